"""Refuse a `.pt2` file that would run code when loaded, *before* torch looks at it.

`torch.export.load` unpickles with full `pickle` (weights_only=False) any weight or constant whose
payload config says `use_pickle: true`, torchbind/opaque constants, the legacy `*.pt` weight
files and, when their restricted load fails, the sample inputs; it also evaluates the graph's
symbolic-shape strings with `sympy.sympify` (eval), turns `guards_code` into a Python function,
and resolves node targets by attribute lookup on `torch`. A crafted archive can therefore run any
command. `check_pt2` accepts only the layout `torch.export.save` writes for a plain tensor
program (format read from torch/export/pt2_archive and torch/_export/serde, torch 2.x):

    <root>/archive_format ("pt2"), archive_version ("0"), byteorder, .data/version,
    .data/serialization_id, models/model.json, data/sample_inputs/model.pt,
    data/weights/model_weights_config.json + weight_<n>,
    data/constants/model_constants_config.json + tensor_<n>

with every payload stored raw (`use_pickle: false`), the sample inputs a tensor-only pickle, and
the graph calling `torch.ops.aten.*` only. Everything else is refused with a reason.

This module depends on the standard library only (torch is imported lazily by `load_pt2`): it is
logged next to `serving.py` as MLflow code, so a served model runs the very same check.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any


class UnsafeArchiveError(ValueError):
    """The file is not a plain tensor-only `torch.export` archive; loading it could run code."""


_FIXED = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/model.json",
    "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
}
_PAYLOAD = re.compile(r"data/weights/weight_\d+|data/constants/tensor_\d+")
_TARGET = re.compile(r"torch\.ops\.aten\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
# Symbolic shapes are sympy expressions over size symbols (s0, u3, ...); nothing callable
# beyond these names may reach sympify.
_SYMPY_NAMES = {
    "Symbol",
    "Integer",
    "True",
    "False",
    "positive",
    "integer",
    "nonnegative",
    "real",
    "finite",
    "Max",
    "Min",
    "Mod",
    "FloorDiv",
    "CeilDiv",
    "CleanDiv",
    "PythonMod",
    "ModularIndexing",
    "Eq",
    "Ne",
    "Lt",
    "Le",
    "Gt",
    "Ge",
    "And",
    "Or",
    "Not",
    "oo",
}
_SYMPY_TOKEN = re.compile(r"\s+|'[A-Za-z0-9_]*'|\d+|[A-Za-z_][A-Za-z0-9_]*|[-+*/%(),=<>]")
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")
# What a tensor-only `torch.save` pickle may reference (all allowed by torch's weights_only).
_STORAGES = {
    f"{kind}Storage"
    for kind in (
        "Byte",
        "Char",
        "Short",
        "Int",
        "Long",
        "Half",
        "Float",
        "Double",
        "Bool",
        "BFloat16",
    )
}
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),
    *(("torch", name) for name in _STORAGES),
}
_TORCH_SAVE_FILES = re.compile(
    r"data\.pkl|\.format_version|\.storage_alignment|byteorder|"
    r"version|\.data/serialization_id|data/\d+"
)


def _members(archive: zipfile.ZipFile, what: str) -> dict[str, zipfile.ZipInfo]:
    """Members by path below the single root folder torch writes (`<root>/...`)."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise UnsafeArchiveError(f"{what} has duplicate member names")
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in n or ".." in n.split("/") for n in names):
        raise UnsafeArchiveError(f"{what} is not a single-folder torch archive")
    members = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; no zip bombs
            raise UnsafeArchiveError(f"{what} member {info.filename} is compressed")
        members[info.filename.split("/", 1)[1]] = info
    return members


