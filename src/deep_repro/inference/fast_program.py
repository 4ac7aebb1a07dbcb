"""A verified fast-start copy of an exported inference program, for `deep-repro predict`.

Why: `torch.export.load` imports torch's compiler stack (torch._dynamo, inductor, sympy): about
as long again as `import torch` itself, to classify one image. The program is a flat graph of
`torch.ops.aten.*` calls over its weights, so the first time a given `.pt2` (by sha256) is used,
its graph is written down as plain JSON (op name + arguments) and its tensors as a tensor-only
file, both under `<store>/.cache/programs/<sha256>/`, and the copy is kept only if it reproduces
the program's logits on probe images. Later runs execute the JSON graph op by op in eager mode:
no unpickling beyond `torch.load(weights_only=True)`, no code from the cache, and any mismatch or
unknown construct falls back to the program. Every load re-checks both: the `.pt2` with the
safe-archive check (cheap: no torch.export.load), and the JSON copy's ops and string arguments
against the same allow-list (`safe_archive.ALLOWED_OPS`), since the cache folder is just files
anyone with write access to the store could edit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from deep_repro.inference import safe_archive

log = logging.getLogger(__name__)

FORMAT = 1
_ENUMS: dict[str, type] = {"dtype": torch.dtype, "layout": torch.layout}
PROBE_ATOL = 1e-5  # eager execution of the same aten ops: expected to be exact


class Unsupported(ValueError):
    """The graph holds something this interpreter does not run (the program is used instead)."""


def _code_key() -> str:
    """The cache is valid for this interpreter, this allow-list and this torch only."""
    code = Path(__file__).read_bytes() + Path(safe_archive.__file__).read_bytes()
    return hashlib.sha256(code + torch.__version__.encode()).hexdigest()


# --------------------------------------------------------------------------- encode (once)
def _encode(value: Any) -> Any:
    if isinstance(value, torch.fx.Node):
        return {"ref": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise Unsupported(f"argument of type {type(value).__name__}")


def describe(program: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(graph as JSON-able dict, tensors by placeholder name) of an ExportedProgram."""
    signature = program.graph_signature
    if [s.kind.name for s in signature.output_specs] != ["USER_OUTPUT"]:
        raise Unsupported("outputs other than one user output")
    tensors: dict[str, torch.Tensor] = {}
    user_inputs = []
    for spec in signature.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            user_inputs.append(spec.arg.name)
        elif kind in ("PARAMETER", "BUFFER"):
            source = program.state_dict.get(spec.target, program.constants.get(spec.target))
            tensors[spec.arg.name] = torch.as_tensor(source).detach().clone()
        elif kind == "CONSTANT_TENSOR":
            tensors[spec.arg.name] = torch.as_tensor(program.constants[spec.target]).clone()
        else:
            raise Unsupported(f"input kind {kind}")
    if len(user_inputs) != 1:
        raise Unsupported("more than one user input")
    nodes, output = [], None
    for node in program.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output = _encode(node.args[0])
            continue
        target = str(node.target)
        if node.op != "call_function" or target not in safe_archive.ALLOWED_OPS:
            raise Unsupported(f"node {node.name}: {node.op} {target}")
        nodes.append(
            {
                "name": node.name,
                "op": target,
                "args": _encode(list(node.args)),
                "kwargs": {k: _encode(v) for k, v in node.kwargs.items()},
            }
        )
    graph = {"format": FORMAT, "input": user_inputs[0], "nodes": nodes, "output": output}
    return graph, tensors


# --------------------------------------------------------------------------- run (every time)
def _decode(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        if "ref" in value:
            return env[value["ref"]]
        if "list" in value:
            return [_decode(v, env) for v in value["list"]]
        if "device" in value:
            return torch.device(value["device"])
        for kind, cls in _ENUMS.items():
            if kind in value:
                found = getattr(torch, value[kind], None)
                if not isinstance(found, cls):
                    raise Unsupported(f"{kind} {value[kind]!r}")
                return found
        raise Unsupported(f"argument {value!r}")
    return value


def _op(name: str, args: Any, kwargs: Any) -> Any:
    """The allowed op `name`, its string arguments checked as the archive's are."""
    if name not in safe_archive.ALLOWED_OPS:
        raise Unsupported(f"op {name!r}")
    if not isinstance(kwargs, dict) or _strings(args):  # strings are keyword-only enums
        raise Unsupported(f"op {name!r}: unexpected arguments")
    for key, value in kwargs.items():
        values = _strings(value)
        if values and not values <= safe_archive.STR_ARGS.get((name, key), frozenset()):
            raise Unsupported(f"op {name!r}: string argument {key}")
    _, op, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)


