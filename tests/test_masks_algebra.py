"""attnkit.functional.masks: every mask kind's meaning (hand-checked), & and |, the block description expanded back
equal to the materialised mask, mask_mod versions of attention-gym's CPU examples, FlexAttention interop."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnkit.functional import (
    BlockedWindowMask,
    BlockSparseMask,
    CausalMask,
    DocumentMask,
    MaskMod,
    OrMask,
    PaddingMask,
    SinkMask,
    SlidingWindowMask,
    WindowMask,
    as_mask,
    from_flex_block_mask,
    mask_blocks,
    to_flex_block_mask,
)
from attnkit.functional import local as local_mod
from attnkit.functional import masks as masks_mod
from attnkit.functional import sparse as sparse_mod


def _int(mask: torch.Tensor) -> list[list[int]]:
    return mask.reshape(mask.shape[-2], mask.shape[-1]).int().tolist()


# --------------------------------------------------------------------------------------------- meanings
def test_sliding_window_is_exact_and_lower_right() -> None:
    assert _int(SlidingWindowMask(2).materialize(4, 4)) == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    # L != S: the queries are the last L positions (a decoding step), as HuggingFace's masks for a cache
    assert _int(SlidingWindowMask(2).materialize(2, 4)) == [[0, 1, 1, 0], [0, 0, 1, 1]]
    assert _int(SlidingWindowMask(3).materialize(1, 5)) == [[0, 0, 1, 1, 1]]
    # non-causal: symmetric |p - j| < window by default, or an explicit look-ahead
    assert _int(SlidingWindowMask(2, causal=False).materialize(3, 3)) == [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    assert _int(SlidingWindowMask(1, causal=False, look_ahead=2).materialize(3, 4)) == [
        [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="look_ahead=0 with causal=True"):
        SlidingWindowMask(4, look_ahead=1)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowMask(0)


def test_sliding_window_equals_huggingface_rule() -> None:
    """HF: kv_idx <= q_idx and q_idx - kv_idx < sliding_window (positions; L == S)."""
    n, w = 37, 5
    q, kv = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    assert torch.equal(SlidingWindowMask(w).materialize(n, n)[0, 0], (kv <= q) & (q - kv < w))


def test_sinks_are_causal_and_combine_with_a_window() -> None:
    assert _int(SinkMask(2).materialize(3, 3)) == [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert _int(SinkMask(2, causal=False).materialize(2, 3)) == [[1, 1, 0], [1, 1, 0]]
    streaming = SlidingWindowMask(2) | SinkMask(1)
    assert isinstance(streaming, OrMask)
    assert _int(streaming.materialize(5, 5)) == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]]
    # never a future key: the union is inside the causal mask
    dense = streaming.materialize(40, 40)
    assert not bool((dense & ~CausalMask().materialize(40, 40)).any())


def test_document_mask_from_ids_and_cu_seqlens() -> None:
    ids = torch.tensor([0, 0, 1, 1, 1, -1])
    want = [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0]]
    assert _int(DocumentMask(ids).materialize(6, 6)) == want
    assert torch.equal(DocumentMask.from_cu_seqlens(torch.tensor([0, 2, 5]), total=6).doc_ids, ids)
    causal_docs = DocumentMask(ids) & CausalMask()
    assert _int(causal_docs.materialize(6, 6))[3] == [0, 0, 1, 1, 0, 0]
    # per batch row ids, and queries as the last L tokens
    two = DocumentMask(torch.tensor([[0, 0, 1], [0, 1, 1]]))
    assert two.materialize(1, 3).shape == (2, 1, 1, 3)
    assert two.materialize(1, 3)[:, 0, 0].int().tolist() == [[0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="cu_seqlens"):
        DocumentMask.from_cu_seqlens(torch.tensor([1, 3]))


def test_blocked_window_is_the_old_window_mask_and_old_names_still_work() -> None:
    with pytest.warns(DeprecationWarning, match="BlockedWindowMask"):
        old = WindowMask(3, look_backward=2)
    assert isinstance(old, BlockedWindowMask)
    assert torch.equal(old.materialize(11, 11), BlockedWindowMask(3, look_backward=2).materialize(11, 11))
    assert local_mod.WindowMask is WindowMask
    assert sparse_mod.BlockSparseMask is masks_mod.BlockSparseMask is BlockSparseMask
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BlockedWindowMask(4)  # the new name never warns


def test_or_and_flatten_and_check_shapes() -> None:
    a, b, c = SlidingWindowMask(3), SinkMask(1), CausalMask()
    assert len((a | b | c).parts) == 3  # type: ignore[attr-defined]
    assert len((a & b & c).parts) == 3  # type: ignore[attr-defined]
    mixed = (a | b) & c
    assert torch.equal(mixed.materialize(9, 9), (a.materialize(9, 9) | b.materialize(9, 9)) & c.materialize(9, 9))
    with pytest.raises(ValueError, match="batch / head"):
        (PaddingMask(torch.tensor([1, 2])) & PaddingMask(torch.tensor([1, 2, 3]))).blocks(4, 4)


# --------------------------------------------------------------------------------------------- block description
_IDS = torch.tensor([0] * 50 + [1] * 80 + [2] * 70 + [-1] * 7)


def _masks(s: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    layout = torch.rand(2, 8, 8, generator=gen) > 0.5
    return {
        "causal": CausalMask(),
        "causal_lr": CausalMask("lower_right"),
        "swa": SlidingWindowMask(37),
        "swa_bidir": SlidingWindowMask(70, causal=False),
        "swa_ahead": SlidingWindowMask(5, causal=False, look_ahead=3),
        "sink": SinkMask(4),
        "swa|sink": SlidingWindowMask(40) | SinkMask(4),
        "blocked": BlockedWindowMask(30),
        "blocked_bidir": BlockedWindowMask(16, look_backward=2, look_forward=1, causal=False),
        "sparse64": BlockSparseMask(layout, 64),
        "sparse32": BlockSparseMask(layout.repeat_interleave(2, 1).repeat_interleave(2, 2), 32),
        "sparse24": BlockSparseMask(torch.rand(11, 11, generator=gen) > 0.4, 24),
        "mod_dilated": MaskMod(lambda b, h, q, kv: (q - kv) % 3 == 0),
        "mod_heads&swa": MaskMod(lambda b, h, q, kv: ((q >= kv) & (h == 1)) | ((b == 0) & (kv < 10)))
        & SlidingWindowMask(80),
        "pad&causal": PaddingMask(torch.tensor([s // 3, s])) & CausalMask(),
        "(swa|sink)&pad": (SlidingWindowMask(20) | SinkMask(3)) & PaddingMask(torch.tensor([s // 2, min(7, s)])),
    }


@pytest.mark.parametrize(("q_len", "k_len"), [(207, 207), (100, 207), (1, 207), (64, 128), (130, 70), (5, 3)])
@pytest.mark.parametrize("name", list(_masks(207)))
def test_blocks_expand_back_to_the_materialised_mask(name, q_len, k_len):  # type: ignore[no-untyped-def]
    mask = _masks(k_len)[name]._bind(2, 3)  # type: ignore[attr-defined]
    blocks = mask.blocks(q_len, k_len)
    dense = mask.materialize(q_len, k_len)
    got = blocks.to_dense()
    assert torch.equal(got, dense.expand_as(got)), name
    # full blocks are really full, listed blocks are never empty: the kernel does no wasted work
    st = blocks.states()
    assert blocks.bits.shape == (int((st == masks_mod.PARTIAL).sum()), 64)
    assert blocks.row_ptr.shape == (blocks.batch * blocks.heads, -(-q_len // 64) + 1)


@pytest.mark.parametrize(("q_len", "k_len"), [(207, 207), (150, 207), (1, 207)])
def test_document_blocks(q_len, k_len):  # type: ignore[no-untyped-def]
    shuffled = _IDS[torch.randperm(207, generator=torch.Generator().manual_seed(1))]
    for mask in (DocumentMask(_IDS), DocumentMask(_IDS) & CausalMask("lower_right"), DocumentMask(shuffled),
                 DocumentMask(torch.stack([_IDS, _IDS.flip(0)])) & SlidingWindowMask(33)):
        bound = mask._bind(2, 1)
        got = bound.blocks(q_len, k_len).to_dense()
        assert torch.equal(got, bound.materialize(q_len, k_len).expand_as(got))


def test_structured_blocks_are_classified_analytically() -> None:
    """Window: full blocks inside the band, partial only on its two edges; documents on 64-aligned boundaries:
    no partial block at all."""
    blocks = SlidingWindowMask(128).blocks(1024, 1024)
    st = blocks.states()[0, 0]
    assert int((st == masks_mod.PARTIAL).sum()) == 16 + 14  # the diagonal, and the far edge from tile 2 on
    assert int((st == masks_mod.FULL).sum()) == 15
    docs = DocumentMask(torch.arange(1024) // 256).blocks(1024, 1024)
    assert docs.bits.shape[0] == 0 and docs.cols.numel() == 4 * 4 * 4
    assert SlidingWindowMask(128).blocks(1024, 1024) is blocks  # cached per length pair


def test_mask_mod_learns_which_batch_and_head_it_depends_on() -> None:
    plain = MaskMod(lambda b, h, q, kv: q >= kv)._bind(4, 8)
    assert plain._rows() == (1, 1)
    per_head = MaskMod(lambda b, h, q, kv: (q >= kv) | (h == 0))._bind(4, 8)
    assert per_head._rows() == (1, 8)
    doc = torch.randint(0, 3, (4, 50)).sort(-1).values
    per_row = MaskMod(lambda b, h, q, kv: doc[b, q] == doc[b, kv])._bind(4, 8)
    assert per_row._rows() == (4, 1)
    got = per_row.blocks(50, 50).to_dense()
    assert torch.equal(got[:, 0], doc.unsqueeze(-1) == doc.unsqueeze(-2))
    fn = lambda b, h, q, kv: q >= kv  # noqa: E731
    assert as_mask(fn) is as_mask(fn)  # one MaskMod (and its cache) per function


# --------------------------------------------------------------------------------------------- attention-gym
def _gym(n: int) -> list[tuple[str, object, object]]:
    """attention-gym's mask_mod examples that run on CPU, each with the same mask built from structures."""
    docs = torch.tensor([0] * (n // 3) + [1] * (n // 2) + [2] * (n - n // 3 - n // 2))
    prefix = 13

    def causal(b, h, q, kv):  # type: ignore[no-untyped-def]
        return q >= kv

    def sliding_window(b, h, q, kv):  # type: ignore[no-untyped-def]
        return (q >= kv) & (q - kv < 16)

    def prefix_lm(b, h, q, kv):  # type: ignore[no-untyped-def]
        return (kv < prefix) | (q >= kv)

    def document(b, h, q, kv):  # type: ignore[no-untyped-def]
        return (docs[q] == docs[kv]) & (q >= kv)

    def dilated(b, h, q, kv):  # type: ignore[no-untyped-def]
        return (q >= kv) & ((q - kv) % 4 == 0)

    def sinks(b, h, q, kv):  # type: ignore[no-untyped-def]
        return (q >= kv) & ((q - kv < 16) | (kv < 4))

    return [
        ("causal", causal, CausalMask()),
        ("sliding_window", sliding_window, SlidingWindowMask(16)),
        ("prefix_lm", prefix_lm, SinkMask(prefix, causal=False) | CausalMask()),
        ("document", document, DocumentMask(docs) & CausalMask()),
        ("dilated", dilated, None),
        ("sinks", sinks, SlidingWindowMask(16) | SinkMask(4)),
    ]


@pytest.mark.parametrize("n", [1, 77, 200])
@pytest.mark.parametrize("case", range(6))
def test_attention_gym_mask_mods(n, case):  # type: ignore[no-untyped-def]
    name, fn, structured = _gym(n)[case]
    q, kv = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    want = fn(torch.zeros(()), torch.zeros(()), q, kv)  # (L, S): the function on the full grid
    mod = MaskMod(fn)
    assert torch.equal(mod.materialize(n, n)[0, 0], want), name
    assert torch.equal(mod.blocks(n, n).to_dense()[0, 0], want), name
    if structured is not None:
        assert torch.equal(structured.materialize(n, n)[0, 0], want), name  # type: ignore[attr-defined]
        assert torch.equal(structured.blocks(n, n).to_dense()[0, 0], want), name  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------- FlexAttention
flex = pytest.importorskip("torch.nn.attention.flex_attention")


def test_to_and_from_flex_block_mask() -> None:
    n = 300
    mask = SlidingWindowMask(70) | SinkMask(4)
    bm = to_flex_block_mask(mask, 1, 1, n, n, block_size=128)
    want = mask.materialize(n, n)[0, 0]
    dense_blocks = bm.to_dense()[0, 0]  # (nq, nk) 0/1: blocks Flex visits
    need = want[: n, : n].float()
    need = torch.nn.functional.pad(need, (0, 384 - n, 0, 384 - n)).view(3, 128, 3, 128).sum((1, 3)) > 0
    assert torch.equal(dense_blocks.bool(), need)
    q, kv = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    assert torch.equal(bm.mask_mod(torch.tensor(0), torch.tensor(0), q, kv), want)
    # back: Flex's own block mask, built by create_block_mask, as an attnkit mask
    fb = flex.create_block_mask(lambda b, h, q, kv: (q >= kv) & (q - kv < 70), None, None, n, n, device="cpu")
    ours = from_flex_block_mask(fb)
    assert torch.equal(ours.blocks(n, n).to_dense()[0, 0], SlidingWindowMask(70).materialize(n, n)[0, 0])


# --------------------------------------------------------------------------------------------- mask_mod compilation
def _want_states(dense: torch.Tensor) -> torch.Tensor:
    """Block states straight from a dense ``(R1, R2, L, S)`` mask: full = every real pair allowed, empty = none."""
    *rows, q_len, k_len = dense.shape
    nq, nk = -(-q_len // 64), -(-k_len // 64)
    pad = (0, nk * 64 - k_len, 0, nq * 64 - q_len)
    allowed = torch.nn.functional.pad(dense, pad).view(*rows, nq, 64, nk, 64)
    real = torch.nn.functional.pad(torch.ones(q_len, k_len, dtype=torch.bool), pad).view(nq, 64, nk, 64)
    some = allowed.any(-1).any(-2)
    full = (allowed | ~real).all(-1).all(-2)
    return torch.where(full, masks_mod.FULL, torch.where(some, masks_mod.PARTIAL, masks_mod.EMPTY)).to(torch.uint8)


_DOC_ROWS = torch.tensor([[0] * 90 + [1] * 110 + [2] * 100, [0] * 150 + [1] * 150])  # per batch row, 300 tokens


def _mods() -> dict[str, object]:
    return {
        "dilated": lambda b, h, q, kv: (q - kv) % 3 == 0,
        "per_head_window": lambda b, h, q, kv: (kv <= q) & (q - kv < 40 + 30 * h),
        "per_batch_docs": lambda b, h, q, kv: (_DOC_ROWS[b, q] == _DOC_ROWS[b, kv]) & (kv <= q),
        "batch_and_head": lambda b, h, q, kv: ((q >= kv) & (h == 1)) | ((b == 0) & (kv < 70)),
        "keys_only": lambda b, h, q, kv: kv % 70 < 64,  # returns (n, 1, 64): broadcast by the compiler
        "integer_result": lambda b, h, q, kv: ((q // 64) + (kv // 64)) % 2,  # whole blocks, as 0 / 1 integers
        "everything": lambda b, h, q, kv: torch.ones((), dtype=torch.bool),
        "nothing": lambda b, h, q, kv: q < 0,
    }


@pytest.mark.parametrize(("q_len", "k_len"), [(1, 1), (63, 65), (64, 64), (129, 200), (200, 129), (257, 3),
                                               (300, 300)])
@pytest.mark.parametrize("name", list(_mods()))
@pytest.mark.parametrize("chunk", [3, 256])
def test_mask_mod_blocks_are_exact(name, q_len, k_len, chunk, monkeypatch):  # type: ignore[no-untyped-def]
    """Every element evaluated, in chunks (3 blocks: many chunks and a short last one), with odd lengths, L != S,
    per-head and per-batch functions: the description expands back to the materialised mask, and each block is
    classified exactly (full = every real pair, empty = none, bits only for the partial ones)."""
    monkeypatch.setattr(mask_blocks, "_CHUNK_BLOCKS", chunk)
    if name == "per_batch_docs" and max(q_len, k_len) > 300:
        pytest.skip("ids for 300 tokens")
    mask = MaskMod(_mods()[name])._bind(2, 3)  # type: ignore[arg-type]
    blocks = mask.blocks(q_len, k_len)
    dense = mask.materialize(q_len, k_len)
    got = blocks.to_dense()
    assert torch.equal(got, dense.expand_as(got)), name
    want = _want_states(dense)
    assert torch.equal(blocks.states(), want.expand_as(blocks.states())), name
    assert blocks.bits.shape == (int((blocks.states() == masks_mod.PARTIAL).sum()), 64)


def test_mask_mod_blocks_equal_the_structured_masks_at_a_long_length() -> None:
    """At N=4059 (the bench's mask_mods, smaller and odd): a fresh MaskMod compiles to exactly the structured
    mask's description, block lists and bit words alike."""
    n, w = 4059, 200
    ids = torch.arange(n) // 1000
    pairs = [
        (lambda b, h, q, kv: (kv <= q) & (q - kv < w), SlidingWindowMask(w)),
        (lambda b, h, q, kv: (ids[q] == ids[kv]) & (kv <= q), DocumentMask(ids) & CausalMask()),
    ]
    for fn, structured in pairs:
        ours, theirs = MaskMod(fn, B=1, H=1).blocks(n, n), structured.blocks(n, n)
        for field in ("row_ptr", "cols", "part", "bits"):
            assert torch.equal(getattr(ours, field), getattr(theirs, field)), field


def test_mask_mod_blocks_with_worker_threads(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With two intra-op threads the chunks go to two workers (single-threaded ops each): the same description, in
    order, as one thread gives; the intra-op thread count is restored after."""
    from attnkit._runtime import torch_threads

    monkeypatch.setattr(mask_blocks, "_CHUNK_BLOCKS", 2)
    fn = _mods()["per_head_window"]
    with torch_threads(1):
        one = MaskMod(fn)._bind(1, 3).blocks(300, 257)  # type: ignore[arg-type]
    with torch_threads(2):
        two = MaskMod(fn)._bind(1, 3).blocks(300, 257)  # type: ignore[arg-type]
        assert torch.get_num_threads() == 2
    for field in ("row_ptr", "cols", "part", "bits"):
        assert torch.equal(getattr(one, field), getattr(two, field)), field
    got = two.to_dense()
    assert torch.equal(got, MaskMod(fn)._bind(1, 3).materialize(300, 257).expand_as(got))  # type: ignore[arg-type]
