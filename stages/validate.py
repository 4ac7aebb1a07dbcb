"""Stage 0 — validate: reject a bad config before DVC touches any output.

DVC removes a stage's outputs just before it reruns that stage. This stage declares ALL params
(dvc.yaml: `- params.yaml:`), so it reruns on any param change, and every other stage depends on
its output, so it runs first: `dvc exp run -S model.lr=-0.1` stops here with one line, and the
checkpoint and reports of the last good run stay as they were. It is also `always_changed`: what
`preflight` checks (memory, CUDA, the data on disk, the tracking host) can change with no param
changing, and an edit of conf/ that was never composed into params.yaml is caught here.
"""

import logging

import deep_repro.models  # noqa: F401  (registers the architectures: checks `model` too)
from deep_repro import preflight
from deep_repro.config import urls
from deep_repro.config.schema import load_config, validate
from deep_repro.errors import ConfigError, entrypoint
from deep_repro.files import write_json
from deep_repro.paths import repo_root
from deep_repro.pipeline import VALIDATED

log = logging.getLogger("validate")


@entrypoint
def main() -> None:
    root = repo_root()
    params = root / "params.yaml"
    # First, before anything can fail: a credential that `-S` wrote into params.yaml leaves it.
    raw, found = urls.remove_credentials(params)
    if found:
        keys = ", ".join(key for key, _ in found)
        log.warning("params.yaml: credentials removed from %s (committed values put back)", keys)
        # The URL type's refusal, naming the key and where credentials go instead. Another
        # error on the same value (a string where a list belongs) would print it: redact first.
        try:
            validate(raw)
        except ConfigError as exc:
            message = str(exc)
            for _, url in found:
                message = message.replace(url, urls.redact(url))
            raise ConfigError(message) from None
        key, url = found[0]
        raise ConfigError(
            f"config error: {key} = {urls.redact(url)!r}: expected no credentials in a URL"
        )
    cfg = load_config(params)  # types, ranges, cross-field rules, URLs without credentials
    preflight.check_composed(root)  # an edit of conf/ that params.yaml does not reflect yet
    preflight.check(cfg, root)  # this machine and this data: sizes, memory, CUDA, hosts
    # Constant bytes, whatever the params: downstream stages depend on this file only for ORDER.
    # If it changed with the params, every param change would rerun every stage through it
    # instead of only the stages that declare the changed param.
    write_json(root / VALIDATED, {"config": "valid"})


if __name__ == "__main__":
    main()
