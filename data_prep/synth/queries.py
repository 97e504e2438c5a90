"""Query text: which of a product's values a query states, and how it words them."""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from data_prep.synth.world import (
    ATTRIBUTE_VALUES, ATTRIBUTES, AUDIENCE, AUDIENCE_FORMS, COLOUR, MATERIAL, PRODUCT_TYPES,
    STYLE, VISUAL_ATTRIBUTES, Query, Spec)

# Words with no counterpart in the photo; some carry the punctuation real queries have.
FILLERS = (
    "new", "2020 new", "flagship store", "autumn and winter", "autumn/winter", "summer",
    "hot sale", "high quality", "ins", "net red", '"ins" style', "large size",
    "spring & summer", "genuine",
)

# Other words for an attribute value or a product type, written with probability
# SynthConfig.paraphrase. Each lemmatises to itself (nouns: plural and singular to the
# singular), to no other concept's lemma (a test checks both).
VALUE_PARAPHRASES: Dict[str, Tuple[str, ...]] = {
    "red": ("scarlet", "crimson"), "pink": ("rosy",), "orange": ("tangerine",),
    "blue": ("azure",), "navy": ("indigo",), "purple": ("violet", "lilac"),
    "black": ("ebony",), "grey": ("gray",), "white": ("ivory",),
    "brown": ("chocolate", "coffee"), "beige": ("cream",), "khaki": ("sand",),
    "green": ("emerald",), "yellow": ("lemon",), "gold": ("golden",),
    "linen": ("flax",), "silk": ("silky",), "wool": ("woollen",), "velvet": ("velour",),
    "suede": ("nubuck",), "wooden": ("wood", "timber"), "rattan": ("wicker",),
    "metal": ("metallic", "iron"), "stainless steel": ("steel",),
    "aluminum": ("aluminium",), "glass": ("crystal",), "ceramic": ("porcelain",),
    "vintage": ("antique",), "classic": ("timeless",), "casual": ("everyday",),
    "sporty": ("athletic",), "loose": ("oversized",), "elegant": ("chic",),
    "minimalist": ("simple",), "nordic": ("scandinavian",), "cute": ("lovely",),
    "cartoon": ("anime",),
}
# Product type singular -> its other (singular, plural) nouns.
NOUN_PARAPHRASES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "sweater": (("pullover", "pullovers"), ("jumper", "jumpers")),
    "dress": (("gown", "gowns"),), "trousers": (("pants", "pants"),),
    "handbag": (("purse", "purses"), ("tote", "totes")),
    "sneaker": (("trainer", "trainers"),), "scarf": (("shawl", "shawls"),),
    "hat": (("cap", "caps"),), "watch": (("wristwatch", "wristwatches"),),
    "sofa": (("couch", "couches"),), "notebook": (("notepad", "notepads"),),
    "rug": (("carpet", "carpets"),), "pan": (("skillet", "skillets"),),
    "cup": (("mug", "mugs"),), "bicycle": (("bike", "bikes"),),
    "lamp": (("lantern", "lanterns"),),
    "headphone": (("headset", "headsets"), ("earphone", "earphones")),
    "quilt": (("duvet", "duvets"), ("comforter", "comforters")),
    "stroller": (("pram", "prams"), ("pushchair", "pushchairs")),
    "racket": (("racquet", "racquets"),),
}

# Probabilities that a query mentions each of ATTRIBUTES, has a filler, starts with "is".
MENTION_PROBS = (0.62, 0.55, 0.58, 0.32)
FILLER_PROB = 0.45
LEADING_BE_PROB = 0.04
PLURAL_PROB = 0.35
SHUFFLE_ORDER_PROB = 0.35
NOUN_NOT_LAST_PROB = 0.1
COMMA_PROB = 0.03


