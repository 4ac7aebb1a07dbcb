"""Build the committed test fixture: a small, stratified subset of the *real* Fashion-MNIST.

    uv run python scripts/make_fixture.py [/usr/share/datasets/fashion-mnist]

Reads the official IDX files (Debian's `dataset-fashion-mnist` puts them in the default
directory), keeps 2,000 training and 500 test images (class-balanced, seed 0) and writes them in
the official IDX .gz format to tests/fixtures/fashion-mnist/, plus SHA256SUMS of the decompressed
files (the fixture's `data.sha256`). Output is byte-reproducible.
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deep_repro import data  # noqa: E402
from deep_repro.files import file_digest  # noqa: E402

N_TRAIN, N_TEST = 2000, 500


def main(source: Path, dest: Path) -> None:
    rng = np.random.default_rng(0)
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for prefix, size in (("train", N_TRAIN), ("t10k", N_TEST)):
        images, labels = data.load_idx_pair(source, prefix)
        keep = data.stratified_subset(labels, size, rng)
        for kind, array in (("images-idx3", images[keep]), ("labels-idx1", labels[keep])):
            path = dest / f"{prefix}-{kind}-ubyte.gz"
            data.write_idx(path, array)
            lines.append(f"{file_digest(path, 'sha256', decompress=True)}  {path.stem}")
    (dest / "SHA256SUMS").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/usr/share/datasets/fashion-mnist")
    main(src, ROOT / "tests/fixtures/fashion-mnist")
