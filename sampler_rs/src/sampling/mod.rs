//! The sampling pipeline: per-sequence state, and one call per engine step over a logits batch.
//!
//! # The pipeline
//!
//! For each row of the `[batch, width]` logits (only the first `vocab_size` columns; padding
//! columns are never read), [`Sampler::step`] runs, in this order:
//!
//! 1. **raw log-softmax** — one pass over the unprocessed row: its max, log-sum-exp and the
//!    `top_logprobs` best tokens (ties: lower id first). The reported logprobs come from here,
//!    *before* any processing, as OpenAI and vLLM report them.
//! 2. **logit bias** — `x += bias` for the listed tokens.
//! 3. *(slot: guided-decoding mask, later)*
//! 4. **EOS masking** — `eos_token_ids` set to `-inf` while fewer than `min_tokens` tokens were
//!    generated, or always with `ignore_eos`.
//! 5. **repetition penalty** — transformers' `RepetitionPenaltyLogitsProcessor` over each distinct
//!    token of prompt + generated: `x * p` if `x < 0` else `x / p`.
//! 6. **frequency and presence penalties** — OpenAI's, over generated tokens only:
//!    `x -= count * frequency + (count > 0) * presence`.
//! 7. **greedy shortcut** — with `temperature == 0`, the argmax (ties: lowest id) and stop.
//! 8. **temperature** — `s = x / temperature` (applied lazily, to the tokens the filters read).
//! 9. **top-k** — transformers' `TopKLogitsWarper`: keep `s >= ` the k-th largest (ties kept).
//! 10. **top-p** — transformers' `TopPLogitsWarper`: keep the shortest best-first prefix whose
//!     mass reaches `top_p` (at least one token).
//! 11. **min-p** — transformers' `MinPLogitsWarper`: drop tokens whose probability is below
//!     `min_p` times the top probability.
//! 12. **sample** — from the softmax of what remains, with the sequence's own seeded RNG (one
//!     draw per step, greedy or not), so a sequence's tokens depend only on its seed and its rows.
//!
//! Then the chosen token is recorded in the sequence's state (penalty counts, generated length).
//! A stage whose parameter is off is skipped. Stages 2–6 touch a few tokens through a
//! copy-on-write [`row::RowView`]; the caller's buffer is never written. With top-k on, stages
//! 9–12 read only the chunks that can hold the k best tokens, so a step reads each row once.
//! Without top-k, top-p gathers bands of tokens below the maximum until they hold enough mass
//! (one band for a peaked row; a flat row ends up gathering most of it, the slow case).
//! NaN logits are never sampled (they count as `-inf`); a row with nothing left to sample is
//! an error ([`crate::SamplerError::NoCandidates`]).

mod kernels;
mod params;
mod rng;
pub mod row;
pub mod stages;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rayon::prelude::*;

pub use params::{SamplingConfig, SamplingParams, MAX_TOP_LOGPROBS, MIN_TEMPERATURE};
pub use rng::Rng;

use crate::error::{Result, SamplerError};
use row::{LogSumExp, RowBuffers, RowView, TopN};
use stages::Candidate;

/// A token id.
pub type TokenId = u32;
/// The engine's id for a sequence.
pub type SeqId = u64;

/// Below this many logits per step, rows run on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// What one step produced for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The chosen token.
    pub token_id: TokenId,
    /// The raw `log_softmax` of the unprocessed row at the chosen token.
    pub logprob: f32,
    /// The best `top_logprobs` tokens of the raw `log_softmax`, best first, ties by lower id.
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// The state one sequence carries between steps.
#[derive(Debug, Clone)]
pub struct SequenceState {
    params: Arc<SamplingParams>,
    /// Distinct tokens of prompt + generated; kept only when the repetition penalty is on.
    seen: HashSet<TokenId>,
    /// How often each token was generated.
    counts: HashMap<TokenId, u32>,
    generated: usize,
    rng: Rng,
}

impl SequenceState {
    /// A fresh sequence; the caller has checked the prompt's token ids against the vocabulary.
    pub fn new(params: Arc<SamplingParams>, prompt_token_ids: &[TokenId]) -> Self {
        let seen = if params.repetition_penalty().is_some() {
            prompt_token_ids.iter().copied().collect()
        } else {
            HashSet::new()
        };
        let rng = Rng::seed_from_u64(params.seed());
        Self {
            params,
            seen,
            counts: HashMap::new(),
            generated: 0,
            rng,
        }
    }

    /// Records a generated token.
    pub fn record(&mut self, token: TokenId) {
        self.generated += 1;
        *self.counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty().is_some() {
            self.seen.insert(token);
        }
    }

