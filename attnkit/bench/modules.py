"""Benchmark suite "modules": MultiHeadAttention against nn.MultiheadAttention, and KV-cached decoding.

``python -m attnkit.bench modules [--quick] [--out DIR]`` prints three tables, every number measured in this
process, each time as a ratio against a baseline measured alongside it (calls alternate between the two, so a
machine shared with other jobs slows both alike):

1. ``MultiHeadAttention`` vs ``torch.nn.MultiheadAttention`` (same weights) at B=8, L=512, D=512, H=8: inference
   forward (both in eval mode under ``no_grad``, where PyTorch takes its fused fast path), training forward and
   forward+backward. Ratio = torch time / attnkit time (above 1 = attnkit faster).
2. Decoding with a :class:`~attnkit.layers.KVCache` vs recomputing the whole causal prefix for every new token,
   tokens/s at contexts 1k and 8k (one attention layer, D=512, H=8).
3. Time of one decoding step of the attention kernel (1 query, H=8 heads of E=64, cache of 1k, 8k, 32k tokens;
   ``--quick``: 1k, 8k)
   against the memory-bandwidth bound ``bytes(K) + bytes(V)`` / read bandwidth, where the read bandwidth is that
   of a large tensor sum measured in the same run; for float32 and bfloat16 caches, PyTorch's fused SDPA next to
   attnkit's decode kernels (``native_decode``: the native C kernel in one pass, as ``backend="auto"`` runs it inside
   a model; ``torch_decode``: its PyTorch-only path), which backend ``backend="auto"`` picks at this thread count
   (it reads this machine's decode calibration, :mod:`attnkit.functional._decode_calibration`), and which was
   fastest. Run it with
   ``OMP_NUM_THREADS=1`` as well: on a busy machine the thread count changes the picture.

``--quick`` shrinks the module sizes and repeats (for CI and the tour; under 20 s).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnkit.bench._timing import Table, machine_line, ratio
from attnkit.functional import (
    _decode_calibration,
    _native,
    decode_attention,
    scaled_dot_product_attention,
    which_backend,
)
from attnkit.layers import KVCache, MultiHeadAttention


def _paired(fns: list[Callable[[], Any]], *, repeats: int, warmup: int = 1, min_time: float = 0.0) -> list[float]:
    """Median seconds of each function, calls interleaved (a, b, a, b, ...) so drifting load hits all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < repeats or time.perf_counter() - start < min_time:
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
        if len(times[0]) >= 200:
            break
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------------------------------------- 1. modules
def module_table(quick: bool) -> Table:
    b, n, d, h = (2, 128, 128, 8) if quick else (8, 512, 512, 8)
    repeats = 3 if quick else 7
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(d, h, batch_first=True)
    ours = MultiHeadAttention.from_torch(ref)
    x = torch.randn(b, n, d)
    table = Table(f"MultiHeadAttention vs nn.MultiheadAttention (B={b}, L={n}, D={d}, H={h}, float32)",
                  ["pass", "nn.MultiheadAttention ms", "attnkit ms", "ratio (torch/attnkit)"])

    def torch_fwd() -> Any:
        return ref(x, x, x, need_weights=False)[0]

    def ours_fwd() -> Any:
        return ours(x)

    ref.eval(), ours.eval()
    with torch.no_grad():
        t_ref, t_ours = _paired([torch_fwd, ours_fwd], repeats=repeats)
    table.add("forward, inference (eval, no_grad)", t_ref * 1e3, t_ours * 1e3, ratio(t_ours, t_ref))
    ref.train(), ours.train()
    t_ref, t_ours = _paired([torch_fwd, ours_fwd], repeats=repeats)
    table.add("forward, training (autograd on)", t_ref * 1e3, t_ours * 1e3, ratio(t_ours, t_ref))
    xg = x.clone().requires_grad_()

    def torch_fb() -> None:
        ref(xg, xg, xg, need_weights=False)[0].sum().backward()

    def ours_fb() -> None:
        ours(xg).sum().backward()

    t_ref, t_ours = _paired([torch_fb, ours_fb], repeats=repeats)
    table.add("forward + backward", t_ref * 1e3, t_ours * 1e3, ratio(t_ours, t_ref))
    with torch.no_grad():
        ref.eval(), ours.eval()
        t_ref, t_ours = _paired([lambda: ref(x, x, x, need_weights=False, is_causal=True,
                                             attn_mask=nn.Transformer.generate_square_subsequent_mask(n))[0],
                                 lambda: ours(x, is_causal=True)], repeats=repeats)
    table.add("causal forward, inference", t_ref * 1e3, t_ours * 1e3, ratio(t_ours, t_ref))
    table.notes.append("same weights (MultiHeadAttention.from_torch); need_weights=False for nn.MultiheadAttention")
    return table


# ---------------------------------------------------------------------------------------------- 2. decoding
def decoding_table(quick: bool) -> Table:
    d, h = (128, 8) if quick else (512, 8)
    contexts = (256, 1024) if quick else (1024, 8192)
    steps = 4 if quick else 16
    torch.manual_seed(0)
    mha = MultiHeadAttention(d, h).eval()
    table = Table(f"KV-cached decoding vs recompute (one layer, D={d}, H={h}, B=1, float32)",
                  ["context", "recompute tok/s", "KV cache tok/s", "speed-up"])
    with torch.no_grad():
        for ctx in contexts:
            x = torch.randn(1, ctx + steps, d)
            # recompute: every new token runs the whole causal prefix again (time of one token at this context)
            prefix = x[:, : ctx + 1]

            def recompute_step(prefix: torch.Tensor = prefix) -> Any:
                return mha(prefix, is_causal=True)

            recompute = _paired([recompute_step], repeats=1 if ctx >= 4096 else 3, warmup=0 if ctx >= 4096 else 1)[0]
            cache = KVCache(capacity=ctx + steps + 1)
            mha(x[:, :ctx], cache=cache, is_causal=True)  # prefill (not timed)
            t0 = time.perf_counter()
            for i in range(steps):
                mha(x[:, ctx + i : ctx + i + 1], cache=cache, is_causal=True)
            cached = (time.perf_counter() - t0) / steps
            table.add(ctx, 1 / recompute, 1 / cached, ratio(cached, recompute))
    table.notes.append("recompute = one causal forward over context+1 tokens per new token; cached = mean of "
                       f"{steps} one-token steps after the prefill")
    return table


