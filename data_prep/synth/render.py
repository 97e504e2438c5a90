"""Photos: the detected boxes of a product's photo, their geometry, labels and features.

Each attribute value, product type and class has a random sparse prototype (siblings share
part of theirs); a box's feature is
    min(7, ReLU(uniform noise - offset + sum_slots strength * prototype * dropout mask))
with per-slot strength jitter, occasional weak slots and one random "clutter" value per box.
The main box shows the product; the other boxes (faces, arms, hair, hands, "others", other
objects, sometimes a second smaller box of the product's class) carry other values of the
same attributes, mostly siblings of the product's.

Legend: M photos of a render batch, N boxes of all its photos together, F = 2048 region
feature width, S = SLOTS slots per box, R prototype rows, L = PROTO_DIMS dims per prototype.
"""
import functools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from data_prep import schema
from data_prep.synth.config import STREAM_PROTOTYPES, stream_rng
from data_prep.synth.world import (
    ARM, ATTRIBUTE_GROUPS, ATTRIBUTE_VALUES, AUDIENCE, FACE, HAIR, HAND, MATERIAL, MATERIALS,
    NUM_SOFT_MATERIALS, OTHERS, PERSON_CLASSES, PRODUCT_TYPES, SIBLING_PROB, TYPES_OF_CLASS,
    VISUAL_ATTRIBUTES, WORN_CLASSES, Product)

IMAGE_SIZES = ((600, 600), (750, 750), (1000, 1000), (640, 480), (480, 640), (1080, 1080),
               (338, 209), (80, 61), (500, 500), (700, 525))
SQUARE_800_PROB = 0.75
NUM_BOXES_MEAN_EXTRA = 2.65     # boxes beyond the main one: negative binomial, this mean
NUM_BOXES_DISPERSION = 2.0
CROWDED_PROB = 0.002            # photos with 15..max boxes (the real max is 91)
SAME_CLASS_DISTRACTOR_PROB = 0.12
MISLABEL_PROB = 0.03            # the main box labelled "others"
DISTRACTOR_ATTRIBUTE_PROB = 0.65
SLOTS = 7                       # class, type, colour, material, style, audience, clutter
PROTO_SHARED_DIMS = 10          # dims a value shares with its sibling group
PROTO_OWN_DIMS = 10
PROTO_DIMS = PROTO_SHARED_DIMS + PROTO_OWN_DIMS
FEATURE_MAX = 7.0
FEATURE_MIN_NONZERO = 1e-3


class Photo(NamedTuple):
    """One product photo as the TSV stores it, plus which box shows the product."""
    image_h: int
    image_w: int
    boxes: np.ndarray              # float32 [N, 4] whole-pixel top, left, bottom, right
    labels: np.ndarray             # int64 [N]
    features: np.ndarray           # float32 [N, 2048]
    main_index: int                # the box that shows the product


class Prototypes:
    """Sparse prototypes of every class, product type and attribute value.

    Row layout of `idx`/`val` (both [R, L]): classes, types, then the values of
    each of ATTRIBUTES, then one all-zero row (`zero`) for empty slots. Values of the same
    sibling group (types: the same class) share PROTO_SHARED_DIMS dims and their weights.
    """

    def __init__(self, seed: int):
        rng = stream_rng(seed, STREAM_PROTOTYPES)
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
        self.idx = np.asarray(idx, np.int64)  # [R, L] feature dims of each prototype
        self.val = np.asarray(val, np.float32)  # [R, L] their weights

    def row(self, attribute: int, value: int) -> int:
        """The prototype row of one value of one of ATTRIBUTES."""
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
_TYPES_TABLE, _TYPES_COUNT = _padded([TYPES_OF_CLASS[c] for c in range(schema.NUM_CLASSES)])
_CONTEXT_CDF = np.cumsum(_CONTEXT_PROBS, axis=1)


def _pick(table: np.ndarray, counts: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per element, table[row, floor(u * count)]: a uniform pick from a padded row."""
    k = np.minimum((u * counts[rows]).astype(np.int64), np.maximum(counts[rows] - 1, 0))
    return table[rows, k]


@functools.lru_cache(maxsize=None)
def _num_boxes_cdf(max_boxes: int, mean: float) -> np.ndarray:
    """float64 [max_boxes]: P(num_boxes <= i + 1), 1 + negative binomial of `mean`, capped."""
    if mean <= 0.0:
        return np.ones(max_boxes)
    r = NUM_BOXES_DISPERSION
    p = r / (r + mean)
    log_pmf = [math.lgamma(k + r) - math.lgamma(r) - math.lgamma(k + 1) + r * math.log(p)
               + k * math.log(1 - p) for k in range(max_boxes)]
    cdf = np.cumsum(np.exp(log_pmf))
    cdf[-1] = 1.0
    return cdf


def _num_boxes(head: np.ndarray, max_boxes: int, mean: float) -> int:
    """Boxes in a photo from two uniforms, capped at max_boxes: 1 + about `mean` more
    (the default mean 2.65 gives quartiles 2/3/5), rarely a crowded photo of 15 or more."""
    if max_boxes >= 15 and head[0] < CROWDED_PROB:
        return 15 + int(head[1] * (max_boxes - 14))
    return 1 + int(np.searchsorted(_num_boxes_cdf(max_boxes, mean), head[1], side="right"))


def _box_geometry(u: np.ndarray, roles: np.ndarray, labels: np.ndarray,
                  image_h: np.ndarray, image_w: np.ndarray) -> np.ndarray:
    """float32 [N, 4] whole-pixel boxes inside their images, top < bottom, left < right.

    Args:
      u: float [6, N] uniforms.
      roles: int [N], 0 main (large, central), 1 second box of the product's class (small,
        anywhere), 2 anything else (faces and hair towards the top).
      labels: int [N] true classes.
      image_h, image_w: int [N] the size of each box's image, pixels.
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


