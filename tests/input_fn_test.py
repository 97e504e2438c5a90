"""The tf.data pipelines: parsed values equal the written ones, caps (the largest boxes by
area), whole-query batches, worker sharding, same-type runs."""
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
import tensorflow as tf

from data_prep import geometry, schema, text, vocab
from data_prep.manifest import PrepDir
from estimator import input_fn
from mmrecall_testing.model_fixtures import tiny_config, write_prep_dir

TRAIN, EVAL, PREDICT = (tf.estimator.ModeKeys.TRAIN, tf.estimator.ModeKeys.EVAL,
                        tf.estimator.ModeKeys.PREDICT)


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return PrepDir(write_prep_dir(str(tmp_path_factory.mktemp("prep")), num_train=60,
                                  num_valid_queries=7, candidates=5, valid_shards=2,
                                  compression="GZIP", max_boxes=4))


def _write(path, rows):
    with tf.io.TFRecordWriter(path) as w:
        for r in rows:
            w.write(r)


def test_prep_without_vocabulary_is_a_clear_error(prep, tmp_path):
    copy = tmp_path / "no_vocab"
    shutil.copytree(prep.path, copy)
    manifest = json.loads((copy / schema.MANIFEST_FILE).read_text())
    manifest["vocab"] = None          # what prep writes when it had no train split
    (copy / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    no_vocab = PrepDir(str(copy))
    assert no_vocab.split_files("test") == []                # absent split: no files
    with pytest.raises(ValueError, match="no vocabulary"):
        input_fn.input_fn_builder(tiny_config(), no_vocab.split_files("train"), TRAIN,
                                  no_vocab)


def test_unresolved_box_cap_is_a_clear_error(prep):
    with pytest.raises(ValueError, match="resolve_config"):
        input_fn.input_fn_builder(tiny_config(max_boxes=0), prep.split_files("train"), TRAIN,
                                  prep)


def test_parse_batch_values_caps_and_lookup(prep, tmp_path):
    rng = np.random.RandomState(0)
    tokens = prep.vocab_tokens()
    rows, sources = [], []
    for i, (lemmas, n) in enumerate([(["red", "dress", "zzz", "new", "shoe", "bag", "lamp",
                                       "sofa", "pink"], 6), (["blue"], 1), ([], 2)]):
        feats = rng.uniform(0, 3, (n, schema.FEATURE_DIM)).astype(np.float32)
        geo = rng.uniform(0, 1, (n, schema.GEOMETRY_DIM)).astype(np.float32)
        labels = rng.randint(0, 33, n)
        boxes = np.tile([[0, 0, 10, 10]], (n, 1)).astype(np.float32)
        rows.append(schema.encode_example(7 + i, 70, 100, 100, " ".join(lemmas), lemmas,
                                          text.query_key(lemmas), boxes, geo, feats, labels,
                                          label=i % 2))
        sources.append((lemmas, feats, geo, labels))
    table = vocab.lookup_table(tokens)
    feats, labels = input_fn.parse_batch(tf.constant(rows), table, max_query_tokens=7,
                                         max_boxes=5)
    assert labels.numpy().tolist() == [0.0, 1.0, 0.0]
    assert feats[schema.F_NUM_TOKENS].numpy().tolist() == [7, 1, 0]
    assert feats[schema.F_NUM_BOXES].numpy().tolist() == [5, 1, 2]      # capped at 5
    ids = feats[schema.F_TOKEN_IDS].numpy()
    assert ids.shape == (3, 7) and ids.dtype == np.int32
    expected0 = [tokens.index(t) if t in tokens else schema.UNK_ID for t in sources[0][0][:7]]
    assert ids[0].tolist() == expected0 and schema.UNK_ID in expected0   # "zzz" unknown
    assert ids[1].tolist() == [tokens.index("blue")] + [0] * 6
    assert ids[2].tolist() == [0] * 7
    bf = feats[schema.F_BOX_FEATURES].numpy()
    assert bf.shape == (3, 5, schema.FEATURE_DIM)
    np.testing.assert_array_equal(bf[0], sources[0][1][:5])
    np.testing.assert_array_equal(bf[1, 0], sources[1][1][0])
    assert not bf[1, 1:].any() and not bf[2, 2:].any()
    np.testing.assert_allclose(feats[schema.F_BOX_GEOMETRY].numpy()[2, :2], sources[2][2])
    assert feats[schema.F_BOX_LABELS].numpy()[0].tolist() == sources[0][3][:5].tolist()
    assert feats[schema.F_PRODUCT_ID].numpy().tolist() == [7, 8, 9]


def _boxes_record(product_id, boxes):
    n = len(boxes)
    features = np.arange(n * schema.FEATURE_DIM, dtype=np.float32).reshape(n, -1)
    geo = geometry.relative_geometry(np.asarray(boxes, np.float32), 100, 100)
    return schema.encode_example(product_id, 1, 100, 100, "a", ["a"], 1,
                                 np.asarray(boxes, np.float32), geo, features,
                                 np.arange(n) + 1, 1), features, geo


def test_box_cap_keeps_the_largest_boxes_in_original_order(prep):
    # Product 1: small boxes first, large ones later; boxes 1 and 4 tie in area (25).
    #   areas: 4, 25, 1, 81, 25, 64 -> the 4 largest are 3 (81), 5 (64), 1 and 4 (25; tie
    #   kept in index order), in original order: [1, 3, 4, 5].
    # Product 2: 2 boxes, under the cap: both kept. Product 3: ties only -> the first 4.
    products = [
        [[0, 0, 2, 2], [0, 0, 5, 5], [0, 0, 1, 1], [0, 0, 9, 9], [10, 10, 15, 15],
         [0, 0, 8, 8]],
        [[0, 0, 3, 3], [0, 0, 7, 7]],
        [[0, 0, 4, 4]] * 5,
    ]
    rows = [_boxes_record(i + 1, b) for i, b in enumerate(products)]
    table = vocab.lookup_table(prep.vocab_tokens())
    feats, _ = input_fn.parse_batch(tf.constant([r[0] for r in rows]), table,
                                    max_query_tokens=7, max_boxes=4)
    assert feats[schema.F_NUM_BOXES].numpy().tolist() == [4, 2, 4]
    expected = [[1, 3, 4, 5], [0, 1], [0, 1, 2, 3]]
    for b, (boxes, (_, features, geo)) in enumerate(zip(products, rows)):
        keep = geometry.largest_box_indices(np.asarray(boxes, np.float32), 4)
        assert keep.tolist() == expected[b]
        k = len(keep)
        np.testing.assert_array_equal(feats[schema.F_BOX_FEATURES].numpy()[b, :k],
                                      features[keep])
        np.testing.assert_array_equal(feats[schema.F_BOX_GEOMETRY].numpy()[b, :k], geo[keep])
        assert feats[schema.F_BOX_LABELS].numpy()[b, :k].tolist() == (keep + 1).tolist()
        assert not feats[schema.F_BOX_FEATURES].numpy()[b, k:].any()
    # Under the cap nothing changes: every box, in order.
    feats, _ = input_fn.parse_batch(tf.constant([rows[0][0]]), table, 7, max_boxes=6)
    np.testing.assert_array_equal(feats[schema.F_BOX_FEATURES].numpy()[0], rows[0][1])


def test_largest_boxes_equals_the_numpy_rule_on_random_boxes():
    rng = np.random.RandomState(5)
    counts = rng.randint(0, 9, size=11)
    boxes = np.zeros([11, 8, 4], np.float32)
    for b, n in enumerate(counts):
        top_left = rng.randint(0, 5, size=(n, 2))
        size = rng.randint(1, 4, size=(n, 2))            # small sizes: many area ties
        boxes[b, :n] = np.concatenate([top_left, top_left + size], 1)
        boxes[b, n:] = 1000.0                             # huge padding must never count
    index, kept = input_fn.largest_boxes(tf.constant(boxes), tf.constant(counts, tf.int32), 3)
    for b, n in enumerate(counts):
        expected = geometry.largest_box_indices(boxes[b, :n], 3)
        assert int(kept[b]) == len(expected)
        assert index.numpy()[b, :len(expected)].tolist() == expected.tolist()


def test_train_batches(prep):
    cfg = tiny_config(batch_size=13, max_query_tokens=2)
    ds = input_fn.input_fn_builder(cfg, prep.split_files("train"), TRAIN, prep)()
    seen = set()
    for features, labels in ds.take(30):                 # 6.5 epochs of 60 rows: repeats
        assert features[schema.F_TOKEN_IDS].shape[0] == 13
        assert features[schema.F_TOKEN_IDS].shape[1] <= 2
        assert int(tf.reduce_max(features[schema.F_NUM_BOXES])) <= 4
        assert features[schema.F_BOX_FEATURES].shape[1] == int(
            tf.reduce_max(features[schema.F_NUM_BOXES]))     # padded to the batch's max
        assert labels.numpy().tolist() == [1.0] * 13
        seen.update(features[schema.F_PRODUCT_ID].numpy().tolist())
    assert len(seen) == 60


@pytest.mark.parametrize("mode", [EVAL, PREDICT])
def test_eval_batches_hold_whole_queries(prep, mode):
    cfg = tiny_config(eval_queries_per_batch=3)
    ds = input_fn.input_fn_builder(cfg, prep.split_files("valid"), mode, prep)()
    batches = []
    for element in ds:
        features = element[0] if mode == EVAL else element
        if mode == EVAL:
            assert set(element[1].numpy().tolist()) <= {0.0, 1.0}
        batches.append(features[schema.F_QUERY_ID].numpy().tolist())
    # 7 queries x 5 candidates, 3 whole queries per batch -> 3 + 3 + 1 queries.
    assert [len(set(b)) for b in batches] == [3, 3, 1]
    assert all(len(b) == 5 * len(set(b)) for b in batches)
    all_ids = [q for b in batches for q in b]
    assert sorted(set(all_ids)) == list(range(2_000_000, 2_000_007))
    for q in set(all_ids):                                  # never split across batches
        assert sum(q in b for b in batches) == 1


def test_whole_queries_cuts_contiguous_runs(tmp_path):
    rows = []
    for qid, n in [(5, 2), (3, 1), (5, 3)]:                 # qid 5 twice: separate runs
        for _ in range(n):
            rows.append(schema.encode_example(
                1, qid, 10, 10, "a", ["a"], 1, np.zeros([1, 4], np.float32),
                np.zeros([1, 6], np.float32), np.zeros([1, 2048], np.float32), [0], 1))
    path = str(tmp_path / "x.tfrecord")
    _write(path, rows)
    groups = [g.numpy().size for g in input_fn.whole_queries(tf.data.TFRecordDataset(path))]
    assert groups == [2, 1, 3]


def test_train_files_are_sharded_by_worker(prep):
    class FakeRunConfig:   # the two RunConfig fields a TF_CONFIG cluster sets
        num_worker_replicas = 2
        global_id_in_cluster = 1

    # No shuffling or regrouping: the first 30 rows read are exactly one pass over the
    # worker's own file (a shuffle buffer spanning epochs could defer any row for long).
    cfg = tiny_config(batch_size=10, shuffle_buffer=1, train_group_size=1, batch_by_boxes=False)
    files = prep.split_files("train")
    assert len(files) == 2
    expected = []
    for record in tf.data.TFRecordDataset(files[1], compression_type="GZIP"):
        expected.append(int(tf.io.parse_single_example(
            record, {schema.PRODUCT_ID: tf.io.FixedLenFeature([], tf.int64)})[schema.PRODUCT_ID]))
    worker = input_fn.input_fn_builder(cfg, files, TRAIN, prep)(config=FakeRunConfig())
    got = []
    for features, _ in worker.take(3):                     # one pass over the 30 rows
        got.extend(features[schema.F_PRODUCT_ID].numpy().tolist())
    assert sorted(got) == sorted(expected) and len(set(got)) == 30


def test_more_workers_than_files_split_records_disjointly(prep):
    files = prep.split_files("train")
    assert len(files) == 2
    num_workers = 3
    cfg = tiny_config(batch_size=4, train_group_size=1)
    seen = []
    for worker_id in range(num_workers):
        class FakeRunConfig:
            num_worker_replicas = num_workers
            global_id_in_cluster = worker_id

        worker = input_fn.input_fn_builder(cfg, files, TRAIN, prep, num_epochs=1)(
            config=FakeRunConfig())
        ids = [i for features, _ in worker for i in features[schema.F_PRODUCT_ID].numpy()]
        seen.append(set(ids))
        assert len(ids) == len(set(ids))
    # 60 rows in two files of 30: each worker gets every 3rd record of each file (20 rows);
    # batches of 4 drop no remainder at 20. Disjoint and together complete.
    assert [len(s) for s in seen] == [20, 20, 20]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(seen[0] | seen[1] | seen[2]) == 60


@pytest.mark.parametrize("by_boxes, least_runs", [(False, 25), (True, 20)])
def test_group_by_last_lemma_makes_runs_of_one_type(prep, by_boxes, least_runs):
    # Both paths keep the runs: group_by_last_lemma, and window_order under batch_by_boxes,
    # whose windows hold one pass of the 60 rows, so each type's last rows make short runs.
    cfg = tiny_config(batch_size=12, train_group_size=4, batch_by_boxes=by_boxes)
    tokens = prep.vocab_tokens()
    ds = input_fn.input_fn_builder(cfg, prep.split_files("train"), TRAIN, prep)()
    runs = 0
    for features, _ in ds.take(10):
        ids, n = features[schema.F_TOKEN_IDS].numpy(), features[schema.F_NUM_TOKENS].numpy()
        last = [tokens[ids[i, n[i] - 1]] for i in range(12)]
        runs += sum(len(set(last[j:j + 4])) == 1 for j in range(0, 12, 4))
    # 6 types among 60 rows: nearly every run of 4 shares its type (rare tails flush short).
    assert runs >= least_runs
    ungrouped = input_fn.input_fn_builder(
        tiny_config(batch_size=12, train_group_size=0, batch_by_boxes=by_boxes),
        prep.split_files("train"), TRAIN, prep)()
    base = 0
    for features, _ in ungrouped.take(10):
        ids, n = features[schema.F_TOKEN_IDS].numpy(), features[schema.F_NUM_TOKENS].numpy()
        last = [tokens[ids[i, n[i] - 1]] for i in range(12)]
        base += sum(len(set(last[j:j + 4])) == 1 for j in range(0, 12, 4))
    assert base < 10


def _lemma_record(product_id, lemmas):
    return schema.encode_example(
        product_id, 1, 10, 10, " ".join(lemmas), list(lemmas), 1, np.zeros([1, 4], np.float32),
        np.zeros([1, 6], np.float32), np.zeros([1, 2048], np.float32), [0], 1)


def _product_ids(records):
    spec = {schema.PRODUCT_ID: tf.io.FixedLenFeature([], tf.int64)}
    return [int(tf.io.parse_single_example(r, spec)[schema.PRODUCT_ID]) for r in records]


def test_group_by_last_lemma_emits_each_window_once_rare_types_included():
    # 12 "dress" rows, 6 "knife" rows and 6 singleton types, in a repeating stream.
    lemmas = [["red", "dress"]] * 12 + [["knife"]] * 6 + [[t] for t in "abcdef"]
    records = [_lemma_record(i, l) for i, l in enumerate(lemmas)]
    stream = tf.data.Dataset.from_tensor_slices(records).repeat()
    out = [r.numpy() for r in input_fn.group_by_last_lemma(stream, 4, len(records)).take(48)]
    for window in (out[:24], out[24:]):
        # Each window holds every record once: no row is deferred, none is doubled.
        assert sorted(_product_ids(window)) == list(range(24))
        last = [lemmas[i][-1] for i in _product_ids(window)]
        # Full runs come first, aligned on multiples of 4: 3 of dress, 1 of knife.
        runs = [last[k:k + 4] for k in range(0, 16, 4)]
        assert all(len(set(run)) == 1 for run in runs)
        assert sorted(run[0] for run in runs) == ["dress", "dress", "dress", "knife"]
        assert sorted(last[16:]) == ["a", "b", "c", "d", "e", "f", "knife", "knife"]


def test_last_lemma_buckets_of_empty_queries():
    records = tf.constant([_lemma_record(1, []), _lemma_record(2, ["red", "dress"]),
                           _lemma_record(3, ["dress"]), _lemma_record(4, [])])
    keys = input_fn._last_lemma_buckets(records, 1 << 16).numpy()
    assert keys[1] == keys[2] and keys[0] == keys[3] and keys[0] != keys[1]
    only_empty = input_fn._last_lemma_buckets(records[:1], 1 << 16).numpy()
    assert only_empty.tolist() == [keys[0]]


def _order(keys, boxes, group_size, batch_size, seed=5):
    tf.random.set_seed(0)        # eagerly, an op seed's draws also depend on earlier calls
    return input_fn.window_order(tf.constant(keys, tf.int64), tf.constant(boxes, tf.int32),
                                 group_size, batch_size, seed=seed).numpy()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5),
       st.lists(st.tuples(st.integers(0, 3), st.integers(1, 10)), min_size=1, max_size=60))
