# The README's two commands, and a few for developers.
.PHONY: setup demo test test-fast lint bench

setup:
	scripts/setup.sh

# Set up, then run the main job: the whole loop on this machine.
demo:
	scripts/setup.sh --vllm
	.venv/bin/tuneloop demo

# Set up, then run the whole test suite (what CI runs).
test:
	scripts/setup.sh --vllm
	scripts/test.sh

test-fast:
	.venv/bin/python -m pytest tests/unit -q

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy shared services

bench:
	.venv/bin/python bench/bus_latency.py
