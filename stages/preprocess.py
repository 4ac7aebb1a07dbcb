"""Stage 2 — preprocess: parse and validate the IDX files into compact uint8 arrays.

Checks magic numbers, image dimensions, image/label counts and the label range, then writes
data/processed/{train,test}.npz (numpy arrays, no pickle).
"""

from deep_repro import data, tracking
from deep_repro.config.stage_view import load_stage_config
from deep_repro.errors import entrypoint
from deep_repro.paths import repo_root
from deep_repro.pipeline import PROCESSED_TEST, PROCESSED_TRAIN, RAW_DIR


@entrypoint
def main() -> None:
    cfg = load_stage_config("preprocess")
    root = repo_root()
    with tracking.stage_run("preprocess", cfg) as run:
        for part, prefix, target in (
            ("train", "train", PROCESSED_TRAIN),
            ("test", "t10k", PROCESSED_TEST),
        ):
            images, labels = data.load_idx_pair(root / RAW_DIR, prefix)
            data.save_arrays(root / target, images=images, labels=labels)
            run.log_metrics({f"{part}_images": len(labels)})


if __name__ == "__main__":
    main()
