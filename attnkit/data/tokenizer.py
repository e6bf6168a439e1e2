"""Subword tokenizer: sentencepiece trained offline on the training split, saved as bytes with the model.

Ids 0-3 are reserved: ``PAD = 0``, ``UNK = 1``, ``BOS = 2``, ``EOS = 3``.

Example:
    >>> from attnkit.data.tokenizer import Tokenizer
    >>> texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
    >>> tok = Tokenizer.train(texts, vocab_size=40)
    >>> ids = tok.encode("the cat sat")
    >>> tok.decode(ids)
    'the cat sat'
    >>> Tokenizer.from_bytes(tok.to_bytes()).encode("the cat sat") == ids
    True
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from attnkit._errors import fail

__all__ = ["BOS", "EOS", "PAD", "UNK", "Tokenizer"]

PAD, UNK, BOS, EOS = 0, 1, 2, 3
_REQUIRED = re.compile(r"smaller than required_chars\. \d+ vs (\d+)")


class Tokenizer:
    """A trained sentencepiece model with the reserved ids above.

    Build one with :meth:`train` (offline, seconds on the Bible's training split) or load one with
    :meth:`load` / :meth:`from_bytes`; never from a hub.
    """

    def __init__(self, model_proto: bytes) -> None:
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except RuntimeError as err:
            raise fail("a serialized sentencepiece model", f"unreadable bytes ({err})", "Tokenizer.train") from None
        if self._sp.pad_id() != PAD or self._sp.bos_id() != BOS or self._sp.eos_id() != EOS:
            raise fail(
                f"a sentencepiece model with pad={PAD}, unk={UNK}, bos={BOS}, eos={EOS}",
                f"pad={self._sp.pad_id()}, unk={self._sp.unk_id()}, bos={self._sp.bos_id()}, eos={self._sp.eos_id()}",
                "Tokenizer.train(...), which reserves these ids",
            )

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = 8000,
        character_coverage: float = 1.0,
        model_type: str = "unigram",
    ) -> Tokenizer:
        """Train on ``texts`` in memory (one thread, so the same texts always give the same model).

        ``character_coverage`` below 1 (``0.9995``) suits languages with thousands of characters (Chinese).
        A ``vocab_size`` larger than the texts allow is lowered to what they allow; one smaller than the
        characters to cover (thousands in Chinese) is raised to cover them.
        """
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise fail("at least one non-empty training text", "none", "passing the training split")
        if not isinstance(vocab_size, int) or vocab_size < 8:
            raise fail("vocab_size >= 8", repr(vocab_size), "vocab_size=8000")
        for _ in range(2):
            buf = io.BytesIO()
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(texts),
                    model_writer=buf,
                    vocab_size=vocab_size,
                    character_coverage=character_coverage,
                    model_type=model_type,
                    pad_id=PAD,
                    unk_id=UNK,
                    bos_id=BOS,
                    eos_id=EOS,
                    num_threads=1,
                    hard_vocab_limit=False,
                    minloglevel=2,
                )
            except RuntimeError as err:
                need = _REQUIRED.search(str(err))
                if need is None:
                    raise ValueError(f"expected texts sentencepiece can train on, got an error: {err}") from None
                vocab_size = int(need.group(1)) + 64  # every required character plus room for a few merges
                continue
            return cls(buf.getvalue())
        raise ValueError(f"expected a vocabulary sentencepiece accepts, got none up to {vocab_size}; try a larger one")

    def __len__(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str) -> list[int]:
        """Subword ids of ``text`` (no BOS/EOS)."""
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; reserved ids (PAD, BOS, EOS) are skipped."""
        return str(self._sp.decode([int(i) for i in ids if int(i) > UNK]))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The subword string of each id (for alignment tables and plots)."""
        return [str(self._sp.id_to_piece(int(i))) for i in ids]

    def to_bytes(self) -> bytes:
        return self._proto

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        return cls(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._proto)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(Path(path).read_bytes())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={len(self)})"
