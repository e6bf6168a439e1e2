"""Generated parallel text with inputs of any length: numbers written out by ``num2words``, dates by ``babel``.

The Bible is real translation but its verses are short and the task is hard; these two families are made offline,
in seconds, by well-kept libraries that encode real linguistic rules, so the *length* of the input can be chosen
and attention's value shows in minutes (the shape of Bahdanau et al. 2015, Figure 2: BLEU against length).

* ``numbers``: integers written out by `num2words <https://pypi.org/project/num2words/>`_ in English (``en``),
  German (``de``) and French (``fr``). German puts the units before the tens, so alignments cross:
  "twenty-one" -> "einundzwanzig" (one-and-twenty); "three hundred and twelve" -> "dreihundertzwölf".
* ``dates``: dates written by `babel <https://pypi.org/project/babel/>`_ in its ``"full"`` format: English
  (``en``, British order) "Wednesday, 2 December 2026" -> German (``de``) "Mittwoch, 2. Dezember 2026",
  French (``fr``) "mercredi 2 décembre 2026", Chinese (``zh``) "2026年12月2日星期三" (year first, weekday last).

Long inputs are *sequences* of items joined by ``"; "`` (``"、"`` in Chinese): a semicolon, because English
numbers from 1,000 up and the English and German dates already contain commas (and ``"、"``, not ``"；"``, because
sentencepiece's NFKC normalisation would turn the full-width semicolon into ``";"``). The length of a source is its
number of whitespace-separated words (:func:`source_length`; "forty-one" is one word, the separator sticks to the
word before it), and every generator draws the length it aims at uniformly from ``[min_len, max_len]``.

Splits (:func:`splits`) are seeded and disjoint on the *source string*: the length-controlled test set is drawn
first (:func:`length_buckets`: the same number of items in each length bucket, by default 1-10, 11-20, ..., 41-50
source words), then the validation set without any test source, then training without any test or validation
source. No split holds the same source twice. The test and validation sets depend on the seed and their own
settings only, not on the training size.

Tokenization: the pairs hold the strings exactly as the libraries write them (the references of BLEU and exact
match are the libraries' text). The model sees them split into *morphemes* (:func:`segment`, reversed exactly by
:func:`unsegment`), in the ``@@`` notation of subword NMT (Sennrich et al. 2016): German number compounds are cut
at their number morphemes ("einundzwanzig" -> ``ein@@ und@@ zwanzig``, "dreihundertzwölf" -> ``drei@@ hundert@@
zwölf``), English hyphens and all punctuation become tokens ("forty-one;" -> ``forty@@ -@@ one@@ ;``), digits stay
whole numbers ("1957", "21") and Chinese splits into numbers, characters and the weekday ("星期三"). Each of these
words is one token of a sentencepiece *word* model (:class:`MorphemeTokenizer`, a
:class:`~attnkit.data.tokenizer.Tokenizer` that segments before encoding and joins after decoding), so a German
compound is several target tokens that each align with one English word: the crossing alignment of
"twenty-one" -> "einundzwanzig" (``ein`` <- one, ``und`` <- -, ``zwanzig`` <- twenty) can be learnt and seen.
Sentencepiece's unigram model, tried on this text with 100-300 pieces, cut the compounds at arbitrary places
("vier", "hundertneunzehn"; "D onn er st a g"); characters make targets of 300+ tokens for 50 words.

Sizes (defaults of :func:`load_corpus`): 20,000 training, 500 validation and 5 x 100 test pairs, made in about 1 s
(numbers) or 2 s (dates) on one core. With :class:`MorphemeTokenizer`, a 41-50-word source is up to ~130 tokens
(numbers) or ~70 (dates), its target up to ~145 (French numbers) or ~95 (Chinese dates); the vocabularies hold
50-70 (numbers) or 250-460 (dates) pieces.

Example:
    >>> from attnkit.data.generated import make_pairs, number_words, source_length
    >>> number_words(21, "de"), number_words(312, "de")
    ('einundzwanzig', 'dreihundertzwölf')
    >>> pairs = make_pairs("numbers", "en", "de", 3, min_len=6, max_len=8, seed=1)
    >>> all(6 <= source_length(p.src) <= 8 for p in pairs), pairs == make_pairs("numbers", "en", "de", 3,
    ...     min_len=6, max_len=8, seed=1)
    (True, True)
    >>> date_words(datetime.date(2026, 12, 2), "zh")
    '2026年12月2日星期三'
"""

