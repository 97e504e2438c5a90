"""Tower shapes with odd sizes, padding invariance, word2vec initialisation and freezing."""
import numpy as np
import tensorflow as tf

from data_prep import schema
from estimator import towers
from mmrecall_testing.model_fixtures import random_batch

B, T, N, D, E, V, W = 13, 7, 5, 24, 16, 20, 8


def _text(**kw):
    args = dict(vocab_size=V, word_embedding_size=W, hidden_size=D, pooled_size=E,
                num_heads=4, intermediate_size=32, num_layers=2, max_tokens=T + 3,
                dropout=0.0, name="text_tower")
    args.update(kw)
    return towers.TextTower(**args)


def _box():
    return towers.BoxTower(hidden_size=D, pooled_size=E, num_heads=4, intermediate_size=32,
                           num_layers=2, box_hidden_size=32, geometry_hidden_size=8,
                           dropout=0.0, name="box_tower")


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
    args = [f[k] for k in (schema.F_BOX_FEATURES, schema.F_BOX_GEOMETRY, schema.F_BOX_LABELS,
                           schema.F_NUM_BOXES)]
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
    tower = _text(embeddings=emb, trainable_embeddings=False)
    tower(np.ones([1, 2], np.int32), np.array([2], np.int32))
    np.testing.assert_array_equal(tower.word_embedding.embeddings.numpy(), emb)
    names = [v.name for v in tower.trainable_variables]
    assert not any("word_embedding" in n for n in names)
    trainable = _text(embeddings=emb)
    trainable(np.ones([1, 2], np.int32), np.array([2], np.int32))
    assert any("word_embedding" in v.name for v in trainable.trainable_variables)
