"""The lemma vocabulary: counting, the `vocab.tsv` file, and the in-graph id lookup.

`vocab.tsv` holds one `token<TAB>count` line per id: line 0 is [PAD] (id 0), line 1 is [UNK]
(id 1), then lemmas by descending count, ties broken alphabetically, so a vocabulary is a
pure function of its counts.
"""
import collections
from typing import Dict, Iterable, List, Sequence, Tuple

from data_prep import schema, shards


def count_lemmas(queries: Iterable[Sequence[str]]) -> collections.Counter:
    """Counts lemma occurrences over normalised queries (each a sequence of lemmas)."""
    counts = collections.Counter()
    for lemmas in queries:
        counts.update(lemmas)
    return counts


def build_vocab(counts: Dict[str, int], min_count: int = 1,
                max_size: int = 0) -> List[Tuple[str, int]]:
    """Orders lemmas into a vocabulary.

    Args:
      counts: lemma -> number of occurrences.
      min_count: drop lemmas seen fewer times.
      max_size: keep at most this many entries including [PAD] and [UNK] (0 = no limit).
    Returns:
      [(token, count)] where index == id; [PAD] and [UNK] first with count 0.
    """
    kept = sorted(((t, c) for t, c in counts.items()
                   if c >= min_count and t not in (schema.PAD_TOKEN, schema.UNK_TOKEN)),
                  key=lambda tc: (-tc[1], tc[0]))
    entries = [(schema.PAD_TOKEN, 0), (schema.UNK_TOKEN, 0)] + kept
    return entries[:max_size] if max_size else entries


def save_vocab(entries: Sequence[Tuple[str, int]], path: str) -> None:
    """Writes `token<TAB>count` lines atomically (shards.write_atomic: temporary, rename)."""
    for token, _ in entries:
        if "\t" in token or "\n" in token:
            raise ValueError(f"token {token!r} contains a tab or newline")
    shards.write_atomic(path, "".join(f"{token}\t{count}\n"
                                      for token, count in entries).encode("utf-8"))


def load_vocab(path: str) -> List[Tuple[str, int]]:
    """Reads a `vocab.tsv`; returns [(token, count)] with index == id."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{line_no}: expected 'token<TAB>count', got {line!r}")
            entries.append((parts[0], int(parts[1])))
    if len(entries) < 2 or entries[0][0] != schema.PAD_TOKEN or entries[1][0] != schema.UNK_TOKEN:
        raise ValueError(f"{path}: must start with {schema.PAD_TOKEN} and {schema.UNK_TOKEN}")
    return entries


def lookup_table(tokens: Sequence[str]):
    """An in-graph token -> id table (unknown tokens map to UNK_ID).

    Built from in-graph constants, so a SavedModel carries it without loose file paths.
    The input_fn and the serving graph both use this function.

    Args:
      tokens: the vocabulary, index == id (from load_vocab).
    Returns:
      tf.lookup.StaticHashTable mapping tf.string -> tf.int64.
    """
    import tensorflow as tf

    keys = tf.constant(list(tokens[2:]), dtype=tf.string)
    ids = tf.range(2, len(tokens), dtype=tf.int64)
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, ids), default_value=schema.UNK_ID)
