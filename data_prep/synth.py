"""`mmrecall generate`: a generated data set in the KDD Cup 2020 Multimodalities Recall format.

The files are indistinguishable from the competition's by format (shared/KDD_FORMAT.md) and
resemble them in the published statistics; their content is learnable only by a model that
reads the query's words and matches them against the right region of the photo.

The generative story
--------------------
A *product* is a product type (a noun such as "knife", class id 14) and four attribute
values: colour, material, style and audience. Colours, materials and styles come in
sibling groups of look-alikes ("red", "pink", "orange").

A *query* names the product type (usually as its last word, singular or plural; irregular
plurals such as knives, mice, geese, teeth, feet and the audience "children" make
lemmatisation matter) and mentions a random subset of the product's attributes, in varied
word orders, sometimes with filler words ("2020 new", "flagship store") or a leading
"is"/"are". A product is relevant to a query when its type and every mentioned attribute
match.

A *photo* has 1..N detected boxes. The main box carries the product's class label (rarely
mislabelled "others"), is large and central, and its 2048-d feature holds the product's
type, colour, material and style. The other boxes (faces, arms, hair, hands, "others",
other objects, sometimes a second smaller box of the product's class) carry *other*
values of the same attributes, mostly the siblings of the product's values, so that the
mean over the boxes of a red dress photographed beside pink things looks like that of a
pink dress beside red things. Person boxes carry the audience.

Each attribute value, product type and class has a random sparse prototype (siblings share
part of theirs); a box's feature is
    min(7, ReLU(uniform noise - offset + sum_slots strength * prototype * dropout mask))
with per-slot strength jitter, occasional weak slots and one random "clutter" value per box.

Splits: `train.tsv` holds one positive (query, product) pair per row, several products per
query. `valid.tsv` and `testB.tsv` hold candidate lists of ~30 products per query, ~6 of
them answers, the rest hard negatives: mostly the answers' type with exactly one mentioned
colour/material/style changed (usually to a sibling), some of the same type with other
random attributes, some of another type of the same class, a few random. As in the real
data, answers appear in one list only, while negatives of the last kinds are often reused
from a pool shared by all lists of both splits (same product id, same photo).

Every random draw comes from a stream derived from the seed; a product's photo depends
only on (seed, product id, product), so a pooled product renders identically everywhere.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from data_prep import schema
from data_prep.tsv import HEADER_LINE, encode_row

# ---------------------------------------------------------------------------------------
# Output files.
TRAIN_FILE = "train.tsv"
VALID_FILE = "valid.tsv"
VALID_ANSWER_FILE = "valid_answer.json"
TEST_FILE = "testB.tsv"
LABELS_FILE = "multimodal_labels.txt"
LABELS_HEADER = "category_id\tcategory_name"

CLASS_NAMES = (
    "top clothes", "skirt & dress", "bottom clothes", "luggage, leather goods", "shoes",
    "accessories", "snacks, nuts, liquor and tea", "makeup, perfume, beauty tools",
    "bottle drink", "furniture", "stationery", "household electrical appliances",
    "home decoration", "household fabric", "kitchenware", "cleaning tools",
    "storage supplies", "vehicles, riding equipment", "outdoor product", "lighting", "toys",
    "underwear", "digital supplies", "bed linens", "baby products", "personal care",
    "sporting goods", "clothes (accessories, baby clothing)", "others", "human face", "arm",
    "hair", "hand",
)
OTHERS, FACE, ARM, HAIR, HAND = 28, 29, 30, 31, 32
PERSON_CLASSES = (FACE, ARM, HAIR, HAND)

# ---------------------------------------------------------------------------------------
# Vocabulary.


class ProductType(NamedTuple):
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
# Words with no counterpart in the photo; some carry the punctuation real queries have.
FILLERS = (
    "new", "2020 new", "flagship store", "autumn and winter", "autumn/winter", "summer",
    "hot sale", "high quality", "ins", "net red", '"ins" style', "large size",
    "spring & summer", "genuine",
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

# ---------------------------------------------------------------------------------------
# Id ranges.
TRAIN_PRODUCT_BASE = 100_000_000
TRAIN_PRODUCT_SPAN = 3_000_000
TRAIN_QUERY_BASE = 1
VALID_QUERY_BASE = 1_000_000_001
TEST_QUERY_BASE = 2_000_000_001

# Independent random streams, one per purpose (mixed with the seed).
_STREAM_PROTOTYPES, _STREAM_TRAIN, _STREAM_EVAL, _STREAM_RENDER = 11, 12, 13, 14

# ---------------------------------------------------------------------------------------
# Photo model constants.
IMAGE_SIZES = ((600, 600), (750, 750), (1000, 1000), (640, 480), (480, 640), (1080, 1080),
               (338, 209), (80, 61), (500, 500), (700, 525))
SQUARE_800_PROB = 0.75
NUM_BOXES_MEAN_EXTRA = 2.65     # boxes beyond the main one: negative binomial, this mean
NUM_BOXES_DISPERSION = 2.0
CROWDED_PROB = 0.002            # photos with 15..max boxes (the real max is 91)
SAME_CLASS_DISTRACTOR_PROB = 0.12
MISLABEL_PROB = 0.03            # the main box labelled "others"
DISTRACTOR_ATTRIBUTE_PROB = 0.65
SIBLING_PROB = 0.75             # a distractor's / one-off negative's value is a sibling
SLOTS = 7                       # class, type, colour, material, style, audience, clutter
PROTO_SHARED_DIMS = 10          # dims a value shares with its sibling group
PROTO_OWN_DIMS = 10
PROTO_DIMS = PROTO_SHARED_DIMS + PROTO_OWN_DIMS
FEATURE_MAX = 7.0
FEATURE_MIN_NONZERO = 1e-3


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a generated data set (same config, same bytes)."""
    out_dir: str
    seed: int = 0
    train_rows: int = 6000
    valid_queries: int = 100
    test_queries: int = 100
    candidates: int = 30          # candidates per valid/test query (most lists)
    answers: int = 6              # answers per valid/test query (most lists)
    max_boxes_train: int = 91
    max_boxes_eval: int = 30
    noise: float = 1.0            # scales feature noise, strength jitter and clutter
    pool_reuse: float = 0.6       # P(a same-type/random negative comes from the shared pool)
    batch_rows: int = 256         # rows rendered per numpy batch


