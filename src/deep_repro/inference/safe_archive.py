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

with every payload stored raw (`use_pickle: false`) and no larger than its member, the sample
inputs a tensor-only pickle, and the graph calling only the pure tensor operators of
`ALLOWED_OPS`. `aten.*` is not the same as pure: `aten.from_file` creates files, `aten.rand`
draws random numbers, `aten.add_` writes into its input, `aten.empty` returns uninitialised
memory; a graph signature that writes back buffers or user inputs carries state from one call to
the next. Everything else, including any damaged or truncated file, is refused with a reason.

This module depends on the standard library only (torch is imported lazily by `load_pt2`): it is
logged next to `serving/pyfunc.py` as MLflow code, so a served model runs the very same check.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import stat
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
# A model file is a few MB; anything near this is not one (and is not read into memory).
MAX_ARCHIVE_BYTES = 1 << 30

# The exact operator overloads a program may call (names as in `torch.ops`). Kept literal here,
# not derived from torch: this module must import without torch. tests/test_archive_trust.py
# holds both parts to account.
# (a) What the exports of every registered model x postprocess setting (tta, quantize) use;
# the test exports them all and asserts this set is exactly their union.
EXPORT_OPS = frozenset(
    "aten." + name
    for name in (  # noqa: SIM905 - a word list: one name per line would double this module
        "_assert_tensor_metadata.default abs.default adaptive_avg_pool2d.default add.Tensor "
        "amax.default clamp.default conv2d.default div.Tensor flatten.using_ints flip.default "
        "gelu.default linear.default max_pool2d.default mean.dim mul.Tensor relu.default "
        "reshape.default round.default silu.default sub.Tensor to.dtype unsqueeze.default"
    ).split()
)
# (b) More Core-ATen operators (what `run_decompositions()` produces), each admitted by the
# rule the test checks against torch's own schemas: no argument or result that is written to
# (alias_info.is_write; read-only views are fine: nothing here writes), no `str` argument
# except those of `STR_ARGS`, none of the tags nondeterministic_seeded / inplace /
# inplace_view / maybe_aliasing_or_mutating, no uninitialised result (empty*, resize_), and
# no factories (they take no tensor to compute from).
CORE_OPS = frozenset(
    "aten." + name
    for name in (  # noqa: SIM905
        "convolution.default addmm.default mm.default bmm.default permute.default view.default "
        "_to_copy.default sigmoid.default tanh.default exp.default log.default sqrt.default "
        "rsqrt.default neg.default maximum.default minimum.default sum.dim_IntList "
        "amin.default avg_pool2d.default max_pool2d_with_indices.default "
        "_native_batch_norm_legit_no_training.default cat.default clone.default expand.default "
        "squeeze.dims where.self hardtanh.default leaky_relu.default _softmax.default "
        "_log_softmax.default constant_pad_nd.default mul.Scalar add.Scalar sub.Scalar "
        "div.Scalar pow.Tensor_Scalar clamp.Tensor _adaptive_avg_pool2d.default "
        "native_layer_norm.default erf.default reciprocal.default elu.default argmax.default"
    ).split()
)
ALLOWED_OPS = EXPORT_OPS | CORE_OPS
# The only string arguments a graph may pass: enum-like choices, by (op, argument name).
STR_ARGS: dict[tuple[str, str], frozenset[str]] = {
    ("aten.gelu.default", "approximate"): frozenset({"none", "tanh"}),
}
# Graph signature: inputs are the user's images, weights and constants; the only output is the
# result. (buffer_mutation, user_input_mutation, parameter_mutation, token: state kept or
# written between calls.)
_INPUT_SPECS = {"user_input", "parameter", "buffer", "tensor_constant"}
_OUTPUT_SPECS = {"user_output"}
# Bytes per element by torch.export's serialised dtype code (torch/_export/serde/schema.py).
_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2}
# Symbolic shapes are sympy expressions over size symbols (s0, u3, ...); nothing callable
# beyond these names may reach sympify.
_SYMPY_NAMES = set(
    (  # noqa: SIM905
        "Symbol Integer Add Mul True False positive integer nonnegative real finite Max Min Mod "
        "FloorDiv CeilDiv CleanDiv PythonMod ModularIndexing Eq Ne Lt Le Gt Ge And Or Not oo"
    ).split()
)
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
        # torch writes no file modes (0); a symlink or folder entry is not one of its files.
        if stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG):
            raise UnsafeArchiveError(f"{what} member {info.filename} is not a regular file")
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


