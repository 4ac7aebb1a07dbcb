"""`dvc.yaml` written from `deep_repro.pipeline.STAGES` and the imports of each stage script.

The stage graph is stated once, in `pipeline.STAGES` (what each stage reads, writes and is
configured by); its code deps are not stated at all but found: every package module a stage
script imports, directly, transitively or lazily inside a function, except the few in
`pipeline.CODE_DEPS_EXEMPT` that cannot change an output. `dvc.yaml` keeps only what is DVC's
business alone (caching, plot styles, comments); everything else in it is regenerated:

    uv run python -m deep_repro.dvc_yaml           # rewrite dvc.yaml (make dvc-yaml)
    uv run python -m deep_repro.dvc_yaml --check   # exit 1 if it is stale (CI, pre-commit)

So adding a stage is one `StageSpec` and a script, and a new import needs no edit at all.
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
from pathlib import Path
from typing import Any

from deep_repro.pipeline import ALL_PARAMS, CODE_DEPS_EXEMPT, STAGES, VALIDATED

DVC_YAML = "dvc.yaml"
OUT_KEYS = ("outs", "metrics", "plots")


# --------------------------------------------------------------------------- stage import graph
PACKAGE = "deep_repro"


def module_file(root: Path, module: str) -> Path | None:
    """`deep_repro.x` -> src/deep_repro/x.py or src/deep_repro/x/__init__.py (None if neither)."""
    base = root / "src" / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Every `deep_repro` module a file can import at run time: top-level and lazy (inside
    functions) imports, `from pkg import submodule`, relative imports and
    `importlib.import_module("...")`; `if TYPE_CHECKING:` blocks never run and are skipped."""

    def __init__(self, root: Path, module: str, is_package: bool) -> None:
        self.root = root
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: set[str] = set()

    def _add(self, module: str) -> None:
        if module == PACKAGE or module.startswith(PACKAGE + "."):
            parts = module.split(".")
            # Importing a.b.c runs a/__init__ and a/b/__init__ first.
            self.found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
            return
        self._add(base)
        for alias in node.names:  # `from deep_repro import data`: data is a module
            if module_file(self.root, f"{base}.{alias.name}") is not None:
                self._add(f"{base}.{alias.name}")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (
            name == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self._add(node.args[0].value)
        self.generic_visit(node)


def direct_imports(root: Path, path: Path, module: str) -> set[str]:
    visitor = _Imports(root, module, path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in visitor.found if module_file(root, m) is not None}


def is_exempt(module: str, exempt: dict[str, str]) -> bool:
    """An exempt module, or a module inside an exempt package (`deep_repro.tracking.runs`);
    the root package's own exemption covers only its `__init__`."""
    return module in exempt or any(module.startswith(e + ".") for e in exempt if e != PACKAGE)


def stage_modules(root: Path, script: str, exempt: dict[str, str] | None = None) -> set[str]:
    """The `deep_repro` modules a stage script imports, transitively (static analysis).

    Exempt modules are listed but not followed: what they import serves only their own
    output-neutral job (e.g. tracking loads the inference model to log it to MLflow)."""
    seen: set[str] = set()
    todo = sorted(direct_imports(root, root / script, "__main__"))
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if exempt and is_exempt(module, exempt):
            continue
        path = module_file(root, module)
        assert path is not None
        todo.extend(direct_imports(root, path, module) - seen)
    return seen


def code_deps(root: Path, script: str, exempt: dict[str, str] | None = None) -> list[str]:
    """The package files `script` imports (exempt modules left out), as dvc.yaml deps."""
    exempt = CODE_DEPS_EXEMPT if exempt is None else exempt
    files = set()
    for module in stage_modules(root, script, exempt):
        if not is_exempt(module, exempt):
            path = module_file(root, module)
            assert path is not None
            files.add(path.relative_to(root).as_posix())
    return sorted(files)


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, key order and DVC's options survive
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 100
    return yaml


def _path(entry: Any) -> str:
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def _set_list(stage: Any, key: str, items: list[Any]) -> None:
    """Replace a list's items in place (comments on the key survive); drop an empty list."""
    if not items:
        stage.pop(key, None)
    elif key in stage and [_path(e) for e in stage[key]] == [_path(e) for e in items]:
        return
    elif key in stage:
        stage[key].clear()
        stage[key].extend(items)
    else:
        stage[key] = items


def render(root: Path) -> str:
    """dvc.yaml as `pipeline.STAGES` and the stage scripts' imports say it must be."""
    from ruamel.yaml.comments import CommentedMap

    yaml = _yaml()
    doc = yaml.load((root / DVC_YAML).read_text())
    stages = doc.setdefault("stages", CommentedMap())
    for name in [n for n in stages if n not in STAGES]:
        del stages[name]
    for position, (name, spec) in enumerate(STAGES.items()):
        if name not in stages:
            stages.insert(position, name, CommentedMap())
        elif list(stages).index(name) != position:
            stages.insert(position, name, stages.pop(name))
        stage = stages[name]
        stage["cmd"] = f"python {spec.script}"
        if spec.always_changed:
            stage["always_changed"] = True
        else:
            stage.pop("always_changed", None)
        order = [VALIDATED] if name != "validate" else []
        _set_list(stage, "deps", [spec.script, *code_deps(root, spec.script), *order, *spec.deps])
        if spec.params == (ALL_PARAMS,):  # validate: every param in the file
            if [_path(p) for p in stage.get("params", [])] != [ALL_PARAMS]:
                stage["params"] = [CommentedMap([(ALL_PARAMS, None)])]
        else:
            _set_list(stage, "params", list(spec.params))
        # Outputs keep their DVC options (cache, persist, plot styles); new ones are plain outs.
        present = set()
        for key in OUT_KEYS:
            if key in stage:
                kept = [e for e in stage[key] if _path(e) in spec.outs]
                _set_list(stage, key, kept)
                present |= {_path(e) for e in kept}
        missing = [out for out in spec.outs if out not in present]
        if missing:
            _set_list(stage, "outs", [*stage.get("outs", []), *missing])
    buf = io.StringIO()
    yaml.dump(doc, buf)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deep_repro.dvc_yaml", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is stale")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the project (default: .)")
    args = parser.parse_args(argv)
    path = args.root / DVC_YAML
    fresh = render(args.root)
    if path.read_text() == fresh:
        return 0
    if args.check:
        print(
            f"{DVC_YAML} is stale (deep_repro.pipeline.STAGES or a stage's imports changed): "
            "run `uv run python -m deep_repro.dvc_yaml` (make dvc-yaml) and commit it",
            file=sys.stderr,
        )
        return 1
    tmp = path.with_name(f".{DVC_YAML}.tmp")
    tmp.write_text(fresh)
    tmp.replace(path)
    print(f"wrote {DVC_YAML}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
