"""Generated parallel text (attnkit.data.generated): numbers by num2words, dates by babel, seeded disjoint splits."""

from __future__ import annotations

import datetime

import pytest

pytest.importorskip("num2words")
pytest.importorskip("babel")

from babel.dates import format_date  # noqa: E402
from num2words import num2words  # noqa: E402

from attnkit.data import generated as G  # noqa: E402

SMALL = {"n_train": 1500, "n_valid": 100, "per_bucket": 20, "seed": 7}


@pytest.fixture(scope="module")
def numbers_de() -> G.GeneratedCorpus:
    return G.load_corpus("numbers", "en", "de", **SMALL)


@pytest.fixture(scope="module")
def dates_zh() -> G.GeneratedCorpus:
    return G.load_corpus("dates", "en", "zh", **SMALL)


def _all(corpus: G.GeneratedCorpus) -> list[G.Pair]:
    return corpus.train + corpus.valid + corpus.test


# --------------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("tgt", ["de", "fr"])
def test_numbers_round_trip(tgt: str) -> None:
    pairs = G.make_pairs("numbers", "en", tgt, 300, min_len=1, max_len=50, seed=1, max_value=999_999)
    seen_large = False
    for p in pairs:
        values = G.read_source("numbers", p.src)  # parse the English words back to integers
        assert all(isinstance(v, int) and 0 <= v <= 999_999 for v in values)
        seen_large |= any(v >= 1000 for v in values)
        assert p.src == "; ".join(num2words(v, lang="en") for v in values)
        assert p.tgt == "; ".join(num2words(v, lang=tgt) for v in values)
    assert seen_large  # the comma inside "one thousand, two hundred" does not split an item


@pytest.mark.parametrize(
    ("tgt", "locale", "sep"), [("de", "de_DE", "; "), ("fr", "fr_FR", "; "), ("zh", "zh_CN", "、")]
)
def test_dates_round_trip(tgt: str, locale: str, sep: str) -> None:
    pairs = G.make_pairs("dates", "en", tgt, 200, min_len=1, max_len=50, seed=2)
    for p in pairs:
        days = G.read_source("dates", p.src)
        assert all(G.YEARS[0] <= d.year <= G.YEARS[1] for d in days)
        assert p.src == "; ".join(format_date(d, "full", locale="en_GB") for d in days)
        assert p.tgt == sep.join(format_date(d, "full", locale=locale) for d in days)


def test_known_values() -> None:
    day = datetime.date(2026, 12, 2)
    assert G.date_words(day, "en") == "Wednesday, 2 December 2026"
    assert G.date_words(day, "de") == "Mittwoch, 2. Dezember 2026"
    assert G.date_words(day, "zh") == "2026年12月2日星期三"
    assert G.date_words(datetime.date(1905, 3, 1), "zh") == "1905年3月1日星期三"
    assert G.read_source("dates", "Wednesday, 2 December 2026; Wednesday, 1 March 1905") == [
        day,
        datetime.date(1905, 3, 1),
    ]
    assert G.read_source("numbers", "one thousand, two hundred and thirty-four; zero; forty-one") == [1234, 0, 41]
    with pytest.raises(ValueError, match="weekday"):
        G.read_source("dates", "Monday, 2 December 2026")


def test_chinese_dates_in_corpus(dates_zh: G.GeneratedCorpus) -> None:
    for p in dates_zh.test[:50]:
        days = G.read_source("dates", p.src)
        items = p.tgt.split("、")
        assert len(items) == len(days)
        for d, item in zip(days, items, strict=True):
            weekday = "一二三四五六日"[d.weekday()]
            assert item == f"{d.year}年{d.month}月{d.day}日星期{weekday}"


def test_german_crossing_order(numbers_de: G.GeneratedCorpus) -> None:
    # units before tens: "twenty-one" -> "ein und zwanzig", the English order reversed
    assert G.number_words(21, "de") == "einundzwanzig"
    assert G.segment("twenty-one") == "twenty@@ -@@ one"
    assert G.segment("einundzwanzig") == "ein@@ und@@ zwanzig"
    assert G.segment("dreihundertsechzehn; siebzehn") == "drei@@ hundert@@ sech@@ zehn@@ ; sieb@@ zehn"
    crossing = sum("und" in G.morphemes(word) for p in numbers_de.train for word in p.tgt.split())
    assert crossing > len(numbers_de.train)  # most training pairs hold several crossing compounds


# --------------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("corpus_name", ["numbers_de", "dates_zh"])
def test_splits_disjoint_and_sized(corpus_name: str, request: pytest.FixtureRequest) -> None:
    corpus: G.GeneratedCorpus = request.getfixturevalue(corpus_name)
    train = {p.src for p in corpus.train}
    valid = {p.src for p in corpus.valid}
    test = {p.src for p in corpus.test}
    assert len(train) == len(corpus.train) == SMALL["n_train"]  # no source twice within a split either
    assert len(valid) == len(corpus.valid) == SMALL["n_valid"]
    assert len(test) == len(corpus.test) == SMALL["per_bucket"] * len(G.BUCKETS)
    assert not train & test and not train & valid and not valid & test
    assert all(1 <= p.length <= 50 for p in corpus.train + corpus.valid)
    assert len({p.ref for p in _all(corpus)}) == len(_all(corpus))


