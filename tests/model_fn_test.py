"""model_fn in TRAIN / EVAL / PREDICT, PREDICT row independence, padding invariance, and the
Ranker contract: deterministic, unchanged variable names and restoring from Estimator
checkpoints."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from data_prep import schema
from data_prep.manifest import PrepDir
from estimator import input_fn, model_fn, network, outputs, train
from export import rank, score
from mmrecall_testing.model_fixtures import random_batch, tiny_config, write_prep_dir

TRAIN, EVAL, PREDICT = (tf.estimator.ModeKeys.TRAIN, tf.estimator.ModeKeys.EVAL,
                        tf.estimator.ModeKeys.PREDICT)
V = 20
# The towers-only mode: tower score served, the in-batch softmax the only loss.
TOWERS_ONLY = dict(serving_score="tower", loss_weights={"softmax": 1.0})


def _cfg(**kw):
    return tiny_config(**kw)


def _feed(features):
    return {k: tf.constant(v) for k, v in features.items()}


@pytest.mark.parametrize("mode", [TRAIN, EVAL, PREDICT])
def test_model_fn_all_modes(mode):
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(1)
        f = random_batch(13, 7, 5, V)
        labels = None if mode == PREDICT else tf.constant(
            (np.arange(13) % 3 == 0).astype(np.float32))
        emb = np.random.RandomState(0).normal(size=(V, 8)).astype(np.float32)
        spec = model_fn.model_fn_builder(_cfg(), V, emb)(_feed(f), labels, mode, {})
        with tf.compat.v1.Session() as sess:
            sess.run([tf.compat.v1.global_variables_initializer(),
                      tf.compat.v1.local_variables_initializer()])
            if mode == TRAIN:
                spec.scaffold.init_fn(sess)
                word = [v for v in tf.compat.v1.global_variables()
                        if v.name == "ranker/text_tower/word_embedding/embeddings:0"][0]
                np.testing.assert_array_equal(sess.run(word), emb)
                step = tf.compat.v1.train.get_global_step()
                l0 = sess.run(spec.loss)
                for _ in range(15):
                    sess.run(spec.train_op)
                assert sess.run(step) == 15
                assert np.isfinite(l0) and sess.run(spec.loss) < l0
            elif mode == EVAL:
                sess.run([op for _, op in spec.eval_metric_ops.values()])
                values = sess.run({k: v for k, (v, _) in spec.eval_metric_ops.items()})
                assert 0.0 <= values["ndcg@5"] <= 1.0 and 0.0 <= values["auc"] <= 1.0
                assert np.isfinite(sess.run(spec.loss))
            else:
                out = sess.run(spec.predictions)
                assert out[outputs.SCORE].shape == (13,)
                assert out[outputs.QUERY_EMBEDDING].shape == (13, 16)
                assert out[outputs.PRODUCT_EMBEDDING].shape == (13, 16)
                np.testing.assert_array_equal(out["product_id"], f[schema.F_PRODUCT_ID])
                # The default serves the towers' score; the cross logit comes alongside.
                np.testing.assert_allclose(out[outputs.SCORE], out[outputs.TOWER_SCORE],
                                           rtol=1e-5, atol=1e-5)
                assert np.abs(out[outputs.CROSS_LOGIT] - out[outputs.SCORE]).max() > 1e-3


@pytest.mark.parametrize("mode", [TRAIN, EVAL])
def test_listwise_cross_softmax_loss_trains_and_evaluates(mode):
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(2)
        f = random_batch(12, 6, 4, V, seed=3)
        f[schema.F_QUERY_ID] = np.repeat(np.arange(3), 4).astype(np.int64)  # 3 lists of 4
        labels = tf.constant((np.arange(12) % 4 == 0).astype(np.float32))
        cfg = _cfg(loss_weights={"cross_softmax": 1.0})
        spec = model_fn.model_fn_builder(cfg, V, None)(_feed(f), labels, mode, {})
        with tf.compat.v1.Session() as sess:
            sess.run([tf.compat.v1.global_variables_initializer(),
                      tf.compat.v1.local_variables_initializer()])
            l0 = sess.run(spec.loss)
            # One positive against 3 (eval) or up to K (train) negatives: about log(1 + n)
            # at initialisation.
            assert 0.3 < l0 < 3.0
            if mode == TRAIN:
                for _ in range(20):
                    sess.run(spec.train_op)
                assert sess.run(spec.loss) < l0


def _predict_scores(features_list, cfg):
    """Scores of several feature batches with the same (random) weights."""
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(3)
        placeholders = {k: tf.compat.v1.placeholder(tf.as_dtype(v.dtype), [None] * v.ndim)
                        for k, v in features_list[0].items()}
        spec = model_fn.model_fn_builder(cfg, V)(placeholders, None, PREDICT, {})
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return [sess.run(spec.predictions[outputs.SCORE],
                             {placeholders[k]: v for k, v in f.items()}) for f in features_list]


def test_predict_score_of_a_pair_ignores_other_rows_and_padding():
    cfg = _cfg(dropout=0.1)   # dropout must be off in PREDICT
    a = random_batch(13, 5, 5, V, seed=1)
    b = random_batch(13, 5, 5, V, seed=2)
    # Row 4 of `a` copied into a batch of other rows, at position 9.
    mixed = {k: v.copy() for k, v in b.items()}
    for k in mixed:
        mixed[k][9] = a[k][4]
    # Row 4 of `a` alone, with 2 extra padded tokens (up to the cap of 7) and 2 extra
    # padded boxes, all filled with garbage.
    alone = {k: v[4:5] for k, v in a.items()}
    alone[schema.F_TOKEN_IDS] = np.concatenate([alone[schema.F_TOKEN_IDS],
                                                np.full([1, 2], 5, np.int32)], 1)
    for key, width in ((schema.F_BOX_FEATURES, 2), (schema.F_BOX_GEOMETRY, 2),
                       (schema.F_BOX_LABELS, 2)):
        extra = random_batch(1, 7, width, V, seed=9)[key]
        alone[key] = np.concatenate([alone[key], extra], 1)
    s_a, s_b, s_mixed, s_alone = _predict_scores([a, b, mixed, alone], cfg)
    assert abs(s_a[4] - s_b[9]) > 1e-4                     # different pairs, different scores
    np.testing.assert_allclose(s_mixed[9], s_a[4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_alone[0], s_a[4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.delete(s_mixed, 9), np.delete(s_b, 9), rtol=1e-5, atol=1e-5)


def _variable_signature(prefill, **cfg_overrides):
    with tf.Graph().as_default():
        if prefill:   # unrelated things, taking the names "ranker", "text_tower", "dense"
            tf.keras.layers.Dense(3, name="dense")(tf.zeros([1, 2]))
            tf.keras.layers.Dense(3, name="text_tower")(tf.zeros([1, 2]))
            tf.keras.layers.Dense(3, name="ranker")(tf.zeros([1, 2]))
            with tf.name_scope("ranker"):
                tf.constant(1.0, name="serving_input")
            tf.compat.v1.train.get_or_create_global_step()
        ranker = network.build_ranker(_cfg(**cfg_overrides), V)
        ranker.encode_query(tf.zeros([13, 7], tf.int32), tf.fill([13], 3))
        sig = sorted((k, tuple(v.shape)) for k, v in ranker.variable_map().items())
        assert len(sig) == len(ranker.variables)
        return sig


def test_variable_names_are_deterministic_and_independent_of_the_graph():
    first, second, prefilled = (_variable_signature(False), _variable_signature(False),
                                _variable_signature(True))
    assert first == second == prefilled
    assert all(name.startswith("ranker/") for name, _ in first)
    assert ("ranker/text_tower/word_embedding/embeddings", (V, 8)) in first


def test_variable_names_and_shapes_are_unchanged():
    # Checkpoints and exports restore by name: the tiny ranker's list is pinned in a file.
    path = os.path.join(os.path.dirname(__file__), "data", "tiny_ranker_variables.json")
    with open(path, encoding="utf-8") as f:
        pinned = [(name, tuple(shape)) for name, shape in json.load(f)]
    assert _variable_signature(False) == pinned


def test_knob_defaults_are_the_pinned_model_and_other_values_change_only_their_part():
    default = dict(_variable_signature(False))
    assert _variable_signature(False, pooling="attention", region_features="log1p",
                               focal_gamma=2.0) == sorted(default.items())
    # Raw features: the same variables (only the input transform differs).
    assert dict(_variable_signature(False, region_features="raw")) == default
    # Mean pooling: the towers' attention-pooling weights are gone, nothing else changes.
    mean = dict(_variable_signature(False, pooling="mean"))
    tower_pooling = {k for k in default if k.startswith(("ranker/text_tower/pooling/",
                                                         "ranker/box_tower/pooling/"))}
    assert tower_pooling and mean == {k: v for k, v in default.items()
                                      if k not in tower_pooling}
    # Towers only: no matcher variables.
    towers_only = dict(_variable_signature(False, **TOWERS_ONLY))
    assert towers_only == {k: v for k, v in default.items()
                           if not k.startswith("ranker/matcher/")}


def test_towers_only_model_fn_forms_no_pairs_and_keeps_the_output_contract():
    f = random_batch(13, 7, 5, V)
    cfg = _cfg(**TOWERS_ONLY)
    assert not cfg.uses_matcher
    with tf.Graph().as_default():
        spec = model_fn.model_fn_builder(cfg, V)(_feed(f), tf.ones([13]), TRAIN, {})
        ops = {op.type for op in tf.compat.v1.get_default_graph().get_operations()}
        # No negative sampling (top-k over [B, B] scores) and no pair gathers of states.
        assert "TopKV2" not in ops and "GatherV2" not in ops, ops & {"TopKV2", "GatherV2"}
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            losses = [sess.run([spec.loss, spec.train_op])[0] for _ in range(8)]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    with tf.Graph().as_default():
        labels = tf.constant((np.arange(13) % 3 == 0).astype(np.float32))
        spec = model_fn.model_fn_builder(cfg, V)(_feed(f), labels, EVAL, {})
        assert "ndcg@5" in spec.eval_metric_ops and "ndcg@5_cross" not in spec.eval_metric_ops
    with tf.Graph().as_default():
        spec = model_fn.model_fn_builder(cfg, V)(_feed(f), None, PREDICT, {})
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            out = sess.run(spec.predictions)
    np.testing.assert_array_equal(out[outputs.CROSS_LOGIT], np.zeros(13, np.float32))
    np.testing.assert_array_equal(out[outputs.SCORE], out[outputs.TOWER_SCORE])
    # Cosine / temperature of the returned unit embeddings.
    cosine = (out[outputs.QUERY_EMBEDDING] * out[outputs.PRODUCT_EMBEDDING]).sum(-1)
    np.testing.assert_allclose(out[outputs.SCORE], cosine / cfg.temperature, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("loss", ["focal", "log_loss"])
def test_a_cross_loss_keeps_the_matcher_with_the_tower_score_served(loss):
    cfg = _cfg(serving_score="tower", loss_weights={"softmax": 1.0, loss: 0.5})
    assert cfg.uses_matcher
    with tf.Graph().as_default():
        spec = model_fn.model_fn_builder(cfg, V)(_feed(random_batch(13, 7, 5, V)),
                                                 tf.ones([13]), TRAIN, {})
        assert any(v.name.startswith("ranker/matcher/")
                   for v in tf.compat.v1.trainable_variables())
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            assert np.isfinite(sess.run(spec.loss))


def test_build_ranker_needs_a_resolved_word_embedding_width():
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match="resolve_config"):
            network.build_ranker(_cfg(word_embedding_size=0), V)
    with tf.Graph().as_default():   # with word2vec vectors their width W is the width
        emb = np.zeros([V, 6], np.float32)
        ranker = network.build_ranker(_cfg(word_embedding_size=0), V, emb)
        assert ranker.text_tower.word_embedding.embeddings.shape == (V, 6)


def test_model_fn_builder_rejects_embeddings_of_another_shape():
    with pytest.raises(ValueError, match="word_embedding_size 8"):
        model_fn.model_fn_builder(_cfg(), V, np.zeros([V, 6], np.float32))
    with pytest.raises(ValueError, match="vocab_size 20"):
        model_fn.model_fn_builder(_cfg(), V, np.zeros([V + 1, 8], np.float32))


def test_restore_ranker_from_estimator_checkpoint_reproduces_predict(tmp_path):
    prep = PrepDir(write_prep_dir(str(tmp_path / "prep"), num_train=64, num_valid_queries=3,
                                  candidates=5))
    cfg = train.resolve_config(_cfg(train_steps=3, dropout=0.1), prep)
    est = train.build_estimator(cfg, str(tmp_path / "model"), prep)
    est.train(input_fn.input_fn_builder(cfg, prep.split_files("train"), TRAIN, prep),
              max_steps=3)
    pred_input = input_fn.input_fn_builder(cfg, prep.split_files("valid"), PREDICT, prep)
    expected = [p[outputs.SCORE] for p in est.predict(pred_input)]
    # Fresh graph: build the Ranker, restore with a name-based Saver, score the same rows.
    with tf.Graph().as_default():
        iterator = tf.compat.v1.data.make_initializable_iterator(pred_input())
        features = iterator.get_next()
        ranker = network.build_ranker(cfg, len(prep.vocab_tokens()))
        q_states, q_pooled = ranker.encode_query(features[schema.F_TOKEN_IDS],
                                                 features[schema.F_NUM_TOKENS])
        p_states, p_pooled = ranker.encode_product(
            features[schema.F_BOX_FEATURES], features[schema.F_BOX_GEOMETRY],
            features[schema.F_BOX_LABELS], features[schema.F_NUM_BOXES])
        out = ranker.score_pairs(q_states, features[schema.F_NUM_TOKENS], q_pooled,
                                 p_states, features[schema.F_NUM_BOXES], p_pooled)
        saver = tf.compat.v1.train.Saver(var_list=ranker.variable_map())
        got = []
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.tables_initializer())
            sess.run(iterator.initializer)
            saver.restore(sess, est.latest_checkpoint())
            try:
                while True:
                    got.extend(sess.run(out[outputs.SCORE]).tolist())
            except tf.errors.OutOfRangeError:
                pass
    assert len(got) == len(expected) == 15
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_mixed_precision_switch_trains_with_float32_variables():
    with tf.Graph().as_default():
        f = random_batch(13, 7, 5, V)
        spec = model_fn.model_fn_builder(_cfg(mixed_precision=True), V)(
            _feed(f), tf.ones([13]), TRAIN, {})
        assert all(v.dtype.base_dtype == tf.float32 for v in tf.compat.v1.global_variables()
                   if v.name.startswith("ranker/"))
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            losses = [sess.run([spec.loss, spec.train_op])[0] for _ in range(4)]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_cross_to_tower_gradient_switch(scale):
    with tf.Graph().as_default():
        f = random_batch(13, 7, 5, V)
        cfg = _cfg(loss_weights={"log_loss": 1.0}, cross_to_tower_gradient=scale)
        spec = model_fn.model_fn_builder(cfg, V)(_feed(f), tf.ones([13]), TRAIN, {})
        box_vars = [v for v in tf.compat.v1.trainable_variables()
                    if v.name.startswith("ranker/box_tower/encoder_0/")]
        matcher_vars = [v for v in tf.compat.v1.trainable_variables()
                        if v.name.startswith("ranker/matcher/mlp_out/")]
        grads = tf.gradients(spec.loss, box_vars + matcher_vars)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            values = sess.run([g for g in grads if g is not None])
        tower_norm = sum(float(np.abs(v).sum()) for v in values[:-2])
        assert float(np.abs(values[-2]).sum()) > 0          # the matcher always learns
        assert (tower_norm == 0.0) == (scale == 0.0), tower_norm


def _initial_weights(seed):
    with tf.Graph().as_default():
        features = _feed(random_batch(4, 3, 2, V))
        model_fn.model_fn_builder(_cfg(seed=seed), V)(features, None, PREDICT, {})
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return {v.name: sess.run(v) for v in tf.compat.v1.global_variables()}


def test_config_seed_alone_fixes_the_initial_weights():
    # No graph-level seed: Config.seed must reach the Keras initializers by itself.
    a, b, c = _initial_weights(5), _initial_weights(5), _initial_weights(6)
    assert len(a) > 50 and a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    kernels = [k for k in a if k.endswith("kernel:0")]
    assert all(not np.array_equal(a[k], c[k]) for k in kernels)


def test_eval_ndcg_counts_a_duplicated_product_once_as_the_scorer_does():
    """Rows repeating a product of their query take no position of their own in eval NDCG@5,
    as in `mmrecall rank` + `mmrecall score` (the same weights score PREDICT and EVAL)."""
    f = random_batch(13, 7, 5, V, seed=3)
    f[schema.F_QUERY_ID] = np.array([0] * 7 + [1] * 6, np.int64)
    for dup, orig in ((3, 0), (5, 1), (9, 7)):               # exact copies: equal scores
        for key in f:
            if key != schema.F_QUERY_ID:
                f[key][dup] = f[key][orig]
    labels = np.array([1, 0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1], np.float32)
    emb = np.random.RandomState(0).normal(size=(V, 8)).astype(np.float32)

    def run(mode):
        with tf.Graph().as_default():
            spec = model_fn.model_fn_builder(_cfg(), V, emb)(
                _feed(f), None if mode == PREDICT else tf.constant(labels), mode, {})
            with tf.compat.v1.Session() as sess:
                sess.run([tf.compat.v1.global_variables_initializer(),
                          tf.compat.v1.local_variables_initializer()])
                if mode == PREDICT:
                    return sess.run(spec.predictions)[outputs.SCORE]
                sess.run([op for _, op in spec.eval_metric_ops.values()])
                return sess.run(spec.eval_metric_ops["ndcg@5"][0])

    scores, in_graph = run(PREDICT), run(EVAL)
    ids, qids = f[schema.F_PRODUCT_ID], f[schema.F_QUERY_ID]
    expected = np.mean([
        score.ndcg_at_5(rank.top_k(ids[qids == q], scores[qids == q]),
                        set(ids[(qids == q) & (labels > 0)].tolist())) for q in (0, 1)])
    assert in_graph == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("cross_layers", [1, 2])
def test_score_pairs_by_index_equals_scoring_gathered_pairs(cross_layers):
    # The training path scores pairs by index (first-round projections once per example);
    # it must give the scores, and the gradients, of scoring the gathered pairs.
    cfg = _cfg(cross_layers=cross_layers, serving_score="sum")
    f = random_batch(13, 7, 5, V, seed=4)
    q_index = np.repeat(np.arange(13), 4).astype(np.int32)                      # K = 3
    p_index = np.random.RandomState(5).randint(0, 13, size=52).astype(np.int32)
    with tf.Graph().as_default():
        ranker = network.build_ranker(cfg, V)
        num_tokens = tf.constant(f[schema.F_NUM_TOKENS])
        num_boxes = tf.constant(f[schema.F_NUM_BOXES])
        q_states, q_pooled = ranker.encode_query(f[schema.F_TOKEN_IDS], num_tokens)
        p_states, p_pooled = ranker.encode_product(
            f[schema.F_BOX_FEATURES], f[schema.F_BOX_GEOMETRY], f[schema.F_BOX_LABELS],
            num_boxes)
        by_index = ranker.score_pairs(q_states, num_tokens, q_pooled, p_states, num_boxes,
                                      p_pooled, q_index=q_index, p_index=p_index)
        g = lambda x, i: tf.gather(x, i)  # noqa: E731
        gathered = ranker.score_pairs(g(q_states, q_index), g(num_tokens, q_index),
                                      g(q_pooled, q_index), g(p_states, p_index),
                                      g(num_boxes, p_index), g(p_pooled, p_index))
        grads = [[tf.convert_to_tensor(d) for d in tf.gradients(
            tf.reduce_sum(out[outputs.SCORE] * tf.range(52.0)), ranker.trainable_variables)]
            for out in (by_index, gathered)]
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            a, b, ga, gb = sess.run([by_index, gathered] + grads)
    for key in (outputs.SCORE, outputs.CROSS_LOGIT, outputs.TOWER_SCORE, "text_gate"):
        assert a[key].shape == (52,)
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
    # Relative to the largest gradient: the key biases' are zero up to rounding.
    scale = max(np.abs(y).max() for y in gb)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * scale)
