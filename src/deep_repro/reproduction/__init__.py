"""Verification: rerun a recorded result in a clean clone and decide whether it holds.

`record` (what a result is: commit, params, every stage's dvc.lock entry, platform,
predictions), `workspace` (a clone of one commit and the venv of its uv.lock, shared with the
cluster runner), `rerun` (the stages, compared one by one), `verdict` (what "the same" means),
`report` (Markdown + JSON for a paper) and `commands` (`deep-repro reproduce`).
"""