@pytest.mark.parametrize("corpus_name", ["numbers_de", "dates_zh"])
def test_length_buckets_filled(corpus_name: str, request: pytest.FixtureRequest) -> None:
    corpus: G.GeneratedCorpus = request.getfixturevalue(corpus_name)
    assert list(corpus.buckets) == ["1-10", "11-20", "21-30", "31-40", "41-50"]
    for (lo, hi), (label, pairs) in zip(G.BUCKETS, corpus.buckets.items(), strict=True):
        assert label == f"{lo}-{hi}" and len(pairs) == SMALL["per_bucket"]
        assert all(lo <= G.source_length(p.src) <= hi for p in pairs)
    groups = G.group_by_length(corpus.test)
    assert {k: len(v) for k, v in groups.items()} == {k: len(v) for k, v in corpus.buckets.items()}
    longest = max(p.length for p in corpus.buckets["41-50"])
    assert longest >= 44  # long inputs are really produced


def test_length_range_and_exclude() -> None:
    pairs = G.make_pairs("numbers", "en", "de", 50, min_len=3, max_len=3, seed=0)
    assert all(p.length == 3 for p in pairs)
    again = G.make_pairs("numbers", "en", "de", 50, min_len=3, max_len=3, seed=0, exclude=[p.src for p in pairs])
    assert not {p.src for p in pairs} & {p.src for p in again}
    with pytest.raises(ValueError, match="distinct"):  # there are only 100 one-word numbers below 100
        G.make_pairs("numbers", "en", "de", 200, min_len=1, max_len=1, max_value=99)


def test_seeds_reproducible() -> None:
    a = G.splits("dates", "en", "de", n_train=200, n_valid=20, per_bucket=5, seed=11)
    b = G.splits("dates", "en", "de", n_train=200, n_valid=20, per_bucket=5, seed=11)
    c = G.splits("dates", "en", "de", n_train=200, n_valid=20, per_bucket=5, seed=12)
    assert a == b and a["train"] != c["train"] and a["test"] != c["test"]
    assert all(isinstance(p, tuple) and len(p) == 2 for p in a["train"])  # plain (src, tgt) pairs
    # the held-out sets do not depend on the training size
    d = G.splits("dates", "en", "de", n_train=300, n_valid=20, per_bucket=5, seed=11)
    assert d["test"] == a["test"] and d["valid"] == a["valid"] and d["train"][:200] == a["train"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind"):
        G.make_pairs("words", "en", "de", 1)
    with pytest.raises(ValueError, match="language"):
        G.make_pairs("numbers", "en", "zh", 1)  # num2words writes no Chinese
    with pytest.raises(ValueError, match="spaces"):
        G.make_pairs("dates", "zh", "en", 1)
    with pytest.raises(ValueError, match="different"):
        G.make_pairs("dates", "de", "de", 1)
    with pytest.raises(ValueError, match="min_len"):
        G.make_pairs("dates", "en", "de", 1, min_len=5, max_len=4)
    with pytest.raises(ValueError, match="non-overlapping"):
        G.length_buckets("numbers", "en", "de", 1, buckets=((1, 10), (5, 20)))


# --------------------------------------------------------------------------------------------------- tokenization
@pytest.mark.parametrize("corpus_name", ["numbers_de", "dates_zh"])
def test_morpheme_tokenizer_round_trip(corpus_name: str, request: pytest.FixtureRequest) -> None:
    corpus: G.GeneratedCorpus = request.getfixturevalue(corpus_name)
    tok_src = G.MorphemeTokenizer.train([p.src for p in corpus.train], **G.tokenizer_settings(corpus.kind, "en"))
    tok_tgt = G.MorphemeTokenizer.train([p.tgt for p in corpus.train], **G.tokenizer_settings(corpus.kind, corpus.tgt))
    for p in corpus.test:
        assert G.unsegment(G.segment(p.tgt)) == p.tgt
        src_ids, tgt_ids = tok_src.encode(p.src), tok_tgt.encode(p.tgt)
        assert 1 not in src_ids and 1 not in tgt_ids  # UNK: every test morpheme is in the training vocabulary
        assert tok_src.decode(src_ids) == p.src and tok_tgt.decode(tgt_ids) == p.tgt
    loaded = G.MorphemeTokenizer.from_bytes(tok_tgt.to_bytes())
    assert loaded.decode(loaded.encode(corpus.test[-1].tgt)) == corpus.test[-1].tgt