def test_window_order_is_a_permutation_with_the_least_padding(group_size, batches_of, seed,
                                                               rows):
    keys, boxes = (np.array(col) for col in zip(*rows))
    batch = group_size * batches_of
    order = _order(keys, boxes, group_size, batch, seed)
    assert sorted(order.tolist()) == list(range(len(rows)))
    full = len(rows) // batch * batch
    padded = sorted(boxes[order[i:i + batch]].max() for i in range(0, full, batch))
    if group_size == 1:
        # No runs: the batches are the sorted counts cut in order, the fewest padded boxes.
        ideal = np.sort(boxes)
        assert padded == sorted(ideal[i + batch - 1] for i in range(0, full, batch))


def test_window_order_keeps_runs_of_one_key_and_batches_similar_counts():
    rng = np.random.RandomState(0)
    # 4 keys x 16 rows, counts 1..10: runs of 4 fit batches of 8 exactly.
    keys = np.repeat(np.arange(4), 16)
    boxes = rng.randint(1, 11, size=64)
    order = _order(keys, boxes, 4, 8)
    assert sorted(order.tolist()) == list(range(64))
    for start in range(0, 64, 4):
        assert len(set(keys[order[start:start + 4]])) == 1                # a run, one key
    padded = sum(boxes[order[i:i + 8]].max() for i in range(0, 64, 8))
    arrival = sum(boxes[i:i + 8].max() for i in range(0, 64, 8))
    assert padded < 0.8 * arrival
    # Batches come out in a seeded random order, not sorted by count.
    maxima = [[boxes[_order(keys, boxes, 4, 8, seed)[i:i + 8]].max() for i in range(0, 64, 8)]
              for seed in (1, 2, 3)]
    assert any(m != sorted(m) for m in maxima)
    np.testing.assert_array_equal(_order(keys, boxes, 4, 8, 9), _order(keys, boxes, 4, 8, 9))


def test_batch_by_boxes_emits_each_window_once_and_pads_less(prep):
    def padded_boxes(**overrides):
        cfg = tiny_config(batch_size=6, shuffle_buffer=1, group_window=30, **overrides)
        ds = input_fn.input_fn_builder(cfg, prep.split_files("train"), TRAIN, prep,
                                       num_epochs=1)()
        ids, padded = [], 0
        for features, _ in ds:
            ids += features[schema.F_PRODUCT_ID].numpy().tolist()
            padded += features[schema.F_BOX_FEATURES].shape[0] * \
                features[schema.F_BOX_FEATURES].shape[1]
        return sorted(ids), padded

    plain_ids, plain = padded_boxes(batch_by_boxes=False, train_group_size=0)
    ids, padded = padded_boxes(batch_by_boxes=True, train_group_size=0)
    grouped_ids, grouped = padded_boxes(batch_by_boxes=True, train_group_size=3)
    assert ids == plain_ids == grouped_ids and len(ids) == 60     # every row, once
    assert padded < plain and grouped < plain
