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
//! 3. **guided-decoding mask** — for a sequence added with a [`Guide`]: its [`GuideState`] fills
//!    the allowed-token bitmask (into per-thread scratch) and every token it does not allow
//!    becomes `-inf`, in one pass ([`row::RowView::apply_mask`]). Tokens at or past the
//!    guide vocabulary's length are never allowed. EOS (the guide vocabulary's EOS ids) is
//!    allowed exactly when the guide accepts.
//! 4. **EOS masking** — `eos_token_ids` set to `-inf` while fewer than `min_tokens` tokens were
//!    generated, or always with `ignore_eos`. Skipped for a guided row whose mask allows EOS
//!    and nothing else (the constraint is complete: it wins, or no token would be left).
//! 5. **repetition penalty** — transformers' `RepetitionPenaltyLogitsProcessor` over each distinct
//!    token of prompt + generated: `x * p` if `x < 0` else `x / p`.
//! 6. **frequency and presence penalties** — OpenAI's, over generated tokens only:
//!    `x -= count * frequency + (count > 0) * presence`.
//! 7. **greedy shortcut** — with `temperature == 0`, the argmax (ties: lowest id) and stop; a
//!    guided row whose allowed tokens are all `-inf` or NaN is an error, as when sampling.
//! 8. **temperature** — `s = x / temperature` (applied lazily, to the tokens the filters read).
//! 9. **top-k** — transformers' `TopKLogitsWarper`: keep `s >= ` the k-th largest (ties kept).
//! 10. **top-p** — transformers' `TopPLogitsWarper`: keep the shortest best-first prefix whose
//!     mass reaches `top_p` (at least one token).
//! 11. **min-p** — transformers' `MinPLogitsWarper`: drop tokens whose probability is below
//!     `min_p` times the top probability.
//! 12. **sample** — from the softmax of what remains, with the sequence's own seeded RNG (one
//!     draw per step, greedy or not), so a sequence's tokens depend only on its seed and its rows.
//!
//! Then the chosen token is recorded in the sequence's state (penalty counts, generated length),
//! and a guided sequence's [`GuideState`] advances by it; [`StepOutput::guide_finished`] tells
//! whether the guide is then finished (complete with nothing allowed to follow, or EOS chosen).
//! Stages 9–12 on a guided row therefore see only the allowed tokens (top-k of the allowed, and
//! so on), and logprobs stay those of the raw row (stage 1), as for unguided rows.
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
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;

pub use params::{SamplingConfig, SamplingParams, MAX_TOP_LOGPROBS, MIN_TEMPERATURE};
pub use rng::Rng;

use crate::error::{Result, SamplerError};
use crate::guide::{Guide, GuideState};
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
    /// The row is guided and, after advancing by the chosen token, its guide is finished (the
    /// text is complete and nothing may follow), or the chosen token is EOS. `false` for an
    /// unguided row.
    pub guide_finished: bool,
}

/// The state one sequence carries between steps.
#[derive(Debug)]
pub struct SequenceState {
    params: Arc<SamplingParams>,
    /// Distinct tokens of prompt + generated; kept only when the repetition penalty is on.
    seen: HashSet<TokenId>,
    /// How often each token was generated.
    counts: HashMap<TokenId, u32>,
    generated: usize,
    rng: Rng,
    /// The sequence's position in its guide. The lock is never contended (a step touches a
    /// row's state from one thread at a time; rows are distinct sequences); it only lets rows
    /// run in parallel over a shared map.
    guide: Option<Mutex<GuideState>>,
}

