"""Tests of data_prep.synth.render: where attributes live, box statistics, geometry, noise."""
import collections

import numpy as np
import pytest

from data_prep import schema
from data_prep.synth import render
from data_prep.synth.world import (
    COLOUR, COLOURS, OTHERS, PERSON_CLASSES, PRODUCT_TYPES, VISUAL_ATTRIBUTES, Product,
    random_spec)


def test_a_photo_does_not_depend_on_its_batch():
    # Pooled negatives reappear in other lists and batches and must render identically.
    protos = render.Prototypes(seed=2)
    rng = np.random.default_rng(0)
    products = [Product(103_000_000 + i, random_spec(rng)) for i in range(5)]
    together = render.render_photos(protos, products, 2, 30, 1.0)
    alone = render.render_photos(protos, products[3:4], 2, 30, 1.0)[0]
    for x, y in zip(together[3], alone):
        assert np.array_equal(x, y)



def _photos(n, seed=4, noise=1.0):
    protos = render.Prototypes(seed)
    rng = np.random.default_rng(seed)
    products = [Product(103_000_000 + i, random_spec(rng)) for i in range(n)]
    return protos, products, render.render_photos(protos, products, seed, 30, noise)


def _unit(v):
    return v / np.linalg.norm(v)


def test_attributes_live_in_the_main_box_only():
    protos, products, photos = _photos(150)
    main_cos, other_cos, main_hits, other_hits, pool_hits = [], [], [], [], []
    colours = np.stack([_unit(protos.dense(protos.row(COLOUR, v)))
                        for v in range(len(COLOURS))])                  # [V, F]
    for product, photo in zip(products, photos):
        feats = photo.features / np.maximum(
            np.linalg.norm(photo.features, axis=1, keepdims=True), 1e-9)       # [N, F]
        for attribute in VISUAL_ATTRIBUTES:
            proto = _unit(protos.dense(protos.row(attribute, product.spec.value(attribute))))
            cos = feats @ proto
            main_cos.append(cos[photo.main_index])
            other_cos += [c for i, c in enumerate(cos) if i != photo.main_index]
        guess = np.argmax(colours @ photo.features.T, axis=0)                  # [N]
        main_hits.append(guess[photo.main_index] == product.spec.colour)
        other_hits += [g == product.spec.colour for i, g in enumerate(guess)
                       if i != photo.main_index]
        pool_hits.append(np.argmax(colours @ photo.features.mean(0)) == product.spec.colour)
    assert np.mean(main_cos) > 2 * np.mean(other_cos)   # siblings share half a prototype
    assert np.mean(main_hits) > 0.8
    assert np.mean(other_hits) < 0.2
    # Mean pooling mixes in the distractors' look-alike values: clearly worse.
    assert np.mean(pool_hits) < np.mean(main_hits) - 0.15


def test_main_box_is_labelled_with_the_class_and_large():
    _, products, photos = _photos(300, seed=8)
    labelled = largest = multi = 0
    for product, photo in zip(products, photos):
        labelled += photo.labels[photo.main_index] == \
            PRODUCT_TYPES[product.spec.type].class_id
        if len(photo.labels) > 1:
            b = photo.boxes
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            multi += 1
            largest += int(np.argmax(area)) == photo.main_index
    assert labelled / len(photos) > 0.9
    assert largest / multi > 0.7
    # The main box is not always listed first.
    assert len({p.main_index for p in photos}) > 3


def test_box_counts_and_labels_resemble_the_real_data():
    _, _, photos = _photos(1200, seed=6)
    counts = np.array([len(p.labels) for p in photos])
    assert 3.3 < counts.mean() < 4.3
    assert tuple(np.percentile(counts, [25, 50, 75])) == (2, 3, 5)
    labels = collections.Counter(int(c) for p in photos for c in p.labels)
    assert labels.most_common(1)[0][0] == OTHERS
    assert sum(labels[c] for c in PERSON_CLASSES) > 0.1 * sum(labels.values())
    sizes = collections.Counter((p.image_h, p.image_w) for p in photos)
    assert 0.6 < sizes[(800, 800)] / len(photos) < 0.9 and len(sizes) > 3
    touching = sum(((p.boxes[:, 0] == 0) | (p.boxes[:, 2] == p.image_h)).any()
                   for p in photos)
    assert touching > 0


