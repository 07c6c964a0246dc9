#!/usr/bin/env bash
# Install everything tokenwire needs into ./.venv (idempotent): Python 3.11+, torch (a CPU wheel when the
# machine's pip can reach one, else PyPI's default build, which also runs on CPU), the Rust toolchain check,
# and the project itself in editable mode (maturin builds the sampler_rs extension).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || {
  echo "error: the Rust toolchain (cargo) is needed to build sampler_rs: https://rustup.rs" >&2; exit 1; }

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && \
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      PYTHON=$candidate; break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "error: Python >= 3.11 is needed" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip maturin

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
  echo "==> installing torch (trying the CPU-only wheel index first)"
  if ! PIP_DEFAULT_TIMEOUT=15 "${PIP[@]}" --retries 0 --index-url "$CPU_INDEX" "torch>=2.4,<3" 2>/dev/null; then
    echo "    CPU index unreachable: installing torch from the default index (runs on CPU too)"
    "${PIP[@]}" "torch>=2.4,<3"
  fi
fi

echo "==> building sampler_rs and installing tokenwire (editable) with its dev tools"
export PATH="$PWD/$VENV/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
"${PIP[@]}" --no-build-isolation -e '.[dev]'
"$VENV/bin/python" -c 'import sampler_rs, service, gateway, tokenwire.v1.chat_pb2' \
  && echo "==> installed: $("$VENV/bin/tokenwire" --version)"