class Spec(NamedTuple):
    """A product: type index into PRODUCT_TYPES and one value index per ATTRIBUTES."""
    type: int
    colour: int
    material: int
    style: int
    audience: int

    def value(self, attribute: int) -> int:
        return self[1 + attribute]


class Query(NamedTuple):
    query_id: int
    text: str
    type: int
    mentioned: Tuple[Optional[int], ...]   # per ATTRIBUTES: the value, or None if unsaid


class Product(NamedTuple):
    product_id: int
    spec: Spec


class CandidateList(NamedTuple):
    query: Query
    products: List[Product]        # in file order, answers mixed among negatives
    answers: List[int]             # product ids


class Photo(NamedTuple):
    image_h: int
    image_w: int
    boxes: np.ndarray              # float32 [N, 4] whole-pixel top, left, bottom, right
    labels: np.ndarray             # int64 [N]
    features: np.ndarray           # float32 [N, 2048]
    main_index: int                # the box that shows the product


def is_relevant(query: Query, spec: Spec) -> bool:
    """True when `spec` has the query's product type and every attribute it mentions."""
    return spec.type == query.type and all(
        v is None or spec.value(a) == v for a, v in enumerate(query.mentioned))


# ---------------------------------------------------------------------------------------
# Products and queries.


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _type_weights() -> np.ndarray:
    w = np.array([2.0 if t.class_id in FREQUENT_CLASSES else 1.0 for t in PRODUCT_TYPES])
    return w / w.sum()


_TYPE_CDF = np.cumsum(_type_weights())
_TYPES_OF_CLASS: Dict[int, Tuple[int, ...]] = {
    c: tuple(i for i, t in enumerate(PRODUCT_TYPES) if t.class_id == c)
    for c in range(schema.NUM_CLASSES)}


def _material_range(type_index: int) -> Tuple[int, int]:
    """[start, stop) of the MATERIALS a product type can be made of."""
    if PRODUCT_TYPES[type_index].soft:
        return 0, NUM_SOFT_MATERIALS
    return NUM_SOFT_MATERIALS, len(MATERIALS)


def _value_bounds(attribute: int, type_index: int) -> Tuple[int, int]:
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
                fixed: Sequence[Optional[int]] = (None,) * len(ATTRIBUTES)) -> Spec:
    """A random product, with the given type and the non-None `fixed` attribute values."""
    u = rng.random(1 + len(ATTRIBUTES))   # one call: numpy's per-call cost dominates here
    if type_index is None:
        type_index = min(int(np.searchsorted(_TYPE_CDF, u[0], side="right")),
                         len(PRODUCT_TYPES) - 1)
    values = []
    for attribute, value in enumerate(fixed):
        if value is None:
            lo, hi = _value_bounds(attribute, type_index)
            value = min(lo + int(u[1 + attribute] * (hi - lo)), hi - 1)
        values.append(value)
    return Spec(type_index, *values)


# Probabilities that a query mentions each of ATTRIBUTES, has a filler, starts with "is".
MENTION_PROBS = (0.62, 0.55, 0.58, 0.32)
FILLER_PROB = 0.45
LEADING_BE_PROB = 0.04
PLURAL_PROB = 0.35
SHUFFLE_ORDER_PROB = 0.35
NOUN_NOT_LAST_PROB = 0.1
COMMA_PROB = 0.03


def sample_mentions(rng: np.random.Generator, spec: Spec,
                    need_visual: bool) -> Tuple[Optional[int], ...]:
    """Which of the product's attribute values a query says (None = unsaid).

    Args:
      need_visual: mention at least one of colour, material, style (valid/test queries,
        whose hard negatives differ from the answers in one of them).
    """
    said = rng.random(len(ATTRIBUTES)) < np.asarray(MENTION_PROBS)
    if need_visual and not said[list(VISUAL_ATTRIBUTES)].any():
        said[VISUAL_ATTRIBUTES[int(rng.integers(len(VISUAL_ATTRIBUTES)))]] = True
    return tuple(spec.value(a) if said[a] else None for a in range(len(ATTRIBUTES)))


