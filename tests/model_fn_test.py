"""model_fn in TRAIN / EVAL / PREDICT, PREDICT row independence, padding invariance, and the
Ranker contract: deterministic variable names and restoring from Estimator checkpoints."""
import numpy as np
import pytest
import tensorflow as tf

from data_prep import schema
from estimator import input_fn, model_fn, network, train
from mmrecall_testing.model_fixtures import random_batch, tiny_config, write_prep_dir

TRAIN, EVAL, PREDICT = (tf.estimator.ModeKeys.TRAIN, tf.estimator.ModeKeys.EVAL,
                        tf.estimator.ModeKeys.PREDICT)
V = 20


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
                assert out["score"].shape == (13,)
                assert out["query_embedding"].shape == (13, 16)
                assert out["product_embedding"].shape == (13, 16)
                np.testing.assert_array_equal(out["product_id"], f[schema.F_PRODUCT_ID])
                np.testing.assert_allclose(out["score"], out["cross_logit"] + out["tower_score"],
                                           rtol=1e-5, atol=1e-5)


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
            return [sess.run(spec.predictions["score"],
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


def _variable_signature(prefill):
    with tf.Graph().as_default():
        if prefill:   # unrelated things, taking the names "ranker", "text_tower", "dense"
            tf.keras.layers.Dense(3, name="dense")(tf.zeros([1, 2]))
            tf.keras.layers.Dense(3, name="text_tower")(tf.zeros([1, 2]))
            tf.keras.layers.Dense(3, name="ranker")(tf.zeros([1, 2]))
            with tf.name_scope("ranker"):
                tf.constant(1.0, name="serving_input")
            tf.compat.v1.train.get_or_create_global_step()
        ranker = network.build_ranker(_cfg(), V)
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


def test_restore_ranker_from_estimator_checkpoint_reproduces_predict(tmp_path):
    data = write_prep_dir(str(tmp_path / "prep"), num_train=64, num_valid_queries=3,
                          candidates=5)
    cfg = train.resolve_config(_cfg(train_steps=3, dropout=0.1), data)
    est = train.build_estimator(cfg, str(tmp_path / "model"), data)
    est.train(input_fn.input_fn_builder(cfg, input_fn.split_files(data, "train"), TRAIN),
              max_steps=3)
    pred_input = input_fn.input_fn_builder(cfg, input_fn.split_files(data, "valid"), PREDICT)
    expected = [p["score"] for p in est.predict(pred_input)]
    # Fresh graph: build the Ranker, restore with a name-based Saver, score the same rows.
    with tf.Graph().as_default():
        iterator = tf.compat.v1.data.make_initializable_iterator(pred_input())
        features = iterator.get_next()
        ranker = network.build_ranker(cfg, len(input_fn.vocab_tokens(data)))
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
                    got.extend(sess.run(out["score"]).tolist())
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


def test_learning_rate_warmup_then_decay_to_floor():
    cfg = _cfg(learning_rate=1e-3, warmup_steps=10, train_steps=110, decay="cosine",
               min_learning_rate_ratio=0.1)
    lr = [float(model_fn.learning_rate_schedule(cfg, tf.constant(s))) for s in
          (0, 4, 9, 60, 110, 500)]
    # warmup: (step + 1) / 10 of the peak; cosine half way (step 60): 0.1 + 0.9 * 0.5 = 0.55
    np.testing.assert_allclose(lr, [1e-4, 5e-4, 1e-3, 0.55e-3, 1e-4, 1e-4], rtol=1e-5)


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
