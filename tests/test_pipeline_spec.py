"""The stage contract, written once: dvc.yaml is generated from deep_repro.pipeline.STAGES (cmd,
data deps, outs, params) and each stage's imports (code deps), and a stage's config view exposes
only the params it declares."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from deep_repro import config, dvc_yaml
from deep_repro.config import stage_view as stage_config
from deep_repro.dvc_yaml import render
from deep_repro.errors import ConfigError, UndeclaredParamError
from deep_repro.pipeline import CODE_DEPS_EXEMPT, STAGES, VALIDATED

from .helpers import REPO, code_dep_problems, module_file, stage_modules

Make = Callable[..., config.Config]


def _paths(entries: list[object]) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else str(e) for e in entries}


def test_dvc_yaml_matches_stage_specs() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)  # download -> ... -> evaluate, in life-cycle order
    for name, stage in stages.items():
        spec = STAGES[name]
        assert stage["cmd"] == f"python {spec.script}"
        deps = _paths(stage.get("deps", []))
        assert spec.script in deps, "a stage depends on its own script"
        data_deps = {d for d in deps if not d.endswith(".py") and not d.startswith("src/")}
        # Every stage runs after `validate` (an order-only dep, not a data dep of the spec).
        assert (VALIDATED in data_deps) == (name != "validate"), name
        assert data_deps - {VALIDATED} == set(spec.deps), name
        outs = set()
        for key in ("outs", "metrics", "plots"):
            outs |= _paths(stage.get(key, []))
        assert outs == set(spec.outs), name
        assert _paths(stage.get("params", [])) == set(spec.params), name
        assert stage.get("always_changed", False) == spec.always_changed, name
        for dep in deps:
            assert (
                dep in outs or (REPO / dep).exists() or any(dep in s.outs for s in STAGES.values())
            ), dep


def test_dvc_yaml_is_generated_from_the_stage_specs_and_the_imports() -> None:
    """One stage graph: dvc.yaml's cmd, deps and params are `render`ed, never hand-edited."""
    assert render(REPO) == (REPO / "dvc.yaml").read_text(), (
        "dvc.yaml is stale: uv run python -m deep_repro.dvc_yaml"
    )


def test_a_stale_dvc_yaml_fails_the_check_in_one_line_and_is_regenerated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_project(tmp_path)
    stale = (root / "dvc.yaml").read_text().replace("      - src/deep_repro/files.py\n", "", 1)
    (root / "dvc.yaml").write_text(stale)
    assert dvc_yaml.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dvc.yaml is stale" in err
    assert (root / "dvc.yaml").read_text() == stale  # --check writes nothing
    assert dvc_yaml.main(["--root", str(root)]) == 0
    assert (root / "dvc.yaml").read_text() == (REPO / "dvc.yaml").read_text()
    assert not list(root.glob(".dvc.yaml*"))  # no temp file left behind


def test_only_validate_runs_on_every_repro() -> None:
    # Its checks depend on the machine (memory, CUDA, the tracking host), not only on its deps;
    # its output is constant, so running it every time reruns nothing after it.
    assert [name for name, spec in STAGES.items() if spec.always_changed] == ["validate"]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["validate"]["always_changed"] is True
    assert stages["validate"]["outs"] == [{VALIDATED: {"cache": False, "persist": True}}]


def test_no_stage_imports_another_stage() -> None:
    for script in (REPO / "stages").glob("*.py"):
        text = script.read_text()
        assert "from stages" not in text and "import stages" not in text


def test_every_stage_lists_the_package_code_it_imports() -> None:
    # DVC reruns a stage only when a listed dep changes: code it imports but does not list
    # could change its outputs while `dvc repro` reports it up to date.
    assert code_dep_problems(REPO, CODE_DEPS_EXEMPT) == []


def test_code_deps_exemptions_are_real_and_few() -> None:
    for module, reason in CODE_DEPS_EXEMPT.items():
        assert module_file(REPO, module) is not None, module
        assert len(reason) > 20, module
    assert len(CODE_DEPS_EXEMPT) <= 6  # widen only with a reason that survives review


def _copy_project(dest: Path) -> Path:
    shutil.copytree(REPO / "src", dest / "src")
    shutil.copytree(REPO / "stages", dest / "stages")
    shutil.copy2(REPO / "dvc.yaml", dest / "dvc.yaml")
    return dest


