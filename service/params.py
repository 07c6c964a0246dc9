"""Request validation: a `ChatCompletionRequest` is checked once, here, into frozen params.

Everything inward (chat rendering, the engine, the sampler) trusts these objects and re-checks nothing.

Rules, in order (all violations of a request are reported together, each naming its field):
1. Fields whose behaviour has not landed yet are rejected with "not supported yet", never ignored. A field set
   to its neutral ("off") value is accepted, since it changes nothing (`n: 1`, `logprobs: false`, ...). The check
   walks the proto's set fields, so a field added to the proto is rejected here until it is handled.
2. Fields that cannot apply to a text chat model (`suffix`, `audio`, non-text `modalities`) are rejected.
3. Each supported field is range-checked; the message names the field, the bound and the value received.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from tokenwire.v1 import chat_pb2

from .errors import FieldViolation, InvalidRequest, ModelNotFound

ROLES = ("system", "developer", "user", "assistant", "tool")

# Fields handled by this module (beyond the always-accepted bookkeeping fields).
# fmt: off
SUPPORTED = frozenset({
    "messages", "model", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
    "logit_bias", "seed", "logprobs", "top_logprobs", "min_tokens", "ignore_eos",
    "stop", "include_stop_str_in_output", "loglikelihood", "chat_template", "chat_template_kwargs_json",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "response_format",
    "n", "best_of", "use_beam_search", "length_penalty", "early_stopping", "inference_timeout",
    "user", "log_prompt", "store", "metadata", "service_tier",
})
# fmt: on

# Fields that are accepted when they hold their neutral value: name -> predicate on the value.
NEUTRAL: dict[str, Any] = {
    "modalities": lambda v: list(v) == ["text"],
}

# The same neutral values as JSON (the gateway's OpenAPI document only admits these for a not-yet-supported field).
NEUTRAL_JSON: dict[str, Any] = {
    "modalities": ["text"],
}

# Simple bounds, checked here and published in the OpenAPI document: field -> (min, max, min is exclusive).
# (temperature's upper bound and the max_tokens cap come from Limits; these are their defaults.)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, True),
    "top_k": (-1, 2**31 - 1, False),
    "min_p": (0.0, 1.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "repetition_penalty": (0.0, math.inf, True),
    "top_logprobs": (0, 20, False),
    "max_tokens": (1, 4096, False),
    "max_completion_tokens": (1, 4096, False),
}

# Where the behaviour of a not-yet-supported field comes from (for the error message).
LATER: dict[str, str] = {
    **dict.fromkeys(["tools", "tool_choice", "parallel_tool_calls"], "tool calling"),
    "memory_strategy": "memory strategies",
    "prediction": "predicted outputs",
    "peft": "LoRA adapters",
    **dict.fromkeys(
        ["api_key_ref", "openai_api_key", "inference_extra_headers", "inference_extra_params_json"],
        "upstream-provider routing (no upstream provider is configured)",
    ),
}

# Proto field name -> the JSON name clients use (the `*_json` fields carry JSON values).
JSON_NAMES = {
    "chat_template_kwargs_json": "chat_template_kwargs",
    "inference_extra_params_json": "inference_extra_params",
    "audio_json": "audio",
}


def json_name(proto_name: str) -> str:
    """The API's name for a proto field."""
    return JSON_NAMES.get(proto_name, proto_name)


@dataclass(frozen=True)
class Limits:
    """Server-side bounds applied at the edge (configurable)."""

    max_temperature: float = 2.0
    max_tokens_cap: int = 4096  # upper bound on max_tokens / max_completion_tokens
    default_max_tokens: int = 256  # used when the request sets neither (capped by the remaining context)
    max_messages: int = 1024
    max_string_chars: int = 1_000_000  # any one message content / name / tool-call string
    max_request_bytes: int = 4 * 1024 * 1024  # the gRPC receive limit (the gateway's body limit matches)
    max_n: int = 16  # n (with its issue)
    max_best_of: int = 16  # best_of / beam width (with its issue)
    max_stop: int = 4  # stop strings per request
    max_stop_chars: int = 1000  # characters per stop string
    max_inference_timeout: float = 3600.0  # seconds
    allow_request_chat_template: bool = True  # per-request Jinja templates (rendered sandboxed)


