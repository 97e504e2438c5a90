"""word2vec.py: streamed corpus, deterministic training, vectors aligned with the vocabulary."""
import numpy as np

from data_prep import schema, vocab, word2vec


def _corpus(tmp_path):
    a, b = tmp_path / "part-00000.lemmas.txt", tmp_path / "part-00001.lemmas.txt"
    a.write_text("red silk dress\nred dress\n\nwooden storage box\n")
    b.write_text("silk scarf\nred wooden box\n" * 3)
    return [str(a), str(b)]


def test_line_corpus_streams_sentences_in_file_order(tmp_path):
    sentences = list(word2vec.LineCorpus(_corpus(tmp_path)))
    assert sentences[:3] == [["red", "silk", "dress"], ["red", "dress"],
                             ["wooden", "storage", "box"]]
    assert len(sentences) == 9


def test_training_is_deterministic_and_vectors_are_aligned_and_normalised(tmp_path):
    paths = _corpus(tmp_path)
    counts = vocab.count_lemmas(word2vec.LineCorpus(paths))
    tokens = [t for t, _ in vocab.build_vocab(counts, min_count=2)] + ["unseen"]
    m1 = word2vec.train(paths, embedding_dim=7, min_count=2, epochs=2)
    m2 = word2vec.train(paths, embedding_dim=7, min_count=2, epochs=2)
    v1, missing = word2vec.aligned_vectors(m1, tokens, 7)
    v2, _ = word2vec.aligned_vectors(m2, tokens, 7)
    np.testing.assert_array_equal(v1, v2)
    assert v1.shape == (len(tokens), 7) and v1.dtype == np.float32
    assert not v1[schema.PAD_ID].any() and not v1[schema.UNK_ID].any()
    np.testing.assert_allclose(np.linalg.norm(v1[2:], axis=1), 1.0, rtol=1e-5)
    assert missing == ["unseen"]  # not in word2vec: a random unit vector
    i = tokens.index("red")
    w = m1.wv["red"]
    np.testing.assert_allclose(v1[i], w / np.linalg.norm(w), rtol=1e-5)


def test_empty_corpus_gives_no_model(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    assert word2vec.train([str(empty)], 4, 1, 1) is None
    vectors, missing = word2vec.aligned_vectors(None, ["[PAD]", "[UNK]", "a"], 4)
    assert missing == ["a"] and np.isclose(np.linalg.norm(vectors[2]), 1.0)