    /// The sequence's parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Stages 2–6: bias, EOS mask, penalties.
    fn apply_edits(&self, view: &mut RowView<'_>) {
        let p = &*self.params;
        let mut edits = p.logit_bias().len();
        if p.masks_eos(self.generated) {
            edits += p.config().eos_token_ids.len();
        }
        if p.repetition_penalty().is_some() {
            edits += self.seen.len();
        }
        if p.frequency_presence().is_some() {
            edits += self.counts.len();
        }
        if edits > view.n_chunks() {
            view.patch_all();
        }
        if !p.logit_bias().is_empty() {
            stages::apply_logit_bias(view, p.logit_bias());
        }
        if p.masks_eos(self.generated) {
            stages::mask_tokens(view, p.eos_token_ids());
        }
        if let Some(penalty) = p.repetition_penalty() {
            stages::apply_repetition_penalty(view, self.seen.iter().copied(), penalty);
        }
        if let Some((f, pr)) = p.frequency_presence() {
            stages::apply_frequency_presence(
                view,
                self.counts.iter().map(|(&t, &n)| (t, n)),
                f,
                pr,
            );
        }
        view.finish_edits();
    }
}

thread_local! {
    /// Each thread's buffers, kept across steps.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Reusable per-thread buffers, so that a step does not allocate in its inner loops.
#[derive(Debug, Default)]
struct Scratch {
    row: RowBuffers,
    cands: Vec<Candidate>,
    floats: Vec<f32>,
    weights: Vec<f32>,
}

/// The tokens left after stages 8–11: all of them, or an explicit list.
enum Kept {
    All,
    Some,
}

/// Stages 8–11 on an edited row; with [`Kept::Some`] the survivors are in `cands`.
fn filter(
    view: &RowView<'_>,
    p: &SamplingParams,
    cands: &mut Vec<Candidate>,
    floats: &mut Vec<f32>,
    weights: &mut Vec<f32>,
) -> Kept {
    let t = p.temperature();
    let mut kept = Kept::All;
    if let Some(k) = p.top_k().filter(|&k| k < view.len()) {
        stages::top_k(view, t, k, cands, floats);
        kept = Kept::Some;
    }
    if let Some(top_p) = p.top_p() {
        match kept {
            Kept::Some => stages::top_p(cands, top_p, None, weights),
            Kept::All => stages::top_p_dense(view, t, top_p, cands, floats, weights),
        }
        kept = Kept::Some;
    }
    if let Some(min_p) = p.min_p() {
        match kept {
            Kept::Some => stages::min_p(cands, min_p, weights),
            Kept::All => stages::min_p_dense(view, t, min_p, cands, weights),
        }
        kept = Kept::Some;
    }
    kept
}

/// The whole pipeline for one row; `u` is the step's uniform draw from the sequence's RNG.
fn sample_row(
    raw: &[f32],
    seq_id: SeqId,
    seq: &SequenceState,
    u: f64,
    scratch: &mut Scratch,
) -> Result<StepOutput> {
    let p = &*seq.params;
    let mut top = TopN::new(p.top_logprobs());
    let Scratch {
        row,
        cands,
        floats,
        weights,
    } = scratch;
    let (mut view, lse): (RowView<'_>, LogSumExp) = RowView::new(raw, row, &mut top);
    seq.apply_edits(&mut view);
    let token = if p.is_greedy() {
        stages::argmax(&view)
    } else {
        let t = p.temperature();
        match filter(&view, p, cands, floats, weights) {
            Kept::All => stages::sample_dense(&view, t, u, floats),
            Kept::Some => stages::sample_candidates(cands, u, weights),
        }
        .ok_or(SamplerError::NoCandidates(seq_id))?
    };
    Ok(StepOutput {
        token_id: token,
        logprob: lse.logprob(raw[token as usize]),
        top_logprobs: top
            .items()
            .iter()
            .map(|&(t, x)| (t, lse.logprob(x)))
            .collect(),
    })
}

/// Stages 2–11 on one row, materialised: the processed scores, `-inf` where filtered. For tests
/// and benchmarks (the differential tests compare it with transformers' processors). With
/// `temperature == 0` it returns the scores after the penalties, which greedy takes the argmax of.
pub fn process_row(
    raw: &[f32],
    params: Arc<SamplingParams>,
    prompt_token_ids: &[TokenId],
    generated_token_ids: &[TokenId],
) -> Vec<f32> {
    let mut seq = SequenceState::new(params, prompt_token_ids);
    for &t in generated_token_ids {
        seq.record(t);
    }
    let mut top = TopN::new(0);
    let Scratch {
        row,
        cands,
        floats,
        weights,
    } = &mut Scratch::default();
    let (mut view, _) = RowView::new(raw, row, &mut top);
    seq.apply_edits(&mut view);
    let p = &*seq.params;
    if p.is_greedy() {
        return (0..raw.len()).map(|i| view.get(i as TokenId)).collect();
    }
    let t = p.temperature();
    match filter(&view, p, cands, floats, weights) {
        Kept::All => (0..raw.len()).map(|i| view.get(i as TokenId) / t).collect(),
        Kept::Some => {
            let mut out = vec![f32::NEG_INFINITY; raw.len()];
            for &(tok, s) in cands.iter() {
                out[tok as usize] = s;
            }
            out
        }
    }
}

/// Every live sequence's state, and the step that samples a batch of them.
#[derive(Debug)]
pub struct Sampler {
    vocab_size: usize,
    sequences: HashMap<SeqId, SequenceState>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab_size` real tokens (logits rows may be wider).
    pub fn new(vocab_size: usize) -> Result<Self> {
        if vocab_size == 0 || vocab_size > TokenId::MAX as usize {
            return Err(SamplerError::InvalidParameter {
                parameter: "vocab_size",
                message: format!("must be in [1, 2^32), got {vocab_size}"),
            });
        }
        Ok(Self {
            vocab_size,
            sequences: HashMap::new(),
        })
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Registers a sequence before its first step.
    pub fn add_sequence(
        &mut self,
        seq_id: SeqId,
        params: Arc<SamplingParams>,
        prompt_token_ids: &[TokenId],
    ) -> Result<()> {
        if self.sequences.contains_key(&seq_id) {
            return Err(SamplerError::DuplicateSequence(seq_id));
        }
        params.check_vocab(self.vocab_size)?;
        if let Some(&token) = prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(SamplerError::TokenOutOfRange {
                parameter: "prompt_token_ids",
                token,
                vocab_size: self.vocab_size,
            });
        }
        self.sequences
            .insert(seq_id, SequenceState::new(params, prompt_token_ids));
        Ok(())
    }

    /// Forgets a finished or cancelled sequence.
    pub fn remove_sequence(&mut self, seq_id: SeqId) -> Result<()> {
        self.sequences
            .remove(&seq_id)
            .map(drop)
            .ok_or(SamplerError::UnknownSequence(seq_id))
    }

    /// Number of registered sequences.
    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    /// Whether no sequence is registered.
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Whether `seq_id` is registered.
    pub fn contains(&self, seq_id: SeqId) -> bool {
        self.sequences.contains_key(&seq_id)
    }

    /// One engine step: `logits` is `[seq_ids.len(), width]`, row-major, `width >= vocab_size`;
    /// row `i` belongs to `seq_ids[i]`. Runs the pipeline (see the module docs) on every row,
    /// in parallel when the batch is large, and records the chosen tokens. On error nothing is
    /// recorded and no RNG advances.
    pub fn step(
        &mut self,
        logits: &[f32],
        width: usize,
        seq_ids: &[SeqId],
    ) -> Result<Vec<StepOutput>> {
        let vocab = self.vocab_size;
        if width < vocab {
            return Err(SamplerError::BadLogits(format!(
                "has {width} columns, fewer than the vocabulary size {vocab}"
            )));
        }
        if logits.len() != seq_ids.len() * width {
            return Err(SamplerError::BadLogits(format!(
                "has {} values, expected {} rows x {width} columns",
                logits.len(),
                seq_ids.len()
            )));
        }
        let mut distinct = HashSet::with_capacity(seq_ids.len());
        for &id in seq_ids {
            if !self.sequences.contains_key(&id) {
                return Err(SamplerError::UnknownSequence(id));
            }
            if !distinct.insert(id) {
                return Err(SamplerError::RepeatedInBatch(id));
            }
        }
        let draws: Vec<(f64, Rng)> = seq_ids
            .iter()
            .map(|id| {
                let mut rng = self.sequences[id].rng.clone();
                (rng.next_f64(), rng)
            })
            .collect();
        let sequences = &self.sequences;
        let run = |scratch: &mut Scratch, i: usize| {
            let id = seq_ids[i];
            let row = &logits[i * width..i * width + vocab];
            sample_row(row, id, &sequences[&id], draws[i].0, scratch)
        };
        let run = |i: usize| SCRATCH.with_borrow_mut(|scratch| run(scratch, i));
        let outputs: Vec<StepOutput> =
            if seq_ids.len() > 1 && seq_ids.len() * vocab >= PARALLEL_MIN_ELEMENTS {
                (0..seq_ids.len())
                    .into_par_iter()
                    .map(run)
                    .collect::<Result<_>>()?
            } else {
                (0..seq_ids.len()).map(run).collect::<Result<_>>()?
            };
        for ((id, out), (_, rng)) in seq_ids.iter().zip(&outputs).zip(draws) {
            let seq = self.sequences.get_mut(id).expect("checked above");
            seq.rng = rng;
            seq.record(out.token_id);
        }
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests;