@dataclass(frozen=True)
class ChatMessage:
    """One validated message, as the chat template sees it."""

    role: str
    content: str | None
    name: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The dict handed to the Jinja chat template (OpenAI's message shape)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.content,
        }
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [dict(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; each field's "off" value is its default.

    temperature 0 = greedy (top_k / top_p / min_p then play no role). The order in which the sampler applies
    them is written down once, in sampler_rs (src/sampling/mod.rs).
    """

    temperature: float = 1.0  # >= 0
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = off, else keep the k best
    min_p: float = 0.0  # [0, 1]
    frequency_penalty: float = 0.0  # [-2, 2], over generated tokens
    presence_penalty: float = 0.0  # [-2, 2], over generated tokens
    repetition_penalty: float = 1.0  # > 0, over prompt + generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    seed: int | None = None  # u64, or None for a random seed
    min_tokens: int = 0  # EOS is masked until this many tokens were generated
    ignore_eos: bool = False  # EOS is always masked

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GUIDED_BACKENDS = ("auto", "outlines", "lm-format-enforcer", "xgrammar", "llguidance")


@dataclass(frozen=True)
class GuideSpec:
    """One output constraint. `field` is the API field it came from (errors name it)."""

    kind: str  # regex | choice | json_schema | json_object | grammar
    spec: str | tuple[str, ...]  # the regex, schema (JSON text), grammar, or the choices
    field: str
    whitespace_pattern: str | None = None  # JSON guides only
    requested_backend: str = "auto"  # what the client asked for; every name is served by our engine


@dataclass(frozen=True)
class BeamParams:
    """Beam search, as transformers' generate(num_beams=width, length_penalty=..., early_stopping=...)."""

    width: int  # beams kept per step (best_of, default n)
    length_penalty: float = 1.0  # score = sum logprob / generated_len ** length_penalty
    early_stopping: bool | str = False  # True, False or "never"


@dataclass(frozen=True)
class ChatParams:
    """A validated chat completion request."""

    messages: tuple[ChatMessage, ...]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None  # None: the server default, capped by the remaining context
    sampling: SamplingParams
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20 alternatives per token (needs logprobs)
    stop: tuple[str, ...] = ()  # stop strings, matched on decoded text
    include_stop_str_in_output: bool = False
    loglikelihood: bool = False  # prompt logprobs on the (unary) response
    chat_template: str | None = None  # per-request Jinja template
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()  # extra template variables
    guide: GuideSpec | None = None  # the output constraint, if any
    n: int = 1  # choices returned
    best_of: int = 1  # sampled rows, of which the n with the highest mean token logprob are returned
    beam: BeamParams | None = None  # beam search instead of sampling (then best_of is its width)
    inference_timeout: float | None = None  # seconds; past it the request ends with DEADLINE_EXCEEDED
    user: str | None = None
    log_prompt: bool = False
    bookkeeping: dict[str, Any] = field(default_factory=dict)  # store / metadata / service_tier, logged only


# Template variables a request may not override (they are the renderer's own).
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
     "tokenize", "chat_template", "return_dict", "return_assistant_tokens_mask"}
)  # fmt: skip


def _stops(request: chat_pb2.ChatCompletionRequest, limits: Limits, out: list[FieldViolation]) -> tuple[str, ...]:
    stops = tuple(request.stop)
    if len(stops) > limits.max_stop:
        out.append(FieldViolation("stop", f"at most {limits.max_stop} stop strings, got {len(stops)}", "too_long"))
    for i, s in enumerate(stops):
        if not s:
            out.append(FieldViolation(f"stop[{i}]", "a stop string must not be empty", "string_too_short"))
        elif len(s) > limits.max_stop_chars:
            out.append(FieldViolation(f"stop[{i}]", f"at most {limits.max_stop_chars} characters, got {len(s)}",
                                      "string_too_long"))  # fmt: skip
    return stops


