"""params.yaml from conf/: write it (what `dvc exp run` writes), or check that it validates.

`dvc repro` does not recompose conf/, so after editing a file in conf/ run `make params`
(`uv run python scripts/compose_params.py`); the validate stage refuses a params.yaml that an
edit of conf/ left behind. Extra arguments are Hydra overrides (`train.epochs=3`).

    uv run python scripts/compose_params.py            # write params.yaml from conf/
    uv run python scripts/compose_params.py --check    # params.yaml validates (pre-commit)
"""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import deep_repro.models  # noqa: E402, F401  (registers the architectures: `model` options)
from deep_repro.config.schema import compose, load_config  # noqa: E402
from deep_repro.errors import DeepReproError  # noqa: E402


def render(overrides: list[str] | None = None) -> str:
    return yaml.safe_dump(compose(overrides, ROOT / "conf"), sort_keys=False)


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["--check"]:
            load_config(ROOT / "params.yaml")
            return 0
        text = render(argv)
        load_config_from = ROOT / ".params.yaml.tmp"
        load_config_from.write_text(text)
        try:
            load_config(load_config_from)  # never write a params.yaml that cannot run
            load_config_from.replace(ROOT / "params.yaml")
        finally:
            load_config_from.unlink(missing_ok=True)
    except DeepReproError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
