"""Checkpoints that never lose work and never unpickle: safetensors + JSON, written atomically, last N kept.

One checkpoint is a folder ``<dir>/step-00000120/`` holding

* ``model.safetensors`` — the weights;
* ``trainer.safetensors`` — optimiser tensors and the torch / numpy RNG states;
* any extra files (the tokenizers);
* ``state.json`` — step, config, scheduler state, optimiser hyper-parameters, python RNG state, and the
  SHA-256 of every other file (a checkpoint whose files do not match is reported as corrupt).

The folder is written under a temporary name and renamed into place with :func:`os.replace`, so a crash leaves
either the complete checkpoint or none; older checkpoints are deleted only after the new one is in place.
Loading reads only safetensors and JSON: no pickle, so a checkpoint cannot run code.

Example:
    >>> import tempfile, torch
    >>> from attnkit.train.checkpoint import save_checkpoint, load_checkpoint, list_checkpoints
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> with tempfile.TemporaryDirectory() as d:
    ...     for step in (1, 2, 3):
    ...         _ = save_checkpoint(d, step=step, model=model, optimizer=opt, config={"d": 3}, keep=2)
    ...     [p.name for p in list_checkpoints(d)], load_checkpoint(list_checkpoints(d)[-1]).step
    (['step-00000002', 'step-00000003'], 3)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_checkpoints",
    "restore_rng",
    "run_folder",
    "save_checkpoint",
]

FORMAT = "attnkit-checkpoint"
VERSION = 1
PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint is corrupt, incomplete or does not match the run that loads it. Nothing was changed on disk."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read (all tensors on CPU)."""

    path: Path
    step: int
    config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- RNG state
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch, numpy and python RNG states as (tensors, JSON-able values)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, pstate, gauss = random.getstate()
    values = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(pstate), gauss]}
    return tensors, values


