"""deep-repro: reproducible, traceable Fashion-MNIST (uv + DVC + Hydra + MLflow + Optuna).

Importing the package first (every stage does) sets how PyTorch's OpenMP threads wait: with the
default busy-waiting, two processes on two cores (e.g. `dvc queue start -j 2`, or training next
to a test run) slow each other down many times over; passive waiting does not change results.
Set OMP_WAIT_POLICY yourself to override.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