@pytest.mark.parametrize("image_h, image_w", [(1, 1), (3, 2), (61, 80), (800, 800)])
def test_box_geometry_is_valid_for_any_uniforms(image_h, image_w):
    rng = np.random.default_rng(image_h)
    n = 257
    u = rng.random((6, n))
    u[:, :40] = 0.0            # extremes: the smallest boxes at the top-left corner
    u[:, 40:80] = 1.0 - 1e-9   # and the largest at the bottom-right one
    roles = rng.integers(0, 3, n)
    labels = rng.integers(0, schema.NUM_CLASSES, n)
    boxes = render._box_geometry(u, roles, labels, np.full(n, image_h), np.full(n, image_w))
    top, left, bottom, right = boxes.T
    assert boxes.dtype == np.float32 and np.array_equal(boxes, np.round(boxes))
    assert (0 <= top).all() and (top < bottom).all() and (bottom <= image_h).all()
    assert (0 <= left).all() and (left < right).all() and (right <= image_w).all()


def test_noise_flag_makes_features_harder():
    def main_box_colour_accuracy(noise):
        protos, products, photos = _photos(150, seed=3, noise=noise)
        colours = np.stack([protos.dense(protos.row(COLOUR, v))
                            for v in range(len(COLOURS))])
        return np.mean([np.argmax(colours @ ph.features[ph.main_index]) == p.spec.colour
                        for p, ph in zip(products, photos)])
    assert main_box_colour_accuracy(0.3) > main_box_colour_accuracy(3.0) + 0.1



# ---------------------------------------------------------------------------------------
# Data-regime knobs.


def _main_box_colour_accuracy(protos, products, photos):
    colours = np.stack([protos.dense(protos.row(COLOUR, v)) for v in range(len(COLOURS))])
    return np.mean([np.argmax(colours @ ph.features[ph.main_index]) == p.spec.colour
                    for p, ph in zip(products, photos)])


def test_shown_hides_values_from_the_main_box():
    protos, products, photos = _photos(200, seed=3)
    hidden = render.render_photos(protos, products, 3, 30, 1.0, shown=0.5)
    # About half the main boxes lose the colour and then match it by chance (1 in 15).
    assert _main_box_colour_accuracy(protos, products, photos) > 0.9
    assert 0.35 < _main_box_colour_accuracy(protos, products, hidden) < 0.65


def test_boxes_mean_sets_the_boxes_per_photo():
    protos, products, _ = _photos(1, seed=5)
    rng = np.random.default_rng(5)
    products = [Product(103_000_000 + i, random_spec(rng)) for i in range(400)]
    # At most 14 boxes: no crowded photos (those have 15 or more).
    means = [np.mean([len(p.labels) for p in render.render_photos(
        protos, products, 5, 14, 1.0, boxes_mean=m)]) for m in (0.0, 1.0, 5.0)]
    assert means[0] == 1.0
    assert 1.8 < means[1] < 2.2 and 5.3 < means[2] < 6.3


def test_a_decoy_box_shows_the_decoy_values():
    protos = render.Prototypes(seed=6)
    rng = np.random.default_rng(6)
    colours = np.stack([protos.dense(protos.row(COLOUR, v)) for v in range(len(COLOURS))])
    specs = [random_spec(rng) for _ in range(200)]
    decoys = [(int((s.colour + 7) % len(COLOURS)), None, None, None) for s in specs]
    plain = [Product(103_000_000 + i, s) for i, s in enumerate(specs)]
    decoyed = [p._replace(decoy=d) for p, d in zip(plain, decoys)]

    def decoy_colour_shown(products):
        shown = []
        for p, ph, d in zip(products, render.render_photos(protos, products, 6, 30, 1.0),
                            decoys):
            guess = np.argmax(colours @ ph.features.T, axis=0)      # [N]
            shown.append(any(g == d[COLOUR] for i, g in enumerate(guess)
                             if i != ph.main_index))
        return np.mean(shown)
    assert decoy_colour_shown(decoyed) > 0.9
    assert decoy_colour_shown(plain) < 0.2
    # The product's own box still shows its own colour.
    assert _main_box_colour_accuracy(
        protos, decoyed, render.render_photos(protos, decoyed, 6, 30, 1.0)) > 0.9