from __future__ import annotations

import calendar
import datetime
import functools
import hashlib
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from attnkit._errors import fail

from ._files import DataNotFoundError
from .bible import Language
from .tokenizer import Tokenizer

__all__ = [
    "BUCKETS",
    "KINDS",
    "JOINER",
    "LANGUAGES",
    "GeneratedCorpus",
    "MorphemeTokenizer",
    "Pair",
    "bucket_label",
    "date_words",
    "group_by_length",
    "length_buckets",
    "load_corpus",
    "make_pairs",
    "morphemes",
    "number_words",
    "read_source",
    "segment",
    "separator",
    "source_length",
    "splits",
    "tokenizer_settings",
    "unsegment",
]

KINDS: tuple[str, ...] = ("numbers", "dates")
# the languages each kind is written in (num2words has no Chinese; babel has every locale)
KIND_LANGUAGES: dict[str, tuple[str, ...]] = {"numbers": ("en", "de", "fr"), "dates": ("en", "de", "fr", "zh")}
# how BLEU is scored on each target language (sacrebleu tokenizer), as attnkit.data.bible.LANGUAGES has it
LANGUAGES: dict[str, Language] = {
    "en": Language("en", "English", "en"),
    "de": Language("de", "German", "de"),
    "fr": Language("fr", "French", "fr"),
    "zh": Language("zh", "Chinese", "zh", bleu_tokenize="zh", no_spaces=True),
}
# babel locale of each language: British English writes "Wednesday, 2 December 2026" (day before month)
LOCALES: dict[str, str] = {"en": "en_GB", "de": "de_DE", "fr": "fr_FR", "zh": "zh_CN"}
# length buckets of the test set, in source words (inclusive)
BUCKETS: tuple[tuple[int, int], ...] = ((1, 10), (11, 20), (21, 30), (31, 40), (41, 50))
MAX_VALUE = 999  # numbers: largest value by default (up to four English words, one German compound)
YEARS = (1900, 2099)  # dates: range of years by default
INSTALL = "pip install 'attnkit[data]' (num2words and babel)"


class Pair(NamedTuple):
    """One parallel item: a source text and its translation (a plain ``(src, tgt)`` tuple with names).

    ``ref`` is a stable id (a hash of the source, unique within a corpus: sources are never repeated) and
    ``length`` the source length in words, so a pair reads like a :class:`~attnkit.data.bible.VersePair`.
    """

    src: str
    tgt: str

    @property
    def ref(self) -> str:
        return hashlib.sha1(self.src.encode("utf-8")).hexdigest()[:12]

    @property
    def length(self) -> int:
        return source_length(self.src)


# --------------------------------------------------------------------------------------------------- writing
def _num2words() -> Callable[..., str]:
    try:
        from num2words import num2words
    except ImportError:
        raise DataNotFoundError(f"the package 'num2words' is not installed; install it with: {INSTALL}") from None
    return num2words  # type: ignore[no-any-return]


def _format_date() -> Callable[..., str]:
    try:
        from babel.dates import format_date
    except ImportError:
        raise DataNotFoundError(f"the package 'babel' is not installed; install it with: {INSTALL}") from None
    return format_date  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=1 << 16)
def number_words(value: int, lang: str) -> str:
    """``value`` written out in words by num2words (``"en"``, ``"de"`` or ``"fr"``).

    >>> number_words(21, "en"), number_words(21, "de"), number_words(21, "fr")
    ('twenty-one', 'einundzwanzig', 'vingt et un')
    """
    _check_language("numbers", lang)
    return str(_num2words()(int(value), lang=lang))


@functools.lru_cache(maxsize=1 << 17)
def _date_words(ordinal: int, lang: str) -> str:
    return str(_format_date()(datetime.date.fromordinal(ordinal), "full", locale=LOCALES[lang]))


