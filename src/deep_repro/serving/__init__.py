"""Serving: the inference model answering requests.

`predict` (the `deep-repro predict` command: images or arrays in, labels out), `server` (`deep-repro
serve`: HTTP with request limits and one-line JSON errors), `wire` (the bytes it reads and
writes: images counted per body, `.npy` bodies in, MLflow's answer text out), `pyfunc` (the
MLflow pyfunc wrapper, logged as code with the model, so it imports nothing of this package) and
`model_cache` (registry models fetched once and checked on every load). Nothing is re-exported
here: `predict` must start without importing MLflow.
"""
