"""One rule for ``key_mask`` (attnkit.functional._validate.check_key_mask) in every kernel and module: boolean
``True`` = real key; integer 0/1 read the same way (the same numbers, bit for bit); float, a wrong shape or a non-tensor
raise the same ValueError everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from attnkit.functional import block_sparse_attention, local_layout, sliding_window_attention
from attnkit.layers import AdditiveAttention, HardAttention, MultiHeadAttention, SoftAttention

B, S, D = 2, 16, 8


def _callers() -> dict[str, Callable[[Any], Any]]:
    torch.manual_seed(0)
    x4 = torch.randn(B, 2, S, D)  # (B, H, S, E)
    x3 = torch.randn(B, S, D)  # (B, S, D)
    q1 = torch.randn(B, D)  # one decoder step
    mha, soft = MultiHeadAttention(D, 2).eval(), SoftAttention(D).eval()
    add, hard = AdditiveAttention(D, D, D).eval(), HardAttention(D, D, mode="argmax").eval()
    return {
        "sliding_window_attention": lambda km: sliding_window_attention(x4, x4, x4, window=4, key_mask=km),
        "block_sparse_attention": lambda km: block_sparse_attention(x4, x4, x4, local_layout(4), block_size=4,
                                                                    key_mask=km),
        "MultiHeadAttention": lambda km: mha(x3, key_mask=km)[0],
        "SoftAttention": lambda km: soft(x3, key_mask=km)[0],
        "AdditiveAttention": lambda km: add(q1, x3, key_mask=km)[0],
        "HardAttention": lambda km: hard(q1, x3, key_mask=km)[0],
    }


CALLERS = _callers()
REAL = torch.arange(S) < torch.tensor([[S], [S - 5]])  # (B, S): the second sequence right-padded


@pytest.mark.parametrize("name", CALLERS)
def test_integer_key_mask_reads_as_boolean(name: str) -> None:
    call = CALLERS[name]
    with torch.no_grad():
        assert torch.equal(call(REAL.long()), call(REAL))
        assert torch.equal(call(REAL.to(torch.uint8)), call(REAL))


BAD = {
    "float": (REAL.float(), "torch.float32 (2, 16)"),
    "shape": (REAL[:, :-1], "torch.bool (2, 15)"),
    "not a tensor": (REAL.tolist(), "list"),
}


@pytest.mark.parametrize("bad", BAD, ids=BAD.keys())
def test_bad_key_mask_gives_one_error_everywhere(bad: str) -> None:
    mask, got = BAD[bad]
    messages = {}
    for name, call in CALLERS.items():
        with pytest.raises(ValueError) as info:
            call(mask)
        messages[name] = str(info.value)
    assert len(set(messages.values())) == 1, messages
    msg = next(iter(messages.values()))
    assert msg.startswith(f"expected key_mask of shape (B, S) = ({B}, {S}): a boolean key_mask"), msg
    assert f"got {got};" in msg, msg


def test_integer_key_mask_other_than_0_1_gives_one_error_everywhere() -> None:
    lengths = REAL.long() * 2  # e.g. a mask of counts, not of 0/1: a mistake every caller names the same way
    messages = {}
    for name, call in CALLERS.items():
        with pytest.raises(ValueError) as info:
            call(lengths)
        messages[name] = str(info.value)
    assert len(set(messages.values())) == 1, messages
    msg = next(iter(messages.values()))
    assert msg.startswith("expected an integer key_mask of 0 and 1 only"), msg
    assert "got torch.int64 values in [0, 2];" in msg, msg
