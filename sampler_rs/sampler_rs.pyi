"""tokenwire's token sampler: logits processing and seeded sampling, one call per engine step.

The pipeline, per row: raw log-softmax (reported logprobs) -> logit bias -> EOS masking
(`min_tokens`, `ignore_eos`) -> repetition penalty -> frequency/presence penalties -> greedy
shortcut (`temperature == 0`) -> temperature -> top-k -> top-p -> min-p -> sample with the
sequence's seeded RNG.
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

@final
class Sampler:
    """Per-sequence sampling state, and the per-step sampling call."""

    def __init__(self, vocab_size: int) -> None:
        """`vocab_size` real tokens; logits rows may be wider (padding columns are never sampled)."""
    @property
    def vocab_size(self) -> int: ...
    def add_sequence(self, seq_id: int, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        """Registers a sequence; ValueError if `seq_id` exists or a token id is out of range."""
    def remove_sequence(self, seq_id: int) -> None:
        """Forgets a sequence; KeyError if it is not registered."""
    def __len__(self) -> int: ...
    def __contains__(self, seq_id: object) -> bool: ...
    def step(self, logits: npt.NDArray[np.float32], seq_ids: list[int]) -> list[StepOutput]:
        """Samples one token per row of the C-contiguous `[len(seq_ids), width]` float32 `logits`
        (read without copying, never written) and records it; the GIL is released. ValueError on a
        bad dtype/shape, an unknown or repeated seq id, or a row where every token is filtered out."""

def process_logits(
    logits: npt.NDArray[np.float32],
    params: SamplingParams,
    prompt_token_ids: list[list[int]],
    generated_token_ids: list[list[int]],
) -> npt.NDArray[np.float32]:
    """The processed scores (bias ... min-p), `-inf` where filtered, one row per input row; the
    vocabulary is the full row width. For tests and benchmarks."""
