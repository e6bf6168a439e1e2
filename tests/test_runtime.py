"""Thread settings for shared machines: available cores (affinity, cgroup quota) and the thread governor."""

from __future__ import annotations

import pytest
import torch

from attnkit import _runtime


@pytest.fixture
def restore_threads():  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_available_cores_follows_affinity_and_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(_runtime, "_cgroup_quota", lambda: None)
    assert _runtime.available_cores() == 4
    monkeypatch.setattr(_runtime, "_cgroup_quota", lambda: 2.5)  # --cpus=2.5: two whole cores
    assert _runtime.available_cores() == 2
    monkeypatch.setattr(_runtime, "_cgroup_quota", lambda: 0.5)  # never below one
    assert _runtime.available_cores() == 1


def test_cgroup_quota_reads_v2_and_v1(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = {"/sys/fs/cgroup/cpu.max": "150000 100000\n"}

    def read_text(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(self) not in files:
            raise OSError(str(self))
        return files[str(self)]

    monkeypatch.setattr(_runtime.Path, "read_text", read_text)
    assert _runtime._cgroup_quota() == 1.5
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert _runtime._cgroup_quota() is None
    del files["/sys/fs/cgroup/cpu.max"]
    files.update({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "300000", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"})
    assert _runtime._cgroup_quota() == 3.0
    files["/sys/fs/cgroup/cpu/cpu.cfs_quota_us"] = "-1"
    assert _runtime._cgroup_quota() is None


def test_governor_uses_the_cores_others_leave_free(monkeypatch: pytest.MonkeyPatch, restore_threads) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_runtime, "available_cores", lambda: 2)
    monkeypatch.setattr(_runtime.os, "cpu_count", lambda: 2)
    samples = iter([(0, 0, 0), (300, 100, 400),   # 200 of 400 jiffies busy elsewhere: one core taken
                    (300, 100, 400), (500, 300, 800)])  # only this process busy: both cores free
    monkeypatch.setattr(_runtime, "_cpu_jiffies", lambda: next(samples))
    monkeypatch.setattr(_runtime.time, "sleep", lambda s: None)
    gov = _runtime.ThreadGovernor(interval=0.0)  # takes the first sample
    assert gov.tick() == 1
    gov._last = None
    assert gov.tick() == 2


def test_fixed_threads_turn_the_governor_off(monkeypatch: pytest.MonkeyPatch, restore_threads) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ATTNKIT_THREADS", "1")
    gov = _runtime.configure_process()
    assert gov.fixed == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(_runtime, "_cpu_jiffies", lambda: pytest.fail("a fixed count never samples"))
    assert gov.tick() == 1
    _runtime.governor_tick()
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(_runtime, "_GOVERNOR", None)


def test_governor_without_proc_keeps_the_count(monkeypatch: pytest.MonkeyPatch, restore_threads) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_runtime, "_cpu_jiffies", lambda: None)
    torch.set_num_threads(1)
    assert _runtime.ThreadGovernor(interval=0.0).tick() == 1
