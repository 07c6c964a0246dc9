"""tokenwire's token sampler: logits processing and seeded sampling, one call per engine step.

The pipeline, per row: raw log-softmax (reported logprobs) -> logit bias -> guided-decoding mask
(rows added with a `Guide`) -> EOS masking (`min_tokens`, `ignore_eos`; skipped when the guide
allows only EOS) -> repetition penalty -> frequency/presence penalties -> greedy
shortcut (`temperature == 0`) -> temperature -> top-k -> top-p -> min-p -> sample with the
sequence's seeded RNG -> advance the row's guide by the chosen token.
"""

from typing import final

import numpy as np
import numpy.typing as npt

__version__: str

@final
class SamplingParams:
    """One request's sampling settings, validated at construction (ValueError naming the parameter)."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        top_logprobs: int = 0,
        repetition_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        eos_token_ids: list[int] | None = None,
    ) -> None: ...
    @property
    def temperature(self) -> float:
        """`>= 0`; `0` = greedy."""
    @property
    def top_p(self) -> float:
        """In `(0, 1]`; `1` = off."""
    @property
    def top_k(self) -> int:
        """`0` or `-1` = off."""
    @property
    def min_p(self) -> float:
        """In `[0, 1]`; `0` = off."""
    @property
    def seed(self) -> int:
        """In `[0, 2**64)`; drawn from OS entropy when not given."""
    @property
    def top_logprobs(self) -> int:
        """`0..=20` alternatives reported per step."""
    @property
    def repetition_penalty(self) -> float:
        """`> 0`; `1` = off."""
    @property
    def frequency_penalty(self) -> float:
        """In `[-2, 2]`; `0` = off."""
    @property
    def presence_penalty(self) -> float:
        """In `[-2, 2]`; `0` = off."""
    @property
    def logit_bias(self) -> dict[int, float]:
        """Token id -> bias in `[-100, 100]`."""
    @property
    def min_tokens(self) -> int:
        """EOS is masked until this many tokens were generated."""
    @property
    def ignore_eos(self) -> bool:
        """Mask EOS for the whole generation."""
    @property
    def eos_token_ids(self) -> list[int]:
        """The tokens `min_tokens` / `ignore_eos` mask."""

@final
class StepOutput:
    """What one step produced for one row."""

    @property
    def token_id(self) -> int:
        """The chosen token."""
    @property
    def logprob(self) -> float:
        """Raw `log_softmax` of the unprocessed row at the chosen token."""
    @property
    def top_logprobs(self) -> list[tuple[int, float]]:
        """The best `top_logprobs` tokens of the raw `log_softmax`, best first, ties by lower id."""
    @property
    def guide_finished(self) -> bool:
        """The row is guided and, after advancing by the chosen token, its guide is finished
        (the text is complete and nothing may follow) or the token is EOS: stop the sequence.
        False for unguided rows."""

@final
class Sampler:
    """Per-sequence sampling state, and the per-step sampling call."""

    def __init__(self, vocab_size: int) -> None:
        """`vocab_size` real tokens; logits rows may be wider (padding columns are never sampled)."""
    @property
    def vocab_size(self) -> int: ...
    def add_sequence(
        self, seq_id: int, params: SamplingParams, prompt_token_ids: list[int], guide: Guide | None = None
    ) -> None:
        """Registers a sequence; ValueError if `seq_id` exists, a token id is out of range, or
        `guide`'s vocabulary is longer than `vocab_size`. With a `guide` the sampler owns the
        sequence's `GuideState`: each step masks the tokens the guide does not allow (tokens past
        the guide's vocabulary never are), then advances it by the chosen token."""
    def remove_sequence(self, seq_id: int) -> None:
        """Forgets a sequence; KeyError if it is not registered."""
    def __len__(self) -> int: ...
    def __contains__(self, seq_id: object) -> bool: ...
    def step(self, logits: npt.NDArray[np.float32], seq_ids: list[int]) -> list[StepOutput]:
        """Samples one token per row of the C-contiguous `[len(seq_ids), width]` float32 `logits`
        (read without copying, never written) and records it; the GIL is released. ValueError on a
        bad dtype/shape, an unknown or repeated seq id, or a row where every token is filtered out
        (for a guided row: every allowed token). RuntimeError naming the seq id if a guide fails
        (a bug)."""

