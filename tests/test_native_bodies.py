"""Every body of the native kernels that this CPU can run is built and checked against the float64 reference."""

from __future__ import annotations

import pytest

from attnkit.functional import _native, _native_check


def test_expected_bodies_follow_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_native, "cpu_flags", lambda: set())
    assert {body for _, body in _native_check.expected_bodies()} == {"portable C"}
    monkeypatch.setattr(_native, "cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512f", "avx512dq"})
    if _native_check.platform.machine() in ("x86_64", "AMD64"):
        assert ("band", "AVX-512") in _native_check.expected_bodies()
        assert ("decode", "AVX2/FMA/F16C") in _native_check.expected_bodies()


def test_every_body_this_cpu_runs_is_built_and_within_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    if _native.load() is None:
        pytest.skip(f"native kernel unavailable: {_native.status()}")
    code = _native_check.main(["--strict"])
    out = capsys.readouterr().out
    assert code == 0, out
    for kernel, body in _native_check.expected_bodies():
        assert f"{kernel}: {body}" in out and "NOT BUILT" not in out
    assert out.count(" ok") >= len(_native_check.expected_bodies())
