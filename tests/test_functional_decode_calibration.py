"""attnkit.functional._decode_calibration: the one-time per-machine timing that decides where ``auto`` sends decoding
steps. The cache file is written and read, a corrupt or foreign one is measured again, the environment variable
turns it off or forces it, and ``auto`` follows a given calibration. No timing is asserted: the measurements are
replaced by given tables (one real ``measure`` call checks only its form)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from attnkit.functional import _decode_calibration as cal
from attnkit.functional import _native, scaled_dot_product_attention, which_backend
from attnkit.functional._reference import attention_reference
from attnkit.testing import assert_close_to_reference

NEEDS_LIB = pytest.mark.skipif(_native.load() is None, reason=f"no native library: {_native.status()}")


def _table(native: float, torch_path: float | None, sdpa: float) -> dict[str, list[list[float | None]]]:
    """A calibration in which every context measured these milliseconds."""
    rows = [[ctx, native / 1e3, None if torch_path is None else torch_path / 1e3, sdpa / 1e3] for ctx in cal.CONTEXTS]
    return {"float32": rows, "bfloat16": [list(r) for r in rows]}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The calibration on: its file in tmp_path, ``measure`` replaced by a given table; returns the call log."""
    monkeypatch.setenv(cal.ENV, "1")
    monkeypatch.setattr(_native, "library_path", lambda: tmp_path / "attnkit_native_test.so")
    state: dict[str, object] = {"calls": 0, "table": _table(1.0, None, 2.0)}

    def measure(threads: int, *args: object, **kwargs: object) -> object:
        state["calls"] = int(state["calls"]) + 1  # type: ignore[call-overload]
        return json.loads(json.dumps(state["table"]))

    monkeypatch.setattr(cal, "measure", measure)
    cal._forget()
    yield state
    cal._forget()


@NEEDS_LIB
def test_cache_is_written_then_read(fake) -> None:  # type: ignore[no-untyped-def]
    first = cal.table(1)
    assert fake["calls"] == 1 and first == fake["table"]
    path = cal.cache_path()
    assert path is not None and path.name == "attnkit_native_test.decode_calibration.json" and path.exists()
    data = json.loads(path.read_text())
    assert data["threads"]["1"] == fake["table"] and data["cpu"] == cal._stamp()["cpu"]
    cal._forget()  # a new process: the file is read, nothing is measured
    assert cal.table(1) == fake["table"] and fake["calls"] == 1
    cal.table(2)  # another thread count: measured once more, kept beside the first
    assert fake["calls"] == 2 and set(json.loads(path.read_text())["threads"]) == {"1", "2"}


@NEEDS_LIB
@pytest.mark.parametrize("content", ["{not json", "[]", '{"threads": {"1": {"float32": []}}}', "foreign", "rows"])
def test_a_corrupt_or_foreign_cache_is_measured_again(fake, content: str) -> None:  # type: ignore[no-untyped-def]
    path = cal.cache_path()
    assert path is not None
    if content == "foreign":  # another CPU wrote it
        content = json.dumps({**cal._stamp(), "cpu": "some other CPU", "threads": {"1": fake["table"]}})
    elif content == "rows":  # the right stamp, a row that is not a timing
        bad = {"float32": [[1024, -1.0, None, 0.1]], "bfloat16": [[1024, 0.1, None, float("nan")]]}
        content = json.dumps({**cal._stamp(), "threads": {"1": bad}})
    path.write_text(content)
    assert cal.table(1) == fake["table"] and fake["calls"] == 1
    assert json.loads(path.read_text())["threads"]["1"] == fake["table"]  # rewritten, valid


@NEEDS_LIB
def test_environment_variable(fake, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(cal.ENV, "0")
    assert cal.mode() == "off" and cal.table(1) is None and cal.timings(torch.float32, 4096, 1) is None
    assert fake["calls"] == 0
    monkeypatch.setenv(cal.ENV, "1")
    cal.table(1)
    cal._forget()
    monkeypatch.setenv(cal.ENV, "force")  # measured again although the file is there
    cal.table(1)
    assert cal.mode() == "force" and fake["calls"] == 2


def test_no_native_library_no_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cal.ENV, "1")
    monkeypatch.setitem(_native._STATE, "lib", None)
    monkeypatch.setitem(_native._STATE, "status", "no C compiler found")
    cal._forget()
    assert cal.cache_path() is None and cal.table(1) is None