def process_logits(
    logits: npt.NDArray[np.float32],
    params: SamplingParams,
    prompt_token_ids: list[list[int]],
    generated_token_ids: list[list[int]],
) -> npt.NDArray[np.float32]:
    """The processed scores (bias ... min-p), `-inf` where filtered, one row per input row; the
    vocabulary is the full row width. For tests and benchmarks."""

# ---- guided decoding ------------------------------------------------------------------------

@final
class Vocabulary:
    """A served model's vocabulary as token bytes (SentencePiece `▁` → space and `<0xNN>` → the
    byte; byte-level BPE decoded), its EOS tokens and its special tokens. Frozen; build once per
    model. Special tokens never match text; EOS is allowed exactly where a guide accepts. Holds
    the compile cache (bounded, by spec)."""

    def __init__(self, token_bytes: list[bytes], eos_token_ids: list[int], special_token_ids: list[int]) -> None:
        """ValueError if `eos_token_ids` is empty or an id is out of range."""
    def __len__(self) -> int: ...
    @property
    def cached_guides(self) -> int:
        """Compiled guides held by the cache."""
    def clear_caches(self) -> None:
        """Empties the compile caches: this vocabulary's guides, and the process-wide rules of the
        JSON Schema compiler but for the built-in ones every schema shares (any-JSON, plain
        strings). Compiled guides stay valid."""

@final
class Guide:
    """A compiled constraint: immutable, shareable across sequences. Compiles release the GIL,
    are cached by (vocabulary, spec) and bounded; errors raise ValueError naming the problem
    (`invalid regex: ...`, `unsupported JSON Schema keyword `x``, `constraint too large: ...`)."""

    @property
    def engine(self) -> str:
        """`"tokenwire-dfa"` (regex, choice), `"tokenwire-json"` (JSON Schema, json_object) or
        `"llguidance"` (grammars, and JSON Schemas using keywords our compiler lacks)."""
    @property
    def fallback_reason(self) -> str | None:
        """Why our JSON Schema compiler passed the schema to llguidance (a keyword or form it
        does not implement, a budget); `None` when it did not. May quote parts of the schema."""
    @property
    def dfa_states(self) -> int | None:
        """Live DFA states of a `tokenwire-dfa` guide; `None` otherwise."""
    @staticmethod
    def regex(vocab: Vocabulary, pattern: str) -> Guide:
        """The output must match `pattern` in full (Rust `regex` syntax; no look-around)."""
    @staticmethod
    def choice(vocab: Vocabulary, choices: list[str]) -> Guide:
        """The output is exactly one of `choices`."""
    @staticmethod
    def json_schema(vocab: Vocabulary, schema_json: str, whitespace_pattern: str | None = None) -> Guide:
        """JSON valid under the schema (draft 2020-12 subset; unsupported keywords raise).
        `whitespace_pattern`: a regex for whitespace allowed between JSON tokens (once between
        any two); `None` = compact JSON."""
    @staticmethod
    def json_object(vocab: Vocabulary, whitespace_pattern: str | None = None) -> Guide:
        """Any JSON object."""
    @staticmethod
    def grammar(vocab: Vocabulary, grammar: str) -> Guide:
        """A Lark-style EBNF grammar (llguidance's dialect), or GBNF (detected by `name ::=` rules,
        `root` the start symbol)."""

@final
class GuideState:
    """One sequence's position in a guide; mutable, one per sequence."""

    def __init__(self, guide: Guide) -> None: ...
    def fill_mask(self, out: npt.NDArray[np.uint32] | npt.NDArray[np.int32]) -> None:
        """Writes the allowed-token bitmask (bit `t` of word `t // 32` = token `t` allowed) into the
        contiguous 1-D `out` of at least `ceil(len(vocab) / 32)` words; bits past the vocabulary
        are cleared. ValueError on a bad buffer."""
    def advance(self, token_id: int) -> bool:
        """Consumes `token_id`; False (state unchanged) if it is not allowed. EOS is allowed iff
        accepting, and ends the sequence."""
    def is_accepting(self) -> bool:
        """The text so far is a complete match (EOS allowed)."""
    def is_finished(self) -> bool:
        """EOS was consumed, or the text is a complete match and nothing else may follow."""