def render_query_text(rng: np.random.Generator, type_index: int,
                      mentioned: Sequence[Optional[int]]) -> str:
    """An English noun phrase naming the product type and the mentioned attributes."""
    ptype = PRODUCT_TYPES[type_index]
    plural = ptype.plural is not None and rng.random() < PLURAL_PROB
    noun = ptype.plural if plural else ptype.singular
    words = []   # modifiers in the canonical order audience, style, colour, material
    if mentioned[AUDIENCE] is not None:
        forms = AUDIENCE_FORMS[mentioned[AUDIENCE]]
        words.append(forms[int(rng.integers(len(forms)))])
    for attribute in (STYLE, COLOUR, MATERIAL):
        if mentioned[attribute] is not None:
            words.append(ATTRIBUTE_VALUES[attribute][mentioned[attribute]])
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


def make_query(rng: np.random.Generator, query_id: int, spec: Spec,
               need_visual: bool) -> Query:
    """A query describing `spec` (its type and a random subset of its attributes)."""
    mentioned = sample_mentions(rng, spec, need_visual)
    return Query(query_id, render_query_text(rng, spec.type, mentioned), spec.type, mentioned)


# ---------------------------------------------------------------------------------------
# Plans: which (query, product) rows each file holds. Cheap; photos are rendered later.


def plan_train(cfg: SynthConfig) -> Iterator[Tuple[Query, Product]]:
    """Yields cfg.train_rows (query, positive product) pairs, ~1.8 products per query.

    Product ids are distinct, drawn from [100M, 100M + max(3M, rows)).
    """
    rng = _rng(cfg.seed, _STREAM_TRAIN)
    span = max(TRAIN_PRODUCT_SPAN, cfg.train_rows)
    product_ids = TRAIN_PRODUCT_BASE + rng.choice(span, size=cfg.train_rows, replace=False)
    row, query_id = 0, TRAIN_QUERY_BASE
    while row < cfg.train_rows:
        query = make_query(rng, query_id, random_spec(rng), need_visual=False)
        for _ in range(min(int(rng.geometric(0.55)), cfg.train_rows - row)):
            spec = random_spec(rng, query.type, query.mentioned)
            yield query, Product(int(product_ids[row]), spec)
            row += 1
        query_id += 1