def date_words(day: datetime.date, lang: str) -> str:
    """``day`` written by babel in the locale's ``"full"`` format (``"en"``, ``"de"``, ``"fr"``, ``"zh"``).

    >>> date_words(datetime.date(2026, 12, 2), "en"), date_words(datetime.date(2026, 12, 2), "de")
    ('Wednesday, 2 December 2026', 'Mittwoch, 2. Dezember 2026')
    """
    _check_language("dates", lang)
    return _date_words(day.toordinal(), lang)


def separator(lang: str) -> str:
    """What joins the items of a sequence: ``"; "``, or the enumeration comma ``"、"`` in Chinese."""
    return "、" if LANGUAGES[lang].no_spaces else "; "


def source_length(text: str) -> int:
    """Length of a source in words: whitespace-separated pieces ("forty-one;" is one word)."""
    return len(text.split())


# German number morphemes: a letter run that starts with one is cut there (longest first); other words stay whole
_DE_MORPHEMES = (
    "null", "eins", "ein", "eine", "zwei", "drei", "vier", "fünf", "sechs", "sech", "sieben", "sieb", "acht", "neun",
    "zehn", "elf", "zwölf", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig", "neunzig",
    "hundert", "tausend", "und", "million", "millionen",
)  # fmt: skip
_MORPHEME = re.compile(
    "|".join(sorted(map(re.escape, _DE_MORPHEMES), key=len, reverse=True)) + r"|\d+|星期.|[\u3000-\u9fff]|[^\W\d_]+|\S",
    re.IGNORECASE,
)
JOINER = "@@"  # ends a morpheme that the next one continues (subword-nmt's notation)


def morphemes(word: str) -> list[str]:
    """The morphemes of one word (no spaces): number morphemes, digit runs, CJK characters, punctuation.

    The German number lexicon applies in every language but only cuts a letter run that *starts* with one of its
    morphemes; of the other languages' number and date words only French "millions" is cut ("million", "s").

    >>> morphemes("einundzwanzig;"), morphemes("forty-one"), morphemes("2026年12月2日星期三")
    (['ein', 'und', 'zwanzig', ';'], ['forty', '-', 'one'], ['2026', '年', '12', '月', '2', '日', '星期三'])
    """
    return _MORPHEME.findall(word)


def segment(text: str) -> str:
    """``text`` as morphemes separated by spaces, each one continued by the next marked ``@@``.

    >>> segment("dreihundertzwölf; einundzwanzig")
    'drei@@ hundert@@ zwölf@@ ; ein@@ und@@ zwanzig'
    >>> unsegment(segment("Mittwoch, 2. Dezember 2026")) == "Mittwoch, 2. Dezember 2026"
    True

    Raises:
        ValueError: the text holds ``@@``, or spaces other than single ``" "`` between words.
    """
    if JOINER in text or text != " ".join(text.split()) or any(c.isspace() and c != " " for c in text):
        raise fail("text without '@@' and with single spaces between words", repr(text), "a generated text")
    return " ".join(f"{JOINER} ".join(morphemes(word)) for word in text.split(" "))


def unsegment(text: str) -> str:
    """The text :func:`segment` was given: the ``@@`` joins removed.

    >>> unsegment("ein@@ und@@ zwanzig@@ ; drei")
    'einundzwanzig; drei'
    """
    return text.replace(f"{JOINER} ", "").replace(JOINER, "")


