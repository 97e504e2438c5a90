"""vocab.py: counting, ordering, min_count and the vocab.tsv round trip."""
import pytest

from data_prep import schema, vocab


def test_build_vocab_orders_by_count_then_alphabet_after_pad_and_unk():
    counts = vocab.count_lemmas([["red", "dress"], ["blue", "dress"], ["red", "box"], ["dress"]])
    # dress 3, red 2, then blue/box 1 each, alphabetical
    entries = vocab.build_vocab(counts)
    assert entries == [(schema.PAD_TOKEN, 0), (schema.UNK_TOKEN, 0), ("dress", 3), ("red", 2),
                       ("blue", 1), ("box", 1)]
    assert [t for t, _ in vocab.build_vocab(counts, min_count=2)][2:] == ["dress", "red"]
    assert len(vocab.build_vocab(counts, max_size=3)) == 3


def test_save_and_load_round_trip(tmp_path):
    entries = vocab.build_vocab({"scarf": 4, "silk": 7, "women's": 1})
    path = str(tmp_path / "vocab.tsv")
    vocab.save_vocab(entries, path)
    assert vocab.load_vocab(path) == entries


def test_load_vocab_rejects_a_file_without_pad_and_unk(tmp_path):
    path = tmp_path / "vocab.tsv"
    path.write_text("dress\t3\n")
    with pytest.raises(ValueError, match="must start with"):
        vocab.load_vocab(str(path))
