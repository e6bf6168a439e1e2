"""Build every body of the native kernels that this CPU can run, and check each against the float64 reference.

``python -m attnkit.functional._native_check`` prints one line per body: the decode kernel (AVX2/FMA/F16C and
portable C) and the sliding-window / block-sparse kernel (AVX-512, AVX2 and portable C), whether the CPU can run
it, whether it was built, and the largest error against :func:`attnkit.functional.attention_reference` in units
of its tolerance (:func:`attnkit.testing.tolerance`), forward and backward. It exits 1 when a body the CPU can run
was not built (with ``--strict``, which ``make test`` uses) or when any body is outside its tolerance.

Each build runs in a child process with its own environment (``ATTNKIT_NATIVE_SIMD=0`` for the portable one), so
the library loaded here is never swapped under a caller. ``make test`` runs this before the test suite, so CI on an
AMD or an Intel machine checks every body that machine has.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from typing import cast

import torch

from attnkit._runtime import cpu_model

from . import _native

__all__ = ["check_build", "expected_bodies", "main"]

# (kernel, body) -> the CPU flags it needs (x86-64 names from /proc/cpuinfo); the portable bodies need nothing.
_NEEDS: dict[tuple[str, str], frozenset[str]] = {
    ("decode", "AVX2/FMA/F16C"): frozenset({"avx2", "fma", "f16c"}),
    ("decode", "portable C"): frozenset(),
    ("band", "AVX-512"): frozenset({"avx512f", "avx512dq"}),
    ("band", "AVX2"): frozenset({"avx2", "fma", "f16c"}),
    ("band", "portable C"): frozenset(),
}


def expected_bodies() -> list[tuple[str, str]]:
    """The (kernel, body) pairs this CPU can run (x86-64 SIMD bodies only on x86-64)."""
    flags = _native.cpu_flags()
    x86 = platform.machine() in ("x86_64", "AMD64")
    return [kb for kb, need in _NEEDS.items() if not need or (x86 and need <= flags)]


def _max_ratio(actual: torch.Tensor, reference: torch.Tensor, reduction: int, grad: bool) -> float:
    """max |actual - reference| / (atol + rtol |reference|): <= 1 means within the policy's tolerance."""
    from attnkit.testing import tolerance

    atol, rtol = tolerance(actual.dtype, reduction, grad=grad)
    err = (actual.double() - reference).abs() / (atol + rtol * reference.abs())
    return float(err.max())


def _worst(out: torch.Tensor, ref: torch.Tensor, grads: tuple[torch.Tensor, ...],
           ref_grads: tuple[torch.Tensor, ...], reduction: int) -> float:
    """The largest error / tolerance over an output and its gradients, each against its float64 reference."""
    worst = _max_ratio(out, ref.detach(), reduction, grad=False)
    for got, want in zip(grads, ref_grads, strict=True):
        worst = max(worst, _max_ratio(got, want, reduction, grad=True))
    return worst


def _check_band(isa: int) -> dict[str, float]:
    """One body of the band kernel: a causal window with GQA, odd length and head dims, forward and gradients."""
    from ._reference import attention_reference
    from .local import WindowMask, window_native

    gen = torch.Generator().manual_seed(7)
    n, e, ev, window = 203, 24, 8, 32
    q, k, v = (torch.randn(1, h, n, d, generator=gen, dtype=torch.float64) for h, d in ((4, e), (2, e), (2, ev)))
    g = torch.randn(1, 4, n, ev, generator=gen, dtype=torch.float64)
    win = WindowMask(window, look_backward=1, causal=True)
    q64, k64, v64 = (t.clone().requires_grad_(True) for t in (q, k, v))
    mask = win.materialize(n, n)
    ref = attention_reference(q64, k64.repeat_interleave(2, 1), v64.repeat_interleave(2, 1), mask)[0]
    ref_grads = torch.autograd.grad((ref * g).sum(), (q64, k64, v64))
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        qd, kd, vd = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
        out = window_native(qd, kd, vd, win, e**-0.5, isa)
        grads = torch.autograd.grad((out * g.to(dtype)).sum(), (qd, kd, vd))
        result[str(dtype).removeprefix("torch.")] = _worst(out, ref, grads, ref_grads, 2 * window)
    result["weights"] = _check_mask_weights(isa)
    result["softcap"] = _check_mask_softcap(isa)
    return result


def _check_mask_softcap(isa: int) -> float:
    """The mask engine with logit soft-capping (its vector tanh): output and gradients under a causal window."""
    from ._reference import attention_reference
    from .masked import masked_attention
    from .masks import SlidingWindowMask

    gen = torch.Generator().manual_seed(13)
    n, e, cap = 203, 24, 5.0
    q, k, v = (3 * torch.randn(1, 2, n, e, generator=gen, dtype=torch.float64) for _ in range(3))
    g = torch.randn(1, 2, n, e, generator=gen, dtype=torch.float64)
    mask = SlidingWindowMask(70)
    q64, k64, v64 = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, mask.materialize(n, n), softcap=cap)[0]
    ref_grads = torch.autograd.grad((ref * g).sum(), (q64, k64, v64))
    qf, kf, vf = (t.float().requires_grad_(True) for t in (q, k, v))
    out = masked_attention(qf, kf, vf, mask, e**-0.5, softcap=cap, isa=isa)
    grads = torch.autograd.grad((out * g.float()).sum(), (qf, kf, vf))
    return _worst(out, ref, grads, ref_grads, n)


