"""The inference-model check admits pure tensor math only, and refuses every damaged file in one
line (issue 20, section 1). The crafted archives are real `torch.export` programs of small
modules (edited only where torch cannot export the op at all), built once per session."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deep_repro import cli, config, data, inference, models
from deep_repro.errors import DataError
from deep_repro.files import atomic_path
from deep_repro.inference import fast_program, safe_archive

from .helpers import REPO

# The tags that make an operator impure, and uninitialised results (empty*, resize_).
BAD_TAGS = {"nondeterministic_seeded", "inplace", "inplace_view", "maybe_aliasing_or_mutating"}
UNINITIALISED = re.compile(r"_?(new_)?empty.*|resize.*")


# --------------------------------------------------------------------------- the allow-list
def rule_violations(name: str) -> list[str]:
    """Why torch's own schema of `name` (`aten.op.overload`) makes it impure; [] if pure."""
    _, op, overload = name.split(".")
    found = getattr(getattr(torch.ops.aten, op, None), overload, None)
    if found is None:
        return ["no such operator in this torch"]
    schema, tags = found._schema, {tag.name for tag in found.tags}
    problems = [f"tag {tag}" for tag in sorted(tags & BAD_TAGS)]
    for arg in [*schema.arguments, *schema.returns]:
        if arg.alias_info is not None and arg.alias_info.is_write:
            problems.append(f"writes {arg.name or 'its result'}")
    if schema.is_mutable:
        problems.append("mutable schema")
    for arg in schema.arguments:
        if "str" in str(arg.type) and (name, arg.name) not in safe_archive.STR_ARGS:
            problems.append(f"str argument {arg.name}")
    if UNINITIALISED.fullmatch(op):
        problems.append("uninitialised result")
    if not any("Tensor" in str(arg.type) for arg in schema.arguments):
        problems.append("a factory (computes from no tensor)")
    if name in safe_archive.CORE_OPS and "core" not in tags:
        problems.append("not a Core-ATen operator")
    return problems


def _export_cases() -> list[tuple[str, list[str], str, str]]:
    """Every registered model x TTA, plus the settings that change which ops a model uses."""
    cases = [(name, [], tta, "none") for name in models.MODELS for tta in ("none", "hflip")]
    cases += [
        ("mlp", ["model.activation=gelu"], "none", "none"),
        ("mlp", ["model.activation=silu"], "none", "none"),
        ("cnn", ["model.pool_before_bn=false", "model.convs_per_block=2"], "none", "none"),
        ("cnn", [], "hflip", "int8"),
        ("cnn", [], "hflip_shift", "none"),
    ]
    return cases