# Columns of the per-box uniforms that follow the F noise and S*L dropout columns.
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
                  max_boxes: int, noise: float, *, boxes_mean: float = NUM_BOXES_MEAN_EXTRA,
                  shown: float = 1.0) -> List[Photo]:
    """Renders the photo of each product, vectorised over all boxes of the batch.

    A photo depends only on (seed, product, max_boxes, noise, boxes_mean, shown): each
    product draws its uniforms from its own generator, and everything else is arithmetic
    on them.

    Args:
      max_boxes: the most boxes a photo has.
      noise: scales feature noise, strength jitter and clutter (SynthConfig.noise).
      boxes_mean: mean boxes beyond the main one.
      shown: P(the main box shows each of the product's colour, material, style).
    Returns:
      One Photo per product. A product with a decoy has at least two boxes (max_boxes
      permitting); its second box (before shuffling) shows the decoy values.
    """
    if not products:
        return []
    width = schema.FEATURE_DIM + SLOTS * PROTO_DIMS + LAYOUT_UNIFORMS
    heads, draws = [], []
    for product in products:
        rng = _photo_rng(seed, product.product_id)
        head = rng.random(PHOTO_UNIFORMS)
        heads.append(head)
        n = _num_boxes(head, max_boxes, boxes_mean)
        if product.decoy is not None:
            n = max(n, min(2, max_boxes))
        draws.append(rng.random((n, width), np.float32))
    heads = np.stack(heads)                                          # [M, 6]
    counts = np.array([len(d) for d in draws])                       # [M]
    draws = np.concatenate(draws)                                    # [N, width]
    photo = np.repeat(np.arange(len(products)), counts)              # [N] photo of each box
    first = np.cumsum(counts) - counts                               # [M]
    position = np.arange(len(photo)) - first[photo]                  # [N] box within photo
    u = draws[:, schema.FEATURE_DIM + SLOTS * PROTO_DIMS:].astype(np.float64).T

    specs = np.array([p.spec for p in products], np.int64)           # [M, 5]
    box_spec = specs[photo]                                          # [N, 5]
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

    decoys = None
    if any(p.decoy is not None for p in products):
        none = (None,) * (specs.shape[1] - 1)
        decoys = np.array([[-1 if v is None else v for v in (p.decoy or none)]
                           for p in products], np.int64)                 # [M, 4]
        decoys = np.where((position == 1)[:, None], decoys[photo], -1)   # [N, 4]
    slots = _box_slots(protos, u, roles, labels, box_spec, shown, decoys)
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
               box_spec: np.ndarray, shown: float = 1.0,
               decoys: Optional[np.ndarray] = None) -> np.ndarray:
    """int64 [N, S]: the prototype row each slot of each box adds (protos.zero: none).

    Args:
      shown: P(the main box shows each visual value of the product).
      decoys: int64 [N, 4], per ATTRIBUTES a value the box shows instead (-1: none), or None.
    """
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
        # On the main box, `present` decides whether the photo shows the value at all.
        slots[:, 2 + j] = np.where(main, np.where(present < shown, row + own, protos.zero),
                                   np.where(present < DISTRACTOR_ATTRIBUTE_PROB, row + other,
                                            protos.zero))
        if decoys is not None:
            slots[:, 2 + j] = np.where(decoys[:, attribute] >= 0, row + decoys[:, attribute],
                                       slots[:, 2 + j])
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
    """float32 [N, S]: log-uniform jitter, occasional weak slots, faint clutter."""
    jitter = u[_U_STRENGTH:_U_STRENGTH + SLOTS].T                    # [N, S]
    weak = u[_U_WEAK:_U_WEAK + SLOTS].T < 0.08 * noise
    # exp of a uniform with standard deviation 0.25 * noise
    strength = np.exp(0.25 * noise * np.sqrt(3.0) * (2.0 * jitter - 1.0))
    strength = np.where(weak, 0.35 * strength, strength)
    strength[roles == 0, 5] *= 0.5     # the main box shows the audience only faintly
    strength[:, 6] *= 0.35 * noise * u[_U_CLUTTER_STRENGTH]
    return strength.astype(np.float32)


def _box_features(protos: Prototypes, draws: np.ndarray, slots: np.ndarray,
                  strength: np.ndarray, noise: float) -> np.ndarray:
    """float32 [N, F]: ReLU(noise + sum of slot prototypes with dropout), clipped.

    Reuses draws[:, :2048] (uniform noise) in place; draws[:, 2048:2048+S*L] are the
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

