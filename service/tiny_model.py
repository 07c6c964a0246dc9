"""The embedded default model: a small random-weight Llama with the real Mistral SentencePiece tokenizer.

It needs no network: the config ships in `service/data/`, the tokenizer comes from the `mistral-common` package,
and the weights are drawn from a fixed seed. `tokenwire tiny-model export DIR` writes the same model as an
ordinary transformers directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

EMBEDDED_MODEL_NAME = "tokenwire-tiny"
DEFAULT_SEED = 0
TOKENIZER_FILE = "mistral_instruct_tokenizer_240323.model.v3"


def data_path(name: str) -> Path:
    """A file shipped in `service/data/`."""
    return Path(str(resources.files("service") / "data" / name))


def chat_template() -> str:
    """The embedded model's chat template (Mistral-style instruct)."""
    return data_path("chat_template.jinja").read_text()


def sentencepiece_model_path() -> Path:
    """The Mistral v3 SentencePiece model (32,768 pieces) from the mistral-common package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall mistral-common")
    return path


def write_tokenizer(dest: Path) -> None:
    """Write a transformers tokenizer directory (LlamaTokenizer over the SentencePiece file) to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sentencepiece_model_path(), dest / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 4096,
        "chat_template": chat_template(),
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def model_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shipped config (minus comments), with optional overrides (tests use smaller ones)."""
    cfg: dict[str, Any] = json.loads(data_path("tiny_llama.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(overrides or {})
    return cfg


def build(seed: int = DEFAULT_SEED, overrides: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Build (model, tokenizer): random weights from `seed`, eval mode, float32."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**model_config(overrides))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()  # type: ignore[no-untyped-call]
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    return model, tokenizer


def export(dest: Path, seed: int = DEFAULT_SEED, overrides: dict[str, Any] | None = None) -> Path:
    """Write the embedded model (weights, config, generation config, tokenizer) as a transformers directory."""
    model, tokenizer = build(seed, overrides)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    # The slow-tokenizer source travels too, so the directory loads exactly like the embedded one.
    shutil.copyfile(sentencepiece_model_path(), dest / "tokenizer.model")
    return dest
