"""Query normalisation: the one definition, used by prep, training and (mirrored) serving.

Steps, in order:
  1. Unicode NFC composition.
  2. Full Unicode lowercasing.
  3. Tokenisation: every character of SEPARATOR_CODEPOINTS (all Unicode whitespace, ASCII
     punctuation and common Unicode punctuation) separates tokens and is dropped.
  4. Lemmatisation with spaCy's lookup lemmatizer (`spacy.blank("en")` + the English
     `lemma_lookup` table of spacy-lookups-data): a token's lemma is its table entry, or the
     token itself when it has none; NOUN_LEMMAS overrides the few plurals of product nouns
     that the table reads as verbs ("shelves" -> "shelve") or lacks ("hoodies").
  5. Optionally, leading tokens whose lemma is "be" are dropped ("is a red dress" -> "red
     dress"), as the real queries sometimes start with one.

Every step is chosen so that the exported SavedModel can reproduce it exactly with core
TensorFlow and tensorflow-text ops (normalize_utf8, strings.lower with encoding="utf-8",
regex_replace with `separator_pattern("re2")`, whitespace split, a lemma lookup table built
from `lemma_table()`).
"""
import functools
import gzip
import hashlib
import json
import os
import re
import sys
import unicodedata
from typing import Dict, List, Sequence

BE_LEMMA = "be"
# Bumped whenever normalisation can give other lemmas for the same text: prep records it in
# the manifest and in each shard's fingerprint, so a resumed prep rewrites older shards.
NORMALIZATION_VERSION = 2
# Search queries name things: these plurals mean the noun, whatever else the table says.
NOUN_LEMMAS = {
    "shelves": "shelf", "leaves": "leaf", "halves": "half", "calves": "calf",
    "thieves": "thief", "hoodies": "hoodie", "onesies": "onesie", "beanies": "beanie",
    "cookies": "cookie", "polos": "polo",
}

# ASCII punctuation, all of it: !"#$%&'()*+,-./:;<=>?@[\]^_`{|}~
_ASCII_PUNCT = [c for c in range(0x21, 0x7F) if not chr(c).isalnum()]
# Unicode punctuation that machine-translated queries carry: quotes, dashes, ellipsis,
# middle dot, CJK comma and full stop, full-width punctuation, bullets.
_UNICODE_PUNCT = [
    0x00A1, 0x00AB, 0x00B7, 0x00BB, 0x00BF, 0x2010, 0x2011, 0x2012, 0x2013, 0x2014, 0x2015,
    0x2018, 0x2019, 0x201A, 0x201B, 0x201C, 0x201D, 0x201E, 0x201F, 0x2022, 0x2026, 0x2032,
    0x2033, 0x3001, 0x3002, 0x300C, 0x300D, 0x300E, 0x300F, 0x3010, 0x3011, 0xFF01, 0xFF08,
    0xFF09, 0xFF0C, 0xFF0E, 0xFF1A, 0xFF1B, 0xFF1F,
]
# Every code point Python's str.split() treats as whitespace, so that splitting on " " after
# replacing separators is exact in both Python and RE2.
_WHITESPACE = [c for c in range(sys.maxunicode + 1) if chr(c).isspace()]
SEPARATOR_CODEPOINTS = tuple(sorted(set(_ASCII_PUNCT + _UNICODE_PUNCT + _WHITESPACE)))


def separator_pattern(flavor: str = "python") -> str:
    """Returns a regex matching one or more separator characters.

    Args:
      flavor: "python" for the `re` module, "re2" for tf.strings.regex_replace.
    """
    if flavor == "python":
        body = "".join(re.escape(chr(c)) for c in SEPARATOR_CODEPOINTS)
    elif flavor == "re2":
        body = "".join(f"\\x{{{c:04x}}}" for c in SEPARATOR_CODEPOINTS)
    else:
        raise ValueError(f"unknown regex flavor {flavor!r}")
    return f"[{body}]+"


_SEPARATORS = re.compile(separator_pattern("python"))


def tokenize(text: str) -> List[str]:
    """Splits raw query text into lowercase tokens (steps 1-3 above)."""
    text = unicodedata.normalize("NFC", text).lower()
    return [t for t in _SEPARATORS.sub(" ", text).split(" ") if t]


@functools.lru_cache(maxsize=1)
def _nlp():
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
    nlp.initialize()
    return nlp


def lemmatize(tokens: Sequence[str]) -> List[str]:
    """Lemmatises tokens with spaCy's English lookup lemmatizer (no model download)."""
    if not tokens:
        return []
    from spacy.tokens import Doc

    nlp = _nlp()
    doc = nlp.get_pipe("lemmatizer")(Doc(nlp.vocab, words=list(tokens)))
    return [NOUN_LEMMAS.get(t.text, t.lemma_) for t in doc]


def normalize_query(text: str, drop_leading_be: bool = True) -> List[str]:
    """Turns a raw query into its normalised lemma tokens.

    Args:
      text: the raw query (any Unicode).
      drop_leading_be: drop leading tokens whose lemma is "be".
    Returns:
      The lemmas, in query order; empty for a query with no tokens.
    """
    lemmas = lemmatize(tokenize(text))
    if drop_leading_be:
        start = 0
        while start < len(lemmas) and lemmas[start] == BE_LEMMA:
            start += 1
        lemmas = lemmas[start:]
    return lemmas


def query_key(lemmas: Sequence[str]) -> int:
    """A stable non-negative int64 fingerprint of a normalised query (equal lemmas, equal key)."""
    digest = hashlib.blake2b(" ".join(lemmas).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


@functools.lru_cache(maxsize=1)
def lemma_table() -> Dict[str, str]:
    """Word form -> lemma, as `lemmatize` applies it (~41.6k entries): the English lookup
    table of spacy-lookups-data (the one spaCy's lookup lemmatizer reads) with NOUN_LEMMAS
    over it. The export embeds it in the graph.
    """
    import spacy_lookups_data

    path = os.path.join(os.path.dirname(spacy_lookups_data.__file__), "data",
                        "en_lemma_lookup.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {**json.load(f), **NOUN_LEMMAS}
