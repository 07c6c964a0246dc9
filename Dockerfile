# syntax=docker/dockerfile:1
# tokenwire: one image, two roles, picked by the command (docs/deploy.md):
#   tokenwire serve --grpc-host 0.0.0.0 --grpc-port 50051    the gRPC model server (the default CMD)
#   tokenwire gateway --upstream HOST:50051 --http-host 0.0.0.0 --http-port 8000
# Build (from the repository root):
#   docker build -t tokenwire:0.1.0 .                                           # CPU torch (default)
#   docker build -t tokenwire:0.1.0-cuda --build-arg TORCH_VARIANT=cuda .       # CUDA torch
# Model weights are never baked in: the chart mounts a volume at /models (HF_HOME lives there).

# Base images, pinned by tag (pin by digest too with --build-arg PYTHON_IMAGE=python:...@sha256:...).
# The runtime base is the same slim Python for both variants: torch's CUDA wheels bundle the CUDA user-space
# libraries and the NVIDIA container toolkit injects the host's driver, so no nvidia/cuda base is needed.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG RUST_IMAGE=rust:1.95.0-slim-bookworm

# ---- the Rust toolchain, copied into the builder (same Debian release, so the same glibc) ----
FROM ${RUST_IMAGE} AS rust

# ---- builder: compile sampler_rs with maturin, build the wheel, fill /opt/venv ----
FROM ${PYTHON_IMAGE} AS builder
# cpu: torch from https://download.pytorch.org/whl/cpu; cuda: torch from PyPI (CUDA libraries included).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.15.0
# Overrides the variant's torch index, e.g. https://download.pytorch.org/whl/cu126 for older NVIDIA drivers.
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# gcc is rustc's linker and compiles mimalloc (the extension's allocator), in a stage that is thrown
# away. The base tag fixes the Debian release; exact package pins (DL3008) would break whenever the
# mirror drops an old point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore lets in only what the wheel is built from (no .venv, target/, weights or tests).
COPY . .
# The same script CI runs in a clean virtual environment (docker/check.sh).
RUN TORCH_VARIANT="$TORCH_VARIANT" TORCH_VERSION="$TORCH_VERSION" TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    docker/install.sh /src /opt/venv /wheels

# ---- runtime: slim Python, the virtual environment, no compilers, non-root ----
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="tokenwire" \
      org.opencontainers.image.description="OpenAI-compatible chat completions: gRPC service + HTTP gateway" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.tokenwire.torch-variant="${TORCH_VARIANT}"
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it; no login shell, no home of its own.
RUN groupadd --system --gid 10001 tokenwire \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin tokenwire
COPY --from=builder /opt/venv /opt/venv
# HOME and HF_HOME are where the read-only root filesystem needs writable volumes (/tmp and /models).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/models/.hf \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 8000
ENTRYPOINT ["tokenwire"]
CMD ["serve", "--grpc-host", "0.0.0.0", "--grpc-port", "50051"]
