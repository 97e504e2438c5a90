"""Tests of data_prep.synth: the competition layout, sizes, determinism and the story.

The files are decoded here independently of data_prep.tsv (split on tabs, strict base64,
numpy frombuffer), so a layout mistake shared by the writer and the reader still shows.
Sizes are odd on purpose (13 candidates, 5 answers, 11 boxes at most).
"""
import base64
import collections
import json
import os

import numpy as np
import pytest

from data_prep import schema, synth
from data_prep.text import normalize_query

TSV_FILES = (synth.TRAIN_FILE, synth.VALID_FILE, synth.TEST_FILE)


def _argv(out_dir, **flags):
    argv = ["--out", str(out_dir)]
    for name, value in flags.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


SMALL = dict(seed=7, train_rows=45, valid_queries=9, test_queries=5, candidates=13,
             answers=5, max_boxes_train=40, max_boxes_eval=11, batch_rows=16)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert synth.main(_argv(out, **SMALL)) == 0
    return out


def read_tsv(path):
    """Decodes a competition TSV: (header fields, list of row dicts with numpy arrays)."""
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = []
        for line in f:
            assert line.endswith("\n")
            fields = line[:-1].split("\t")
            assert len(fields) == 9, fields[:4]
            n = int(fields[3])
            arrays = {}
            for col, dtype, per_box in (("boxes", "<f4", 4), ("features", "<f4", 2048),
                                        ("class_labels", "<i8", 1)):
                text = fields[schema.TSV_COLUMNS.index(col)]
                assert len(text) % 4 == 0   # standard alphabet with '=' padding
                raw = base64.b64decode(text, validate=True)
                assert len(raw) == n * per_box * np.dtype(dtype).itemsize, col
                arrays[col] = np.frombuffer(raw, dtype).reshape(n, per_box)
            rows.append(dict(product_id=int(fields[0]), image_h=int(fields[1]),
                             image_w=int(fields[2]), num_boxes=n, boxes=arrays["boxes"],
                             features=arrays["features"],
                             labels=arrays["class_labels"].reshape(n), query=fields[7],
                             query_id=int(fields[8])))
    return header, rows


def _runs(values):
    """[(value, run length)] of consecutive equal values."""
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


# ---------------------------------------------------------------------------------------
# Layout.


def test_writes_exactly_the_five_files(small_set):
    assert sorted(os.listdir(small_set)) == sorted(
        TSV_FILES + (synth.VALID_ANSWER_FILE, synth.LABELS_FILE))   # no temp files left


