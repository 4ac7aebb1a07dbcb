"""Write params.yaml as the composition of conf/ with no overrides (what `dvc exp run` writes).

`dvc repro` does not recompose conf/, so after editing a file in conf/ run
`uv run python scripts/compose_params.py`; tests/test_config.py fails while they differ.
"""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deep_repro.config import compose  # noqa: E402


def render(overrides: list[str] | None = None) -> str:
    return yaml.safe_dump(compose(overrides, ROOT / "conf"), sort_keys=False)


if __name__ == "__main__":
    (ROOT / "params.yaml").write_text(render(sys.argv[1:]))
