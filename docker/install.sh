#!/usr/bin/env bash
# The image's install steps, shared by the Dockerfile's builder stage and CI's clean-venv check
# (docker/check.sh), so both run the same commands:
#   1. create the runtime virtual environment;
#   2. build the tokenwire wheel from the source tree (maturin compiles sampler_rs; needs cargo + a C linker);
#   3. install torch for the variant: cpu -> the CPU wheel index, cuda -> PyPI's default (CUDA libs bundled);
#   4. install the wheel (its other dependencies come from PyPI).
# Usage: docker/install.sh SRC_DIR VENV_DIR WHEEL_DIR
# Env: TORCH_VARIANT=cpu|cuda (default cpu), TORCH_VERSION (default: the pin below), TORCH_INDEX_URL (overrides
# the variant's index, e.g. https://download.pytorch.org/whl/cu126 for hosts with an older NVIDIA driver),
# SKIP_TORCH=1 (steps 3-4 without dependencies: CI's check, which must not download torch on every run).
set -euo pipefail
SRC=${1:?usage: install.sh SRC_DIR VENV_DIR WHEEL_DIR}
VENV=${2:?usage: install.sh SRC_DIR VENV_DIR WHEEL_DIR}
WHEELS=${3:?usage: install.sh SRC_DIR VENV_DIR WHEEL_DIR}
TORCH_VARIANT=${TORCH_VARIANT:-cpu}
TORCH_VERSION=${TORCH_VERSION:-2.15.0}
PYTHON=${PYTHON:-python3}

case "$TORCH_VARIANT" in
  cpu) TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu} ;;
  cuda) TORCH_INDEX_URL=${TORCH_INDEX_URL:-} ;;
  *) echo "error: TORCH_VARIANT must be cpu or cuda, got '$TORCH_VARIANT'" >&2; exit 2 ;;
esac

echo "==> [1/4] creating $VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

echo "==> [2/4] building the tokenwire wheel from $SRC (maturin, in an isolated build environment)"
"$VENV/bin/python" -m pip wheel --disable-pip-version-check --no-deps --wheel-dir "$WHEELS" "$SRC"

if [ "${SKIP_TORCH:-0}" = 1 ]; then
  echo "==> [3/4] skipped (SKIP_TORCH=1)"
  echo "==> [4/4] installing the wheel without dependencies"
  "${PIP[@]}" --no-deps "$WHEELS"/tokenwire-*.whl
  exit 0
fi

echo "==> [3/4] installing torch==$TORCH_VERSION ($TORCH_VARIANT) from ${TORCH_INDEX_URL:-PyPI}"
"${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"

echo "==> [4/4] installing the wheel and its dependencies"
"${PIP[@]}" "$WHEELS"/tokenwire-*.whl
"$VENV/bin/python" -c 'import torch, sampler_rs, service.server, gateway.app, tokenwire.v1.chat_pb2'
"$VENV/bin/tokenwire" --version