def _strings(value: Any) -> set[str]:
    """Plain string values in an encoded argument (the dtype/layout/device encodings aside)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        items = value.get("list", [])
        return set().union(*(_strings(v) for v in items)) if isinstance(items, list) else {"?"}
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value))
    return set()


class GraphProgram:
    """uint8 images -> logits, by running the recorded aten graph eagerly."""

    def __init__(self, graph: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if graph.get("format") != FORMAT:
            raise Unsupported(f"format {graph.get('format')!r}")
        # Resolve every op up front: an unknown op fails here, not mid-prediction.
        self._steps = [
            (n["name"], _op(n["op"], n["args"], n["kwargs"]), n["args"], n["kwargs"])
            for n in graph["nodes"]
        ]
        self._input, self._output, self._tensors = graph["input"], graph["output"], tensors

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {**self._tensors, self._input: images}
        for name, op, args, kwargs in self._steps:
            env[name] = op(*_decode(args, env), **{k: _decode(v, env) for k, v in kwargs.items()})
        (logits,) = _decode(self._output, env)
        return logits


# --------------------------------------------------------------------------- the cache
def _probe() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (3, 28, 28), generator=gen, dtype=torch.uint8)
    return torch.cat([noise, torch.zeros(1, 28, 28, dtype=torch.uint8)])


def _load_cached(folder: Path) -> GraphProgram | None:
    try:
        check = json.loads((folder / "check.json").read_text())
        if check.get("code") != _code_key():
            return None
        graph = json.loads((folder / "graph.json").read_text())
        tensors = torch.load(folder / "tensors.pt", weights_only=True, map_location="cpu")
        return GraphProgram(graph, tensors)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        log.debug("fast-start copy in %s unusable (%s): rebuilding", folder, exc)
        return None


def _build(program: Any, folder: Path) -> GraphProgram | None:
    """Describe the program, check the copy against it, store it atomically."""
    try:
        graph, tensors = describe(program)
        fast = GraphProgram(graph, tensors)
        probe = _probe()
        with torch.no_grad():
            diff = float((fast(probe) - program.module()(probe)).abs().max())
    except (Unsupported, RuntimeError, TypeError) as exc:
        log.debug("no fast-start copy (%s)", exc)
        return None
    if not diff <= PROBE_ATOL:
        log.debug("fast-start copy differs from the program (%g): not kept", diff)
        return None
    tmp = folder.parent / f".tmp-{os.getpid()}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        (tmp / "graph.json").write_text(json.dumps(graph))
        torch.save(tensors, tmp / "tensors.pt")
        (tmp / "check.json").write_text(json.dumps({"code": _code_key(), "max_abs_diff": diff}))
        shutil.rmtree(folder, ignore_errors=True)  # a stale copy (other torch or code)
        os.replace(tmp, folder)
    except OSError as exc:  # a read-only store or a concurrent writer: just not cached
        log.debug("fast-start copy not stored (%s)", exc)
        shutil.rmtree(tmp, ignore_errors=True)
    return fast


def default_cache() -> Path:
    """Next to the MLflow store and the champion copies (outlives queued experiments' copies)."""
    from deep_repro.paths import store_root

    return store_root() / ".cache" / "programs"


def warm(path: Path, program: Any, cache_root: Path) -> None:
    """Leave the fast-start copy of `program`, already loaded (and checked) from `path`, so that
    the exporter does not pay `torch.export.load` a second time for it."""
    folder = cache_root / hashlib.sha256(path.read_bytes()).hexdigest()
    if _load_cached(folder) is None:
        _build(program, folder)


def load(path: Path, cache_root: Path) -> Any:
    """A callable uint8 images -> logits for the `.pt2` at `path`: the verified fast copy when
    there is one, else the (checked) program, leaving a fast copy for the next call."""
    from deep_repro.inference.export import load_exported_program, read_checked_model

    # The archive check on every load (also refuses what is not a regular file, before reading).
    folder = cache_root / hashlib.sha256(read_checked_model(path)).hexdigest()
    cached = _load_cached(folder)
    if cached is not None:
        return cached
    program = load_exported_program(path)  # the safe-archive check, then torch.export.load
    return _build(program, folder) or program.module()
