#!/usr/bin/env bash
# Set up (or bring up to date) the project's environment: idempotent, fast when nothing changed.
#
#   scripts/setup.sh            .venv/ with the tuneloop command and every service's dependencies
#   scripts/setup.sh --vllm     also .venvs/vllm/ with the vLLM engine (its own environment:
#                               vLLM pins versions the training stack cannot share)
#
# Versions come from constraints.txt, so a fresh machine gets what CI got. torch is pinned to
# the 2.13.0 CPU build that lies on this kind of machine's disk (pip finds it there; a GPU
# machine installs its CUDA build of the same version).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
EXTRAS=${TUNELOOP_EXTRAS:-dev,embedded,gateway,ingest,evaluator,inference,trainer,quantizer}
WANT_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WANT_VLLM=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

if ! command -v "$PYTHON" >/dev/null; then
  echo "setup: $PYTHON not found; tuneloop needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.tuneloop-setup
want=$( (cat pyproject.toml constraints.txt; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing tuneloop[$EXTRAS] into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade "pip>=25"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
else
  echo "setup: .venv is up to date"
fi
# Compiled parts (ingest's fast path, built in place by the editable install): rebuilt when
# their sources change, without reinstalling the dependencies. Without a C compiler the
# install still succeeds and ingest runs its Python path.
native_stamp=.venv/.tuneloop-native
native=$(cat services/ingest/_fastpass.c services/ingest/xxhash.h | sha256sum | cut -d' ' -f1)
if [ "$(cat "$native_stamp" 2>/dev/null)" != "$native" ]; then
  echo "setup: building ingest's fast path (services/ingest/_fastpass.c)"
  .venv/bin/python -m pip install -q --no-deps -c constraints.txt -e . && echo "$native" > "$native_stamp"
fi

# Headless Chromium for the dashboard's browser tests (Debian's package; never a download of
# a browser build). Only where we may install system packages.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing Debian's chromium (dashboard browser tests)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if [ "$WANT_VLLM" = 1 ] && [ -x scripts/setup-vllm.sh ]; then
  scripts/setup-vllm.sh
fi
