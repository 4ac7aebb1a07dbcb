# Everyday commands. Each is one `uv run ...` line you can also type yourself.
.PHONY: help check lint format test test-slow docs docs-reference params dvc-yaml

help:  ## this list
	@grep -E "^[a-z-]+:.*## " $(MAKEFILE_LIST) | sed -E "s/:.*## /\t/"

check: lint  ## everything CI checks before the tests (fast)
	uv run python -m deep_repro.dvc_yaml --check
	uv run python scripts/compose_params.py --check
	uv run python scripts/docs_reference.py --check

lint:  ## format check, lint, types, the layer contract
	uv run ruff format --check .
	uv run ruff check .
	uv run mypy
	uv run lint-imports --no-logo

format:  ## format and autofix
	uv run ruff format .
	uv run ruff check --fix .

test:  ## the fast suite (the README's test command)
	uv run pytest

test-slow:  ## queued experiments, parallel tuning, byte-reproducibility
	uv run pytest -m slow -n 0

docs:  ## build the docs site strictly into site/ (uv run mkdocs serve: live preview)
	NO_MKDOCS_2_WARNING=1 uv run mkdocs build --strict

docs-reference:  ## regenerate the config and CLI reference pages from the schema and the parser
	uv run python scripts/docs_reference.py

params:  ## recompose params.yaml from conf/ (after editing conf/)
	uv run python scripts/compose_params.py

dvc-yaml:  ## regenerate dvc.yaml from deep_repro.pipeline.STAGES and the stages' imports
	uv run python -m deep_repro.dvc_yaml