def _template(
    request: chat_pb2.ChatCompletionRequest, limits: Limits, out: list[FieldViolation]
) -> tuple[str | None, tuple[tuple[str, Any], ...]]:
    template = request.chat_template if request.HasField("chat_template") else None
    if template is not None and not limits.allow_request_chat_template:
        out.append(FieldViolation("chat_template", "per-request chat templates are disabled on this server",
                                  "not_allowed"))  # fmt: skip
    elif template is not None and len(template) > limits.max_string_chars:
        msg = f"at most {limits.max_string_chars} characters, got {len(template)}"
        out.append(FieldViolation("chat_template", msg, "string_too_long"))
    kwargs: tuple[tuple[str, Any], ...] = ()
    if request.HasField("chat_template_kwargs_json"):
        value = json.loads(request.chat_template_kwargs_json)  # the gateway wrote it; gRPC clients must too
        if not isinstance(value, dict):
            out.append(FieldViolation("chat_template_kwargs", "`chat_template_kwargs` must be a JSON object",
                                      "dict_type"))  # fmt: skip
        else:
            for key in sorted(RESERVED_TEMPLATE_KWARGS & value.keys()):
                out.append(FieldViolation(f"chat_template_kwargs.{key}", f"`{key}` is set by the server and cannot "
                                          "be overridden", "reserved"))  # fmt: skip
            kwargs = tuple(sorted(value.items()))
    return template, kwargs


def _json_schema_text(text: str, where: str, out: list[FieldViolation]) -> str | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        out.append(FieldViolation(where, f"not valid JSON: {exc}", "json_invalid"))
        return None
    if not isinstance(value, dict | bool):
        out.append(FieldViolation(where, "a JSON Schema must be an object (or a boolean)", "dict_type"))
        return None
    return text


def _guide(request: chat_pb2.ChatCompletionRequest, out: list[FieldViolation]) -> GuideSpec | None:
    """At most one constraint: guided_json / guided_regex / guided_choice / guided_grammar / response_format."""
    specs: list[GuideSpec] = []
    ws = request.guided_whitespace_pattern if request.HasField("guided_whitespace_pattern") else None
    backend = request.guided_decoding_backend if request.HasField("guided_decoding_backend") else "auto"
    if backend not in GUIDED_BACKENDS:
        out.append(FieldViolation("guided_decoding_backend", f"must be one of {', '.join(GUIDED_BACKENDS)}; got "
                                  f"{backend!r} (all are served by tokenwire's own engine)", "enum"))  # fmt: skip
    if request.HasField("guided_json"):
        text = _json_schema_text(request.guided_json, "guided_json", out)
        if text is not None:
            specs.append(GuideSpec("json_schema", text, "guided_json", ws, backend))
    if request.HasField("guided_regex"):
        specs.append(GuideSpec("regex", request.guided_regex, "guided_regex", None, backend))
    if request.guided_choice:
        specs.append(GuideSpec("choice", tuple(request.guided_choice), "guided_choice", None, backend))
    if request.HasField("guided_grammar"):
        if not request.guided_grammar.strip():
            out.append(FieldViolation("guided_grammar", "the grammar is empty", "string_too_short"))
        specs.append(GuideSpec("grammar", request.guided_grammar, "guided_grammar", None, backend))
    if request.HasField("response_format"):
        rf = request.response_format
        if rf.type == "json_object":
            specs.append(GuideSpec("json_object", "", "response_format", ws, backend))
        elif rf.type == "json_schema":
            if not (rf.HasField("json_schema") and rf.json_schema.HasField("schema_json")):
                out.append(FieldViolation("response_format.json_schema.schema",
                                          "`json_schema` needs a `schema`", "missing"))  # fmt: skip
            else:
                text = _json_schema_text(rf.json_schema.schema_json, "response_format.json_schema.schema", out)
                if text is not None:
                    specs.append(GuideSpec("json_schema", text, "response_format", ws, backend))
        elif rf.type != "text":
            out.append(FieldViolation("response_format.type", "must be one of text, json_object, json_schema; "
                                      f"got {rf.type!r}", "enum"))  # fmt: skip
    if len(specs) > 1:
        names = ", ".join(f"`{s.field}`" for s in specs)
        out.append(FieldViolation(specs[1].field, f"at most one output constraint per request; got {names}",
                                  "value_error"))  # fmt: skip
        return None
    if ws is not None and not (specs and specs[0].kind in ("json_schema", "json_object")):
        out.append(FieldViolation("guided_whitespace_pattern", "applies to JSON constraints only (`guided_json`, "
                                  "`response_format`)", "value_error"))  # fmt: skip
    return specs[0] if specs else None