class _EvalPlanner:
    """Builds valid and test candidate lists, sharing one pool of negatives across both."""

    NEGATIVE_KINDS = ("one_off", "same_type", "same_class", "random")
    NEGATIVE_PROBS = (0.55, 0.2, 0.1, 0.15)

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.rng = _rng(cfg.seed, _STREAM_EVAL)
        self.next_product_id = TRAIN_PRODUCT_BASE + max(TRAIN_PRODUCT_SPAN, cfg.train_rows)
        self.pool: List[Product] = []
        self.pool_by_type: Dict[int, List[Product]] = {}

    def candidate_list(self, query_id: int) -> CandidateList:
        rng, cfg = self.rng, self.cfg
        n_answers, n_candidates = self._list_sizes()
        target = random_spec(rng)
        query = make_query(rng, query_id, target, need_visual=True)
        fresh = [random_spec(rng, query.type, query.mentioned) for _ in range(n_answers)]
        reused: List[Product] = []
        kinds = rng.choice(len(self.NEGATIVE_KINDS), size=n_candidates - n_answers,
                           p=self.NEGATIVE_PROBS)
        for kind in kinds:
            pooled = self._from_pool(query, self.NEGATIVE_KINDS[kind], reused)
            if pooled is not None:
                reused.append(pooled)
            else:
                fresh.append(self._negative(query, self.NEGATIVE_KINDS[kind]))
        ids = self._new_ids(len(fresh))   # random order, so ids do not reveal answers
        new_products = [Product(i, s) for i, s in zip(ids, fresh)]
        products = new_products + reused
        products = [products[i] for i in rng.permutation(len(products))]
        for p in new_products[n_answers:]:
            self.pool.append(p)
            self.pool_by_type.setdefault(p.spec.type, []).append(p)
        return CandidateList(query, products, [p.product_id for p in new_products[:n_answers]])

    def _list_sizes(self) -> Tuple[int, int]:
        rng, cfg = self.rng, self.cfg
        n_answers = cfg.answers
        if cfg.answers > 2 and rng.random() < 0.1:
            n_answers = int(rng.integers(2, cfg.answers))
        n_candidates = cfg.candidates
        if rng.random() < 0.15:
            low = max(n_answers + 2, min(8, cfg.candidates), cfg.candidates // 4)
            n_candidates = int(rng.integers(min(low, cfg.candidates), cfg.candidates + 1))
        return n_answers, max(n_candidates, n_answers + 1)

    def _new_ids(self, n: int) -> List[int]:
        gaps = self.rng.integers(1, 8, size=n)
        ids = self.next_product_id + np.cumsum(gaps)
        self.next_product_id = int(ids[-1]) + 1 if n else self.next_product_id
        return [int(i) for i in self.rng.permutation(ids)]

    def _negative(self, query: Query, kind: str) -> Spec:
        rng = self.rng
        if kind == "same_class":
            others = [t for t in _TYPES_OF_CLASS[PRODUCT_TYPES[query.type].class_id]
                      if t != query.type]
            if others:
                return random_spec(rng, others[int(rng.integers(len(others)))])
            kind = "random"
        if kind in ("same_type", "random"):
            for _ in range(20):
                spec = random_spec(rng, query.type if kind == "same_type" else None)
                if not is_relevant(query, spec):
                    return spec
        # one_off: an answer with exactly one mentioned colour/material/style changed.
        said = [a for a in VISUAL_ATTRIBUTES if query.mentioned[a] is not None]
        changed = said[int(rng.integers(len(said)))]
        values = list(query.mentioned)
        values[changed] = other_value(rng, changed, query.mentioned[changed], query.type)
        return random_spec(rng, query.type, values)

    def _from_pool(self, query: Query, kind: str, taken: List[Product]) -> Optional[Product]:
        if kind not in ("same_type", "random") or self.rng.random() >= self.cfg.pool_reuse:
            return None
        pool = self.pool_by_type.get(query.type, []) if kind == "same_type" else self.pool
        if not pool:
            return None
        product = pool[int(self.rng.integers(len(pool)))]
        if is_relevant(query, product.spec) or product in taken:
            return None
        return product


def plan_eval(cfg: SynthConfig) -> Iterator[Tuple[str, CandidateList]]:
    """Yields ("valid", list) for cfg.valid_queries lists, then ("test", list) likewise."""
    planner = _EvalPlanner(cfg)
    for i in range(cfg.valid_queries):
        yield "valid", planner.candidate_list(VALID_QUERY_BASE + i)
    for i in range(cfg.test_queries):
        yield "test", planner.candidate_list(TEST_QUERY_BASE + i)


# ---------------------------------------------------------------------------------------
# Photos.


class Prototypes:
    """Sparse prototypes of every class, product type and attribute value.

    Row layout of `idx`/`val` (both [P, PROTO_DIMS]): classes, types, then the values of
    each of ATTRIBUTES, then one all-zero row (`zero`) for empty slots. Values of the same
    sibling group (types: the same class) share PROTO_SHARED_DIMS dims and their weights.
    """

    def __init__(self, seed: int):
        rng = _rng(seed, _STREAM_PROTOTYPES)
        # The sibling group of each row, block by block; a class is its own group.
        blocks = [tuple(range(schema.NUM_CLASSES)), tuple(t.class_id for t in PRODUCT_TYPES)]
        blocks += list(ATTRIBUTE_GROUPS)
        self.class_offset = 0
        self.type_offset = schema.NUM_CLASSES
        self.attribute_offset = list(np.cumsum([len(b) for b in blocks])[1:-1])
        self.zero = sum(len(b) for b in blocks)
        idx, val = [], []
        for groups in blocks:
            shared = {g: (rng.choice(schema.FEATURE_DIM, PROTO_SHARED_DIMS, replace=False),
                          _proto_weights(rng, PROTO_SHARED_DIMS)) for g in sorted(set(groups))}
            for g in groups:
                dims, weights = shared[g]
                own = rng.choice(np.setdiff1d(np.arange(schema.FEATURE_DIM), dims),
                                 PROTO_OWN_DIMS, replace=False)
                idx.append(np.concatenate([dims, own]))
                val.append(np.concatenate([weights, _proto_weights(rng, PROTO_OWN_DIMS)]))
        idx.append(np.arange(PROTO_DIMS))     # the zero row: distinct dims, zero weights
        val.append(np.zeros(PROTO_DIMS))
        self.idx = np.asarray(idx, np.int64)  # [P, K] feature dims of each prototype
        self.val = np.asarray(val, np.float32)  # [P, K] their weights

    def row(self, attribute: int, value: int) -> int:
        return self.attribute_offset[attribute] + value

    def dense(self, row: int) -> np.ndarray:
        """float32 [2048]: prototype `row` as a dense vector."""
        out = np.zeros(schema.FEATURE_DIM, np.float32)
        out[self.idx[row]] = self.val[row]
        return out


def _proto_weights(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.lognormal(0.4, 0.45, n)


def _context_probs() -> np.ndarray:
    """[33, 33]: P(class of a non-main box | the product's class)."""
    probs = np.zeros((schema.NUM_CLASSES, schema.NUM_CLASSES))
    for c in range(schema.NUM_CLASSES):
        p = np.full(schema.NUM_CLASSES, 0.16 / 28)
        p[list(PERSON_CLASSES)] = 0.0
        if c in WORN_CLASSES:
            p[OTHERS] += 0.3
            p[[FACE, ARM, HAIR, HAND]] = (0.15, 0.14, 0.12, 0.13)
        else:
            p[OTHERS] += 0.64
            p[HAND] = 0.1
            p[[FACE, ARM, HAIR]] = 0.1 / 3
        probs[c] = p / p.sum()
    return probs


_CONTEXT_PROBS = _context_probs()


def _padded(rows: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """int64 [R, max_len] table (padded with 0) and int64 [R] row lengths."""
    width = max(1, max(len(r) for r in rows))
    table = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    return table, np.array([len(r) for r in rows], np.int64)


def _value_range(attribute: int, value: int) -> range:
    """The values a product with `value` could have had instead (same material kind)."""
    if attribute == MATERIAL:
        soft = value < NUM_SOFT_MATERIALS
        return range(0, NUM_SOFT_MATERIALS) if soft else range(NUM_SOFT_MATERIALS,
                                                                 len(MATERIALS))
    return range(len(ATTRIBUTE_VALUES[attribute]))


def _other_value_tables():
    """Per visual attribute: padded tables of each value's siblings and other values."""
    tables = []
    for attribute in VISUAL_ATTRIBUTES:
        groups = ATTRIBUTE_GROUPS[attribute]
        values = range(len(groups))
        siblings = [[u for u in _value_range(attribute, v) if groups[u] == groups[v] and u != v]
                    for v in values]
        others = [[u for u in _value_range(attribute, v) if u != v] for v in values]
        tables.append((_padded(siblings), _padded(others)))
    return tables


_OTHER_VALUE_TABLES = _other_value_tables()
_TYPES_TABLE, _TYPES_COUNT = _padded([_TYPES_OF_CLASS[c] for c in range(schema.NUM_CLASSES)])
_CONTEXT_CDF = np.cumsum(_CONTEXT_PROBS, axis=1)


def _pick(table: np.ndarray, counts: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per element, table[row, floor(u * count)]: a uniform pick from a padded row."""
    k = np.minimum((u * counts[rows]).astype(np.int64), np.maximum(counts[rows] - 1, 0))
    return table[rows, k]


@functools.lru_cache(maxsize=None)
def _num_boxes_cdf(max_boxes: int) -> np.ndarray:
    """float64 [max_boxes]: P(num_boxes <= i + 1), 1 + negative binomial, capped."""
    r, mean = NUM_BOXES_DISPERSION, NUM_BOXES_MEAN_EXTRA
    p = r / (r + mean)
    log_pmf = [math.lgamma(k + r) - math.lgamma(r) - math.lgamma(k + 1) + r * math.log(p)
               + k * math.log(1 - p) for k in range(max_boxes)]
    cdf = np.cumsum(np.exp(log_pmf))
    cdf[-1] = 1.0
    return cdf


def _num_boxes(head: np.ndarray, max_boxes: int) -> int:
    """Boxes in a photo from two uniforms: mean ~3.8, quartiles 2/3/5, capped at max_boxes."""
    if max_boxes >= 15 and head[0] < CROWDED_PROB:
        return 15 + int(head[1] * (max_boxes - 14))
    return 1 + int(np.searchsorted(_num_boxes_cdf(max_boxes), head[1], side="right"))


def _box_geometry(u: np.ndarray, roles: np.ndarray, labels: np.ndarray,
                  image_h: np.ndarray, image_w: np.ndarray) -> np.ndarray:
    """float32 [B, 4] whole-pixel boxes inside their images, top < bottom, left < right.

    Args:
      u: float [6, B] uniforms.
      roles: int [B], 0 main (large, central), 1 second box of the product's class (small,
        anywhere), 2 anything else (faces and hair towards the top).
      labels: int [B] true classes.
      image_h, image_w: int [B] the size of each box's image, pixels.
    """
    main = roles == 0
    cy = np.where(main, 0.5 + 0.16 * (u[0] - 0.5), 0.1 + 0.8 * u[0])
    cy = np.where(np.isin(labels, (FACE, HAIR)) & ~main, 0.08 + 0.3 * u[0], cy)
    cx = np.where(main, 0.5 + 0.16 * (u[1] - 0.5), 0.1 + 0.8 * u[1])
    bh = np.where(main, 0.5 + 0.55 * u[2],
                  np.where(roles == 1, 0.1 + 0.25 * u[2], 0.05 + 0.4 * u[2] * u[4]))
    bw = np.where(main, 0.4 + 0.6 * u[3],
                  np.where(roles == 1, 0.1 + 0.25 * u[3], 0.05 + 0.4 * u[3] * u[5]))
    top = np.clip(np.round((cy - bh / 2) * image_h), 0, image_h - 1)
    left = np.clip(np.round((cx - bw / 2) * image_w), 0, image_w - 1)
    bottom = np.clip(np.round((cy + bh / 2) * image_h), top + 1, image_h)
    right = np.clip(np.round((cx + bw / 2) * image_w), left + 1, image_w)
    return np.stack([top, left, bottom, right], axis=1).astype(np.float32)


# Columns of the per-box uniforms that follow the F noise and S*K dropout columns.
(_U_LABEL, _U_TYPE, _U_ORDER, _U_CLUTTER_ATTR, _U_CLUTTER_VALUE,
 _U_CLUTTER_STRENGTH) = range(6)
_U_ATTR = 6                                    # 3 visual attributes x (present, sibling, pick)
_U_STRENGTH = _U_ATTR + 3 * len(VISUAL_ATTRIBUTES)   # SLOTS log-strength uniforms
_U_WEAK = _U_STRENGTH + SLOTS
_U_GEOMETRY = _U_WEAK + SLOTS      # 6 geometry uniforms
LAYOUT_UNIFORMS = _U_GEOMETRY + 6
# Per-photo uniforms: crowded?, box count, image size, second box?, image size pick, mislabel?
PHOTO_UNIFORMS = 6


def _photo_rng(seed: int, product_id: int) -> np.random.Generator:
    # A counter-based generator keyed by (seed, product id): independent streams, cheap.
    return np.random.Generator(np.random.Philox(key=(seed << 64) | product_id))


def render_photos(protos: Prototypes, products: Sequence[Product], seed: int,
                  max_boxes: int, noise: float) -> List[Photo]:
    """Renders the photo of each product, vectorised over all boxes of the batch.

    A photo depends only on (seed, product id, spec, max_boxes, noise): each product draws
    its uniforms from its own generator, and everything else is arithmetic on them.
    """
    if not products:
        return []
    width = schema.FEATURE_DIM + SLOTS * PROTO_DIMS + LAYOUT_UNIFORMS
    heads, draws = [], []
    for product in products:
        rng = _photo_rng(seed, product.product_id)
        head = rng.random(PHOTO_UNIFORMS)
        heads.append(head)
        draws.append(rng.random((_num_boxes(head, max_boxes), width), np.float32))
    heads = np.stack(heads)                                          # [P, 6]
    counts = np.array([len(d) for d in draws])                       # [P]
    draws = np.concatenate(draws)                                    # [B, width]
    photo = np.repeat(np.arange(len(products)), counts)              # [B] photo of each box
    first = np.cumsum(counts) - counts                               # [P]
    position = np.arange(len(photo)) - first[photo]                  # [B] box within photo
    u = draws[:, schema.FEATURE_DIM + SLOTS * PROTO_DIMS:].astype(np.float64).T

    specs = np.array([p.spec for p in products], np.int64)           # [P, 5]
    box_spec = specs[photo]                                          # [B, 5]
    cls = np.array([t.class_id for t in PRODUCT_TYPES])[box_spec[:, 0]]
    roles = np.where(position == 0, 0, 2)
    roles[(position == 1) & (heads[photo, 3] < SAME_CLASS_DISTRACTOR_PROB)] = 1
    context = (u[_U_LABEL][:, None] > _CONTEXT_CDF[cls]).sum(axis=1)
    labels = np.where(roles < 2, cls, np.minimum(context, schema.NUM_CLASSES - 1))

    square = heads[:, 2] < SQUARE_800_PROB
    size_pick = np.array(IMAGE_SIZES)[(heads[:, 4] * len(IMAGE_SIZES)).astype(np.int64)]
    image_h = np.where(square, 800, size_pick[:, 0])
    image_w = np.where(square, 800, size_pick[:, 1])
    boxes = _box_geometry(u[_U_GEOMETRY:_U_GEOMETRY + 6], roles, labels,
                          image_h[photo], image_w[photo])

    slots = _box_slots(protos, u, roles, labels, box_spec)
    strength = _slot_strengths(u, roles, noise)

    features = _box_features(protos, draws, slots, strength, noise)
    out_labels = labels.astype(np.int64)
    out_labels[(roles == 0) & (heads[photo, 5] < MISLABEL_PROB)] = OTHERS
    order = np.lexsort((u[_U_ORDER], photo))     # shuffles the boxes within each photo
    photos = []
    for i, product in enumerate(products):
        idx = order[first[i]:first[i] + counts[i]]
        photos.append(Photo(int(image_h[i]), int(image_w[i]), boxes[idx], out_labels[idx],
                            features[idx], int(np.flatnonzero(idx == first[i])[0])))
    return photos


def _box_slots(protos: Prototypes, u: np.ndarray, roles: np.ndarray, labels: np.ndarray,
               box_spec: np.ndarray) -> np.ndarray:
    """int64 [B, SLOTS]: the prototype row each slot of each box adds (protos.zero: none)."""
    n = len(roles)
    slots = np.full((n, SLOTS), protos.zero, np.int64)
    slots[:, 0] = protos.class_offset + labels
    main = roles == 0
    # Type: the product's on the main box; a random type of the box's class elsewhere
    # (for a second box of the product's class, another type of that class if there is one).
    counts = _TYPES_COUNT[labels]
    pick = np.minimum((u[_U_TYPE] * counts).astype(np.int64), np.maximum(counts - 1, 0))
    types = _TYPES_TABLE[labels, pick]
    second = (roles == 1) & (counts > 1)
    alt = np.minimum((u[_U_TYPE] * (counts - 1)).astype(np.int64), np.maximum(counts - 2, 0))
    alt_type = _TYPES_TABLE[labels, alt]
    alt_type = np.where(alt_type == box_spec[:, 0], _TYPES_TABLE[labels, alt + 1], alt_type)
    types = np.where(second, alt_type, types)
    slots[:, 1] = np.where(main, protos.type_offset + box_spec[:, 0],
                           np.where(counts > 0, protos.type_offset + types, protos.zero))
    # Visual attributes: the product's on the main box; other values (mostly siblings) on
    # some of the other boxes, never the product's own.
    for j, attribute in enumerate(VISUAL_ATTRIBUTES):
        own = box_spec[:, 1 + attribute]
        (sib_table, sib_count), (other_table, other_count) = _OTHER_VALUE_TABLES[j]
        present, sibling, pick_u = u[_U_ATTR + 3 * j:_U_ATTR + 3 * j + 3]
        use_sibling = (sibling < SIBLING_PROB) & (sib_count[own] > 0)
        other = np.where(use_sibling, _pick(sib_table, sib_count, own, pick_u),
                         _pick(other_table, other_count, own, pick_u))
        row = protos.attribute_offset[attribute]
        slots[:, 2 + j] = np.where(main, row + own,
                                   np.where(present < DISTRACTOR_ATTRIBUTE_PROB, row + other,
                                            protos.zero))
    person = np.isin(labels, PERSON_CLASSES) | main
    slots[person, 5] = protos.attribute_offset[AUDIENCE] + box_spec[person, 1 + AUDIENCE]
    # Clutter: a random value of a random visual attribute (materials of the product's kind).
    attribute = (u[_U_CLUTTER_ATTR] * len(VISUAL_ATTRIBUTES)).astype(np.int64)
    lo = np.zeros(n, np.int64)
    hi = np.array([len(ATTRIBUTE_VALUES[a]) for a in VISUAL_ATTRIBUTES])[attribute]
    is_material = attribute == VISUAL_ATTRIBUTES.index(MATERIAL)
    soft = box_spec[:, 1 + MATERIAL] < NUM_SOFT_MATERIALS
    lo = np.where(is_material & ~soft, NUM_SOFT_MATERIALS, lo)
    hi = np.where(is_material & soft, NUM_SOFT_MATERIALS, hi)
    value = np.minimum(lo + (u[_U_CLUTTER_VALUE] * (hi - lo)).astype(np.int64), hi - 1)
    offsets = np.array([protos.attribute_offset[a] for a in VISUAL_ATTRIBUTES])
    slots[:, 6] = offsets[attribute] + value
    return slots


def _slot_strengths(u: np.ndarray, roles: np.ndarray, noise: float) -> np.ndarray:
    """float32 [B, SLOTS]: log-uniform jitter, occasional weak slots, faint clutter."""
    jitter = u[_U_STRENGTH:_U_STRENGTH + SLOTS].T                    # [B, S]
    weak = u[_U_WEAK:_U_WEAK + SLOTS].T < 0.08 * noise
    # exp of a uniform with standard deviation 0.25 * noise
    strength = np.exp(0.25 * noise * np.sqrt(3.0) * (2.0 * jitter - 1.0))
    strength = np.where(weak, 0.35 * strength, strength)
    strength[roles == 0, 5] *= 0.5     # the main box shows the audience only faintly
    strength[:, 6] *= 0.35 * noise * u[_U_CLUTTER_STRENGTH]
    return strength.astype(np.float32)


def _box_features(protos: Prototypes, draws: np.ndarray, slots: np.ndarray,
                  strength: np.ndarray, noise: float) -> np.ndarray:
    """float32 [B, 2048]: ReLU(noise + sum of slot prototypes with dropout), clipped.

    Reuses draws[:, :2048] (uniform noise) in place; draws[:, 2048:2048+S*K] are the
    dropout uniforms of each slot's prototype dims.
    """
    features = draws[:, :schema.FEATURE_DIM]
    features *= np.float32(noise)
    features -= np.float32(0.75 * noise)
    rows = np.arange(len(slots))[:, None]
    for s in range(SLOTS):
        start = schema.FEATURE_DIM + s * PROTO_DIMS
        keep = draws[:, start:start + PROTO_DIMS] >= np.float32(0.25)
        # Within one slot a row's prototype dims are distinct, so += drops no update.
        features[rows, protos.idx[slots[:, s]]] += (
            protos.val[slots[:, s]] * strength[:, s:s + 1] * keep)
    np.clip(features, 0.0, FEATURE_MAX, out=features)
    features[features < FEATURE_MIN_NONZERO] = 0.0
    return features


# ---------------------------------------------------------------------------------------
# Writing.


@contextlib.contextmanager
def _atomic_output(path: str):
    """Opens a temp file beside `path` for writing; renames it to `path` on success."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp creates 0600; give the usual mode
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_tsv(path: str, rows: Iterable[Tuple[Query, Product]], protos: Prototypes,
              cfg: SynthConfig, max_boxes: int) -> int:
    """Streams (query, product) rows to a competition TSV at `path`; returns the row count."""
    count = 0
    with _atomic_output(path) as f:
        f.write(HEADER_LINE + "\n")
        for batch in _batches(rows, cfg.batch_rows):
            photos = render_photos(protos, [p for _, p in batch], cfg.seed, max_boxes,
                                   cfg.noise)
            lines = [encode_row(product.product_id, photo.image_h, photo.image_w,
                                photo.boxes, photo.features, photo.labels, query.text,
                                query.query_id)
                     for (query, product), photo in zip(batch, photos)]
            f.write("\n".join(lines) + "\n")
            count += len(batch)
    return count


def write_labels(path: str) -> None:
    """Writes multimodal_labels.txt: a header line, then `id<TAB>name` for the 33 classes."""
    with _atomic_output(path) as f:
        f.write(LABELS_HEADER + "\n")
        f.writelines(f"{i}\t{name}\n" for i, name in enumerate(CLASS_NAMES))


def _eval_rows(lists: Iterable[CandidateList],
               answers: Optional[Dict[str, List[int]]]) -> Iterator[Tuple[Query, Product]]:
    for cl in lists:
        if answers is not None:
            answers[str(cl.query.query_id)] = cl.answers
        for product in cl.products:
            yield cl.query, product


def generate(cfg: SynthConfig) -> Dict[str, int]:
    """Writes all five files into cfg.out_dir; returns rows written per TSV file."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    protos = Prototypes(cfg.seed)
    write_labels(os.path.join(cfg.out_dir, LABELS_FILE))
    counts = {TRAIN_FILE: write_tsv(os.path.join(cfg.out_dir, TRAIN_FILE), plan_train(cfg),
                                    protos, cfg, cfg.max_boxes_train)}
    lists = plan_eval(cfg)
    valid = (cl for split, cl in _take(lists, cfg.valid_queries))
    answers: Dict[str, List[int]] = {}
    counts[VALID_FILE] = write_tsv(os.path.join(cfg.out_dir, VALID_FILE),
                                   _eval_rows(valid, answers), protos, cfg, cfg.max_boxes_eval)
    with _atomic_output(os.path.join(cfg.out_dir, VALID_ANSWER_FILE)) as f:
        json.dump(answers, f)
    test = (cl for split, cl in _take(lists, cfg.test_queries))
    counts[TEST_FILE] = write_tsv(os.path.join(cfg.out_dir, TEST_FILE), _eval_rows(test, None),
                                  protos, cfg, cfg.max_boxes_eval)
    return counts


def _take(items: Iterator, n: int) -> Iterator:
    for _ in range(n):
        yield next(items)


# ---------------------------------------------------------------------------------------
# Command line.


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    d = SynthConfig(out_dir="")
    parser = argparse.ArgumentParser(
        prog="mmrecall generate",
        description="Write a generated data set in the exact format of the KDD Cup 2020 "
                    "Multimodalities Recall files: train.tsv, valid.tsv, valid_answer.json, "
                    "testB.tsv (no answers) and multimodal_labels.txt. Deterministic for a "
                    "seed. The defaults make a small set for a quick end-to-end run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (created if missing; files are replaced)")
    parser.add_argument("--seed", type=_int_at_least(0), default=d.seed,
                        help="random seed, 0 <= seed < 2**63")
    parser.add_argument("--train-rows", type=_int_at_least(0), default=d.train_rows,
                        help="rows of train.tsv, one positive (query, product) pair each")
    parser.add_argument("--valid-queries", type=_int_at_least(0), default=d.valid_queries,
                        help="queries (candidate lists) in valid.tsv")
    parser.add_argument("--test-queries", type=_int_at_least(0), default=d.test_queries,
                        help="queries (candidate lists) in testB.tsv")
    parser.add_argument("--candidates", type=_int_at_least(2), default=d.candidates,
                        help="candidates per valid/test query (most lists; some are shorter)")
    parser.add_argument("--answers", type=_int_at_least(1), default=d.answers,
                        help="answers per valid/test query (most lists; some have 2..N-1)")
    parser.add_argument("--max-boxes-train", type=_int_at_least(1), default=d.max_boxes_train,
                        help="most boxes in a train photo")
    parser.add_argument("--max-boxes-eval", type=_int_at_least(1), default=d.max_boxes_eval,
                        help="most boxes in a valid/test photo")
    parser.add_argument("--noise", type=_float_in(0.0, 10.0), default=d.noise,
                        help="feature noise scale (0 = clean prototypes); higher is harder")
    parser.add_argument("--pool-reuse", type=_float_in(0.0, 1.0), default=d.pool_reuse,
                        help="probability that a same-type or random negative is reused from "
                             "the pool shared by all valid/test lists (the real data's "
                             "'answers appear in one list only' artefact); 0 disables")
    parser.add_argument("--batch-rows", type=_int_at_least(1), default=d.batch_rows,
                        help="rows rendered per numpy batch (memory vs. speed)")
    return parser


def config_from_args(argv: Sequence[str]) -> SynthConfig:
    """Parses command-line arguments into a SynthConfig (argparse errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.seed >= 2 ** 63:
        parser.error(f"--seed must be < 2**63, got {args.seed}")
    if args.candidates <= args.answers:
        parser.error(f"--candidates ({args.candidates}) must exceed --answers ({args.answers})")
    return SynthConfig(
        out_dir=args.out, seed=args.seed, train_rows=args.train_rows,
        valid_queries=args.valid_queries, test_queries=args.test_queries,
        candidates=args.candidates, answers=args.answers,
        max_boxes_train=args.max_boxes_train, max_boxes_eval=args.max_boxes_eval,
        noise=args.noise, pool_reuse=args.pool_reuse, batch_rows=args.batch_rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mmrecall generate`: writes the data set; prints rows, MB and rate to stderr."""
    cfg = config_from_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    counts = generate(cfg)
    seconds = time.perf_counter() - start
    rows = sum(counts.values())
    size = sum(os.path.getsize(os.path.join(cfg.out_dir, name)) for name in counts)
    print(f"mmrecall generate: {', '.join(f'{n} {c} rows' for n, c in counts.items())} in "
          f"{seconds:.1f}s ({rows / max(seconds, 1e-9):.0f} rows/s, "
          f"{size / 1e6 / max(seconds, 1e-9):.0f} MB/s) -> {cfg.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
