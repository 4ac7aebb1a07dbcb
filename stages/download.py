"""Stage 1 — download: fetch the four official Fashion-MNIST IDX files into data/raw/.

Mirrors (`data.mirrors`) are tried in order; a file is accepted only if the sha256 of its
decompressed content matches `data.sha256`, so the data's identity never depends on the host.
"""

from deep_repro import config, data, tracking
from deep_repro.config.stage_view import load_stage_config
from deep_repro.errors import entrypoint, scrub
from deep_repro.paths import repo_root
from deep_repro.pipeline import RAW_DIR


@entrypoint
def main() -> None:
    cfg = load_stage_config("download")
    raw_dir = repo_root() / RAW_DIR
    with tracking.stage_run("download", cfg) as run:
        sources = {}
        for name in config.DATA_FILES:
            mirror = data.download_file(name, cfg.data.sha256[name], cfg.data.mirrors, raw_dir)
            sources[f"source.{name}"] = scrub(mirror)
        run.set_tags(sources)


if __name__ == "__main__":
    main()