# ---- beam search ----------------------------------------------------------------------------

@final
class BeamHypothesis:
    """One returned beam-search hypothesis."""

    @property
    def token_ids(self) -> list[int]:
        """Generated tokens only (prompt excluded), including a final EOS if it ended with one."""
    @property
    def score(self) -> float:
        """transformers' `sequences_scores` value: `sum_logprobs / len(token_ids) ** length_penalty`."""
    @property
    def logprobs(self) -> list[float]:
        """The raw log-probability (log_softmax of the model's row, before any processor) of each token."""
    @property
    def top_logprobs(self) -> list[list[tuple[int, float]]]:
        """Per token, the best `top_logprobs` raw `(token, log-probability)` alternatives, best first."""
    @property
    def finished_by_eos(self) -> bool:
        """The last token is one of `eos_token_ids`."""

@final
class BeamSearch:
    """One beam search (batch size 1) with exactly transformers' semantics (`generate(num_beams=k,
    num_return_sequences=n, length_penalty=..., early_stopping=..., do_sample=False,
    max_new_tokens=...)`). Per step, per beam: log_softmax -> logit bias -> EOS masking
    (`min_tokens`/`ignore_eos`, over `eos_token_ids`) -> repetition penalty (prompt + the beam's
    tokens) -> frequency/presence penalties (the beam's tokens) -> + beam score; then the top
    `max(2, 1 + len(eos_token_ids)) * num_beams` candidates, finished hypotheses and the early-
    stopping rule as transformers'. With a `guide`, every beam follows it with its own state: the
    tokens its mask forbids are -inf after log_softmax (transformers' prefix_allowed_tokens_fn).
    ValueError naming the parameter on bad arguments."""

    def __init__(
        self,
        *,
        num_beams: int,
        num_return: int,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        eos_token_ids: list[int],
        max_new_tokens: int,
        vocab_size: int,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        guide: Guide | None = None,
        top_logprobs: int = 0,
    ) -> None:
        """`early_stopping`: True, False or "never". Only `params`' logit bias, penalties,
        `min_tokens` and `ignore_eos` are used; its temperature/top-k/top-p/min-p are ignored.
        `top_logprobs`: raw alternatives kept per generated token (see BeamHypothesis)."""
    @property
    def steps(self) -> int:
        """Steps taken so far (tokens generated per beam)."""
    def step(self, logits: npt.NDArray[np.float32]) -> tuple[list[int], list[int]]:
        """One step over the C-contiguous `[num_beams, width]` float32 `logits` (`width >=
        vocab_size`; padding columns are never chosen; row i = live beam i; at the first step only
        row 0 is live). Returns `(parent, token)`: for each beam of the next step, the current beam
        it extends and the token to feed (reorder the KV cache by `parent`). GIL released.
        ValueError on bad logits; RuntimeError after `is_done()` or on a panic."""
    def propose(self, logits: npt.NDArray[np.float32]) -> tuple[list[int], list[int]]:
        """The first half of `step`: the step's candidates `(beam, token)`, best first; `commit`
        must follow. GIL released."""
    def commit(self, stops: list[bool] | None = None) -> tuple[list[int], list[int]]:
        """The second half of `step`: `stops[i]` true ends candidate i (a stop string found by the
        caller; transformers' StopStringCriteria) exactly as an EOS would. Returns what `step` does.
        ValueError without a proposal or with the wrong number of flags."""
    def is_done(self) -> bool:
        """No further step can change the result (early-stopping rule or `max_new_tokens`)."""
    def finalize(self) -> list[BeamHypothesis]:
        """The `num_return` best hypotheses, best first. Before `is_done()` (stopping early) the
        running beams compete too, scored as if they ended now. ValueError before the first step."""
