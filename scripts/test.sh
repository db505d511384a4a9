#!/usr/bin/env bash
# The test suite: lint, types, then every tier (unit, integration, e2e, chaos) against real
# nats-server, PostgreSQL, SQLite, the GCS emulator and (where present) vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"; .venv/bin/ruff check .
echo "== ruff format"; .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy shared services
echo "== pytest"; exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