def sample_mentions(rng: np.random.Generator, spec: Spec, need_visual: bool,
                    mention_scale: float = 1.0) -> Tuple[Optional[int], ...]:
    """Which of the product's attribute values a query says (None = unsaid).

    Args:
      need_visual: mention at least one of colour, material, style (valid/test queries,
        whose hard negatives differ from the answers in one of them).
      mention_scale: multiplies MENTION_PROBS (each capped at 1).
    """
    probs = np.minimum(1.0, np.asarray(MENTION_PROBS) * mention_scale)
    said = rng.random(len(ATTRIBUTES)) < probs
    if need_visual and not said[list(VISUAL_ATTRIBUTES)].any():
        said[VISUAL_ATTRIBUTES[int(rng.integers(len(VISUAL_ATTRIBUTES)))]] = True
    return tuple(spec.value(a) if said[a] else None for a in range(len(ATTRIBUTES)))


def _paraphrase_index(rng: np.random.Generator, options: Sequence, paraphrase: float) -> int:
    """-1 (keep the plain word), or which of `options` to write instead (P = paraphrase).

    Draws nothing when paraphrase is 0, so the plain wording's random stream is unchanged.
    """
    if paraphrase <= 0.0 or not options or rng.random() >= paraphrase:
        return -1
    return int(rng.integers(len(options)))


def _value_word(rng: np.random.Generator, word: str, paraphrase: float) -> str:
    options = VALUE_PARAPHRASES.get(word, ())
    pick = _paraphrase_index(rng, options, paraphrase)
    return word if pick < 0 else options[pick]


def render_query_text(rng: np.random.Generator, type_index: int,
                      mentioned: Sequence[Optional[int]], paraphrase: float = 0.0) -> str:
    """An English noun phrase naming the product type and the mentioned attributes.

    Args:
      paraphrase: P(the noun and each colour/material/style are written with another word
        from NOUN_PARAPHRASES / VALUE_PARAPHRASES, where they have one).
    """
    ptype = PRODUCT_TYPES[type_index]
    plural = ptype.plural is not None and rng.random() < PLURAL_PROB
    noun = ptype.plural if plural else ptype.singular
    nouns = NOUN_PARAPHRASES.get(ptype.singular, ())
    pick = _paraphrase_index(rng, nouns, paraphrase)
    if pick >= 0:
        noun = nouns[pick][1] if plural else nouns[pick][0]
    words = []   # modifiers in the canonical order audience, style, colour, material
    if mentioned[AUDIENCE] is not None:
        forms = AUDIENCE_FORMS[mentioned[AUDIENCE]]
        words.append(forms[int(rng.integers(len(forms)))])
    for attribute in (STYLE, COLOUR, MATERIAL):
        if mentioned[attribute] is not None:
            words.append(_value_word(rng, ATTRIBUTE_VALUES[attribute][mentioned[attribute]],
                                     paraphrase))
    if len(words) > 1 and rng.random() < SHUFFLE_ORDER_PROB:
        words = [words[i] for i in rng.permutation(len(words))]
    if len(words) > 1 and rng.random() < COMMA_PROB:
        words[0] += ","
    if rng.random() < FILLER_PROB:
        filler = FILLERS[int(rng.integers(len(FILLERS)))]
        words.insert(int(rng.integers(len(words) + 1)), filler)
    if words and rng.random() < NOUN_NOT_LAST_PROB:
        words.insert(int(rng.integers(len(words))), noun)
    else:
        words.append(noun)
    if rng.random() < LEADING_BE_PROB:
        words.insert(0, "are" if plural else "is")
    return " ".join(words)


def make_query(rng: np.random.Generator, query_id: int, spec: Spec, need_visual: bool,
               mention_scale: float = 1.0, paraphrase: float = 0.0) -> Query:
    """A query describing `spec` (its type and a random subset of its attributes).

    `mention_scale` and `paraphrase` are as in sample_mentions and render_query_text.
    """
    mentioned = sample_mentions(rng, spec, need_visual, mention_scale)
    text = render_query_text(rng, spec.type, mentioned, paraphrase)
    return Query(query_id, text, spec.type, mentioned)