def test_the_allow_list_is_exactly_what_every_model_exports_plus_checked_core_ops() -> None:
    used: set[str] = set()
    for name, extra, tta, quantize in _export_cases():
        cfg = config.validate(config.compose([f"model={name}", *extra], REPO / "conf"))
        module = inference.build_inference_module(models.build_model(cfg.model), quantize, tta)
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        program = torch.export.export(
            module, (torch.zeros(2, 28, 28, dtype=torch.uint8),), dynamic_shapes=({0: batch},)
        )
        used |= {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert used == safe_archive.EXPORT_OPS  # none missing, none stale
    assert {name: rule_violations(name) for name in sorted(safe_archive.ALLOWED_OPS)} == {
        name: [] for name in sorted(safe_archive.ALLOWED_OPS)
    }


@pytest.mark.parametrize(
    "name",
    [
        "aten.from_file.default",
        "aten.rand.default",
        "aten.bernoulli.default",
        "aten.dropout.default",
        "aten.add_.Tensor",
        "aten.relu_.default",
        "aten.batch_norm.default",
        "aten.empty.memory_format",
        "aten.resize_.default",
        "aten.new_empty.default",
    ],
)
def test_the_schema_rule_refuses_each_impure_family(name: str) -> None:
    assert rule_violations(name)
    assert name not in safe_archive.ALLOWED_OPS


def test_the_check_imports_without_torch_and_deep_repro(real_pt2: bytes, tmp_path: Path) -> None:
    (tmp_path / "m.pt2").write_bytes(real_pt2)
    code = (
        "import sys, importlib.util; sys.modules['torch'] = sys.modules['deep_repro'] = None; "
        "spec = importlib.util.spec_from_file_location('safe_archive', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "m.read_checked(sys.argv[2]); print(len(m.ALLOWED_OPS))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, safe_archive.__file__, str(tmp_path / "m.pt2")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and int(proc.stdout) == len(safe_archive.ALLOWED_OPS), proc.stderr


# --------------------------------------------------------------------------- crafted programs
class _Ones(torch.nn.Module):  # exported, then its `ones` node turned into `from_file`
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ops.aten.ones.default([8]).sum()


class _Rand(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand(x.shape)


class _Dropout(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, 0.5, training=True)


class _InPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1) * 2


class _Counter(torch.nn.Module):
    """Counts calls in a buffer: state carried from one request to the next."""

    def __init__(self) -> None:
        super().__init__()
        self.count: torch.Tensor
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        return x + self.count


class _Empty(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.empty(3)


def _members(blob: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _zip(members: dict[str, bytes], infos: dict[str, zipfile.ZipInfo] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, blob in members.items():
            archive.writestr((infos or {}).get(name, name), blob)
    return out.getvalue()


def _edit_json(blob: bytes, rel: str, change: Callable[[dict], None]) -> bytes:
    members = _members(blob)
    [name] = [n for n in members if n.endswith("/" + rel)]
    doc = json.loads(members[name])
    change(doc)
    members[name] = json.dumps(doc).encode()
    return _zip(members)


def _saved(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def created(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file the `from_file` program would create."""
    return tmp_path_factory.mktemp("victim") / "created-by-the-model"


@pytest.fixture(scope="session")
def crafted(created: Path) -> dict[str, bytes]:
    """One program per refused family, by name."""
    x = (torch.zeros(3),)

    def from_file(doc: dict) -> None:  # torch cannot trace from_file: edit an exported node
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.ops.aten.from_file.default"
        node["inputs"] = [
            {"name": "filename", "arg": {"as_string": str(created)}, "kind": 1},
            {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
            {"name": "size", "arg": {"as_int": 8}, "kind": 1},
        ]

    programs = {
        "rand": torch.export.export(_Rand(), x),
        "dropout": torch.export.export(_Dropout(), x),
        "in_place": torch.export.export(_InPlace(), x),
        "buffer_in_place": torch.export.export(_Counter(), x),
        # functionalised: pure `add`, the write-back in the graph signature instead
        "buffer_mutation": torch.export.export(_Counter(), x).run_decompositions(),
        "input_mutation": torch.export.export(_InPlace(), x).run_decompositions(),
        "empty": torch.export.export(_Empty(), x),
    }
    blobs = {name: _saved(program) for name, program in programs.items()}
    blobs["from_file"] = _edit_json(
        _saved(torch.export.export(_Ones(), x)), "models/model.json", from_file
    )
    return blobs


REFUSALS = {
    "from_file": "calls 'torch.ops.aten.from_file.default'",
    "rand": "calls 'torch.ops.aten.rand.default'",
    "dropout": "calls 'torch.ops.aten.dropout.default'",
    "in_place": "calls 'torch.ops.aten.add_.Tensor'",
    "buffer_in_place": "calls 'torch.ops.aten.add_.Tensor'",
    "buffer_mutation": "signature has a buffer_mutation output",
    "input_mutation": "signature has a user_input_mutation output",
    "empty": "calls 'torch.ops.aten.empty.memory_format'",
}


def test_the_from_file_program_really_creates_a_file_in_torch(
    crafted: dict[str, bytes], tmp_path: Path, created: Path
) -> None:
    """The attack is real: plain `torch.export.load` runs it and a file appears."""
    torch.export.load(io.BytesIO(crafted["from_file"])).module()(torch.zeros(3))
    assert created.exists()
    created.unlink()


@pytest.mark.parametrize("family", list(REFUSALS))
def test_every_impure_program_is_refused_by_every_loader(
    crafted: dict[str, bytes], tmp_path: Path, created: Path, family: str
) -> None:
    path = tmp_path / f"{family}.pt2"
    path.write_bytes(crafted[family])
    with pytest.raises(safe_archive.UnsafeArchiveError, match=re.escape(REFUSALS[family])):
        safe_archive.read_checked(path)
    with pytest.raises(safe_archive.UnsafeArchiveError):  # what the served pyfunc model calls
        safe_archive.load_pt2(path)
    for load in (  # evaluate / postprocess, and predict's fast-start loader
        inference.load_inference_model,
        lambda p: fast_program.load(p, tmp_path / "cache"),
    ):
        with pytest.raises(DataError, match="refused to load model"):
            load(path)
    assert not created.exists()


# --------------------------------------------------------------------------- damaged files
@pytest.fixture(scope="session")
def real_pt2(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real exported logistic regression (untrained: only the file's form matters here)."""
    torch.manual_seed(0)
    target = tmp_path_factory.mktemp("real") / "inference.pt2"
    with atomic_path(target) as tmp:
        inference.export(
            inference.build_inference_module(models.linear_classifier()),
            torch.zeros(2, 28, 28, dtype=torch.uint8),
            tmp,
        )
    return target.read_bytes()


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x10]) + blob[at + 1 :]


def _symlink_member(blob: bytes) -> bytes:
    members = _members(blob)
    name = next(n for n in members if n.endswith("/byteorder"))
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return _zip(members, {name: info})


def _huge_weight(doc: dict) -> None:
    meta = next(iter(doc["config"].values()))["tensor_meta"]
    meta["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]
    meta["strides"] = [{"as_int": 1 << 20}, {"as_int": 1}]


FAULTS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "flipped_bit": (
        lambda b: _flip(b, b.index(b'"graph_module"') + 3),
        "models/model.json is damaged (CRC-32 mismatch)",
    ),
    "symlink_member": (_symlink_member, "byteorder is not a regular file"),
    "huge_tensor": (
        lambda b: _edit_json(b, "data/weights/model_weights_config.json", _huge_weight),
        "declares 4398046511104 bytes but its payload holds 31360",
    ),
    "truncated": (lambda b: b[: len(b) // 2], "not a zip file"),
}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(path)
    return path


def _predict_fails_in_one_line(model: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(["predict", "--model", str(model), str(image)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_archive_is_one_line_from_predict(
    real_pt2: bytes,
    fault: str,
    image: Path,
    tmp_path: Path,
    tracking_env: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    damage, reason = FAULTS[fault]
    path = tmp_path / f"{fault}.pt2"
    path.write_bytes(damage(real_pt2))
    err = _predict_fails_in_one_line(path, image, capsys)
    assert f"{path}: refused to load model" in err and reason in err


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "directory"])
def test_a_model_path_that_is_not_a_regular_file_is_refused_before_reading(
    kind: str, image: Path, tmp_path: Path, tracking_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{kind}.pt2"
    if kind == "dev_zero":
        path.symlink_to("/dev/zero")  # reading it never ends
    elif kind == "fifo":
        os.mkfifo(path)  # reading it waits for a writer forever
    else:
        path.mkdir()
    err = _predict_fails_in_one_line(path, image, capsys)
    assert "refused to load model" in err and "not a regular file" in err


def test_every_flipped_bit_loads_or_is_refused_in_one_line(real_pt2: bytes, tmp_path: Path) -> None:
    """A sweep over the whole file: no flip may end in anything but a load or a DataError."""
    outcomes = {"loaded": 0, "refused": 0}
    path = tmp_path / "flipped.pt2"
    for at in range(7, len(real_pt2), len(real_pt2) // 48):
        path.write_bytes(_flip(real_pt2, at))
        try:
            inference.load_exported_program(path)
            outcomes["loaded"] += 1
        except DataError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 40, outcomes


def test_the_fixture_model_file_still_loads(real_pt2: bytes, splits: data.Splits) -> None:
    program = torch.export.load(io.BytesIO(real_pt2))
    assert safe_archive.check_pt2(real_pt2) is None
    assert program.module()(torch.from_numpy(splits.x_val[:2])).shape == (2, 10)


@pytest.mark.parametrize("expr", ["9**9**9**9", "9^9^9", "s0*" + "9" * 40])
def test_a_shape_expression_that_would_hang_sympify_is_refused(real_pt2: bytes, expr: str) -> None:
    """Review finding: sympify evaluates a power tower or a huge literal (hangs or exhausts
    memory) before any op runs; the check refuses it in one line instead."""
    found = []

    def poison(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr_str":
                    node[key] = expr
                    found.append(key)
                else:
                    poison(value)
        elif isinstance(node, list):
            for item in node:
                poison(item)

    blob = _edit_json(real_pt2, "models/model.json", poison)
    assert found  # the dynamic batch size is a symbolic shape
    with pytest.raises(safe_archive.UnsafeArchiveError, match="shape expression"):
        safe_archive.check_pt2(blob)
