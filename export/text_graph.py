"""In-graph query normalisation: `data_prep.text.normalize_query` with TensorFlow ops.

The serving graph receives the raw query string and must produce exactly the lemmas that
prep wrote into the TFRecords, so this module mirrors `data_prep.text` step by step using
only ops the stock TF Serving 2.15 model server links (core TF plus TF Text 2.12's
`NormalizeUTF8`):

  1. NFC            tensorflow_text.normalize_utf8(..., "NFC")
  2. lowercase      tf.strings.lower(..., encoding="utf-8")  (ICU full case mapping, as str.lower)
  3. separators     tf.strings.regex_replace(separator_pattern("re2"), " "), then a split on
                    ASCII whitespace (every whitespace code point is a separator, so after the
                    replacement only " " separates tokens)
  4. lemmas         a StaticHashTable built from in-graph constants of `lemma_table()`;
                    a token without an entry is its own lemma (spaCy's lookup lemmatizer)
  5. leading "be"   dropped when the prep manifest says so
  6. truncation     to the model's maximum number of tokens, then the vocabulary lookup.

`tests/text_graph_test.py` keeps this equal to the Python definition.

Dimension legend: B batch, T tokens.
"""
from typing import Dict, Optional, Tuple

import tensorflow as tf

from data_prep import schema
from data_prep import text as text_lib

QUERY_FIELD = "query"


def _normalize_utf8_nfc(queries: tf.Tensor) -> tf.Tensor:
    # Imported here so that modules that only need the helpers below do not pull in
    # tensorflow_text; the SavedModel needs it loaded for the NormalizeUTF8 op.
    import tensorflow_text as tf_text

    return tf_text.normalize_utf8(queries, "NFC")


def assert_valid_utf8(queries: tf.Tensor, field: str = QUERY_FIELD) -> tf.Operation:
    """An op failing with InvalidArgument naming `field` when a string is not UTF-8.

    Transcoding UTF-8 to UTF-8 replaces every ill-formed sequence by U+FFFD and leaves a
    well-formed string unchanged, so the two are equal exactly for valid UTF-8.
    """
    transcoded = tf.strings.unicode_transcode(queries, "UTF-8", "UTF-8", errors="replace")
    return _assert(tf.equal(transcoded, queries), f"{field}: not valid UTF-8 text")


def _assert(condition: tf.Tensor, message: str):
    """One Assert op failing with InvalidArgument "<message>" unless `condition` (bool, any
    shape) holds everywhere: tf.debugging.assert_* add a cond of several ops to print
    tensors, run on every request, which the field-naming message does not need."""
    return tf.debugging.Assert(tf.reduce_all(condition), [message])


class QueryNormalizer:
    """Raw query strings -> normalised lemma tokens, inside a graph (or eagerly).

    Builds its lemma table once (in the current graph when called in graph mode); call it on
    any number of query tensors afterwards.
    """

    def __init__(self, drop_leading_be: bool = True,
                 lemmas: Optional[Dict[str, str]] = None):
        """Args:
          drop_leading_be: as in `data_prep.text.normalize_query`; take it from the prep
            manifest so serving does what prep did.
          lemmas: word form -> lemma; defaults to `data_prep.text.lemma_table()`.
        """
        self.drop_leading_be = drop_leading_be
        table = text_lib.lemma_table() if lemmas is None else lemmas
        # Only forms that survive tokenisation unchanged can ever be looked up (tokens are
        # lowercase and separator-free); keep every entry anyway: the table is small (~42k)
        # and keeping all of it makes the equivalence with spaCy obvious.
        keys = sorted(table)
        values = [table[k] for k in keys]
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys, tf.string), tf.constant(values, tf.string)),
            default_value="")
        self._separators = text_lib.separator_pattern("re2")

    def tokenize(self, queries: tf.Tensor) -> tf.RaggedTensor:
        """Steps 1-3. Args: queries string [B]. Returns: ragged string [B, None]."""
        normalized = _normalize_utf8_nfc(queries)
        lowered = tf.strings.lower(normalized, encoding="utf-8")
        spaced = tf.strings.regex_replace(lowered, self._separators, " ")
        # sep=None splits on runs of ASCII whitespace and drops empty pieces.
        return tf.strings.split(spaced)

    def lemmatize(self, tokens: tf.RaggedTensor) -> tf.RaggedTensor:
        """Step 4: a token's lemma is its table entry, else the token itself."""
        flat = tokens.flat_values
        looked_up = self._table.lookup(flat)
        # The table has no empty lemma (checked in the tests), so "" means "no entry".
        lemmas = tf.where(tf.equal(looked_up, ""), flat, looked_up)
        return tokens.with_flat_values(lemmas)

    def __call__(self, queries: tf.Tensor) -> tf.RaggedTensor:
        """Normalises queries.

        Args:
          queries: string [B], raw UTF-8 query text.
        Returns:
          string ragged [B, None]: the lemmas of `data_prep.text.normalize_query`.
        """
        lemmas = self.lemmatize(self.tokenize(queries))
        if self.drop_leading_be:
            lemmas = drop_leading(lemmas, text_lib.BE_LEMMA)
        return lemmas


