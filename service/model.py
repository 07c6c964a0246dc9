"""The served model: loading (local directory, hub id, or the embedded default), its tokenizer and chat template."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, tiny_model
from . import vocab as vocab_mod
from .errors import ContextLengthExceeded, FieldViolation, InvalidRequest
from .params import ChatParams, GuideSpec
from .vocab import Vocabulary

log = logging.getLogger("tokenwire.model")


@dataclass
class ServedModel:
    """A loaded causal LM with everything the service needs to know about it."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    name: str
    aliases: tuple[str, ...]
    context_length: int
    eos_token_ids: frozenset[int]
    vocab_size: int  # ids the tokenizer can decode; wider logit rows are padding
    fingerprint: str
    created: int
    embedded: bool
    vocab: Vocabulary  # token id -> bytes / text (logprobs, guided decoding)
    guide_vocab: Any = None  # sampler_rs.Vocabulary: the same bytes, indexed for guides (holds the compile cache)

    @property
    def names(self) -> frozenset[str]:
        return frozenset((self.name, *self.aliases))

    def render_prompt(self, params: ChatParams) -> list[int]:
        """Apply the chat template (with the generation prompt) and tokenize."""
        conversation = [m.to_template() for m in params.messages]
        where = "chat_template" if params.chat_template is not None else "messages"
        try:
            # transformers renders in jinja2's ImmutableSandboxedEnvironment: a request's template cannot reach
            # Python objects beyond the conversation and its kwargs.
            text = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=params.chat_template,
                tokenize=False,
                add_generation_prompt=True,
                **dict(params.chat_template_kwargs),
            )
        except Exception as exc:  # a template syntax error, or the template rejected the conversation
            msg = f"the chat template failed: {type(exc).__name__}: {exc}"
            raise InvalidRequest([FieldViolation(where, msg, "template_error")]) from exc
        if not isinstance(text, str):
            raise InvalidRequest([FieldViolation(where, "the chat template did not render text", "template_error")])
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    def compile_guide(self, spec: GuideSpec) -> Any:
        """Compile (or fetch from the vocabulary's cache) a sampler_rs.Guide; call it off the event loop.

        JSON Schema and grammars run on llguidance inside sampler_rs, regexes and choices on our own DFA engine;
        `Guide.engine` says which. An invalid or unsupported spec is a 422 naming the field.
        """
        import sampler_rs

        vocab = self.guide_vocab
        try:
            if spec.kind == "regex":
                return sampler_rs.Guide.regex(vocab, str(spec.spec))
            if spec.kind == "choice":
                return sampler_rs.Guide.choice(vocab, list(spec.spec))
            if spec.kind == "json_schema":
                return sampler_rs.Guide.json_schema(vocab, str(spec.spec), spec.whitespace_pattern)
            if spec.kind == "json_object":
                return sampler_rs.Guide.json_object(vocab, spec.whitespace_pattern)
            return sampler_rs.Guide.grammar(vocab, str(spec.spec))
        except ValueError as exc:
            where = spec.field
            if spec.field == "response_format" and spec.kind == "json_schema":
                where = "response_format.json_schema.schema"
            raise InvalidRequest([FieldViolation(where, str(exc), "invalid_constraint")]) from exc

    def max_new_tokens(self, params: ChatParams, prompt_len: int, default_cap: int) -> int:
        """Resolve max_tokens against the context: explicit values must fit; the default is capped to fit."""
        room = self.context_length - prompt_len
        if params.max_tokens is not None:
            if params.max_tokens > room:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                    f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the messages, {params.max_tokens} in "
                    "the completion). Please reduce the length of the messages or the completion.",
                    param="max_tokens",
                )
            return params.max_tokens
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens, and the messages take "
                f"{prompt_len} tokens, leaving no room for a completion.",
                param="messages",
            )
        return min(default_cap, room)


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list | tuple):
        ids.update(int(i) for i in gen_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _fingerprint(config: Any, revision: str) -> str:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(revision.encode())
    return f"tw-{__version__}-{digest.hexdigest()[:10]}"


def load(
    model_id: str | None,
    *,
    served_model_name: str | None = None,
    chat_template_path: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = tiny_model.DEFAULT_SEED,
) -> ServedModel:
    """Load the model named by `model_id` (a directory or hub id), or the embedded default when None."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    if model_id is None:
        model, tokenizer = tiny_model.build(seed)
        name = served_model_name or tiny_model.EMBEDDED_MODEL_NAME
        revision = f"embedded-seed{seed}"
        log.warning(
            "serving the EMBEDDED model %r: its weights are RANDOM (seed %d), so its text is gibberish. "
            "Serve a real model with `--model DIR_OR_HUB_ID` (e.g. --model Qwen/Qwen2.5-0.5B-Instruct).",
            name,
            seed,
        )
    else:
        torch_dtype = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch_dtype).eval()  # type: ignore[no-untyped-call]
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        name = served_model_name or (Path(model_id).name if Path(model_id).exists() else model_id)
        revision = str(getattr(model.config, "_commit_hash", None) or model_id)
    model.to(device)
    if chat_template_path is not None:
        tokenizer.chat_template = Path(chat_template_path).read_text()
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"the model {name!r} has no chat template: pass --chat-template FILE")
    aliases = tuple(a for a in {Path(model_id).name if model_id else None, model_id} if a and a != name)
    context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    served = ServedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        aliases=aliases,
        context_length=context,
        eos_token_ids=_eos_ids(model, tokenizer),
        vocab_size=min(len(tokenizer), int(model.config.vocab_size)),
        fingerprint=_fingerprint(model.config, revision),
        created=int(time.time()),
        embedded=model_id is None,
        vocab=vocab_mod.from_tokenizer(tokenizer),
    )
    import sampler_rs

    served.guide_vocab = sampler_rs.Vocabulary(
        list(served.vocab.token_bytes), sorted(served.eos_token_ids), sorted(served.vocab.special_ids)
    )
    log.info(
        "model loaded",
        extra={
            "fields": {
                "model": name,
                "seconds": round(time.monotonic() - started, 2),
                "context_length": context,
                "device": device,
            }
        },
    )
    return served
