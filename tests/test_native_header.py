"""csrc/attnkit.h against the ctypes signatures of attnkit.functional._native: every C entry point the header declares
is declared to ctypes with the same argument count and types and the same result type, and the other way round
(the C compiler checks the definitions in decode.c and band.c against the same header)."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from attnkit.functional import _native

HEADER = Path(_native.__file__).with_name("csrc") / "attnkit.h"
C_TYPES: dict[str, Any] = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float, "void": None}


class _Recorder:
    """Stands in for the loaded library: records what ``_declare`` sets on each function."""

    def __init__(self) -> None:
        self.functions: dict[str, SimpleNamespace] = {}

    def __getattr__(self, name: str) -> SimpleNamespace:
        return self.functions.setdefault(name, SimpleNamespace(argtypes=[], restype=ctypes.c_int))


def _ctype(decl: str) -> Any:
    """``const float *q`` -> c_void_p, ``int64_t n`` -> c_int64, ``int`` -> c_int, ``void`` -> None."""
    decl = decl.replace("const ", "").strip()
    if "*" in decl:
        return ctypes.c_void_p
    return C_TYPES[decl.split()[0]]


def _header() -> dict[str, tuple[Any, list[Any]]]:
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    found = {}
    for ret, name, args in re.findall(r"^(int64_t|int|void)\s+(attnkit_\w+)\(([^)]*)\);", text, flags=re.M):
        params = [] if args.strip() == "void" else [_ctype(a) for a in args.split(",")]
        found[name] = (C_TYPES[ret], params)
    return found


def _declared() -> dict[str, SimpleNamespace]:
    lib = _Recorder()
    _native._declare(lib)  # type: ignore[arg-type]
    return lib.functions


def test_header_is_part_of_the_build_hash() -> None:
    assert HEADER in _native._HEADERS


def test_header_and_ctypes_declare_the_same_functions() -> None:
    assert sorted(_header()) == sorted(_declared())


@pytest.mark.parametrize("name", sorted(_header()))
def test_signature_matches_ctypes(name: str) -> None:
    restype, params = _header()[name]
    fn = _declared()[name]
    names = lambda types: [getattr(t, "__name__", repr(t)) for t in types]  # noqa: E731
    assert len(fn.argtypes) == len(params), f"{name}: {len(fn.argtypes)} ctypes argtypes, {len(params)} in the header"
    assert names(fn.argtypes) == names(params), name
    assert fn.restype is restype, f"{name}: restype {fn.restype} vs {restype} in the header"