class MorphemeTokenizer(Tokenizer):
    """A sentencepiece word model over :func:`segment`'s morphemes: text in, text out, as a :class:`Tokenizer`.

    ``encode`` segments the text first and ``decode`` joins the morphemes again, so the pipeline that encodes
    ``pair.src`` and decodes to compare with ``pair.tgt`` works unchanged. Load a saved one with
    ``MorphemeTokenizer.from_bytes`` (the bytes are a plain sentencepiece model).

    >>> tok = MorphemeTokenizer.train(["dreihundertzwölf; einundzwanzig", "zweiundzwanzig; zwölf"] * 5)
    >>> tok.pieces(tok.encode("zweihundertzwölf; einundzwanzig"))
    ['▁zwei@@', '▁hundert@@', '▁zwölf@@', '▁;', '▁ein@@', '▁und@@', '▁zwanzig']
    >>> tok.decode(tok.encode("zweihundertzwölf; einundzwanzig"))
    'zweihundertzwölf; einundzwanzig'
    """

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = 1000,
        character_coverage: float = 1.0,
        model_type: str = "word",
    ) -> Tokenizer:
        """Train on the morphemes of ``texts`` (a ``vocab_size`` above the distinct morphemes keeps them all)."""
        return super().train(
            [segment(t) for t in texts if t.strip()], vocab_size=vocab_size,
            character_coverage=character_coverage, model_type=model_type,
        )  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return super().encode(segment(text.strip()))

    def decode(self, ids: Sequence[int]) -> str:
        return unsegment(super().decode(ids))


# --------------------------------------------------------------------------------------------------- reading
_EN_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_EN_UNITS = {w: i for i, w in enumerate(_EN_WORDS)}
_EN_TENS = {
    w: 10 * i for i, w in enumerate(("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"), 2)
}
_EN_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_EN_DATE = re.compile(r"(\w+), (\d{1,2}) (\w+) (\d{4})")


def _read_en_number(text: str) -> int:
    total, current = 0, 0
    for word in text.replace(",", " ").replace("-", " ").split():
        if word == "and":
            continue
        if word in _EN_UNITS:
            current += _EN_UNITS[word]
        elif word in _EN_TENS:
            current += _EN_TENS[word]
        elif word == "hundred":
            current *= 100
        elif word in _EN_SCALES:
            total, current = total + current * _EN_SCALES[word], 0
        else:
            raise fail("English number words", repr(text), "a text written by num2words(..., lang='en')")
    return total + current


def _read_en_date(text: str) -> datetime.date:
    m = _EN_DATE.fullmatch(text.strip())
    months = {name: i for i, name in enumerate(calendar.month_name) if name}
    if m is None or m.group(3) not in months:
        raise fail("an English date like 'Wednesday, 2 December 2026'", repr(text), "a text written by date_words")
    day = datetime.date(int(m.group(4)), months[m.group(3)], int(m.group(2)))
    if calendar.day_name[day.weekday()] != m.group(1):
        raise fail(f"the weekday of {day} ({calendar.day_name[day.weekday()]})", m.group(1), "a consistent date")
    return day


def read_source(kind: str, text: str) -> list[Any]:
    """The values an English source stands for: ``list[int]`` (numbers) or ``list[datetime.date]`` (dates).

    >>> read_source("numbers", "three hundred and twelve; forty-one")
    [312, 41]
    >>> read_source("dates", "Wednesday, 2 December 2026")
    [datetime.date(2026, 12, 2)]
    """
    _check_kind(kind)
    read: Callable[[str], Any] = _read_en_number if kind == "numbers" else _read_en_date
    return [read(item) for item in text.split(separator("en"))]


# --------------------------------------------------------------------------------------------------- generating
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise fail("a kind of generated text", repr(kind), f"one of {', '.join(KINDS)}")


def _check_language(kind: str, lang: str) -> None:
    if lang not in KIND_LANGUAGES[kind]:
        raise fail(f"a language {kind} are written in", repr(lang), f"one of {', '.join(KIND_LANGUAGES[kind])}")


def _check_pair(kind: str, src: str, tgt: str) -> None:
    _check_kind(kind)
    _check_language(kind, src)
    _check_language(kind, tgt)
    if src == tgt:
        raise fail("two different languages", f"{src!r} and {tgt!r}", "src='en', tgt='de'")
    if LANGUAGES[src].no_spaces:
        raise fail("a source language written with spaces (lengths are counted in words)", repr(src), "src='en'")


