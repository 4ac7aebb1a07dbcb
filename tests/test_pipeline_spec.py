"""dvc.yaml and deep_repro.pipeline.STAGES describe the same graph (lineage depends on it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from deep_repro.pipeline import STAGES

REPO = Path(__file__).resolve().parents[1]


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
        data_deps = {d for d in deps if not d.endswith(".py")}
        assert data_deps == set(spec.deps), name
        outs = set()
        for key in ("outs", "metrics", "plots"):
            outs |= _paths(stage.get(key, []))
        assert outs == set(spec.outs), name
        assert set(stage.get("params", [])) == set(spec.params), name
        for dep in deps:
            assert dep in outs or (REPO / dep).exists() or any(
                dep in s.outs for s in STAGES.values()), dep


def test_no_stage_imports_another_stage() -> None:
    for script in (REPO / "stages").glob("*.py"):
        text = script.read_text()
        assert "from stages" not in text and "import stages" not in text
