"""word2vec embeddings of the lemma vocabulary, trained on the lemmatized train queries.

The corpus is streamed from the per-shard `lemmas.txt` sidecars (one query per line), so it
is never held in memory and is the same whichever machine wrote which shard. Training is
deterministic: a fixed seed and one gensim worker thread.

Dimension legend: V vocabulary entries, W word2vec width.
"""
import io
import os
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from data_prep import schema, shards

MODEL_FILE = "word2vec.model"
SEED = 2020
WINDOW = 5


class LineCorpus:
    """Re-iterable sentences (lists of tokens) read lazily from space-separated text files."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __iter__(self) -> Iterator[List[str]]:
        for path in self.paths:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    tokens = line.split()
                    if tokens:
                        yield tokens


def train(corpus_paths: Sequence[str], embedding_dim: int, min_count: int, epochs: int):
    """Trains a gensim skip-gram Word2Vec model, deterministically.

    Args:
      corpus_paths: lemma files, one query per line, in shard order.
      embedding_dim: W, the vector width.
      min_count: ignore lemmas seen fewer times (as vocab.build_vocab does).
      epochs: training passes over the corpus.
    Returns:
      gensim.models.Word2Vec, or None when the corpus has no words.
    """
    from gensim.models import Word2Vec

    corpus = LineCorpus(corpus_paths)
    if not any(True for _ in corpus):
        return None
    model = Word2Vec(vector_size=embedding_dim, window=WINDOW, min_count=min_count, sg=1,
                     seed=SEED, workers=1)
    model.build_vocab(corpus)
    model.train(corpus, total_examples=model.corpus_count, epochs=epochs)
    return model


def aligned_vectors(model, tokens: Sequence[str], embedding_dim: int) -> Tuple[np.ndarray,
                                                                                List[str]]:
    """The embedding matrix of a vocabulary, rows L2-normalised.

    Args:
      model: a trained gensim Word2Vec, or None.
      tokens: the vocabulary, index == id ([PAD], [UNK] first).
      embedding_dim: W.
    Returns:
      (float32 [V, W] with zero [PAD] and [UNK] rows, the vocabulary tokens word2vec had no
      vector for; those rows are small random unit vectors, seeded so reruns agree).
    """
    out = np.zeros((len(tokens), embedding_dim), np.float32)
    rng = np.random.default_rng(SEED)
    missing = []
    for i, token in enumerate(tokens):
        if i in (schema.PAD_ID, schema.UNK_ID):
            continue
        if model is not None and token in model.wv.key_to_index:
            vector = model.wv[token].astype(np.float64)
        else:
            missing.append(token)
            vector = rng.normal(size=embedding_dim)
        norm = np.linalg.norm(vector)
        out[i] = vector / norm if norm > 0 else vector
    return out, missing


def save(out_dir: str, model, matrix: np.ndarray, embeddings_file: str) -> None:
    """Writes the matrix as `embeddings_file` (atomically) and the gensim model beside it."""
    buffer = io.BytesIO()
    np.save(buffer, matrix.astype(np.float32))
    shards.write_atomic(os.path.join(out_dir, embeddings_file), buffer.getvalue())
    if model is not None:
        model.save(os.path.join(out_dir, MODEL_FILE))
