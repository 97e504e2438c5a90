"""Tests of data_prep.synth.world and .queries: vocabulary, lemmas, query wording."""
import numpy as np

from data_prep.synth import SynthConfig, plan_train
from data_prep.synth.queries import NOUN_PARAPHRASES, VALUE_PARAPHRASES
from data_prep.synth.world import (
    ATTRIBUTE_VALUES, AUDIENCE_FORMS, COLOUR, COLOURS, MATERIAL, MATERIALS, PRODUCT_TYPES,
    VISUAL_ATTRIBUTES, is_relevant)
from data_prep.text import normalize_query


def _plural_types():
    return [t for t in PRODUCT_TYPES if t.plural is not None]


def test_every_plural_lemmatises_to_its_singular():
    for ptype in _plural_types():
        assert normalize_query(ptype.plural) == normalize_query(ptype.singular), ptype
    for forms in AUDIENCE_FORMS:   # "children" -> child, "women" -> woman
        lemmas = {normalize_query(f)[0] for f in forms if "'" not in f}
        assert normalize_query(forms[0])[0] in lemmas


def test_queries_describe_their_products():
    cfg = SynthConfig(out_dir="", seed=9, train_rows=1500)
    rows = list(plan_train(cfg))
    assert len(rows) == cfg.train_rows
    texts = {}
    last_is_noun = 0
    for query, product in rows:
        assert is_relevant(query, product.spec)
        ptype = PRODUCT_TYPES[product.spec.type]
        words = query.text.split()
        nouns = {ptype.singular, ptype.plural}
        assert nouns & set(words), query.text
        last_is_noun += words[-1] in nouns
        for attribute in VISUAL_ATTRIBUTES:
            value = query.mentioned[attribute]
            if value is not None:
                assert ATTRIBUTE_VALUES[attribute][value] in query.text
        texts.setdefault(query.query_id, query.text)
    assert last_is_noun / len(rows) > 0.8
    words_per_query = np.mean([len(t.split()) for t in texts.values()])
    assert 3.4 < words_per_query < 4.4
    # Several products share a query, and queries vary in word order.
    assert len(texts) < 0.8 * len(rows)
    colour_first = set()
    for query, _ in rows:
        colour, material = query.mentioned[COLOUR], query.mentioned[MATERIAL]
        if colour is not None and material is not None:
            colour_first.add(query.text.index(COLOURS[colour])
                             < query.text.index(MATERIALS[material]))
    assert colour_first == {True, False}


def test_irregular_plurals_and_leading_verbs_appear_and_normalise():
    cfg = SynthConfig(out_dir="", seed=1, train_rows=3000)
    texts = {q.text for q, _ in plan_train(cfg)}
    irregular = {t.plural: t.singular for t in _plural_types()
                 if not t.plural.startswith(t.singular)}
    irregular["children"] = "child"
    seen = {w for text in texts for w in text.split() if w in irregular}
    assert len(seen) >= 4, seen
    for plural in seen:
        text = next(t for t in texts if plural in t.split())
        assert irregular[plural] in normalize_query(text)
    verbs = [t for t in texts if t.split()[0] in ("is", "are")]
    assert verbs
    assert all(normalize_query(t)[0] not in ("be", "is", "are") for t in verbs)



# ---------------------------------------------------------------------------------------
# Data-regime knobs.


def _train_queries(**knobs):
    cfg = SynthConfig(out_dir="", seed=5, train_rows=2000, **knobs)
    return list({q.query_id: q for q, _ in plan_train(cfg)}.values())


def _words(queries):
    return {w for q in queries for w in q.text.split()}


def test_mention_scale_sets_how_many_attributes_a_query_states():
    def stated(scale):
        return np.mean([sum(v is not None for v in q.mentioned)
                        for q in _train_queries(mention_scale=scale)])
    # sum(MENTION_PROBS) = 2.07 attributes at scale 1; capped at 1 each for scale 2.
    assert 1.9 < stated(1.0) < 2.2
    assert 0.9 < stated(0.5) < 1.2
    assert stated(2.0) > 3.4


def test_paraphrase_and_product_types_change_the_vocabulary():
    plain = _words(_train_queries())
    paraphrased = _words(_train_queries(paraphrase=0.5))
    assert len(paraphrased) > len(plain) + 50
    other_nouns = {w for pairs in NOUN_PARAPHRASES.values() for pair in pairs for w in pair}
    assert len(other_nouns & paraphrased) > 10 and not other_nouns & plain
    assert len(_words(_train_queries(product_types=10))) < 0.6 * len(plain)


def test_paraphrased_queries_still_describe_their_products():
    for query in _train_queries(paraphrase=1.0):
        ptype = PRODUCT_TYPES[query.type]
        nouns = {ptype.singular, ptype.plural} | {
            w for pair in NOUN_PARAPHRASES.get(ptype.singular, ()) for w in pair}
        assert nouns & set(query.text.split()), query.text
        for attribute in VISUAL_ATTRIBUTES:
            value = query.mentioned[attribute]
            if value is not None:
                word = ATTRIBUTE_VALUES[attribute][value]
                assert any(w in query.text for w in (word,) + VALUE_PARAPHRASES.get(word, ()))


def test_every_paraphrase_lemmatises_to_itself_and_to_no_other_concept():
    values = [v for values in ATTRIBUTE_VALUES[:3] for v in values]
    assert set(VALUE_PARAPHRASES) <= set(values)
    assert set(NOUN_PARAPHRASES) <= {t.singular for t in PRODUCT_TYPES}
    own = {}   # lemma -> the concept (value or type singular) it names
    for word in values + [t.singular for t in PRODUCT_TYPES]:
        for lemma in normalize_query(word):
            own.setdefault(lemma, set()).add(word)
    for word, options in VALUE_PARAPHRASES.items():
        for option in options:
            (lemma,) = normalize_query(option)
            assert own.get(lemma, {word}) <= {word}, (option, own.get(lemma))
    for singular, pairs in NOUN_PARAPHRASES.items():
        for one, many in pairs:
            (lemma,) = normalize_query(one)
            assert normalize_query(many) == [lemma], many
            assert own.get(lemma, {singular}) <= {singular}, (one, own.get(lemma))
