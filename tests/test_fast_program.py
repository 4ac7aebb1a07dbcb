"""The fast-start copy of an exported program (`deep_repro.inference.fast_program`): same
logits as the program on real images, used from the second load on, and never trusted blindly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from deep_repro import config, data, inference, models
from deep_repro.errors import DataError
from deep_repro.inference import fast_program
from tests.helpers import REPO


def _export(name: str, tmp_path: Path, quantize: str = "none") -> Path:
    cfg = config.validate(config.compose([f"model={name}"], REPO / "conf"))
    torch.manual_seed(0)
    module = inference.build_inference_module(models.build_model(cfg.model), quantize)
    target = tmp_path / f"{name}-{quantize}.pt2"
    inference.export(module, torch.zeros(2, 28, 28, dtype=torch.uint8), target)
    return target


@pytest.mark.parametrize(
    ("name", "quantize"),
    [("cnn", "none"), ("cnn", "int8"), ("mlp", "none"), ("resnet", "none"), ("logreg", "none")],
)
def test_fast_copy_gives_the_programs_logits_and_is_used_next_time(
    name: str,
    quantize: str,
    splits: data.Splits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    program_path = _export(name, tmp_path, quantize)
    cache = tmp_path / "cache"
    first = fast_program.load(program_path, cache)
    assert isinstance(first, fast_program.GraphProgram)
    images = torch.from_numpy(splits.x_test[:64])
    program = inference.load_inference_model(program_path)
    reference = inference.predict_logits(program, images)
    one = inference.predict_logits(program, images[:1])  # (BLAS blocking depends on the batch)
    # Second load: from the cache alone, never through torch.export.load.
    monkeypatch.setattr(inference, "load_exported_program", _no_export_load)
    again = fast_program.load(program_path, cache)
    assert isinstance(again, fast_program.GraphProgram)
    assert torch.equal(inference.predict_logits(again, images), reference)
    assert torch.equal(inference.predict_logits(again, images[:1]), one)  # any batch size


def _no_export_load(path: Path) -> None:
    raise AssertionError(f"{path} went through torch.export.load")


def _folder(cache: Path) -> Path:
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return folder


def test_a_tampered_or_stale_copy_is_rebuilt_from_the_checked_program(
    splits: data.Splits, tmp_path: Path
) -> None:
    program_path = _export("mlp", tmp_path)
    cache = tmp_path / "cache"
    fast_program.load(program_path, cache)
    folder = _folder(cache)
    graph = json.loads((folder / "graph.json").read_text())
    images = torch.from_numpy(splits.x_test[:16])
    reference = inference.predict_logits(inference.load_inference_model(program_path), images)
    # Only `aten.*` op names are ever looked up: anything else makes the copy unusable.
    graph["nodes"][0]["op"] = "builtins.eval"
    (folder / "graph.json").write_text(json.dumps(graph))
    rebuilt = fast_program.load(program_path, cache)
    assert torch.equal(inference.predict_logits(rebuilt, images), reference)
    assert json.loads((folder / "graph.json").read_text())["nodes"][0]["op"].startswith("aten.")
    # A copy made by another interpreter or torch version is not used either.
    (folder / "check.json").write_text(json.dumps({"code": "other"}))
    fast_program.load(program_path, cache)
    assert json.loads((folder / "check.json").read_text())["code"] != "other"


@pytest.mark.parametrize("tamper", ["from_file", "string_argument"])
def test_the_json_copy_is_checked_against_the_allow_list_on_every_load(
    splits: data.Splits, tmp_path: Path, tamper: str
) -> None:
    created = tmp_path / "created"
    edits: dict[str, Callable[[dict[str, Any]], None]] = {
        # an op outside the allow-list, however `aten` its name (it would create a file)
        "from_file": lambda n: n.update(
            op="aten.from_file.default", args={"list": [str(created), True, 8]}, kwargs={}
        ),
        # an allowed op with a string where only enum choices may be
        "string_argument": lambda n: n["kwargs"].update(approximate="/etc/passwd"),
    }
    program_path = _export("mlp", tmp_path)
    cache = tmp_path / "cache"
    fast_program.load(program_path, cache)
    folder = _folder(cache)
    graph = json.loads((folder / "graph.json").read_text())
    edits[tamper](graph["nodes"][0])
    (folder / "graph.json").write_text(json.dumps(graph))
    images = torch.from_numpy(splits.x_test[:8])
    reference = inference.predict_logits(inference.load_inference_model(program_path), images)
    # Not run: rebuilt from the (checked) program instead, and the tampered copy replaced.
    assert torch.equal(
        inference.predict_logits(fast_program.load(program_path, cache), images), reference
    )
    assert json.loads((folder / "graph.json").read_text()) != graph
    assert not created.exists()


def test_no_copy_for_a_refused_archive_and_a_missing_file_says_so(tmp_path: Path) -> None:
    crafted = tmp_path / "crafted.pt2"
    crafted.write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip: not a torch.export archive
    with pytest.raises(DataError, match="refused to load model"):
        fast_program.load(crafted, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    with pytest.raises(DataError, match="not found"):
        fast_program.load(tmp_path / "missing.pt2", tmp_path / "cache")


def test_the_exporter_warms_the_copy_from_the_program_it_already_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program_path = _export("mlp", tmp_path)
    program = inference.load_exported_program(program_path)
    fast_program.warm(program_path, program, tmp_path / "cache")
    monkeypatch.setattr(inference, "load_exported_program", _no_export_load)
    assert isinstance(
        fast_program.load(program_path, tmp_path / "cache"), fast_program.GraphProgram
    )
