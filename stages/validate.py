"""Stage 0 — validate: reject a bad config before DVC touches any output.

DVC removes a stage's outputs just before it reruns that stage. This stage declares ALL params
(dvc.yaml: `- params.yaml:`), so it reruns on any param change, and every other stage depends on
its output, so it runs first: `dvc exp run -S model.lr=-0.1` stops here with one line, and the
checkpoint and reports of the last good run stay as they were.
"""

from deep_repro.config import load_config
from deep_repro.errors import entrypoint
from deep_repro.files import write_json
from deep_repro.paths import repo_root
from deep_repro.pipeline import VALIDATED


@entrypoint
def main() -> None:
    load_config()  # the whole config: types, ranges, cross-field rules, a usable tracking.uri
    # Constant bytes, whatever the params: downstream stages depend on this file only for ORDER.
    # If it changed with the params, every param change would rerun every stage through it
    # instead of only the stages that declare the changed param.
    write_json(repo_root() / VALIDATED, {"config": "valid"})


if __name__ == "__main__":
    main()