/// Locks a guide state; a poisoned lock (a panic in an earlier step) is taken over as is.
fn lock(g: &Mutex<GuideState>) -> MutexGuard<'_, GuideState> {
    g.lock().unwrap_or_else(|p| p.into_inner())
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
            guide: None,
        }
    }

    /// A fresh sequence constrained by `guide` (its own [`GuideState`], at the guide's start).
    pub fn with_guide(
        params: Arc<SamplingParams>,
        prompt_token_ids: &[TokenId],
        guide: &Guide,
    ) -> Self {
        Self {
            guide: Some(Mutex::new(GuideState::new(guide))),
            ..Self::new(params, prompt_token_ids)
        }
    }

    /// Whether the sequence is guided.
    pub fn is_guided(&self) -> bool {
        self.guide.is_some()
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

    /// Stages 2–6: bias, guide mask (`mask`, filled by the sequence's guide), EOS mask,
    /// penalties.
    fn apply_edits(&self, view: &mut RowView<'_>, mask: Option<&[u32]>) {
        let p = &*self.params;
        let mut edits = p.logit_bias().len();
        let masks_eos = p.masks_eos(self.generated)
            && !matches!((mask, &self.guide), (Some(m), Some(g)) if lock(g).guide().allows_only_eos(m));
        if masks_eos {
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
        if let Some(mask) = mask {
            view.apply_mask(mask);
        }
        if masks_eos {
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
    /// A guided row's allowed-token bitmask, `2 * chunks` words.
    mask: Vec<u32>,
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
        mask,
    } = scratch;
    let mask = match &seq.guide {
        None => None,
        Some(g) => {
            // Two words per chunk; the guide clears every word past its vocabulary.
            mask.resize(2 * raw.len().div_ceil(row::CHUNK), 0);
            lock(g).fill_mask(mask).map_err(|e| SamplerError::Guide {
                seq_id,
                message: format!("computing the token mask: {e}"),
            })?;
            Some(&mask[..])
        }
    };
    let (mut view, lse): (RowView<'_>, LogSumExp) = RowView::new(raw, row, &mut top);
    seq.apply_edits(&mut view, mask);
    let token = if p.is_greedy() {
        let m = view.max();
        if mask.is_some() && (m == f32::NEG_INFINITY || m.is_nan()) {
            return Err(SamplerError::NoCandidates(seq_id));
        }
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
        guide_finished: false,
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
        ..
    } = &mut Scratch::default();
    let (mut view, _) = RowView::new(raw, row, &mut top);
    seq.apply_edits(&mut view, None);
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
    /// How many registered sequences are guided (a step skips the guide pass when none is).
    guided: usize,
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
            guided: 0,
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
        self.add_guided_sequence(seq_id, params, prompt_token_ids, None)
    }

    /// Registers a sequence before its first step, constrained by `guide` when given: the
    /// sampler creates and owns the sequence's [`GuideState`]. The guide's vocabulary may be
    /// shorter than `vocab_size` (tokens past it are never allowed), not longer.
    pub fn add_guided_sequence(
        &mut self,
        seq_id: SeqId,
        params: Arc<SamplingParams>,
        prompt_token_ids: &[TokenId],
        guide: Option<&Guide>,
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
        let seq = match guide {
            None => SequenceState::new(params, prompt_token_ids),
            Some(g) => {
                if g.vocab_len() > self.vocab_size {
                    return Err(SamplerError::InvalidParameter {
                        parameter: "guide",
                        message: format!(
                            "was compiled for a vocabulary of {} tokens, more than the \
                             sampler's vocab_size {}",
                            g.vocab_len(),
                            self.vocab_size
                        ),
                    });
                }
                self.guided += 1;
                SequenceState::with_guide(params, prompt_token_ids, g)
            }
        };
        self.sequences.insert(seq_id, seq);
        Ok(())
    }

    /// Forgets a finished or cancelled sequence.
    pub fn remove_sequence(&mut self, seq_id: SeqId) -> Result<()> {
        let seq = self
            .sequences
            .remove(&seq_id)
            .ok_or(SamplerError::UnknownSequence(seq_id))?;
        self.guided -= usize::from(seq.is_guided());
        Ok(())
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
    /// in parallel when the batch is large, records the chosen tokens and advances the guided
    /// rows' guides. On an error of the pipeline nothing is recorded, no RNG and no guide
    /// advances. A guide that fails to advance by a token its own mask allowed (a bug,
    /// [`SamplerError::Guide`]) fails the step after every row was recorded.
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
        let mut outputs: Vec<StepOutput> =
            if seq_ids.len() > 1 && seq_ids.len() * vocab >= PARALLEL_MIN_ELEMENTS {
                (0..seq_ids.len())
                    .into_par_iter()
                    .map(run)
                    .collect::<Result<_>>()?
            } else {
                (0..seq_ids.len()).map(run).collect::<Result<_>>()?
            };
        let advanced = if self.guided > 0 {
            self.advance_guides(seq_ids, &mut outputs)
        } else {
            Ok(())
        };
        for ((id, out), (_, rng)) in seq_ids.iter().zip(&outputs).zip(draws) {
            let seq = self.sequences.get_mut(id).expect("checked above");
            seq.rng = rng;
            seq.record(out.token_id);
        }
        advanced.map(|()| outputs)
    }

    /// Advances each guided row's guide by its chosen token and sets `guide_finished`; rows
    /// run in parallel when more than one is guided. The first failure is returned, after
    /// every other row advanced.
    fn advance_guides(&self, seq_ids: &[SeqId], outputs: &mut [StepOutput]) -> Result<()> {
        let sequences = &self.sequences;
        let advance = |(&id, out): (&SeqId, &mut StepOutput)| -> Result<()> {
            let seq = &sequences[&id];
            let Some(g) = &seq.guide else {
                return Ok(());
            };
            let mut g = lock(g);
            let token = out.token_id;
            if !g.advance(token) {
                return Err(SamplerError::Guide {
                    seq_id: id,
                    message: format!("the guide refused token {token}, which its mask allowed"),
                });
            }
            out.guide_finished = g.is_finished() || seq.params.eos_token_ids().any(|e| e == token);
            Ok(())
        };
        let in_batch = seq_ids
            .iter()
            .filter(|id| sequences[id].is_guided())
            .take(2)
            .count();
        let results: Vec<Result<()>> = if in_batch > 1 {
            seq_ids.par_iter().zip(outputs).map(advance).collect()
        } else {
            seq_ids.iter().zip(outputs).map(advance).collect()
        };
        results.into_iter().collect()
    }
}

#[cfg(test)]
mod guided_tests;
#[cfg(test)]
mod tests;