def _count(value: Any, what: str) -> int:
    """A concrete, non-negative size, stride or offset (`{"as_int": n}`)."""
    number = value.get("as_int") if isinstance(value, dict) else None
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        raise UnsafeArchiveError(f"{what} has a size that is not a plain non-negative integer")
    return number


def _tensor_bytes(meta: dict[str, Any], what: str) -> int:
    """Bytes the declared tensor reads from its payload (its furthest element + 1)."""
    itemsize = _ITEMSIZE.get(meta.get("dtype"))  # type: ignore[arg-type]
    if itemsize is None:
        raise UnsafeArchiveError(f"{what} has an unsupported dtype {meta.get('dtype')!r}")
    sizes = [_count(v, what) for v in meta.get("sizes") or []]
    strides = [_count(v, what) for v in meta.get("strides") or []]
    if len(strides) != len(sizes):
        raise UnsafeArchiveError(f"{what} has {len(sizes)} sizes but {len(strides)} strides")
    if 0 in sizes:
        return 0
    offset = _count(meta.get("storage_offset", {"as_int": 0}), what)
    return (offset + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True)) + 1) * itemsize


def _check_payload_config(text: bytes, what: str, prefix: str, present: dict[str, int]) -> None:
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
        # torch would allocate the declared tensor and fail (or read past the payload) later.
        needed = _tensor_bytes(meta["tensor_meta"], f"{what}: {fqn}")
        if needed > present[path]:
            raise UnsafeArchiveError(
                f"{what}: {fqn} declares {needed} bytes but its payload holds {present[path]}"
            )


def _check_sympy(expr: str) -> None:
    # sympify evaluates what it parses: a power tower (`9**9**9**9`) or a huge literal would
    # hang the loader or exhaust memory. Shapes need neither (sizes are products and sums).
    if "**" in expr or "^" in expr or len(expr) > 1000:
        raise UnsafeArchiveError(f"model graph has an unexpected shape expression {expr[:80]!r}")
    pos = 0
    while pos < len(expr):
        match = _SYMPY_TOKEN.match(expr, pos)
        if match is None:
            raise UnsafeArchiveError(
                f"model graph has an unexpected shape expression {expr[:80]!r}"
            )
        token = match.group()
        if token.isdigit() and len(token) > 20:
            raise UnsafeArchiveError("model graph shape expression has an oversized number")
        if (
            (token[0].isalpha() or token[0] == "_")
            and token not in _SYMPY_NAMES
            and not _SYMBOL_NAME.fullmatch(token)
        ):
            raise UnsafeArchiveError(f"model graph shape expression uses {token[:40]!r}")
        pos = match.end()


def _check_graph(node: Any, strings: frozenset[str] = frozenset()) -> None:
    """Walk models/model.json: allowed ops only, with allowed string arguments only, plain
    sympy shapes, no guard code. `strings`: the string values the enclosing argument may take."""
    if isinstance(node, dict):
        items = list(node.items())
        target = node.get("target")
        if isinstance(target, str):
            op = target.removeprefix("torch.ops.")
            if op == target or op not in ALLOWED_OPS:
                raise UnsafeArchiveError(
                    f"model graph calls {target[:80]!r} (not an allowed pure tensor operator)"
                )
            inputs = node.get("inputs")
            for item in inputs if isinstance(inputs, list) else [inputs]:
                name = item.get("name") if isinstance(item, dict) else None
                _check_graph(item, STR_ARGS.get((op, name), frozenset()))  # type: ignore[arg-type]
            items = [(k, v) for k, v in items if k != "inputs"]
        for key, value in items:
            if key in ("as_string", "as_strings"):
                values = value if isinstance(value, list) else [value]
                if not all(isinstance(v, str) and v in strings for v in values):
                    raise UnsafeArchiveError(
                        f"model graph passes a string argument {str(values)[:60]} "
                        "(only enum choices such as gelu's approximate are allowed)"
                    )
            if key == "expr_str" and isinstance(value, str):
                _check_sympy(value)
            if key == "guards_code" and value:
                raise UnsafeArchiveError("model graph carries guard code")
            _check_graph(value, strings)
    elif isinstance(node, list):
        for item in node:
            _check_graph(item, strings)