def restore_rng(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, pstate, gauss = values["python"]
    random.setstate((version, tuple(pstate), gauss))


# ----------------------------------------------------------------------------------------------- optimiser
def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------------------- files
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return None  # callables (LambdaLR's lambdas) and other objects are rebuilt by the caller, never stored


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoint folders in ``directory``, oldest first (temporary folders are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
            found.append((int(p.name[len(PREFIX) :]), p))
    return [p for _, p in sorted(found)]


def remove_checkpoints(directory: str | Path) -> int:
    """Delete the checkpoint folders in ``directory`` (a fresh run into a folder an older run used, so a later
    ``--resume`` cannot pick up the older run's newer steps); returns how many were removed."""
    found = list_checkpoints(directory)
    for p in found:
        shutil.rmtree(p)
    return len(found)


@contextlib.contextmanager
def run_folder(
    checkpoint_dir: str | Path | None, *, resume: bool, expect_config: dict[str, Any]
) -> Iterator[tuple[Path, Checkpoint | None]]:
    """The checkpoint folder of one training run and the checkpoint it starts from, for ``train.loop.fit``.

    The folder is ``checkpoint_dir``, or a temporary folder removed on exit when it is ``None``. With ``resume`` the
    run starts from the newest checkpoint there (checked against ``expect_config``), or from scratch when there is
    none yet (a model an interrupted run had not reached); without it, the older checkpoints there are removed, so
    that a later ``--resume`` cannot pick up an older run's steps.
    """
    with contextlib.ExitStack() as stack:
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else Path(stack.enter_context(TemporaryDirectory()))
        start = None
        if resume and latest_checkpoint(folder) is not None:
            start = load_checkpoint(folder, expect_config=expect_config)
        elif not resume:
            remove_checkpoints(folder)
        yield folder, start


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    keep: int = 3,
    rng: bool = True,
) -> Path:
    """Write checkpoint ``step`` atomically into ``directory`` and keep only the newest ``keep``.

    Args:
        model: its ``state_dict()`` goes to ``model.safetensors`` (tied weights are stored once per name).
        optimizer: its state (tensors in safetensors, hyper-parameters in JSON).
        scheduler: its state (JSON).
        config: JSON-able settings that define the model (checked by :func:`load_checkpoint`).
        extra: JSON-able training state (data position, best score, ...).
        files: extra files by name (the tokenizers), stored byte for byte.
        keep: how many checkpoints to keep (>= 1).
        rng: store the torch / numpy / python RNG states.
    """
    if keep < 1:
        raise ValueError(f"expected keep >= 1, got {keep}; try keep=3")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = f"{PREFIX}{step:08d}"
    tmp = d / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    blobs: dict[str, bytes] = {}
    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blobs["model.safetensors"] = st_save(_untie(model_state))
    trainer_tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "config": _jsonable(config or {}),
        "extra": _jsonable(extra or {}),
    }
    if optimizer is not None:
        tensors, meta = _split_optimizer(optimizer.state_dict())
        trainer_tensors.update(tensors)
        state["optimizer"] = _jsonable(meta)
    if scheduler is not None:
        state["scheduler"] = _jsonable(scheduler.state_dict())
    if rng:
        tensors, values = capture_rng()
        trainer_tensors.update(tensors)
        state["rng"] = values
    blobs["trainer.safetensors"] = st_save(trainer_tensors)
    for fname, data in (files or {}).items():
        if fname in blobs or fname == "state.json" or "/" in fname:
            raise ValueError(f"expected an extra file name other than {sorted(blobs)}, got {fname!r}")
        blobs[fname] = bytes(data)
    state["files"] = {fname: _sha256(data) for fname, data in blobs.items()}
    for fname, data in blobs.items():
        _write(tmp / fname, data)
    _write(tmp / "state.json", json.dumps(state, indent=1).encode())
    _fsync_dir(tmp)
    final = d / name
    if final.exists():  # the same step saved again (e.g. stop signal on a checkpoint step): swap it
        old = d / f".{name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(d)
    for stale in list_checkpoints(d)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give every name its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_checkpoint(
    path: str | Path, *, expect_config: dict[str, Any] | None = None, config_keys: tuple[str, ...] | None = None
) -> Checkpoint:
    """Read and verify one checkpoint folder (or the newest one in a folder of checkpoints).

    Args:
        path: a ``step-*`` folder, or a folder holding them (the newest is read).
        expect_config: if given, the stored config must agree with it on ``config_keys`` (default: every key of
            ``expect_config``), otherwise :class:`CheckpointError` names the differences.

    Raises:
        CheckpointError: missing or unreadable files, a checksum mismatch (corrupt file), an unknown format, or a
            config mismatch. Files on disk are never modified.
    """
    p = Path(path)
    if p.is_dir() and not (p / "state.json").exists():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"expected a checkpoint in {p}, got none; try training first (without --resume)")
        p = latest
    state_file = p / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"expected {state_file}, got no such file; the checkpoint {p} is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"expected JSON in {state_file}, got unreadable text ({err}); it is corrupt") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(
            f"expected an {FORMAT} v{VERSION} checkpoint in {p}, got format={state.get('format')!r}, "
            f"version={state.get('version')!r}"
        )
    blobs: dict[str, bytes] = {}
    for fname, digest in state["files"].items():
        try:
            data = (p / fname).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"expected {p / fname}, got no such file; the checkpoint is incomplete") from None
        if _sha256(data) != digest:
            raise CheckpointError(
                f"expected {p / fname} to match the checksum in state.json, got different bytes: the checkpoint is "
                f"corrupt; try an older one in {p.parent} or delete {p}"
            )
        blobs[fname] = data
    if expect_config is not None:
        keys = config_keys if config_keys is not None else tuple(expect_config)
        stored = state.get("config", {})
        diff = {
            k: (stored.get(k), _jsonable(expect_config.get(k)))
            for k in keys
            if stored.get(k) != _jsonable(expect_config.get(k))
        }
        if diff:
            msg = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"expected a checkpoint with this run's settings, got a mismatch in {p} ({msg}); try the same "
                f"options as the run that wrote it, or a new --out folder"
            )
    try:
        model_state = st_load(blobs["model.safetensors"])
        trainer = st_load(blobs["trainer.safetensors"])
    except (SafetensorError, KeyError) as err:
        raise CheckpointError(f"expected readable safetensors in {p}, got an error ({err})") from None
    ckpt = Checkpoint(
        path=p,
        step=int(state["step"]),
        config=state.get("config", {}),
        model_state=model_state,
        scheduler_state=state.get("scheduler"),
        extra=state.get("extra", {}),
        files={k: v for k, v in blobs.items() if k not in ("model.safetensors", "trainer.safetensors")},
    )
    if "optimizer" in state:
        ckpt.optimizer_state = _join_optimizer(trainer, state["optimizer"])
    if "rng" in state:
        ckpt.rng_state = {"tensors": {k: v for k, v in trainer.items() if k.startswith("rng.")}, **state["rng"]}
    return ckpt


def restore(
    ckpt: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    rng: bool = True,
) -> None:
    """Load ``ckpt`` into live objects; a shape or name mismatch raises :class:`CheckpointError`."""
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"expected weights that fit this model, got a mismatch in {ckpt.path} ({' '.join(first[:3])[:400]}); "
            "try the same model options as the run that wrote it"
        ) from None
    if optimizer is not None and ckpt.optimizer_state is not None:
        try:
            optimizer.load_state_dict(ckpt.optimizer_state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"expected an optimiser state that fits, got {err} in {ckpt.path}") from None
    if scheduler is not None and ckpt.scheduler_state is not None:
        sched = {k: v for k, v in ckpt.scheduler_state.items() if v is not None or k not in ("lr_lambdas",)}
        sched.pop("lr_lambdas", None)
        scheduler.load_state_dict({**scheduler.state_dict(), **sched})
    if rng and ckpt.rng_state is not None:
        restore_rng(ckpt.rng_state["tensors"], ckpt.rng_state)
