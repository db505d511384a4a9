#!/usr/bin/env bash
# The test suite: lint, types, then every tier (unit, integration, e2e, chaos) against real
# nats-server, PostgreSQL, SQLite, the GCS emulator and (where present) vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"; .venv/bin/ruff check .
echo "== ruff format"; .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy shared services
# A private temp root: pytest prunes old /tmp/pytest-of-$USER/ dirs at start-up, which would
# pull the data directories out from under another session's servers.
basetemp=$(mktemp -d /tmp/tuneloop-tests.XXXXXX)
echo "== pytest (temp: $basetemp)"
trap 'rm -rf "$basetemp"' EXIT
.venv/bin/python -m pytest -q -p no:cacheprovider --basetemp="$basetemp/t" "$@"
