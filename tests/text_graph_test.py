"""The in-graph query normalisation (export.text_graph) equals data_prep.text.normalize_query."""
import numpy as np
import pytest
import tensorflow as tf

from data_prep import text
from data_prep import vocab as vocab_lib
from export import text_graph

TRICKY = [
    "Hypoallergenic Earrings",
    "MS. WESTERN-STYLE SHIRT",
    "tea all solid wood sofa, 2020 new",
    '"new" women\'s dress & shoes / bags',
    "children's  knives\t\tand\nforks",
    "  leading and trailing spaces  ",
    "is a red dress",
    "Are Is was red skirts",
    "be",
    "is",
    "the dress is red",              # "is" not leading: kept
    "café crème brûlée",             # precomposed accents
    "cafe\u0301 cre\u0300me",        # decomposed accents -> NFC
    "ÉCOLE İstanbul ΣΑΣ straße ẞ",   # dotted I, final sigma, sharp s
    "\u201csmart\u201d \u2018quotes\u2019 \u2014 dash\u2026 ellipsis",
    "full\uff0cwidth\uff01punct\u3002cjk\u3001comma",
    "non\u00a0breaking\u2003em\u3000ideographic space",
    "emoji 👗 dress ✨",
    "中文 query mixed",
    "mice knives leaves shelves hoodies leggings",
    "",
    "   ",
    ",./;'[]\\-=`~!@#$%^&*()_+{}|:\"<>?",
    "x" * 500,
    " ".join(["very", "long", "query"] * 40),
    "a-b_c.d/e'f\"g",
    "Ǆ ǅ ǆ ﬁ ligature",
    "I'm it's they're we've",
]


@pytest.fixture(scope="module")
def normalizers():
    return {flag: text_graph.QueryNormalizer(drop_leading_be=flag) for flag in (True, False)}


def _in_graph(normalizer, queries):
    out = normalizer(tf.constant(queries, tf.string)).to_list()
    return [[t.decode("utf-8") for t in row] for row in out]


def _mismatches(normalizer, queries, drop):
    got = _in_graph(normalizer, queries)
    return [(q, g, text.normalize_query(q, drop_leading_be=drop))
            for q, g in zip(queries, got) if g != text.normalize_query(q, drop_leading_be=drop)]


@pytest.mark.parametrize("drop", [True, False])
def test_tricky_queries_match_python(normalizers, drop):
    assert _mismatches(normalizers[drop], TRICKY, drop) == []


def test_tricky_queries_are_not_trivial(normalizers):
    # The cases exercise what they claim: leading "be" dropped, accents composed, plurals
    # lemmatised, separators removed, empty queries empty.
    got = dict(zip(TRICKY, _in_graph(normalizers[True], TRICKY)))
    assert got["is a red dress"] == ["a", "red", "dress"]
    assert got["the dress is red"] == ["the", "dress", "be", "red"]
    assert got["cafe\u0301 cre\u0300me"] == ["café", "crème"]
    assert got["mice knives leaves shelves hoodies leggings"] == ["mouse", "knife", "leaf",
                                                                  "shelf", "hoodie", "legging"]
    assert got[""] == [] and got["   "] == [] and got[",./;'[]\\-=`~!@#$%^&*()_+{}|:\"<>?"] == []
    assert _in_graph(normalizers[False], ["is a red dress"]) == [["be", "a", "red", "dress"]]


def test_every_query_of_a_generated_data_set_matches(normalizers):
    """All query texts the generator writes (train and valid/test lists), zero mismatches."""
    from data_prep import synth

    cfg = synth.SynthConfig(out_dir="", seed=11, train_rows=3000, valid_queries=150,
                            test_queries=150)
    queries = sorted({q.text for q, _ in synth.plan_train(cfg)} |
                     {c.query.text for _, c in synth.plan_eval(cfg)})
    assert len(queries) > 500
    bad = _mismatches(normalizers[True], queries, True)
    assert bad == [], bad[:5]


def test_lemma_table_has_no_empty_lemma():
    # text_graph reads "" from the table as "no entry"; an empty lemma would break that.
    assert all(text.lemma_table().values())


def test_query_token_ids_truncate_look_up_and_pad(normalizers):
    tokens = ["[PAD]", "[UNK]", "red", "dress", "woman"]
    table = vocab_lib.lookup_table(tokens)
    ids, counts = text_graph.query_token_ids(
        tf.constant(["Is a RED dress, for women!", "dress"]), normalizers[True], table,
        max_tokens=4)
    # "a red dress for woman" -> first 4 lemmas: a(UNK=1) red(2) dress(3) for(UNK=1).
    np.testing.assert_array_equal(ids.numpy(), [[1, 2, 3, 1], [3, 0, 0, 0]])
    np.testing.assert_array_equal(counts.numpy(), [4, 1])
    assert ids.dtype == tf.int32 and counts.dtype == tf.int32


@pytest.mark.parametrize("query", ["", "  ,,; ", "is are", "\u201c\u201d"])
def test_empty_query_is_invalid_argument_naming_query(normalizers, query):
    table = vocab_lib.lookup_table(["[PAD]", "[UNK]", "red"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="query: empty after normalisation"):
        text_graph.query_token_ids(tf.constant(["red", query]), normalizers[True], table, 8)


def test_invalid_utf8_is_invalid_argument_naming_query(normalizers):
    table = vocab_lib.lookup_table(["[PAD]", "[UNK]", "red"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="query: not valid UTF-8"):
        text_graph.query_token_ids(tf.constant([b"red", b"r\xffd"]), normalizers[True],
                                   table, 8)


@pytest.mark.parametrize("query, message", [
    (b"?!", "query: empty after normalisation (no word left once punctuation and whitespace "
            "are removed)"),
    (b"r\xffd", "query: not valid UTF-8 text")])
def test_refusals_in_a_session_read_back_by_rank(query, message):
    # As the model server runs the graph: one Assert op whose message rank.field_message
    # reads back whole.
    from export import rank

    with tf.Graph().as_default():
        queries = tf.compat.v1.placeholder(tf.string, [None])
        table = vocab_lib.lookup_table(["[PAD]", "[UNK]", "red"])
        out = text_graph.query_token_ids(queries, text_graph.QueryNormalizer(), table, 8)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.tables_initializer())
            np.testing.assert_array_equal(sess.run(out[1], {queries: [b"red", b"is red"]}),
                                          [1, 1])
            with pytest.raises(tf.errors.InvalidArgumentError) as err:
                sess.run(out, {queries: [b"red", query]})
    assert rank.field_message(err.value.message) == message