def _drawer(kind: str, max_value: int, years: tuple[int, int]) -> Callable[[random.Random], Any]:
    """A function that draws one value: a number (its count of digits uniform, then uniform) or a day."""
    if kind == "numbers":
        if not (isinstance(max_value, int) and 9 <= max_value < 10**9):
            raise fail("9 <= max_value < 10**9", repr(max_value), f"max_value={MAX_VALUE}")
        digits = len(str(max_value))

        def number(rng: random.Random) -> int:
            d = rng.randint(1, digits)
            return rng.randint(0 if d == 1 else 10 ** (d - 1), min(10**d - 1, max_value))

        return number
    lo, hi = years
    if not (1 <= lo <= hi <= 9999):
        raise fail("years (first, last) within 1..9999", repr(years), f"years={YEARS}")
    first, last = datetime.date(lo, 1, 1).toordinal(), datetime.date(hi, 12, 31).toordinal()
    return lambda rng: datetime.date.fromordinal(rng.randint(first, last))


def make_pairs(
    kind: str,
    src: str = "en",
    tgt: str = "de",
    n: int = 1000,
    *,
    min_len: int = 1,
    max_len: int = 50,
    seed: int = 0,
    exclude: Iterable[str] = (),
    max_value: int = MAX_VALUE,
    years: tuple[int, int] = YEARS,
) -> list[Pair]:
    """``n`` pairs of sequences of numbers or dates, every source ``min_len..max_len`` words, all sources distinct.

    Each pair aims at a length drawn uniformly from ``[min_len, max_len]`` and adds items until it is reached
    (dates are four English words each, so their lengths are multiples of four). Sources in ``exclude`` are
    never produced. The same arguments always give the same pairs.

    Args:
        kind: ``"numbers"`` or ``"dates"``.
        src: source language (``"en"``, ``"de"``, ``"fr"``; Chinese is a target only).
        tgt: target language (numbers: ``"en"``, ``"de"``, ``"fr"``; dates also ``"zh"``).
        n: number of pairs.
        min_len: shortest source in words.
        max_len: longest source in words.
        seed: random seed.
        exclude: source strings never to produce (the sources of other splits).
        max_value: numbers: the largest value (default 999; from 1000 up English uses commas and German
            compounds grow long).
        years: dates: first and last year (default 1900-2099).

    Raises:
        ValueError: unknown kind or language, a bad length range, or fewer than ``n`` distinct sources exist.

    >>> make_pairs("dates", "en", "zh", 1, min_len=8, max_len=8, seed=0)
    [Pair(src='Tuesday, 15 December 2076; Tuesday, 1 May 1934', tgt='2076年12月15日星期二、1934年5月1日星期二')]
    """
    _check_pair(kind, src, tgt)
    if not (isinstance(n, int) and n >= 0):
        raise fail("n >= 0", repr(n), "n=1000")
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
        raise fail("1 <= min_len <= max_len", f"min_len={min_len}, max_len={max_len}", "min_len=1, max_len=50")
    draw = _drawer(kind, max_value, years)
    write: Callable[[Any, str], str] = number_words if kind == "numbers" else date_words  # type: ignore[assignment]
    rng = random.Random(f"attnkit.generated:{kind}:{src}:{tgt}:{min_len}:{max_len}:{max_value}:{years}:{seed}")
    seen = set(exclude)
    out: list[Pair] = []
    budget = 50 * n + 1000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise fail(
                f"{n} distinct {kind} sources of {min_len}-{max_len} words",
                f"only {len(out)} after many draws",
                "a smaller n, a wider length range or a larger max_value",
            )
        target = rng.randint(min_len, max_len)
        values: list[Any] = []
        length = 0
        while length < target:
            for _ in range(8):  # an item that keeps the source within the length aimed at
                value = draw(rng)
                words = source_length(write(value, src))
                if length + words <= target:
                    values.append(value)
                    length += words
                    break
            else:
                break
        if not values or length < min_len:
            continue
        s = separator(src).join(write(v, src) for v in values)
        if s in seen:
            continue
        seen.add(s)
        out.append(Pair(s, separator(tgt).join(write(v, tgt) for v in values)))
    return out


def bucket_label(lo: int, hi: int) -> str:
    """The name of a length bucket: ``"1-10"``."""
    return f"{lo}-{hi}"


