"""text.py: query normalisation (tokenising, lemmatising, leading "be") and its key."""
import pytest

from data_prep import text


@pytest.mark.parametrize("query, lemmas", [
    ("dresses", ["dress"]),
    ("Kitchen KNIVES", ["kitchen", "knife"]),
    ("children's shoes", ["child", "s", "shoe"]),
    ("wireless mice", ["wireless", "mouse"]),
    ('"new" autumn/winter jacket, ladies & men', ["new", "autumn", "winter", "jacket", "lady",
                                                  "man"]),
    ("  tea\u3001all\u00a0solid\u2014wood sofa ", ["tea", "all", "solid", "wood", "sofa"]),
    # Product nouns the lookup table reads as verbs or lacks (text.NOUN_LEMMAS).
    ("Wall Shelves, oak leaves", ["wall", "shelf", "oak", "leaf"]),
    ("hoodies beanies cookies", ["hoodie", "beanie", "cookie"]),
])
def test_normalize_query_lemmas(query, lemmas):
    assert text.normalize_query(query) == lemmas


def test_leading_be_is_dropped_only_when_asked_and_only_at_the_start():
    assert text.normalize_query("Is are the dress is red") == ["the", "dress", "be", "red"]
    assert text.normalize_query("is dress", drop_leading_be=False) == ["be", "dress"]
    assert text.normalize_query("is are") == []
    assert text.normalize_query("!!! ,,") == []


def test_query_key_equal_for_equal_lemmas_only():
    a = text.query_key(text.normalize_query("Red Dresses"))
    assert a == text.query_key(text.normalize_query("red dress!"))
    assert a != text.query_key(text.normalize_query("dress red"))
    assert 0 <= a < 2 ** 63


def test_lemma_table_is_what_lemmatize_applies():
    table = text.lemma_table()
    words = sorted(text.NOUN_LEMMAS) + ["knives", "mice", "dresses", "unlistedword"]
    assert text.lemmatize(words) == [table.get(w, w) for w in words]
    assert table["shelves"] == "shelf" and table["knives"] == "knife"