def test_an_undeclared_lazy_transitive_import_fails_the_check(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    assert code_dep_problems(root, CODE_DEPS_EXEMPT) == []
    stage = next(iter(STAGES.values()))
    used = stage_modules(root, stage.script)
    # A module the stage reaches (not exempt) gains a lazy import of one it does not reach.
    carrier = sorted(m for m in used if m not in CODE_DEPS_EXEMPT)[0]
    newcomer = sorted(
        p.stem
        for p in (root / "src/deep_repro").glob("[!_]*.py")
        if f"deep_repro.{p.stem}" not in used | set(CODE_DEPS_EXEMPT)
    )[0]
    path = module_file(root, carrier)
    assert path is not None
    path.write_text(
        path.read_text() + f"\n\ndef _probe() -> None:\n"
        f"    from deep_repro import {newcomer}  # noqa: F401\n"
    )
    problems = code_dep_problems(root, CODE_DEPS_EXEMPT)
    assert (
        f"stage {stage.name!r} imports deep_repro.{newcomer} but dvc.yaml does not list "
        f"src/deep_repro/{newcomer}.py" in "\n".join(problems)
    )


def test_a_dep_the_stage_never_imports_is_reported(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    text = (root / "dvc.yaml").read_text()
    (root / "dvc.yaml").write_text(
        text.replace(
            "      - stages/preprocess.py\n",
            "      - stages/preprocess.py\n      - src/deep_repro/serving/pyfunc.py\n",
            1,
        )
    )
    assert code_dep_problems(root, CODE_DEPS_EXEMPT) == [
        "stage 'preprocess' lists src/deep_repro/serving/pyfunc.py in its deps but never imports it"
    ]


def test_import_graph_follows_packages_relative_imports_and_skips_type_checking(
    tmp_path: Path,
) -> None:
    pkg = tmp_path / "src/deep_repro"
    (pkg / "tuning").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tuning/__init__.py").write_text("from .search import run\n")
    (pkg / "tuning/search.py").write_text(
        "from typing import TYPE_CHECKING\n\nfrom ..models import build\n\n"
        "if TYPE_CHECKING:\n    from deep_repro.tracking import StageRun\n\n"
        "def run():\n    import importlib\n    return importlib.import_module('deep_repro.data')\n"
    )
    for name in ("models", "data", "tracking", "unused"):
        (pkg / f"{name}.py").write_text("")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/tune.py").write_text("from deep_repro.tuning import run\n")
    assert stage_modules(tmp_path, "stages/tune.py") == {
        "deep_repro",
        "deep_repro.tuning",
        "deep_repro.tuning.search",
        "deep_repro.models",
        "deep_repro.data",
    }
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "tune": {
                        "cmd": "python stages/tune.py",
                        "deps": [
                            "stages/tune.py",
                            "src/deep_repro/tuning",
                            "src/deep_repro/models.py",
                        ],
                    }
                }
            }
        )
    )
    assert code_dep_problems(tmp_path, {"deep_repro": "package init"}) == [
        "stage 'tune' imports deep_repro.data but dvc.yaml does not list src/deep_repro/data.py "
        "in its deps (add it, or exempt the module in deep_repro.pipeline.CODE_DEPS_EXEMPT "
        "with the reason)"
    ]


# --------------------------------------------------------------------------- stage config views
def test_stage_view_exposes_only_declared_params(make_cfg: Make) -> None:
    cfg = make_cfg()
    view = stage_config.stage_view(cfg, "evaluate")
    assert view.evaluate == cfg.evaluate and view.model.name == cfg.model.name
    assert view.train.num_threads == cfg.train.num_threads  # declared since evaluate uses it
    assert view.tracking == cfg.tracking  # ambient: MLflow only
    with pytest.raises(
        UndeclaredParamError,
        match=r"stage 'evaluate' reads train\.epochs, "
        r"which its params in dvc\.yaml do not declare \(declared: evaluate, "
        r"model\.name, train\.num_threads\)",
    ):
        _ = view.train.epochs
    with pytest.raises(UndeclaredParamError, match=r"stage 'evaluate' reads seed"):
        _ = view.seed
    with pytest.raises(UndeclaredParamError, match=r"reads model\.lr"):
        _ = view.model.lr
    assert stage_config.unrestricted(view) is cfg


def test_stage_view_of_train_passes_real_sections_and_properties(make_cfg: Make) -> None:
    cfg = make_cfg()
    view = stage_config.stage_view(cfg, "train")
    assert view.model is cfg.model and view.train is cfg.train and view.seed == cfg.seed
    assert view.is_torch_model is True  # properties evaluate through the view
    with pytest.raises(UndeclaredParamError, match=r"stage 'train' reads postprocess"):
        _ = view.postprocess
    with pytest.raises(Exception, match="cannot assign"):
        view.seed = 1  # type: ignore[misc]
    preprocess = stage_config.stage_view(cfg, "preprocess")
    with pytest.raises(UndeclaredParamError, match=r"\(declared: none\)"):
        _ = preprocess.data


def test_load_stage_config_validates_the_whole_config_first(tmp_path: Path) -> None:
    raw = config.compose([], REPO / "conf")  # not the workspace params.yaml: see test_config
    raw["train"]["epochs"] = 0  # not a param of preprocess, still rejected there
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.epochs = 0: expected a value >= 1"):
        stage_config.load_stage_config("preprocess", tmp_path / "params.yaml")