def _check_signature(graph: Any) -> None:
    """Inputs: images, weights, constants; output: the result, never a write-back of state."""
    signature = graph["graph_module"]["signature"]
    for specs, allowed, side in (
        (signature["input_specs"], _INPUT_SPECS, "input"),
        (signature["output_specs"], _OUTPUT_SPECS, "output"),
    ):
        for spec in specs:
            kinds = set(spec) if isinstance(spec, dict) else {"?"}
            if not kinds or kinds - allowed:
                raise UnsafeArchiveError(
                    f"model graph signature has a {'/'.join(sorted(kinds))} {side} "
                    "(a program must not keep or write state between calls)"
                )


def check_pt2(data: bytes) -> None:
    """Raise `UnsafeArchiveError` unless `data` is a plain tensor-only `torch.export` archive."""
    try:
        _check_pt2(data)
    except UnsafeArchiveError:
        raise
    except Exception as exc:  # any parse failure of untrusted bytes is a refusal
        # (a flipped bit: BadZipFile "Bad CRC-32", a truncated file: EOFError / struct.error, a
        # JSON document of the wrong shape: KeyError / TypeError, ...): one line, no traceback.
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UnsafeArchiveError(
            f"damaged or malformed archive ({type(exc).__name__}{': ' if first else ''}{first})"
        ) from None


def _check_pt2(data: bytes) -> None:
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
        # Every member against its CRC-32 now: torch would otherwise meet a damaged weight
        # mid-load (or not at all: it does not check every CRC).
        damaged = archive.testzip()
        if damaged is not None:
            raise UnsafeArchiveError(f"archive member {damaged} is damaged (CRC-32 mismatch)")

        def read(rel: str) -> bytes:
            return archive.read(members[rel])

        if read("archive_format") != b"pt2" or read("archive_version") != b"0":
            raise UnsafeArchiveError("unsupported archive format or version")
        present = {
            rel.rsplit("/", 1)[1]: info.file_size
            for rel, info in members.items()
            if _PAYLOAD.fullmatch(rel)
        }
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
        _check_signature(graph)


def read_archive(path: str | Path) -> bytes:
    """The bytes of a regular file of plausible size, or `UnsafeArchiveError`: a FIFO would block
    forever and /dev/zero never ends, so the type and size are checked on the open file first."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UnsafeArchiveError(f"cannot open the file ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeArchiveError("not a regular file")
        if info.st_size > MAX_ARCHIVE_BYTES:
            raise UnsafeArchiveError(
                f"{info.st_size} bytes: larger than any model ({MAX_ARCHIVE_BYTES} at most)"
            )
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(MAX_ARCHIVE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_ARCHIVE_BYTES:  # grew while being read
        raise UnsafeArchiveError(f"larger than any model ({MAX_ARCHIVE_BYTES} bytes at most)")
    return data


def read_checked(path: str | Path) -> bytes:
    """The file's bytes, checked; load *these* bytes (the file could change after the check)."""
    data = read_archive(path)
    check_pt2(data)
    return data


def load_pt2(path: str | Path) -> Any:
    """Check, then load the exported program from the checked bytes as a callable module."""
    return load_exported(path).module()


def load_exported(path: str | Path) -> Any:
    """Check, then load the `ExportedProgram` itself from the checked bytes."""
    import torch

    data = read_checked(path)
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # checked bytes torch still cannot read: refuse
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UnsafeArchiveError(f"torch cannot load it ({type(exc).__name__}: {first})") from None
