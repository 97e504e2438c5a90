"""Tower shapes with odd sizes, padding invariance, word2vec initialisation and freezing."""
import numpy as np

from data_prep import schema
from estimator import towers
from mmrecall_testing.model_fixtures import random_batch, tiny_config

B, T, N, D, E, V, W = 13, 7, 5, 24, 16, 20, 8


def _cfg(**kw):
    return tiny_config(word_embedding_size=W, hidden_size=D, pooled_size=E, num_heads=4,
                       intermediate_size=32, text_layers=2, box_layers=2,
                       max_query_tokens=T + 3, box_hidden_size=32, geometry_hidden_size=8,
                       dropout=0.0, **kw)


def _text(embeddings=None, **kw):
    return towers.TextTower(_cfg(**kw), V, embeddings, name="text_tower")


def _box(**kw):
    return towers.BoxTower(_cfg(**kw), name="box_tower")


def _box_args(f):
    return [f[k] for k in (schema.F_BOX_FEATURES, schema.F_BOX_GEOMETRY, schema.F_BOX_LABELS,
                           schema.F_NUM_BOXES)]


def test_text_tower_shapes_and_padding_invariance():
    f = random_batch(B, T, N, V)
    tower = _text()
    states, pooled, diag = tower(f[schema.F_TOKEN_IDS], f[schema.F_NUM_TOKENS])
    assert states.shape == (B, T, D)
    assert pooled.shape == (B, E)
    np.testing.assert_allclose(np.linalg.norm(pooled.numpy(), axis=1), 1.0, rtol=1e-5)
    assert len(diag["self_attention_entropy"]) == 2
    # Zero the padding and add 3 more padded positions: nothing real may change.
    ids = f[schema.F_TOKEN_IDS] * (np.arange(T)[None] < f[schema.F_NUM_TOKENS][:, None])
    ids_pad = np.concatenate([ids, np.zeros([B, 3], np.int32)], 1)
    states2, pooled2, _ = tower(ids_pad, f[schema.F_NUM_TOKENS])
    np.testing.assert_allclose(pooled.numpy(), pooled2.numpy(), atol=1e-5)
    m = (np.arange(T)[None] < f[schema.F_NUM_TOKENS][:, None])[..., None]
    np.testing.assert_allclose(states.numpy() * m, states2.numpy()[:, :T] * m, atol=1e-5)


def test_box_tower_shapes_and_padding_invariance():
    f = random_batch(B, T, N, V)
    tower = _box()
    args = _box_args(f)
    states, pooled, _ = tower(*args)
    assert states.shape == (B, N, D)
    assert pooled.shape == (B, E)
    # Two extra padded boxes full of garbage (random_batch's padding is garbage already).
    extra = random_batch(B, T, 2, V, seed=7)
    padded = [np.concatenate([a, extra[k]], 1) for a, k in
              zip(args[:3], (schema.F_BOX_FEATURES, schema.F_BOX_GEOMETRY, schema.F_BOX_LABELS))]
    states2, pooled2, _ = tower(*padded, args[3])
    np.testing.assert_allclose(pooled.numpy(), pooled2.numpy(), atol=1e-5)
    m = (np.arange(N)[None] < args[3][:, None])[..., None]
    np.testing.assert_allclose(states.numpy() * m, states2.numpy()[:, :N] * m, atol=1e-5)
    # Changing a real box does change the output (the test can fail).
    changed = args[0].copy()
    changed[:, 0] += 1.0
    _, pooled3, _ = tower(changed, *args[1:])
    assert np.abs(pooled3.numpy() - pooled.numpy()).max() > 1e-3


def test_word2vec_initialisation_and_freezing():
    emb = np.random.RandomState(0).normal(size=(V, W)).astype(np.float32)
    tower = _text(emb, trainable_embeddings=False)
    tower(np.ones([1, 2], np.int32), np.array([2], np.int32))
    np.testing.assert_array_equal(tower.word_embedding.embeddings.numpy(), emb)
    names = [v.name for v in tower.trainable_variables]
    assert not any("word_embedding" in n for n in names)
    trainable = _text(emb)
    trainable(np.ones([1, 2], np.int32), np.array([2], np.int32))
    assert any("word_embedding" in v.name for v in trainable.trainable_variables)


def test_config_round_trips_through_get_config():
    text = _text(trainable_embeddings=False)
    again = towers.TextTower.from_config(text.get_config())
    assert again.cfg == text.cfg and again.vocab_size == V and again.name == "text_tower"
    box = _box()
    assert towers.BoxTower.from_config(box.get_config()).cfg == box.cfg


def test_mean_pooling_is_the_masked_mean_of_the_states_projected():
    f = random_batch(B, T, N, V)
    tower = _text(pooling="mean")
    states, pooled, _ = tower(f[schema.F_TOKEN_IDS], f[schema.F_NUM_TOKENS])
    assert not any("/pooling/" in v.name for v in tower.variables)
    n = f[schema.F_NUM_TOKENS]
    mean = np.stack([states.numpy()[b, :n[b]].mean(0) for b in range(B)])    # [B, D]
    kernel, bias = tower.pooled_projection.get_weights()
    want = mean @ kernel + bias                                               # [B, E]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled.numpy(), want, rtol=1e-4, atol=1e-5)


def test_raw_region_features_skip_log1p():
    f = random_batch(B, T, N, V)
    args = _box_args(f)
    log1p, raw = _box(), _box(region_features="raw")
    expected = log1p(*args)[1].numpy()
    raw(*args)
    raw.set_weights(log1p.get_weights())     # same variables, same order
    # The raw tower fed log1p(features) is the log1p tower fed the features...
    np.testing.assert_allclose(raw(np.log1p(args[0]), *args[1:])[1].numpy(), expected,
                               rtol=1e-5, atol=1e-5)
    # ...and differs from it on the features themselves.
    assert np.abs(raw(*args)[1].numpy() - expected).max() > 1e-3
