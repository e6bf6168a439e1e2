"""attnkit's small native kernels: C source shipped with the package, compiled on first use, loaded with ctypes.

Some kernels cannot reach the speed of the hardware through PyTorch operators:

* The decode step should take as long as reading the KV cache once, and PyTorch's CPU kernels convert a whole
  half-precision cache to float32 first (several times the read). ``csrc/decode.c`` streams the cache once,
  widening half-precision rows in registers (AVX2/FMA/F16C where the CPU has them, portable C otherwise), with
  OpenMP threads.
* Sliding-window and block-sparse attention, forward and backward: ``csrc/band.c`` (body in
  ``csrc/band_impl.h``). On an AMD Zen 5 PyTorch's CPU matrix products (MKL, with no AVX-512 code path for that
  CPU) reach about 110 GFLOP/s a core, where the band kernel's AVX-512 microkernel, its accumulators kept in
  registers, reaches about 255. The body is compiled for the build's target and again for AVX-512, and picked at
  run time.

How it is built. Nothing happens at install time. The first call that wants a native kernel compiles the C source
with the system C compiler (``$CC`` or ``cc``) into a shared library in the cache folder (``$ATTNKIT_CACHE``, else
``$XDG_CACHE_HOME/attnkit``, else ``~/.cache/attnkit``), named by a hash of the source, the flags and the compiler,
and writes it under a temporary name first, then renames it, so processes racing to build it never load half a file.
Later calls and processes load the cached library. The library links the same ``libgomp.so.1`` that PyTorch
loaded, so both share one OpenMP runtime, and it runs with PyTorch's thread count.

``ATTNKIT_NATIVE_SIMD=0`` builds the portable C code only (no AVX2, no AVX-512), which the tests use to check that
path too.

Nothing depends on it. Without a compiler, or with ``ATTNKIT_NATIVE=0``, :func:`load` returns ``None``, callers run
their pure-PyTorch path, and :func:`status` says why. Every native kernel has a parity test against the reference.

Example:
    >>> from attnkit.functional import _native
    >>> isinstance(_native.status(), str)
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from attnkit._runtime import cpu_flags  # noqa: F401 - re-exported: tests patch _native.cpu_flags

__all__ = ["band_body", "library_path", "load", "release_scratch", "scratch_held", "status"]

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "decode.c", _CSRC / "band.c")  # compiled together into one library
_HEADERS = (_CSRC / "attnkit.h", _CSRC / "band_impl.h")  # part of the hash: a changed header rebuilds
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _cache_dir() -> Path:
    if os.environ.get("ATTNKIT_CACHE"):
        return Path(os.environ["ATTNKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attnkit"


def _flags() -> list[str]:
    flags = ["-O3", "-std=gnu11", "-fPIC", "-shared"]
    simd = os.environ.get("ATTNKIT_NATIVE_SIMD", "1").strip().lower() not in ("0", "false", "no", "off")
    if simd and platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= cpu_flags():
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if not simd:
        flags.append("-DATTNKIT_PORTABLE")  # no AVX-512 body in band.c either
    return flags


def _compile(cc: str, flags: list[str], target: Path) -> str | None:
    """Compile to ``target``; returns None on success, else the reason (compiler output, shortened)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    reason = None
    for extra in (["-fopenmp"], []):  # without OpenMP (e.g. Apple clang) the kernels run on one thread
        try:
            proc = subprocess.run([cc, *flags, *extra, *map(str, _SOURCES), "-lm", "-o", tmp],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            reason = f"{cc} failed to run: {exc}"
            break
        if proc.returncode == 0:
            os.replace(tmp, target)
            return None
        reason = f"{cc} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
    Path(tmp).unlink(missing_ok=True)
    return reason


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.attnkit_decode_scores.argtypes = [ptr, cint, i64, i64, i64, i64, i64, i64, i64, ptr, i64, ptr, i64, cint]
    lib.attnkit_decode_scores.restype = None
    lib.attnkit_decode_pv.argtypes = [ptr, ptr, cint, i64, i64, i64, i64, i64, i64, i64, i64, ptr, i64, cint]
    lib.attnkit_decode_pv.restype = None
    lib.attnkit_decode_fused.argtypes = [ptr, ptr, cint, *[i64] * 11, ptr, i64, ptr, ptr, ptr, i64, cint]
    lib.attnkit_decode_fused.restype = None
    f32 = ctypes.c_float
    lib.attnkit_band_fwd.argtypes = [*[ptr] * 5, *[i64] * 7, cint, f32, i64, i64, cint]
    lib.attnkit_band_fwd.restype = cint
    lib.attnkit_band_bwd.argtypes = [*[ptr] * 9, *[i64] * 7, cint, f32, i64, i64, cint]
    lib.attnkit_band_bwd.restype = cint
    lib.attnkit_sparse_fwd.argtypes = [*[ptr] * 5, *[i64] * 6, ptr, ptr, cint, f32, i64, i64, cint]
    lib.attnkit_sparse_fwd.restype = cint
    lib.attnkit_sparse_bwd.argtypes = [*[ptr] * 9, *[i64] * 6, ptr, ptr, cint, f32, i64, i64, cint]
    lib.attnkit_sparse_bwd.restype = cint
    # n_q, n_k, kv_len, e, ev, row_ptr, cols, part, bits, softcap, scale, g0, g1, isa
    mask_args: list[type] = [*[i64] * 5, *[ptr] * 4, f32, f32, i64, i64, cint]
    lib.attnkit_mask_fwd.argtypes = [*[ptr] * 5, *mask_args]
    lib.attnkit_mask_fwd.restype = cint
    lib.attnkit_mask_bwd.argtypes = [*[ptr] * 9, *mask_args]
    lib.attnkit_mask_bwd.restype = cint
    # q k v out lse, n_q n_k, kv_len, e ev rep, row_ptr row_of, groups, cols part bits, softcap scale, tasks, ntasks,
    # nthreads, isa
    lib.attnkit_mask_fwd_tasks.argtypes = [*[ptr] * 5, i64, i64, ptr, i64, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, f32,
                                           f32, ptr, i64, cint, cint]
    lib.attnkit_mask_fwd_tasks.restype = cint
    # q k w, n_q n_k kv_len e, row_ptr cols part bits, softcap scale, g0 g1, isa
    lib.attnkit_mask_weights.argtypes = [*[ptr] * 3, *[i64] * 4, *[ptr] * 4, f32, f32, i64, i64, cint]
    lib.attnkit_mask_weights.restype = cint
    # q k w, n_q n_k, kv_len, e rep, row_ptr row_of, groups, cols part bits, softcap scale, tasks, ntasks, nthreads,
    # isa
    lib.attnkit_mask_weights_tasks.argtypes = [*[ptr] * 3, i64, i64, ptr, i64, i64, ptr, ptr, i64, ptr, ptr, ptr, f32,
                                               f32, ptr, i64, cint, cint]
    lib.attnkit_mask_weights_tasks.restype = cint
    lib.attnkit_openmp.restype = cint
    lib.attnkit_scratch_held.restype = i64
    lib.attnkit_scratch_release.restype = None
    lib.attnkit_band_isa.restype = cint
    lib.attnkit_simd.restype = cint
    lib.attnkit_has_f16.restype = cint
    return lib


def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("ATTNKIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "turned off by ATTNKIT_NATIVE=0"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler found (install gcc, or set CC); using the PyTorch path"
    flags = _flags()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{cc} failed to run: {exc}"
    code = b"".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(code + " ".join([cc, *flags, version]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"attnkit_native_{key}.so"
    if not target.exists():
        try:
            reason = _compile(cc, flags, target)
        except OSError as exc:  # e.g. a read-only cache folder
            reason = f"cannot write {target.parent}: {exc}"
        if reason is not None:
            return None, reason
    try:
        lib = _declare(ctypes.CDLL(str(target)))
    except (OSError, AttributeError) as exc:
        return None, f"cannot load {target}: {exc}"
    simd = "AVX2/FMA/F16C" if lib.attnkit_simd() else "portable C"
    return lib, f"loaded {target.name} (decode: {simd}; sliding window: {band_body(lib)})"


def band_body(lib: ctypes.CDLL) -> str:
    """Which body of the sliding-window / block-sparse kernel ``lib`` runs on this CPU."""
    return {2: "AVX-512", 1: "AVX2"}.get(lib.attnkit_band_isa(), "portable C")


def load() -> ctypes.CDLL | None:
    """The native library (built on first call), or ``None`` when it cannot be built; see :func:`status`."""
    if "status" in _STATE:  # built or refused already: no lock on the decode hot path
        return _STATE["lib"]  # type: ignore[return-value]
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"], _STATE["status"] = _build()
    return _STATE["lib"]  # type: ignore[return-value]


def library_path() -> Path | None:
    """Where the loaded native library lies (per-machine data, e.g. the decode calibration, goes beside it), or
    ``None`` when none is loaded."""
    lib = load()
    return None if lib is None else Path(lib._name)


def scratch_held() -> int:
    """Bytes the block engine keeps for its next calls: tile buffers and transposed keys, which a fresh allocation
    would fault in page by page (at most 64 MiB; see ``csrc/band.c``). 0 without the library."""
    lib = load()
    return 0 if lib is None else int(lib.attnkit_scratch_held())


def release_scratch() -> None:
    """Free what :func:`scratch_held` counts (the next call allocates afresh)."""
    lib = load()
    if lib is not None:
        lib.attnkit_scratch_release()


def status() -> str:
    """One line: which native library is loaded, or why none is (builds it on first call)."""
    load()
    return str(_STATE["status"])