def test_labels_file(small_set):
    with open(small_set / synth.LABELS_FILE, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + schema.NUM_CLASSES
    assert not lines[0].split("\t")[0].isdigit()   # a header, not data
    pairs = [line.split("\t") for line in lines[1:]]
    assert [int(i) for i, _ in pairs] == list(range(schema.NUM_CLASSES))
    names = dict((int(i), name) for i, name in pairs)
    assert (names[4], names[14], names[22], names[28], names[29], names[32]) == (
        "shoes", "kitchenware", "digital supplies", "others", "human face", "hand")
    assert len(set(names.values())) == schema.NUM_CLASSES


@pytest.mark.parametrize("name", TSV_FILES)
def test_tsv_decodes_with_the_competition_layout(small_set, name):
    header, rows = read_tsv(small_set / name)
    assert header == list(schema.TSV_COLUMNS)
    assert rows
    zeros = nonzeros = 0
    for row in rows:
        h, w, boxes = row["image_h"], row["image_w"], row["boxes"]
        assert h > 0 and w > 0 and row["num_boxes"] >= 1
        assert np.array_equal(boxes, np.round(boxes))                    # whole pixels
        top, left, bottom, right = boxes.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (bottom <= h).all() and (right <= w).all()
        assert (top < bottom).all() and (left < right).all()
        assert ((row["labels"] >= 0) & (row["labels"] < schema.NUM_CLASSES)).all()
        feats = row["features"]
        assert np.isfinite(feats).all() and (feats >= 0).all()
        zeros += int((feats == 0).sum())
        nonzeros += int((feats > 0).sum())
        assert row["query"] and row["query"] == row["query"].strip()
    # Many exact zeros, as in the real detector features, but not only zeros.
    assert 0.3 < zeros / (zeros + nonzeros) < 0.98
    ids = [r["product_id"] for r in rows]
    if name == synth.TRAIN_FILE:
        assert all(100_000_000 <= i < 103_000_000 for i in ids)
        assert len(set(ids)) == len(ids)
    else:
        assert all(i >= 103_000_000 for i in ids)


def test_sizes_follow_flags(small_set):
    _, train = read_tsv(small_set / synth.TRAIN_FILE)
    assert len(train) == SMALL["train_rows"]
    assert max(r["num_boxes"] for r in train) <= SMALL["max_boxes_train"]
    for name, queries in ((synth.VALID_FILE, SMALL["valid_queries"]),
                          (synth.TEST_FILE, SMALL["test_queries"])):
        _, rows = read_tsv(small_set / name)
        sizes = collections.Counter(r["query_id"] for r in rows)
        assert len(sizes) == queries
        assert max(sizes.values()) == SMALL["candidates"]
        assert min(sizes.values()) > SMALL["answers"]
        # Most lists have exactly --candidates products (a few are shorter).
        assert sum(s == SMALL["candidates"] for s in sizes.values()) >= queries / 2
        assert max(r["num_boxes"] for r in rows) <= SMALL["max_boxes_eval"]


def test_empty_splits_write_a_header_only(tmp_path):
    assert synth.main(_argv(tmp_path, train_rows=0, valid_queries=0, test_queries=1,
                            candidates=9)) == 0
    for name in (synth.TRAIN_FILE, synth.VALID_FILE):
        header, rows = read_tsv(tmp_path / name)
        assert header == list(schema.TSV_COLUMNS) and rows == []
    with open(tmp_path / synth.VALID_ANSWER_FILE) as f:
        assert json.load(f) == {}
    assert len(read_tsv(tmp_path / synth.TEST_FILE)[1]) <= 9


# ---------------------------------------------------------------------------------------
# Valid / test structure.


@pytest.mark.parametrize("name", (synth.VALID_FILE, synth.TEST_FILE))
def test_rows_are_grouped_by_query(small_set, name):
    _, rows = read_tsv(small_set / name)
    runs = _runs([r["query_id"] for r in rows])
    assert len(runs) == len({q for q, _ in runs})
    for query_id, _ in runs:   # one query text per query id
        assert len({r["query"] for r in rows if r["query_id"] == query_id}) == 1


def test_answers_are_in_their_list_and_mostly_the_flag(small_set):
    _, valid = read_tsv(small_set / synth.VALID_FILE)
    _, test = read_tsv(small_set / synth.TEST_FILE)
    with open(small_set / synth.VALID_ANSWER_FILE) as f:
        answers = json.load(f)
    lists = collections.defaultdict(list)
    for r in valid:
        lists[r["query_id"]].append(r["product_id"])
    assert sorted(answers) == sorted(str(q) for q in lists)
    positions = []
    for query_id, ids in answers.items():
        assert all(type(i) is int for i in ids)
        assert len(set(ids)) == len(ids) and 2 <= len(ids) <= SMALL["answers"]
        candidates = lists[int(query_id)]
        assert set(ids) <= set(candidates)
        positions += [candidates.index(i) for i in ids]
    exact = sum(len(ids) == SMALL["answers"] for ids in answers.values())
    assert exact >= len(answers) / 2
    # Answers are mixed among the candidates, not written first.
    assert np.mean(positions) > SMALL["answers"]
    # The real artefact: an answer appears in one candidate list only.
    appearances = collections.Counter(r["product_id"] for r in valid + test)
    assert all(appearances[i] == 1 for ids in answers.values() for i in ids)


def test_negatives_are_hard_and_never_relevant():
    cfg = synth.SynthConfig(out_dir="", seed=5, valid_queries=40, test_queries=10)
    one_off = same_type = negatives = 0
    reused = collections.Counter()
    for _, cl in synth.plan_eval(cfg):
        query = cl.query
        answers = set(cl.answers)
        for product in cl.products:
            reused[product.product_id] += 1
            spec = product.spec
            differ = [a for a, v in enumerate(query.mentioned)
                      if v is not None and spec.value(a) != v]
            matches = spec.type == query.type and not differ
            assert matches == (product.product_id in answers)
            if product.product_id in answers:
                continue
            negatives += 1
            if spec.type == query.type:
                same_type += 1
                one_off += len(differ) == 1 and differ[0] in synth.VISUAL_ATTRIBUTES
    assert same_type / negatives > 0.6
    assert one_off / negatives > 0.4
    # Some negatives are shared between lists (the pool), so appear more than once.
    assert sum(c > 1 for c in reused.values()) > 10


def test_no_pool_reuse_when_disabled():
    cfg = synth.SynthConfig(out_dir="", seed=5, valid_queries=20, test_queries=5,
                            pool_reuse=0.0)
    ids = [p.product_id for _, cl in synth.plan_eval(cfg) for p in cl.products]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------
# Determinism.


TINY = dict(train_rows=11, valid_queries=2, test_queries=2, candidates=9, batch_rows=4)


def _file_bytes(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_deterministic_for_a_seed_and_different_for_another(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert synth.main(_argv(tmp_path / name, seed=seed, **TINY)) == 0
    a, b, c = (_file_bytes(tmp_path / n) for n in "abc")
    assert a == b
    for name in TSV_FILES:
        assert a[name] != c[name]


def test_a_photo_does_not_depend_on_its_batch():
    # Pooled negatives reappear in other lists and batches and must render identically.
    protos = synth.Prototypes(seed=2)
    rng = np.random.default_rng(0)
    products = [synth.Product(103_000_000 + i, synth.random_spec(rng)) for i in range(5)]
    together = synth.render_photos(protos, products, 2, 30, 1.0)
    alone = synth.render_photos(protos, products[3:4], 2, 30, 1.0)[0]
    for x, y in zip(together[3], alone):
        assert np.array_equal(x, y)


# ---------------------------------------------------------------------------------------
# Queries.


def _plural_types():
    return [t for t in synth.PRODUCT_TYPES if t.plural is not None]


def test_every_plural_lemmatises_to_its_singular():
    for ptype in _plural_types():
        assert normalize_query(ptype.plural) == normalize_query(ptype.singular), ptype
    for forms in synth.AUDIENCE_FORMS:   # "children" -> child, "women" -> woman
        lemmas = {normalize_query(f)[0] for f in forms if "'" not in f}
        assert normalize_query(forms[0])[0] in lemmas


def test_queries_describe_their_products():
    cfg = synth.SynthConfig(out_dir="", seed=9, train_rows=1500)
    rows = list(synth.plan_train(cfg))
    assert len(rows) == cfg.train_rows
    texts = {}
    last_is_noun = 0
    for query, product in rows:
        assert synth.is_relevant(query, product.spec)
        ptype = synth.PRODUCT_TYPES[product.spec.type]
        words = query.text.split()
        nouns = {ptype.singular, ptype.plural}
        assert nouns & set(words), query.text
        last_is_noun += words[-1] in nouns
        for attribute in synth.VISUAL_ATTRIBUTES:
            value = query.mentioned[attribute]
            if value is not None:
                assert synth.ATTRIBUTE_VALUES[attribute][value] in query.text
        texts.setdefault(query.query_id, query.text)
    assert last_is_noun / len(rows) > 0.8
    words_per_query = np.mean([len(t.split()) for t in texts.values()])
    assert 3.4 < words_per_query < 4.4
    # Several products share a query, and queries vary in word order.
    assert len(texts) < 0.8 * len(rows)
    colour_first = set()
    for query, _ in rows:
        colour, material = query.mentioned[synth.COLOUR], query.mentioned[synth.MATERIAL]
        if colour is not None and material is not None:
            colour_first.add(query.text.index(synth.COLOURS[colour])
                             < query.text.index(synth.MATERIALS[material]))
    assert colour_first == {True, False}


def test_irregular_plurals_and_leading_verbs_appear_and_normalise():
    cfg = synth.SynthConfig(out_dir="", seed=1, train_rows=3000)
    texts = {q.text for q, _ in synth.plan_train(cfg)}
    irregular = {t.plural: t.singular for t in _plural_types()
                 if not t.plural.startswith(t.singular)}
    irregular["children"] = "child"
    seen = {w for text in texts for w in text.split() if w in irregular}
    assert len(seen) >= 4, seen
    for plural in seen:
        text = next(t for t in texts if plural in t.split())
        assert irregular[plural] in normalize_query(text)
    verbs = [t for t in texts if t.split()[0] in ("is", "are")]
    assert verbs
    assert all(normalize_query(t)[0] not in ("be", "is", "are") for t in verbs)


# ---------------------------------------------------------------------------------------
# Photos.


def _photos(n, seed=4, noise=1.0):
    protos = synth.Prototypes(seed)
    rng = np.random.default_rng(seed)
    products = [synth.Product(103_000_000 + i, synth.random_spec(rng)) for i in range(n)]
    return protos, products, synth.render_photos(protos, products, seed, 30, noise)


def _unit(v):
    return v / np.linalg.norm(v)


def test_attributes_live_in_the_main_box_only():
    protos, products, photos = _photos(150)
    main_cos, other_cos, main_hits, other_hits, pool_hits = [], [], [], [], []
    colours = np.stack([_unit(protos.dense(protos.row(synth.COLOUR, v)))
                        for v in range(len(synth.COLOURS))])                  # [V, F]
    for product, photo in zip(products, photos):
        feats = photo.features / np.maximum(
            np.linalg.norm(photo.features, axis=1, keepdims=True), 1e-9)       # [N, F]
        for attribute in synth.VISUAL_ATTRIBUTES:
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
            synth.PRODUCT_TYPES[product.spec.type].class_id
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
    assert labels.most_common(1)[0][0] == synth.OTHERS
    assert sum(labels[c] for c in synth.PERSON_CLASSES) > 0.1 * sum(labels.values())
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
    boxes = synth._box_geometry(u, roles, labels, np.full(n, image_h), np.full(n, image_w))
    top, left, bottom, right = boxes.T
    assert boxes.dtype == np.float32 and np.array_equal(boxes, np.round(boxes))
    assert (0 <= top).all() and (top < bottom).all() and (bottom <= image_h).all()
    assert (0 <= left).all() and (left < right).all() and (right <= image_w).all()


def test_noise_flag_makes_features_harder():
    def main_box_colour_accuracy(noise):
        protos, products, photos = _photos(150, seed=3, noise=noise)
        colours = np.stack([protos.dense(protos.row(synth.COLOUR, v))
                            for v in range(len(synth.COLOURS))])
        return np.mean([np.argmax(colours @ ph.features[ph.main_index]) == p.spec.colour
                        for p, ph in zip(products, photos)])
    assert main_box_colour_accuracy(0.3) > main_box_colour_accuracy(3.0) + 0.1


# ---------------------------------------------------------------------------------------
# Command line.


@pytest.mark.parametrize("flags", [
    ["--train-rows", "-1"],
    ["--valid-queries", "many"],
    ["--candidates", "6", "--answers", "6"],
    ["--noise", "-0.5"],
    ["--pool-reuse", "1.5"],
    ["--seed", "-3"],
])
def test_bad_flags_are_argparse_errors(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        synth.config_from_args(["--out", str(tmp_path)] + flags)
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_out_is_required_and_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        synth.config_from_args([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        synth.config_from_args(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--out", "--seed", "--train-rows", "--valid-queries", "--test-queries",
                 "--candidates", "--answers", "--noise"):
        assert flag in usage


def test_config_from_args_fills_the_dataclass(tmp_path):
    cfg = synth.config_from_args(_argv(tmp_path, **SMALL))
    assert cfg == synth.SynthConfig(out_dir=str(tmp_path), **SMALL)
