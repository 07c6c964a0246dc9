//! The crate's one error type.

use crate::sampling::{SeqId, TokenId};

/// Everything that can go wrong in the sampler. Bindings map each variant to one Python exception
/// (`UnknownSequence` in `remove_sequence` → `KeyError`, `Guide` → `RuntimeError`, everything
/// else → `ValueError`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// A sampling parameter is out of range; `parameter` is its name as the API spells it.
    #[error("`{parameter}` {message}")]
    InvalidParameter {
        /// The parameter's name (`top_p`, `logit_bias`, ...).
        parameter: &'static str,
        /// What was wrong, with the bound and the value received.
        message: String,
    },
    /// A token id does not fit the vocabulary.
    #[error("`{parameter}` holds token id {token}, outside the vocabulary of size {vocab_size}")]
    TokenOutOfRange {
        /// Where the token id came from (`prompt_token_ids`, `eos_token_ids`, `logit_bias`).
        parameter: &'static str,
        /// The offending token id.
        token: TokenId,
        /// The sampler's vocabulary size.
        vocab_size: usize,
    },
    /// `add_sequence` with an id that is already registered.
    #[error("sequence {0} is already registered")]
    DuplicateSequence(SeqId),
    /// A sequence id that is not registered.
    #[error("unknown sequence id {0}")]
    UnknownSequence(SeqId),
    /// The same sequence id appears twice in one step.
    #[error("sequence {0} appears more than once in the batch")]
    RepeatedInBatch(SeqId),
    /// The logits buffer does not match `[seq_ids.len(), width]` with `width >= vocab_size`.
    #[error("`logits` {0}")]
    BadLogits(String),
    /// Every token of a row was filtered out (all scores -inf or NaN), so nothing can be sampled.
    #[error("no token can be sampled for sequence {0}: every processed score is -inf or NaN")]
    NoCandidates(SeqId),
    /// A guide's matcher failed (computing a mask, or advancing by the chosen token, which the
    /// mask allowed): a bug, not a bad request. The bindings raise `RuntimeError`.
    #[error("guided decoding failed for sequence {seq_id}: {message}")]
    Guide {
        /// The sequence whose guide failed.
        seq_id: SeqId,
        /// What failed.
        message: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, SamplerError>;