_EARLY_STOPPING: dict[int, bool | str] = {
    chat_pb2.EARLY_STOPPING_UNSPECIFIED: False,
    chat_pb2.EARLY_STOPPING_TRUE: True,
    chat_pb2.EARLY_STOPPING_FALSE: False,
    chat_pb2.EARLY_STOPPING_NEVER: "never",
}


def _choices(
    request: chat_pb2.ChatCompletionRequest, streaming: bool, limits: Limits, out: list[FieldViolation]
) -> tuple[int, int, BeamParams | None]:
    """n, best_of and beam search, and the sampling fields beam search has no use for."""
    n = request.n if request.HasField("n") else 1
    if not 1 <= n <= limits.max_n:
        out.append(FieldViolation("n", f"`n` must be in [1, {limits.max_n}], got {n}", "range"))
        n = 1
    best_of = request.best_of if request.HasField("best_of") else n
    if not n <= best_of <= limits.max_best_of:
        out.append(FieldViolation("best_of", f"`best_of` must be in [n={n}, {limits.max_best_of}], got {best_of}",
                                  "range"))  # fmt: skip
        best_of = n
    if not request.use_beam_search:
        for name, set_ in (("length_penalty", request.HasField("length_penalty")),
                           ("early_stopping", bool(request.early_stopping))):  # fmt: skip
            if set_:
                out.append(FieldViolation(name, f"`{name}` applies only with `use_beam_search: true`", "value_error"))
        if streaming and best_of > n:
            out.append(FieldViolation("best_of", f"`best_of` ({best_of}) > `n` ({n}): results cannot be streamed "
                                      "(the best are known only at the end)", "value_error"))  # fmt: skip
        return n, best_of, None
    length_penalty = request.length_penalty if request.HasField("length_penalty") else 1.0
    _finite("length_penalty", length_penalty, out)
    for name, bad in (
        ("temperature", request.HasField("temperature") and request.temperature != 0.0),
        ("top_p", request.HasField("top_p") and request.top_p != 1.0),
        ("top_k", request.top_k not in (0, -1)),
        ("min_p", request.min_p != 0.0),
        ("seed", request.HasField("seed")),
    ):
        if bad:
            out.append(FieldViolation(name, f"`{name}` has no effect with `use_beam_search` (beam search is "
                                      "deterministic): leave it unset", "value_error"))  # fmt: skip
    return n, best_of, BeamParams(best_of, length_penalty, _EARLY_STOPPING[request.early_stopping])


def _is_neutral(name: str, value: Any) -> bool:
    pred = NEUTRAL.get(name)
    return bool(pred is not None and pred(value))


