"""``python -m attnkit.bench dense``: the dense kernel against PyTorch's SDPA and the naive formula.

For each N (B=1, H=8, E=64, float32, no grad), in one process:

* attnkit ``backend="auto"`` vs ``torch.nn.functional.scaled_dot_product_attention`` (the baseline) vs naive math
  (``softmax(Q K^T / sqrt(E)) V`` written as three plain ops);
* causal attention given as a :class:`~attnkit.functional.CausalMask` object, as an explicit boolean ``N x N``
  tensor, and as PyTorch's ``is_causal=True`` (the causal baseline);
* the exact-weights path (``return_weights=True``), which must also hand back the ``N x N`` weights: once as a
  loop that drops each result before the next call (the math backend then reuses the weights' memory), once
  keeping the previous result alive (fresh memory every call).

The contenders of one N are timed **interleaved**: each round calls every contender once, so a machine shared
with other jobs slows all of them alike, and the medians over rounds are compared as ratios
(``baseline time / time``: above 1 is faster than the baseline). Nothing here asserts a timing.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import torch
import torch.nn.functional as F

from attnkit.functional import CausalMask, causal_mask, scaled_dot_product_attention

from ._timing import Table, interleaved_medians, machine_line, ratio

B, H, E = 1, 8, 64


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) / E**0.5  # (B, H, N, N)
    return scores.softmax(dim=-1) @ v  # (B, H, N, E)


KEPT = "attnkit return_weights, kept"


def _keep(store: deque[Any], result: Any) -> Any:
    store.append(result)
    return result


def contenders(n: int) -> dict[str, Callable[[], Any]]:
    """The timed calls for sequence length ``n`` (all on the same random inputs)."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, E, generator=g) for _ in range(3))  # (B, H, N, E)
    bool_causal = causal_mask(n)  # (N, N), True = may attend
    kept: deque[Any] = deque(maxlen=1)  # the caller still holds the previous weights: no memory can be reused
    obj = CausalMask()
    return {
        "torch SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
        "attnkit auto": lambda: scaled_dot_product_attention(q, k, v),
        "naive math": lambda: _naive(q, k, v),
        "attnkit return_weights": lambda: scaled_dot_product_attention(q, k, v, return_weights=True),
        KEPT: lambda: _keep(kept, scaled_dot_product_attention(q, k, v, return_weights=True)),
        "torch is_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "attnkit CausalMask()": lambda: scaled_dot_product_attention(q, k, v, obj),
        "attnkit bool causal tensor": lambda: scaled_dot_product_attention(q, k, v, bool_causal),
    }


BASELINE = {
    "torch SDPA": "torch SDPA",
    "attnkit auto": "torch SDPA",
    "naive math": "torch SDPA",
    "attnkit return_weights": "torch SDPA",
    KEPT: "torch SDPA",
    "torch is_causal": "torch is_causal",
    "attnkit CausalMask()": "torch is_causal",
    "attnkit bool causal tensor": "torch is_causal",
}


def run(sizes: list[int], rounds: dict[int, int]) -> Table:
    table = Table(
        title=f"Dense attention, B={B}, H={H}, E={E}, float32, no grad",
        columns=["N", "kernel", "wall ms", "speed vs baseline", "CPU ms", "speed (CPU)", "baseline"],
    )
    with torch.no_grad():
        for n in sizes:
            fns = contenders(n)
            # The kept-weights loop runs in its own interleaved group (with its own SDPA baseline): alternating
            # with the drop-each-result loop would hand it that loop's free buffer, which is not what it measures.
            kept = {KEPT: fns.pop(KEPT), "torch SDPA": fns["torch SDPA"]}
            medians = interleaved_medians(fns, rounds=rounds[n])
            medians_kept = interleaved_medians(kept, rounds=rounds[n])
            for name in BASELINE:
                group = medians_kept if name == KEPT else medians
                (wall, cpu), (base_wall, base_cpu) = group[name], group[BASELINE[name]]
                table.add(
                    n, name, f"{wall * 1e3:.2f}", ratio(wall, base_wall), f"{cpu * 1e3:.2f}", ratio(cpu, base_cpu),
                    BASELINE[name],
                )
            causal_gain = medians["attnkit bool causal tensor"][0] / medians["attnkit CausalMask()"][0]
            table.notes.append(f"N={n}: CausalMask() is {causal_gain:.2f}x faster than the explicit boolean tensor")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    table.notes.append(
        f"measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine_line()}, {os.cpu_count()} CPUs, "
        f"1-min load average {load:.1f} at the end"
    )
    table.notes.append("ratios are baseline time / time (above 1 = faster); contenders interleaved round by round")
    table.notes.append(f"'{KEPT}' keeps the previous weights alive; timed in its own group with its own SDPA baseline")
    return table


def main(quick: bool = False, out: str | None = None) -> int:
    if quick:
        sizes, rounds = [128, 256], {128: 3, 256: 3}
    else:
        sizes, rounds = [256, 1024, 4096], {256: 40, 1024: 15, 4096: 5}
    table = run(sizes, rounds)
    print(table.text())
    table.save(out, "dense")
    return 0
