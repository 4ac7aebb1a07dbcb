"""Experiments and their pipelines on a SLURM cluster: `deep-repro submit` and `collect`."""