def _check_buckets(buckets: Sequence[tuple[int, int]]) -> None:
    ok = bool(buckets) and all(isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi for lo, hi in buckets)
    ok = ok and all(a[1] < b[0] for a, b in zip(buckets, buckets[1:], strict=False))
    if not ok:
        raise fail("non-overlapping increasing (lo, hi) word ranges", repr(buckets), f"buckets={BUCKETS}")


def length_buckets(
    kind: str,
    src: str = "en",
    tgt: str = "de",
    per_bucket: int = 100,
    *,
    buckets: Sequence[tuple[int, int]] = BUCKETS,
    seed: int = 0,
    exclude: Iterable[str] = (),
    max_value: int = MAX_VALUE,
    years: tuple[int, int] = YEARS,
) -> dict[str, list[Pair]]:
    """A length-controlled set: ``per_bucket`` distinct pairs whose source length lies in each bucket.

    Returns ``{"1-10": [...], "11-20": [...], ...}`` in the order of ``buckets`` (inclusive word ranges).

    >>> sets = length_buckets("numbers", "en", "de", 2, buckets=((1, 3), (4, 6)), seed=0)
    >>> {k: [p.length for p in v] for k, v in sets.items()}  # doctest: +ELLIPSIS
    {'1-3': [..., ...], '4-6': [..., ...]}
    """
    _check_buckets(buckets)
    seen = set(exclude)
    out: dict[str, list[Pair]] = {}
    for lo, hi in buckets:
        pairs = make_pairs(kind, src, tgt, per_bucket, min_len=lo, max_len=hi, seed=seed, exclude=seen,
                           max_value=max_value, years=years)  # fmt: skip
        seen.update(p.src for p in pairs)
        out[bucket_label(lo, hi)] = pairs
    return out


def group_by_length(pairs: Iterable[Pair], buckets: Sequence[tuple[int, int]] = BUCKETS) -> dict[str, list[int]]:
    """Indices of ``pairs`` per length bucket (by source words); pairs outside every bucket are left out.

    >>> group_by_length([Pair("one", "eins"), Pair("two; three", "zwei; drei")], ((1, 1), (2, 5)))
    {'1-1': [0], '2-5': [1]}
    """
    _check_buckets(buckets)
    out: dict[str, list[int]] = {bucket_label(lo, hi): [] for lo, hi in buckets}
    for i, p in enumerate(pairs):
        n = source_length(p.src)
        for lo, hi in buckets:
            if lo <= n <= hi:
                out[bucket_label(lo, hi)].append(i)
                break
    return out


def splits(
    kind: str,
    src: str = "en",
    tgt: str = "de",
    *,
    n_train: int = 20_000,
    n_valid: int = 500,
    per_bucket: int = 100,
    train_len: tuple[int, int] = (1, 50),
    buckets: Sequence[tuple[int, int]] = BUCKETS,
    seed: int = 0,
    max_value: int = MAX_VALUE,
    years: tuple[int, int] = YEARS,
) -> dict[str, list[Pair]]:
    """Seeded ``{"train", "valid", "test"}`` pairs with no source in two splits.

    ``test`` is :func:`length_buckets` (``per_bucket`` pairs per bucket, bucket after bucket); ``valid`` and
    ``train`` have lengths uniform in ``train_len``. Test is drawn first and validation second, so neither depends
    on ``n_train``.

    >>> s = splits("numbers", "en", "fr", n_train=20, n_valid=5, per_bucket=2, seed=3)
    >>> {k: len(v) for k, v in s.items()}, set(p.src for p in s["train"]) & set(p.src for p in s["test"])
    ({'train': 20, 'valid': 5, 'test': 10}, set())
    """
    corpus = load_corpus(kind, src, tgt, n_train=n_train, n_valid=n_valid, per_bucket=per_bucket,
                         train_len=train_len, buckets=buckets, seed=seed, max_value=max_value, years=years)  # fmt: skip
    return {"train": corpus.train, "valid": corpus.valid, "test": corpus.test}