# ---------------------------------------------------------------------------------------------- 3. bandwidth
def read_bandwidth(numel: int, repeats: int) -> float:
    """Bytes/s of a float32 sum over a tensor much larger than the CPU caches (the machine's read bandwidth)."""
    big = torch.ones(numel)
    big.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t0)
    return numel * 4 / statistics.median(times)


def bandwidth_table(quick: bool) -> Table:
    h, e = 8, 64
    contexts = (1024, 8192) if quick else (1024, 8192, 32768)
    numel = (16 if quick else 64) * 1024 * 1024  # 64 or 256 MiB of float32: well beyond the CPU caches
    sums = 3 if quick else 5
    torch.manual_seed(0)
    impl = "auto" if _native.load() is None else "native"
    bws = [read_bandwidth(numel, sums)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for ctx in contexts:
            cache = KVCache(capacity=ctx)
            keys, values, _ = cache.update(torch.randn(1, h, ctx, e).to(dtype), torch.randn(1, h, ctx, e).to(dtype))
            q = torch.randn(1, h, 1, e).to(dtype)
            nbytes = 2 * keys.numel() * keys.element_size()
            name = which_backend(q, keys, values).name
            reps = (3 if quick else 15) if ctx < 32768 else 7

            def sdpa_step(q: torch.Tensor = q, k: torch.Tensor = keys, v: torch.Tensor = values) -> Any:
                return scaled_dot_product_attention(q, k, v, backend="sdpa")

            def native_step(q: torch.Tensor = q, k: torch.Tensor = keys, v: torch.Tensor = values) -> Any:
                return decode_attention(q, k, v, impl=impl, need_weights=False)

            def torch_step(q: torch.Tensor = q, k: torch.Tensor = keys, v: torch.Tensor = values) -> Any:
                return decode_attention(q, k, v, impl="torch", need_weights=False)

            with torch.no_grad():
                t_sdpa, t_native, t_torch = _paired([sdpa_step, native_step, torch_step], repeats=reps,
                                                    min_time=0.0 if quick else 0.3)
            bws.append(read_bandwidth(numel, sums))
            rows.append((dtype, ctx, nbytes, name, t_sdpa, t_native, t_torch))
    bw = statistics.median(bws)
    table = Table(f"decode step vs memory-bandwidth bound (1 query, H={h}, E={e}, B=1, "
                  f"{torch.get_num_threads()} threads)",
                  ["cache", "context", "MB read", "bound ms", "sdpa ms", "sdpa of bound", f"decode ({impl}) ms",
                   "of bound", "decode (torch) ms", "of bound", "auto picks", "fastest"])
    for dtype, ctx, nbytes, name, t_sdpa, t_native, t_torch in rows:
        bound = nbytes / bw
        candidates = {"sdpa": t_sdpa, "torch_decode": t_torch}
        if impl == "native":
            candidates["native_decode"] = t_native
        fastest = min(candidates, key=lambda c: candidates[c])
        table.add(str(dtype).replace("torch.", ""), ctx, f"{nbytes / 1e6:.1f}", f"{bound * 1e3:.2f}",
                  f"{t_sdpa * 1e3:.2f}", f"{bound / t_sdpa:.2f}", f"{t_native * 1e3:.2f}", f"{bound / t_native:.2f}",
                  f"{t_torch * 1e3:.2f}", f"{bound / t_torch:.2f}", name, fastest)
    table.notes.append(f"read bandwidth: median {bw / 1e9:.2f} GB/s over {len(bws)} measurements (each the median "
                       f"of {sums} sums of a {numel * 4 >> 20} MiB float32 tensor; min {min(bws) / 1e9:.2f}, "
                       f"max {max(bws) / 1e9:.2f}), taken between the rows")
    table.notes.append(f"native kernel: {_native.status()}")
    cal_file = _decode_calibration.cache_path() if _decode_calibration.mode() != "off" else None
    table.notes.append("'auto picks' = the backend backend='auto' runs for the row's step (which_backend); 'fastest' "
                       "= the quickest of the kernels timed here. auto reads this machine's decode calibration "
                       + (f"({cal_file})" if cal_file else f"(off: {_decode_calibration.ENV}=0, or no native library)")
                       + f"; {_decode_calibration.ENV}=force measures it again")
    table.notes.append("bound = bytes of K and V / read bandwidth; 'of bound' = bound / measured time (above 1: the "
                       "cache was served from the CPU caches)")
    return table


def main(quick: bool = False, out: str | None = None) -> int:
    print(machine_line())
    for stem, make in (("modules", module_table), ("decoding", decoding_table), ("decode_bandwidth", bandwidth_table)):
        t0 = time.perf_counter()
        table = make(quick)
        table.notes.append(f"{machine_line()}; table took {time.perf_counter() - t0:.1f} s")
        print(table.text(), flush=True)
        print()
        table.save(out, f"modules_{stem}")
    return 0


if __name__ == "__main__":
    main()