def _check_fields(request: chat_pb2.ChatCompletionRequest, out: list[FieldViolation]) -> None:
    for fd, value in request.ListFields():
        name = fd.name
        if name in SUPPORTED or _is_neutral(name, value):
            continue
        api = json_name(name)
        if name == "suffix":
            out.append(FieldViolation(api, "`suffix` is not supported for chat models", "not_supported"))
        elif name == "audio_json":
            out.append(
                FieldViolation(api, "`audio` is not supported: tokenwire serves text-only models", "not_supported")
            )
        elif name == "modalities":
            out.append(
                FieldViolation(api, f'only ["text"] is supported for `modalities`, got {list(value)}', "not_supported")
            )
        else:
            why = LATER.get(name, "this release")
            out.append(FieldViolation(api, f"`{api}` is not supported yet (arrives with {why})", "not_supported"))


def _content(msg: chat_pb2.ChatMessage, path: str, out: list[FieldViolation]) -> str | None:
    kind = msg.WhichOneof("content")
    if kind == "text":
        return msg.text
    if kind == "parts":
        texts: list[str] = []
        for j, part in enumerate(msg.parts.parts):
            if part.type != "text":
                out.append(
                    FieldViolation(
                        f"{path}.content[{j}].type",
                        f'content part type {part.type!r} is not supported: only "text" parts (text-only model)',
                        "not_supported",
                    )
                )
            texts.append(part.text)
        return "".join(texts)
    return None