def _check_tensor_pickle(data: bytes, what: str) -> None:
    """A `torch.save`d tensor structure: only tensor-rebuilding globals, nothing else."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UnsafeArchiveError(f"{what} is not a torch.save archive") from None
    with archive:
        members = _members(archive, what)
        for rel in members:
            if not _TORCH_SAVE_FILES.fullmatch(rel):
                raise UnsafeArchiveError(f"{what} has an unexpected member {rel}")
        if "data.pkl" not in members:
            raise UnsafeArchiveError(f"{what} has no data.pkl")
        payload = archive.read(members["data.pkl"])
    try:
        for opcode, _, _ in pickletools.genops(payload):
            if opcode.name in ("EXT1", "EXT2", "EXT4", "INST"):
                raise UnsafeArchiveError(f"{what} uses pickle opcode {opcode.name}")
    except ValueError as exc:
        if isinstance(exc, UnsafeArchiveError):
            raise
        raise UnsafeArchiveError(f"{what} is not a valid pickle") from None

    class _Stub:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __setstate__(self, state: Any) -> None:
            pass

    class _Restricted(pickle.Unpickler):
        # Resolve only tensor-rebuilding names, and to inert stubs: nothing real is called.
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in _SAFE_GLOBALS:
                raise UnsafeArchiveError(f"{what} references {module}.{name}")
            return _Stub

        def persistent_load(self, pid: Any) -> Any:
            return _Stub()

    try:
        _Restricted(io.BytesIO(payload)).load()
    except UnsafeArchiveError:
        raise
    except Exception as exc:
        raise UnsafeArchiveError(
            f"{what} is not a valid tensor pickle ({type(exc).__name__})"
        ) from None


def _check_payload_config(text: bytes, what: str, prefix: str, present: set[str]) -> None:
    try:
        config = json.loads(text)["config"]
        entries = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UnsafeArchiveError(f"{what} is not a payload config") from None
    for fqn, meta in entries:
        if not isinstance(meta, dict):
            raise UnsafeArchiveError(f"{what}: entry {fqn} is not an object")
        if meta.get("use_pickle") is not False:
            raise UnsafeArchiveError(f"{what}: {fqn} is stored as a pickle (use_pickle)")
        path = meta.get("path_name")
        if (
            not isinstance(path, str)
            or not re.fullmatch(rf"{prefix}_\d+", path)
            or path not in present
        ):
            raise UnsafeArchiveError(f"{what}: {fqn} has an unexpected payload {path!r}")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise UnsafeArchiveError(f"{what}: {fqn} is not a tensor")


def _check_sympy(expr: str) -> None:
    pos = 0
    while pos < len(expr):
        match = _SYMPY_TOKEN.match(expr, pos)
        if match is None:
            raise UnsafeArchiveError(
                f"model graph has an unexpected shape expression {expr[:80]!r}"
            )
        token = match.group()
        if (
            (token[0].isalpha() or token[0] == "_")
            and token not in _SYMPY_NAMES
            and not _SYMBOL_NAME.fullmatch(token)
        ):
            raise UnsafeArchiveError(f"model graph shape expression uses {token[:40]!r}")
        pos = match.end()


def _check_graph(node: Any) -> None:
    """Walk models/model.json: aten targets only, plain sympy shapes, no guard code."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "target" and isinstance(value, str) and not _TARGET.fullmatch(value):
                raise UnsafeArchiveError(
                    f"model graph calls {value[:80]!r} (only torch.ops.aten operators are allowed)"
                )
            if key == "expr_str" and isinstance(value, str):
                _check_sympy(value)
            if key == "guards_code" and value:
                raise UnsafeArchiveError("model graph carries guard code")
            _check_graph(value)
    elif isinstance(node, list):
        for item in node:
            _check_graph(item)


def check_pt2(data: bytes) -> None:
    """Raise `UnsafeArchiveError` unless `data` is a plain tensor-only `torch.export` archive."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UnsafeArchiveError("not a torch.export archive (not a zip file)") from None
    with archive:
        members = _members(archive, "archive")
        for rel in members:
            if rel not in _FIXED and not _PAYLOAD.fullmatch(rel):
                raise UnsafeArchiveError(f"unexpected archive member {rel}")
        missing = sorted(_FIXED - {".data/serialization_id"} - set(members))
        if missing:
            raise UnsafeArchiveError(f"archive lacks {', '.join(missing)}")

        def read(rel: str) -> bytes:
            return archive.read(members[rel])

        if read("archive_format") != b"pt2" or read("archive_version") != b"0":
            raise UnsafeArchiveError("unsupported archive format or version")
        present = {rel.rsplit("/", 1)[1] for rel in members if _PAYLOAD.fullmatch(rel)}
        _check_payload_config(
            read("data/weights/model_weights_config.json"), "weights config", "weight", present
        )
        _check_payload_config(
            read("data/constants/model_constants_config.json"),
            "constants config",
            "tensor",
            present,
        )
        _check_tensor_pickle(read("data/sample_inputs/model.pt"), "sample inputs")
        try:
            graph = json.loads(read("models/model.json"))
        except ValueError:
            raise UnsafeArchiveError("models/model.json is not JSON") from None
        _check_graph(graph)


def read_checked(path: str | Path) -> bytes:
    """The file's bytes, checked; load *these* bytes (the file could change after the check)."""
    data = Path(path).read_bytes()
    check_pt2(data)
    return data


def load_pt2(path: str | Path) -> Any:
    """Check, then load the exported program from the checked bytes as a callable module."""
    return load_exported(path).module()


def load_exported(path: str | Path) -> Any:
    """Check, then load the `ExportedProgram` itself from the checked bytes."""
    import torch

    data = read_checked(path)
    return torch.export.load(io.BytesIO(data))