def _check_mask_weights(isa: int) -> float:
    """The mask engine's exact weights (attnkit_mask_weights) under a window with sinks and a padded batch row."""
    from ._reference import attention_reference
    from .masked import masked_weights
    from .masks import PaddingMask, SinkMask, SlidingWindowMask

    gen = torch.Generator().manual_seed(9)
    n, e = 203, 24
    q = torch.randn(2, 4, n, e, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, n, e, generator=gen, dtype=torch.float64)
    mask = (SlidingWindowMask(40) | SinkMask(3)) & PaddingMask(torch.tensor([n, 150]))
    w = masked_weights(q.float(), k.float(), mask, e**-0.5, isa=isa)
    _, ref = attention_reference(q, k, torch.zeros(2, 2, n, 1, dtype=torch.float64), mask._bind(2, 4))
    return _max_ratio(w, ref, n, grad=False)


def _check_decode() -> dict[str, float]:
    """The decode kernel (two-pass with weights, and the one-pass fused path) on a cache view with a mask."""
    from ._reference import attention_reference
    from .decode import decode_attention

    gen = torch.Generator().manual_seed(11)
    s, e, ev = 777, 24, 16
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        kbuf = torch.randn(2, 2, s + 9, e, generator=gen, dtype=torch.float64).to(dtype)
        vbuf = torch.randn(2, 2, s + 9, ev, generator=gen, dtype=torch.float64).to(dtype)
        k, v = kbuf[:, :, :s], vbuf[:, :, :s]
        q = torch.randn(2, 4, 1, e, generator=gen, dtype=torch.float64).to(dtype)
        mask = torch.rand(2, 1, 1, s, generator=gen) > 0.3
        ref, ref_w = attention_reference(q.double(), k.double(), v.double(), mask)
        out, w = decode_attention(q, k, v, mask, impl="native")
        if w is None:
            raise RuntimeError("decode_attention(need_weights=True) returned no weights")
        worst = max(_max_ratio(out, ref, s, grad=False), _max_ratio(w, ref_w, s, grad=False))
        ref, _ = attention_reference(q.double(), k.double(), v.double())
        out, _ = decode_attention(q, k, v, impl="native", need_weights=False)
        result[str(dtype).removeprefix("torch.")] = max(worst, _max_ratio(out, ref, s, grad=False))
    return result


def check_build() -> dict[str, object]:
    """In this process: which bodies the loaded library has, and each one's error (in units of its tolerance)."""
    lib = _native.load()
    if lib is None:
        return {"status": _native.status(), "bodies": {}}
    bodies: dict[str, dict[str, float]] = {}
    bodies["decode: " + ("AVX2/FMA/F16C" if lib.attnkit_simd() else "portable C")] = _check_decode()
    if lib.attnkit_band_isa() == 2:
        bodies["band: AVX-512"] = _check_band(2)
    bodies["band: " + ("AVX2" if lib.attnkit_simd() else "portable C")] = _check_band(1)
    return {"status": _native.status(), "bodies": bodies}


def _child(variant: str) -> dict[str, object]:
    env = dict(os.environ, ATTNKIT_NATIVE_SIMD="0" if variant == "portable" else "1", ATTNKIT_NATIVE="1")
    proc = subprocess.run([sys.executable, "-m", "attnkit.functional._native_check", "--child"], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return {"status": f"check failed: {(proc.stderr or proc.stdout).strip()[-400:]}", "bodies": {}}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.functional._native_check", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 when a body this CPU can run was not built")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(check_build()))
        return 0
    print(f"CPU: {cpu_model()}")
    checked: dict[str, dict[str, float]] = {}
    for variant in ("simd", "portable"):
        found = _child(variant)
        print(f"{variant} build: {found['status']}")
        checked.update(cast(dict[str, dict[str, float]], found["bodies"]))
    ok = True
    for kernel, body in expected_bodies():
        name = f"{kernel}: {body}"
        errors = checked.get(name)
        if errors is None:
            print(f"  {name:<22} NOT BUILT (this CPU can run it)")
            ok = ok and not args.strict
            continue
        within = all(x <= 1.0 for x in errors.values())
        ok = ok and within
        worst = ", ".join(f"{dt} {x:.3f}" for dt, x in errors.items())
        print(f"  {name:<22} checked: max error / tolerance {worst}  {'ok' if within else 'OUTSIDE TOLERANCE'}")
    for name in sorted(set(checked) - {f"{k}: {b}" for k, b in expected_bodies()}):
        print(f"  {name:<22} built and checked, though this CPU's flags do not list it")
    print("native bodies: all checked" if ok else "native bodies: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