@NEEDS_LIB
def test_auto_follows_the_calibration(fake, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count the calibration is read at
    try:
        _auto_follows(fake)
    finally:
        torch.set_num_threads(threads)


def _auto_follows(fake: dict[str, object]) -> None:
    q = torch.randn(1, 8, 1, 64)
    k = v = torch.randn(1, 2, 4096, 64)
    fake["table"] = _table(1.0, None, 2.0)  # native faster: auto takes it
    cal._forget()
    choice = which_backend(q, k, v)
    assert choice.name == "native_decode" and "calibration" in str(choice.kernel)

    fake["table"] = _table(2.0, None, 1.0)  # native slower than SDPA: auto passes it over
    cal._forget()
    cal.cache_path().unlink()  # type: ignore[union-attr]
    choice = which_backend(q, k, v)
    assert choice.name == "sdpa"
    assert "slower than sdpa on this machine" in " ".join(choice.reasons["native_decode"])
    out = scaled_dot_product_attention(q, k, v)
    assert_close_to_reference(out, attention_reference(q.double(), k.double(), v.double())[0], reduction=4096)
    assert which_backend(q, k, v, backend="native_decode").name == "native_decode"  # forced: it still runs
    # steps the calibration did not time keep the declared rule: with weights (auto's other choice is math), with a mask
    assert which_backend(q, k, v, return_weights=True).name == "native_decode"
    assert which_backend(q, k, v, torch.rand(1, 4096) > 0.5).name == "native_decode"

    qb, kb = q.bfloat16(), k.bfloat16()  # half precision at one thread: the PyTorch decode path is a candidate
    fake["table"] = _table(2.0, 1.5, 3.0)  # native slower than the PyTorch path, which beats SDPA
    cal._forget()
    cal.cache_path().unlink()  # type: ignore[union-attr]
    choice = which_backend(qb, kb, kb)
    assert choice.name == "torch_decode"
    assert "slower than torch_decode" in " ".join(choice.reasons["native_decode"])
    fake["table"] = _table(2.0, 2.5, 1.0)  # SDPA fastest: neither decode kernel
    cal._forget()
    cal.cache_path().unlink()  # type: ignore[union-attr]
    choice = which_backend(qb, kb, kb)
    assert choice.name == "sdpa" and "slower than sdpa" in " ".join(choice.reasons["torch_decode"])
    assert which_backend(torch.randn(1, 8, 64, 64), k, v).name == "sdpa"  # not a decoding step


def test_nearest_context_is_read(fake) -> None:  # type: ignore[no-untyped-def]
    if _native.load() is None:
        pytest.skip(f"no native library: {_native.status()}")
    rows = [[1024, 1e-3, None, 2e-3], [8192, 3e-3, None, 2e-3], [32768, 5e-3, None, 9e-3]]
    fake["table"] = {"float32": rows, "bfloat16": rows}
    assert cal.timings(torch.float32, 900, 1)["context"] == 1024  # type: ignore[index]
    assert cal.timings(torch.float32, 6000, 1)["context"] == 8192  # type: ignore[index]
    row = cal.timings(torch.float16, 20000, 1)  # float16 reads the bfloat16 rows
    assert row is not None and row["context"] == 32768 and math.isinf(row["torch_decode"])


@NEEDS_LIB
def test_measure_gives_a_valid_table() -> None:
    """One real (tiny) measurement: the form the cache stores, never a figure."""
    tab = cal.measure(1, contexts=(256, 512), repeats=1)
    assert set(tab) == {"float32", "bfloat16", "float32/gqa4", "bfloat16/gqa4"} and cal._valid(tab)
    assert [r[0] for r in tab["float32"]] == [256, 512] and tab["float32"][0][2] is None  # float32: no torch path
    assert tab["bfloat16"][0][2] is not None  # half precision at one thread: the PyTorch path is timed too


def test_timings_read_the_nearest_grouped_query_ratio(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A GQA step reads the rows timed with grouped key/value heads (nearest ratio, log scale); a table without
    them (an older file's layout) serves every ratio from the plain rows."""
    plain = [[1024, 1e-3, None, 2e-3], [8192, 3e-3, None, 2e-3]]
    grouped = [[1024, 1e-3, None, 2e-3], [8192, 1e-3, None, 2e-3]]
    fake = {"float32": plain, "bfloat16": plain, "float32/gqa4": grouped, "bfloat16/gqa4": grouped}
    monkeypatch.setattr(cal, "table", lambda threads=None, run=True: fake)
    assert cal.timings(torch.float32, 8192, 1, group=1)["native_decode"] == 3e-3  # type: ignore[index]
    assert cal.timings(torch.float32, 8192, 1, group=3)["native_decode"] == 1e-3  # type: ignore[index]
    assert cal.timings(torch.float32, 8192, 1, group=16)["native_decode"] == 1e-3  # type: ignore[index]
    del fake["float32/gqa4"], fake["bfloat16/gqa4"]
    assert cal.timings(torch.float32, 8192, 1, group=3)["native_decode"] == 3e-3  # type: ignore[index]
