"""The generator's world: classes, product types, attribute values, products and relevance.

A product (`Spec`) is a product type and one value of each of ATTRIBUTES; colours,
materials and styles come in sibling groups of look-alikes. A query (`Query`) names a type
and states some of its attribute values; a product is relevant when it has the query's type
and every stated value.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from data_prep import schema

CLASS_NAMES = schema.CLASS_NAMES
OTHERS, FACE, ARM, HAIR, HAND = 28, 29, 30, 31, 32
PERSON_CLASSES = (FACE, ARM, HAIR, HAND)


class ProductType(NamedTuple):
    """A noun of the catalogue and the detector class its photos are labelled with."""
    singular: str
    plural: Optional[str]   # None: the plural is never written (see below)
    class_id: int
    soft: bool              # textile materials (True) or hard materials (False)


# Plurals are only listed where data_prep.text.normalize_query maps them to the singular's
# lemma (a test checks this). The lookup lemmatizer reads "leaves", "shelves", "hoodies",
# "leggings" as other words, so those types appear in the singular only or not at all.
PRODUCT_TYPES = (
    ProductType("shirt", "shirts", 0, True), ProductType("sweater", "sweaters", 0, True),
    ProductType("jacket", "jackets", 0, True), ProductType("coat", "coats", 0, True),
    ProductType("blouse", "blouses", 0, True),
    ProductType("dress", "dresses", 1, True), ProductType("skirt", "skirts", 1, True),
    ProductType("jeans", "jeans", 2, True), ProductType("trousers", "trousers", 2, True),
    ProductType("handbag", "handbags", 3, True), ProductType("wallet", "wallets", 3, True),
    ProductType("suitcase", "suitcases", 3, False),
    ProductType("backpack", "backpacks", 3, True),
    ProductType("shoe", "shoes", 4, True), ProductType("sneaker", "sneakers", 4, True),
    ProductType("sandal", "sandals", 4, True), ProductType("boot", "boots", 4, True),
    ProductType("slipper", "slippers", 4, True),
    ProductType("scarf", "scarves", 5, True), ProductType("earring", "earrings", 5, False),
    ProductType("necklace", "necklaces", 5, False), ProductType("hat", "hats", 5, True),
    ProductType("watch", "watches", 5, False),
    ProductType("tea", None, 6, False), ProductType("nut", "nuts", 6, False),
    ProductType("lipstick", "lipsticks", 7, False), ProductType("brush", "brushes", 7, False),
    ProductType("bottle", "bottles", 8, False), ProductType("flask", "flasks", 8, False),
    ProductType("sofa", "sofas", 9, True), ProductType("chair", "chairs", 9, False),
    ProductType("table", "tables", 9, False), ProductType("shelf", None, 9, False),
    ProductType("foot", "feet", 9, False),
    ProductType("pen", "pens", 10, False), ProductType("notebook", "notebooks", 10, False),
    ProductType("fan", "fans", 11, False), ProductType("heater", "heaters", 11, False),
    ProductType("kettle", "kettles", 11, False),
    ProductType("vase", "vases", 12, False), ProductType("clock", "clocks", 12, False),
    ProductType("leaf", None, 12, False),
    ProductType("curtain", "curtains", 13, True), ProductType("cushion", "cushions", 13, True),
    ProductType("rug", "rugs", 13, True),
    ProductType("knife", "knives", 14, False), ProductType("pan", "pans", 14, False),
    ProductType("bowl", "bowls", 14, False), ProductType("plate", "plates", 14, False),
    ProductType("cup", "cups", 14, False),
    ProductType("mop", "mops", 15, False), ProductType("broom", "brooms", 15, False),
    ProductType("box", "boxes", 16, False), ProductType("basket", "baskets", 16, False),
    ProductType("bicycle", "bicycles", 17, False), ProductType("helmet", "helmets", 17, False),
    ProductType("tent", "tents", 18, True),
    ProductType("lamp", "lamps", 19, False),
    ProductType("doll", "dolls", 20, True), ProductType("goose", "geese", 20, True),
    ProductType("wolf", "wolves", 20, True), ProductType("tooth", "teeth", 20, False),
    ProductType("bra", "bras", 21, True), ProductType("sock", "socks", 21, True),
    ProductType("mouse", "mice", 22, False), ProductType("keyboard", "keyboards", 22, False),
    ProductType("headphone", "headphones", 22, False),
    ProductType("quilt", "quilts", 23, True), ProductType("pillowcase", "pillowcases", 23, True),
    ProductType("sheet", "sheets", 23, True),
    ProductType("stroller", "strollers", 24, False), ProductType("bib", "bibs", 24, True),
    ProductType("toothbrush", "toothbrushes", 25, False),
    ProductType("comb", "combs", 25, False), ProductType("razor", "razors", 25, False),
    ProductType("dumbbell", "dumbbells", 26, False), ProductType("racket", "rackets", 26, False),
    ProductType("glove", "gloves", 27, True), ProductType("belt", "belts", 27, True),
)
# Clothing is over-represented in the real data; these classes are drawn twice as often.
FREQUENT_CLASSES = (0, 1, 2, 4, 5, 27)
WORN_CLASSES = (0, 1, 2, 4, 5, 21, 27)

COLOUR_GROUPS = (
    ("red", "pink", "orange"), ("blue", "navy", "purple"), ("black", "grey", "white"),
    ("brown", "beige", "khaki"), ("green", "yellow", "gold"),
)
SOFT_MATERIAL_GROUPS = (
    ("cotton", "linen", "silk"), ("wool", "velvet", "knitted"), ("denim", "leather", "suede"),
)
HARD_MATERIAL_GROUPS = (
    ("wooden", "bamboo", "rattan"), ("metal", "stainless steel", "aluminum"),
    ("plastic", "glass", "ceramic"),
)
STYLE_GROUPS = (
    ("retro", "vintage", "classic"), ("casual", "sporty", "loose"),
    ("elegant", "minimalist", "nordic"), ("cute", "korean", "cartoon"),
)
# Each audience value has several written forms (lemmas differ for "ladies", "kids").
AUDIENCE_FORMS = (
    ("women", "women's", "woman", "ladies"), ("men", "men's", "man"),
    ("children", "children's", "child", "kids"), ("baby", "infant"), ("student", "students"),
)

ATTRIBUTES = ("colour", "material", "style", "audience")
COLOUR, MATERIAL, STYLE, AUDIENCE = range(4)
VISUAL_ATTRIBUTES = (COLOUR, MATERIAL, STYLE)   # the ones hard negatives change


def _flatten(groups: Sequence[Sequence[str]]) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    names = tuple(v for g in groups for v in g)
    group_of = tuple(i for i, g in enumerate(groups) for _ in g)
    return names, group_of


COLOURS, COLOUR_GROUP = _flatten(COLOUR_GROUPS)
MATERIALS, MATERIAL_GROUP = _flatten(SOFT_MATERIAL_GROUPS + HARD_MATERIAL_GROUPS)
NUM_SOFT_MATERIALS = sum(len(g) for g in SOFT_MATERIAL_GROUPS)
STYLES, STYLE_GROUP = _flatten(STYLE_GROUPS)
ATTRIBUTE_VALUES = (COLOURS, MATERIALS, STYLES, tuple(f[0] for f in AUDIENCE_FORMS))
ATTRIBUTE_GROUPS = (COLOUR_GROUP, MATERIAL_GROUP, STYLE_GROUP,
                    tuple(range(len(AUDIENCE_FORMS))))

SIBLING_PROB = 0.75             # a distractor's / one-off negative's value is a sibling


class Spec(NamedTuple):
    """A product: type index into PRODUCT_TYPES and one value index per ATTRIBUTES."""
    type: int
    colour: int
    material: int
    style: int
    audience: int

    def value(self, attribute: int) -> int:
        """The value index of one of ATTRIBUTES."""
        return self[1 + attribute]


class Query(NamedTuple):
    """A query: its id, its text, the product type it names and the values it states."""
    query_id: int
    text: str
    type: int
    mentioned: Tuple[Optional[int], ...]   # per ATTRIBUTES: the value, or None if unsaid


class Product(NamedTuple):
    """A catalogue item: its id (the TSV's product_id), what it is, and its photo's decoy.

    `decoy`, per ATTRIBUTES, is a value another object in the photo shows (None: no decoy
    box, or the attribute has none); it belongs to the product, so a pooled product keeps
    it in every list.
    """
    product_id: int
    spec: Spec
    decoy: Optional[Tuple[Optional[int], ...]] = None


def is_relevant(query: Query, spec: Spec) -> bool:
    """True when `spec` has the query's product type and every attribute it mentions."""
    return spec.type == query.type and all(
        v is None or spec.value(a) == v for a, v in enumerate(query.mentioned))


def _type_weights() -> np.ndarray:
    """float64 [len(PRODUCT_TYPES)]: the probability of drawing each product type."""
    w = np.array([2.0 if t.class_id in FREQUENT_CLASSES else 1.0 for t in PRODUCT_TYPES])
    return w / w.sum()


_TYPE_CDF = np.cumsum(_type_weights())


def _type_order() -> Tuple[int, ...]:
    """Product type indices, round-robin over classes: the first N cover most classes."""
    by_class: Dict[int, List[int]] = {}
    for i, t in enumerate(PRODUCT_TYPES):
        by_class.setdefault(t.class_id, []).append(i)
    rounds = max(len(v) for v in by_class.values())
    return tuple(v[r] for r in range(rounds) for _, v in sorted(by_class.items()) if r < len(v))


TYPE_ORDER = _type_order()


def types_in_use(num_types: int) -> Tuple[int, ...]:
    """The indices of the first `num_types` product types of TYPE_ORDER, ascending."""
    if not 1 <= num_types <= len(PRODUCT_TYPES):
        raise ValueError(f"num_types must be in [1, {len(PRODUCT_TYPES)}], got {num_types}")
    return tuple(sorted(TYPE_ORDER[:num_types]))


def type_cdf(num_types: int = len(PRODUCT_TYPES)) -> np.ndarray:
    """float64 [len(PRODUCT_TYPES)]: the CDF random_spec draws types from, over the
    types in use (all types: the catalogue's frequencies; fewer: the same, renormalised)."""
    if num_types == len(PRODUCT_TYPES):
        return _TYPE_CDF
    w = np.zeros(len(PRODUCT_TYPES))
    used = list(types_in_use(num_types))
    w[used] = _type_weights()[used]
    cdf = np.cumsum(w / w.sum())
    cdf[used[-1]:] = 1.0     # a uniform draw never lands past the last type in use
    return cdf

# class id -> indices of its PRODUCT_TYPES (empty for person and "others" classes).
TYPES_OF_CLASS: Dict[int, Tuple[int, ...]] = {
    c: tuple(i for i, t in enumerate(PRODUCT_TYPES) if t.class_id == c)
    for c in range(schema.NUM_CLASSES)}


def _material_range(type_index: int) -> Tuple[int, int]:
    """[start, stop) of the MATERIALS a product type can be made of."""
    if PRODUCT_TYPES[type_index].soft:
        return 0, NUM_SOFT_MATERIALS
    return NUM_SOFT_MATERIALS, len(MATERIALS)


def value_bounds(attribute: int, type_index: int) -> Tuple[int, int]:
    """[start, stop) of the values of `attribute` a product type can have."""
    if attribute == MATERIAL:
        return _material_range(type_index)
    return 0, len(ATTRIBUTE_VALUES[attribute])


def other_value(rng: np.random.Generator, attribute: int, value: int, type_index: int,
                sibling_prob: float = SIBLING_PROB) -> int:
    """A value of `attribute` different from `value`: a sibling with `sibling_prob`."""
    groups = ATTRIBUTE_GROUPS[attribute]
    if attribute == MATERIAL:
        pool = range(*_material_range(type_index))
    else:
        pool = range(len(groups))
    siblings = [v for v in pool if groups[v] == groups[value] and v != value]
    if siblings and rng.random() < sibling_prob:
        return siblings[int(rng.integers(len(siblings)))]
    others = [v for v in pool if v != value]
    return others[int(rng.integers(len(others)))]


def random_spec(rng: np.random.Generator, type_index: Optional[int] = None,
                fixed: Sequence[Optional[int]] = (None,) * len(ATTRIBUTES),
                types: np.ndarray = _TYPE_CDF) -> Spec:
    """A random product, with the given type and the non-None `fixed` attribute values.

    Args:
      types: float64 [len(PRODUCT_TYPES)], the CDF a None `type_index` is drawn from
        (type_cdf()).
    """
    u = rng.random(1 + len(ATTRIBUTES))   # one call: numpy's per-call cost dominates here
    if type_index is None:
        type_index = min(int(np.searchsorted(types, u[0], side="right")),
                         len(PRODUCT_TYPES) - 1)
    values = []
    for attribute, value in enumerate(fixed):
        if value is None:
            lo, hi = value_bounds(attribute, type_index)
            value = min(lo + int(u[1 + attribute] * (hi - lo)), hi - 1)
        values.append(value)
    return Spec(type_index, *values)