def _messages(
    request: chat_pb2.ChatCompletionRequest, limits: Limits, out: list[FieldViolation]
) -> tuple[ChatMessage, ...]:
    if not request.messages:
        out.append(FieldViolation("messages", "`messages` must contain at least one message", "missing"))
        return ()
    if len(request.messages) > limits.max_messages:
        out.append(
            FieldViolation(
                "messages", f"at most {limits.max_messages} messages, got {len(request.messages)}", "too_long"
            )
        )
    result: list[ChatMessage] = []
    for i, msg in enumerate(request.messages):
        path = f"messages[{i}]"
        if msg.role not in ROLES:
            out.append(
                FieldViolation(f"{path}.role", f"role must be one of {', '.join(ROLES)}; got {msg.role!r}", "enum")
            )
        content = _content(msg, path, out)
        for where, text in ((f"{path}.content", content), (f"{path}.name", msg.name)):
            if text is not None and len(text) > limits.max_string_chars:
                msg_ = f"at most {limits.max_string_chars} characters, got {len(text)}"
                out.append(FieldViolation(where, msg_, "string_too_long"))
        calls = tuple(
            {
                "id": c.id,
                "type": c.type or "function",
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in msg.tool_calls
        )
        if calls and msg.role != "assistant":
            out.append(
                FieldViolation(f"{path}.tool_calls", "only assistant messages carry `tool_calls`", "value_error")
            )
        if content is None and not (msg.role == "assistant" and calls):
            article = "an" if msg.role in ("assistant", "user") else "a"
            out.append(
                FieldViolation(
                    f"{path}.content",
                    f"{article} {msg.role or 'chat'} message needs `content`",
                    "missing",
                )
            )
        if msg.role == "tool" and not msg.HasField("tool_call_id"):
            out.append(FieldViolation(f"{path}.tool_call_id", "a tool message needs `tool_call_id`", "missing"))
        result.append(
            ChatMessage(
                role=msg.role,
                content=content,
                name=msg.name if msg.HasField("name") else None,
                tool_calls=calls,
                tool_call_id=msg.tool_call_id if msg.HasField("tool_call_id") else None,
            )
        )
    return tuple(result)


def _finite(name: str, value: float, out: list[FieldViolation]) -> bool:
    if math.isfinite(value):
        return True
    out.append(FieldViolation(name, f"`{name}` must be a finite number, got {value}", "value_error"))
    return False


def _ranged(
    request: chat_pb2.ChatCompletionRequest, name: str, default: float, lo: float, hi: float, out: list[FieldViolation]
) -> float:
    if not request.HasField(name):  # type: ignore[arg-type]
        return default
    value = float(getattr(request, name))
    if not _finite(name, value, out):
        return default
    if not lo <= value <= hi:
        out.append(FieldViolation(name, f"`{name}` must be in [{lo:g}, {hi:g}], got {value:g}", "range"))
    return value


def _logit_bias(
    request: chat_pb2.ChatCompletionRequest, vocab_size: int, out: list[FieldViolation]
) -> tuple[tuple[int, float], ...]:
    result: list[tuple[int, float]] = []
    for key, bias in sorted(request.logit_bias.items()):
        where = f"logit_bias.{key}"
        try:
            token_id = int(key)
        except ValueError:
            out.append(FieldViolation(where, f"`logit_bias` keys must be token ids, got {key!r}", "int_parsing"))
            continue
        if not 0 <= token_id < vocab_size:
            msg = f"token id {token_id} is not in the vocabulary (0..{vocab_size - 1})"
            out.append(FieldViolation(where, msg, "unknown_token"))
            continue
        if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
            out.append(FieldViolation(where, f"a logit bias must be in [-100, 100], got {bias:g}", "range"))
            continue
        result.append((token_id, float(bias)))
    return tuple(result)


def validate(
    request: chat_pb2.ChatCompletionRequest,
    *,
    streaming: bool,
    served_names: frozenset[str],
    default_model: str,
    limits: Limits,
    vocab_size: int,
) -> ChatParams:
    """Check `request` and return its frozen params; raise InvalidRequest or ModelNotFound."""
    out: list[FieldViolation] = []
    _check_fields(request, out)
    messages = _messages(request, limits, out)

    model = request.model if request.HasField("model") and request.model else default_model
    if request.HasField("stream") and request.stream != streaming:
        rpc = "StreamChatCompletion" if streaming else "CreateChatCompletion"
        out.append(
            FieldViolation(
                "stream",
                f"`stream: {str(request.stream).lower()}` does not match the {rpc} RPC",
                "value_error",
            )
        )
    if request.HasField("stream_options") and not streaming:
        out.append(
            FieldViolation("stream_options", "`stream_options` is only allowed with `stream: true`", "value_error")
        )
    include_usage = bool(request.stream_options.include_usage) if request.HasField("stream_options") else False

    max_tokens: int | None = None
    for name in ("max_tokens", "max_completion_tokens"):  # the latter wins
        if request.HasField(name):
            value = getattr(request, name)
            if value < 1:
                out.append(FieldViolation(name, f"`{name}` must be >= 1, got {value}", "greater_than_equal"))
            elif value > limits.max_tokens_cap:
                out.append(
                    FieldViolation(
                        name,
                        f"`{name}` must be <= {limits.max_tokens_cap} (server limit), got {value}",
                        "less_than_equal",
                    )
                )
            else:
                max_tokens = value

    temperature = 1.0
    if request.HasField("temperature") and _finite("temperature", request.temperature, out):
        temperature = request.temperature
        if not 0.0 <= temperature <= limits.max_temperature:
            out.append(
                FieldViolation(
                    "temperature",
                    f"`temperature` must be in [0, {limits.max_temperature:g}], got {temperature:g}",
                    "range",
                )
            )
    top_p = 1.0
    if request.HasField("top_p") and _finite("top_p", request.top_p, out):
        top_p = request.top_p
        if not 0.0 < top_p <= 1.0:
            out.append(FieldViolation("top_p", f"`top_p` must be in (0, 1], got {top_p:g}", "range"))
    seed = request.seed & 0xFFFF_FFFF_FFFF_FFFF if request.HasField("seed") else None
    top_k = request.top_k if request.HasField("top_k") else 0
    if top_k < -1:
        out.append(FieldViolation("top_k", f"`top_k` must be -1 or 0 (off) or >= 1, got {top_k}", "greater_than_equal"))
    min_p = _ranged(request, "min_p", 0.0, *BOUNDS["min_p"][:2], out)
    frequency_penalty = _ranged(request, "frequency_penalty", 0.0, *BOUNDS["frequency_penalty"][:2], out)
    presence_penalty = _ranged(request, "presence_penalty", 0.0, *BOUNDS["presence_penalty"][:2], out)
    repetition_penalty = 1.0
    if request.HasField("repetition_penalty") and _finite("repetition_penalty", request.repetition_penalty, out):
        repetition_penalty = request.repetition_penalty
        if repetition_penalty <= 0.0:
            msg = f"`repetition_penalty` must be > 0, got {repetition_penalty:g}"
            out.append(FieldViolation("repetition_penalty", msg, "greater_than"))
    logit_bias = _logit_bias(request, vocab_size, out)
    top_logprobs = request.top_logprobs if request.HasField("top_logprobs") else 0
    if top_logprobs > BOUNDS["top_logprobs"][1]:
        out.append(FieldViolation("top_logprobs", f"`top_logprobs` must be in [0, 20], got {top_logprobs}", "range"))
    if top_logprobs > 0 and not request.logprobs:
        out.append(FieldViolation("top_logprobs", "`top_logprobs` requires `logprobs: true`", "value_error"))
    min_tokens = request.min_tokens if request.HasField("min_tokens") else 0
    if max_tokens is not None and min_tokens > max_tokens:
        msg = f"`min_tokens` ({min_tokens}) must be <= the max tokens ({max_tokens})"
        out.append(FieldViolation("min_tokens", msg, "less_than_equal"))

    stops = _stops(request, limits, out)
    inference_timeout = None
    if request.HasField("inference_timeout") and _finite("inference_timeout", request.inference_timeout, out):
        inference_timeout = request.inference_timeout
        if not 0.0 < inference_timeout <= limits.max_inference_timeout:
            bound = f"(0, {limits.max_inference_timeout:g}]"
            msg = f"`inference_timeout` must be in {bound} seconds, got {inference_timeout:g}"
            out.append(FieldViolation("inference_timeout", msg, "range"))
    guide = _guide(request, out)
    n, best_of, beam = _choices(request, streaming, limits, out)
    try:
        chat_template, template_kwargs = _template(request, limits, out)
    except json.JSONDecodeError as exc:
        out.append(FieldViolation("chat_template_kwargs", f"not valid JSON: {exc}", "json_invalid"))
        chat_template, template_kwargs = None, ()
    if request.loglikelihood and streaming:
        out.append(FieldViolation("loglikelihood", "prompt logprobs come on unary responses: use `stream: false`",
                                  "value_error"))  # fmt: skip

    if out:
        raise InvalidRequest(out)
    if model not in served_names:
        raise ModelNotFound(f"model {model!r} is not served here; served: {', '.join(sorted(served_names))}")

    bookkeeping: dict[str, Any] = {}
    if request.HasField("store"):
        bookkeeping["store"] = request.store
    if request.metadata:
        bookkeeping["metadata"] = dict(request.metadata)
    if request.HasField("service_tier"):
        bookkeeping["service_tier"] = request.service_tier
    return ChatParams(
        messages=messages,
        model=model,
        stream=streaming,
        include_usage=include_usage,
        max_tokens=max_tokens,
        sampling=SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=max(top_k, 0),
            min_p=min_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            repetition_penalty=repetition_penalty,
            logit_bias=logit_bias,
            seed=seed,
            min_tokens=min_tokens,
            ignore_eos=request.ignore_eos,
        ),
        logprobs=request.logprobs,
        top_logprobs=top_logprobs,
        stop=stops,
        include_stop_str_in_output=request.include_stop_str_in_output,
        loglikelihood=request.loglikelihood,
        chat_template=chat_template,
        chat_template_kwargs=template_kwargs,
        guide=guide,
        n=n,
        best_of=best_of,
        beam=beam,
        inference_timeout=inference_timeout,
        user=request.user if request.HasField("user") else None,
        log_prompt=request.log_prompt,
        bookkeeping=bookkeeping,
    )
