"""tokenwire's gRPC service: request validation, chat templates, the engine that drives a transformers model."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("tokenwire")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