def drop_leading(tokens: tf.RaggedTensor, token: str) -> tf.RaggedTensor:
    """Drops, per row, the leading run of `token` ("be be red dress" -> "red dress").

    Works on the flat values [V] with the row of each (no ragged masking, whose generic
    ops are several times as many, each run on every request).
    """
    rows = tokens.value_rowids()                                           # [V]
    position = (tf.range(tf.size(rows, out_type=rows.dtype)) -
                tf.gather(tokens.row_starts(), rows))                      # [V] in its row
    # A row's leading run ends at its first other token; a row without one (empty
    # segment: the dtype's maximum) loses every token.
    first_other = tf.math.unsorted_segment_min(
        tf.where(tf.equal(tokens.flat_values, token), rows.dtype.max, position),
        rows, tokens.nrows())                                              # [B]
    keep = position >= tf.gather(first_other, rows)                       # [V]
    values = tf.gather(tokens.flat_values, tf.reshape(tf.where(keep), [-1]))
    lengths = tf.math.unsorted_segment_sum(tf.cast(keep, rows.dtype), rows, tokens.nrows())
    return tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)


def tokens_to_ids(lemmas: tf.RaggedTensor, vocab_table, max_tokens: int,
                  pad_to_max: bool = False, field: str = QUERY_FIELD
                  ) -> Tuple[tf.Tensor, tf.Tensor]:
    """Truncates, looks up ids and pads; fails on queries with no tokens.

    Args:
      lemmas: string ragged [B, None] from QueryNormalizer.
      vocab_table: string -> int64 table (`data_prep.vocab.lookup_table`).
      max_tokens: keep the first `max_tokens` lemmas (the model's maximum).
      pad_to_max: pad to exactly `max_tokens` columns instead of the batch's longest query.
      field: the request field named in the error.
    Returns:
      token_ids int32 [B, T] (PAD_ID padding), num_tokens int32 [B] (>= 1).
    Raises (when run):
      InvalidArgumentError naming `field` when a query has no token after normalisation.
    """
    lemmas = lemmas[:, :max_tokens]
    ids = tf.ragged.map_flat_values(vocab_table.lookup, lemmas)
    ids = tf.cast(ids, tf.int32)
    num_tokens = tf.cast(ids.row_lengths(), tf.int32)
    check = _assert(num_tokens > 0,
                    f"{field}: empty after normalisation (no word left once punctuation "
                    f"and whitespace are removed)")
    shape = [None, max_tokens] if pad_to_max else None
    token_ids = ids.to_tensor(default_value=schema.PAD_ID, shape=shape)
    with tf.control_dependencies([check]):
        return tf.identity(token_ids), tf.identity(num_tokens)


def query_token_ids(queries: tf.Tensor, normalizer: QueryNormalizer, vocab_table,
                    max_tokens: int, pad_to_max: bool = False,
                    field: str = QUERY_FIELD) -> Tuple[tf.Tensor, tf.Tensor]:
    """Raw queries string [B] -> (token_ids int32 [B, T], num_tokens int32 [B]), validated."""
    utf8_check = assert_valid_utf8(queries, field)
    with tf.control_dependencies([utf8_check]):
        queries = tf.identity(queries)
    return tokens_to_ids(normalizer(queries), vocab_table, max_tokens, pad_to_max, field)