@dataclass
class GeneratedCorpus:
    """Train / valid / test pairs of one kind and language pair, with the test set's length buckets.

    Has the attributes of :class:`~attnkit.data.bible.ParallelCorpus` (``src``, ``tgt``, ``train``, ``valid``,
    ``test``; each pair has ``src``, ``tgt`` and ``ref``), so the translation task can take either.
    """

    kind: str
    src: str
    tgt: str
    train: list[Pair] = field(default_factory=list)
    valid: list[Pair] = field(default_factory=list)
    test: list[Pair] = field(default_factory=list)
    buckets: dict[str, list[Pair]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"GeneratedCorpus({self.kind} {self.src!r} -> {self.tgt!r}: train={len(self.train)}, "
            f"valid={len(self.valid)}, test={len(self.test)} in buckets {list(self.buckets)})"
        )


def load_corpus(
    kind: str,
    src: str = "en",
    tgt: str = "de",
    *,
    n_train: int = 20_000,
    n_valid: int = 500,
    per_bucket: int = 100,
    train_len: tuple[int, int] = (1, 50),
    buckets: Sequence[tuple[int, int]] = BUCKETS,
    seed: int = 0,
    max_value: int = MAX_VALUE,
    years: tuple[int, int] = YEARS,
) -> GeneratedCorpus:
    """:func:`splits` as a corpus object (the same pairs; the test set also kept per bucket).

    Raises:
        ValueError: unknown kind or language, bad sizes or lengths.
        DataNotFoundError: num2words or babel is not installed.
    """
    _check_pair(kind, src, tgt)
    lo, hi = train_len
    for name, value in (("n_train", n_train), ("n_valid", n_valid), ("per_bucket", per_bucket)):
        if not (isinstance(value, int) and value >= 0):
            raise fail(f"{name} >= 0", repr(value), f"{name}=100")
    buckets = tuple((int(a), int(b)) for a, b in buckets)
    test_sets, valid, train = _generate(kind, src, tgt, n_train, n_valid, per_bucket, (lo, hi), buckets, seed,
                                        max_value, tuple(years))  # type: ignore[arg-type]  # fmt: skip
    by_bucket = {k: list(v) for k, v in test_sets}
    test = [p for v in by_bucket.values() for p in v]
    return GeneratedCorpus(kind, src, tgt, list(train), list(valid), test, by_bucket)


@functools.lru_cache(maxsize=4)
def _generate(
    kind: str,
    src: str,
    tgt: str,
    n_train: int,
    n_valid: int,
    per_bucket: int,
    train_len: tuple[int, int],
    buckets: tuple[tuple[int, int], ...],
    seed: int,
    max_value: int,
    years: tuple[int, int],
) -> tuple[tuple[tuple[str, tuple[Pair, ...]], ...], tuple[Pair, ...], tuple[Pair, ...]]:
    """Cached: a process that trains and then evaluates generates the corpus once."""
    opts: dict[str, Any] = {"max_value": max_value, "years": years}
    test = length_buckets(kind, src, tgt, per_bucket, buckets=buckets, seed=seed, **opts)
    held = {p.src for v in test.values() for p in v}
    lo, hi = train_len
    valid = make_pairs(kind, src, tgt, n_valid, min_len=lo, max_len=hi, seed=seed + 1_000_003, exclude=held, **opts)
    held.update(p.src for p in valid)
    train = make_pairs(kind, src, tgt, n_train, min_len=lo, max_len=hi, seed=seed + 2_000_003, exclude=held, **opts)
    return tuple((k, tuple(v)) for k, v in test.items()), tuple(valid), tuple(train)


def tokenizer_settings(kind: str, lang: str) -> dict[str, Any]:
    """Keyword arguments for :meth:`MorphemeTokenizer.train` on one side of a generated corpus.

    A word model whose vocabulary holds every morpheme of the training split: numbers have a few dozen (times
    two: with and without ``@@``), dates a few hundred (the 200 years of the default range, days, months,
    weekdays).

    >>> tokenizer_settings("numbers", "de")
    {'vocab_size': 400, 'character_coverage': 1.0, 'model_type': 'word'}
    """
    _check_language(kind, lang)
    return {"vocab_size": 400 if kind == "numbers" else 2000, "character_coverage": 1.0, "model_type": "word"}
