//! Beam-search bookkeeping: one call per engine step picks, over `num_beams` rows of logits, the
//! beams of the next step, and keeps the finished hypotheses.
//!
//! The semantics are exactly those of transformers' `GenerationMixin._beam_search` (5.x,
//! `generation/utils.py`) for `generate(num_beams=k, num_return_sequences=n, length_penalty=lp,
//! early_stopping=..., do_sample=False, max_new_tokens=m)` on a decoder-only model, batch size 1.
//! The engine owns the model and its KV cache; this module owns the beams' scores and histories.
//!
//! # One step ([`BeamSearch::step`])
//!
//! With `K = max(2, 1 + len(eos_token_ids)) * k` (transformers' `beams_to_keep`) and `t` the
//! number of steps taken so far, for each live beam `b` (row `b` of the logits; only the first
//! `vocab_size` columns are read), all in `f32` as torch computes them:
//!
//! 1. **log-softmax** — `lp = (x - max) - ln(sum(exp(x - max)))` over the row.
//! 2. **logit bias** — `lp += bias` for the listed tokens (transformers' `SequenceBiasLogitsProcessor`
//!    with one-token sequences).
//! 3. **EOS masking** — `eos_token_ids` set to `-inf` while `t < min_tokens`, or always with
//!    `ignore_eos` (transformers' `MinNewTokensLengthLogitsProcessor`).
//! 4. **repetition penalty** — transformers' `RepetitionPenaltyLogitsProcessor` over each
//!    distinct token of the prompt and this beam's generated tokens: `lp * p` if `lp < 0`
//!    else `lp / p` (log-probabilities are `<= 0`, so in practice `lp * p`).
//! 5. **frequency and presence penalties** — OpenAI's, over this beam's generated tokens:
//!    `lp = (lp - count * frequency) - presence` (no transformers equivalent).
//! 6. **beam score** — `s = lp + running_score[b]`; before the first step beam 0 has score 0
//!    and the others `-1e9`, so only beam 0's continuations compete.
//! 7. **top-K** over all `k x vocab_size` scores, best first; ties: lower `b * vocab_size + token`
//!    first (torch's `topk` leaves tie order unspecified).
//! 8. **stopping** — candidate `i` *hits* when its token is an EOS id or `t + 1 == max_new_tokens`
//!    (`EosTokenCriteria`, `MaxLengthCriteria`).
//! 9. **next running beams** — the `k` best of `s + hits * -1e9` (`_get_running_beams_for_next_iteration`).
//! 10. **finished hypotheses** — candidate `i` is *finished* when it hits and `i < k` (only the
//!     top `k` may finish); its score is `s / (t + 1) ** lp` (the generated length, EOS
//!     included; the prompt excluded). Non-finished candidates get `-1e9` added (so do all when
//!     the early-stop rule already holds). The `k` slots keep the best `k` of old slots + new
//!     candidates (`_update_finished_beams`); ties: old slots first, then candidate order.
//! 11. **done?** — the search ends when every candidate hit (the length limit), when
//!     `early_stopping=True` and all `k` slots hold finished hypotheses, or when no running beam
//!     can beat the worst finished one: with every slot finished and
//!     `running_score[0] / L ** lp <= min(slot scores)`, where `L = max_new_tokens` for
//!     `"never"` with `lp > 0`, else `t + 1` (`_check_early_stop_heuristic`; sticky).
//!
//! Per-beam token histories (for the penalties) follow the reordering: a next beam's history is
//! its parent's plus its token.
//!
//! [`BeamSearch::finalize`] returns the `n` best slots (transformers' `sequences_scores`). Called
//! before the search is done (the engine stopping early), it merges the finished hypotheses with
//! the running beams scored as if they ended now (`score / t ** lp`), as transformers' legacy
//! `BeamSearchScorer.finalize` did.
//!
//! # Guided decoding
//!
//! With a [`Guide`], every beam carries its own [`GuideState`] (cloned with its history when
//! beams are reordered, then advanced by the beam's new token). Its mask is applied to the
//! log-probabilities with the other processors (step 5b: every token it does not allow is
//! `-inf`, as transformers' `PrefixConstrainedLogitsProcessor` does), so EOS is a candidate
//! exactly when the beam's text is a complete match; when the guide allows EOS alone, step 3's
//! `min_tokens` rule is skipped (as when sampling). A beam whose guide is finished (a complete
//! match nothing may follow) can only take EOS next.
//!
//! # Stops decided by the caller
//!
//! [`BeamSearch::propose`] returns the top-K candidates of a step; [`BeamSearch::commit`]
//! takes, per candidate, whether something the caller checks (a stop string in the decoded
//! text, transformers' `StopStringCriteria`) ends it, and finishes the step: such a candidate
//! *hits* (step 8) exactly as an EOS does. [`BeamSearch::step`] is both with no extra stops.
//!
//! # Log-probabilities
//!
//! Each beam also keeps, per generated token, the token's raw log-probability (step 1, before
//! any processor, as the sampler reports it) and, when asked, the best `top_logprobs` raw
//! alternatives; finished hypotheses carry them.

mod select;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{Result, SamplerError};
use crate::guide::{Guide, GuideState};
use crate::sampling::row::CHUNK;
use crate::sampling::{SamplingParams, TokenId};

/// Below this many logits per step, rows run on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;
/// The score transformers adds to exclude an entry (`-1.0e9`, exact in `f32`).
const EXCLUDED: f32 = -1.0e9;

/// When the search may stop before `max_new_tokens` (transformers' `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `True`: as soon as `num_beams` finished hypotheses are kept.
    WhenFull,
    /// `False` (transformers' default): when the best running beam, scored at its current
    /// length, cannot beat the worst kept hypothesis.
    Heuristic,
    /// `"never"`: when the best running beam cannot beat the worst kept hypothesis even at
    /// the longest length still reachable (the exact bound for `length_penalty > 0`).
    Never,
}

/// The settings of one beam search; every field's doc gives its range.
#[derive(Debug, Clone)]
pub struct BeamConfig {
    /// Beams kept per step, `>= 1`.
    pub num_beams: usize,
    /// Hypotheses [`BeamSearch::finalize`] returns, in `1..=num_beams`.
    pub num_return: usize,
    /// Exponent of the generated length dividing a finished hypothesis' log-probability; finite.
    pub length_penalty: f64,
    /// When to stop before `max_new_tokens`.
    pub early_stopping: EarlyStopping,
    /// The tokens that finish a hypothesis; may be empty.
    pub eos_token_ids: Vec<TokenId>,
    /// Steps at most, `>= 1`.
    pub max_new_tokens: usize,
    /// Real tokens per row, `>= 1`; logits rows may be wider (padding columns are never read).
    pub vocab_size: usize,
    /// Only its logit bias, penalties, `min_tokens` and `ignore_eos` are used (EOS masking uses
    /// `eos_token_ids` above); temperature, top-k/p/min-p and the seed are ignored.
    pub params: Option<Arc<SamplingParams>>,
    /// The prompt, for the repetition penalty.
    pub prompt_token_ids: Vec<TokenId>,
    /// The constraint every beam follows, if any (its vocabulary must not exceed `vocab_size`).
    pub guide: Option<Guide>,
    /// Raw alternatives kept per generated token (0: none).
    pub top_logprobs: usize,
}

/// A finished (or, from an early [`BeamSearch::finalize`], cut-off) hypothesis.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated tokens only, including the final EOS if it ended with one.
    pub token_ids: Vec<TokenId>,
    /// transformers' `sequences_scores` value: `sum_logprobs / len ** length_penalty`.
    pub score: f32,
    /// The last token is an EOS id.
    pub finished_by_eos: bool,
    /// The raw log-probability of each token of `token_ids`.
    pub logprobs: Vec<f32>,
    /// Per token of `token_ids`, the best `top_logprobs` raw `(token, log-probability)`.
    pub top_logprobs: Vec<Vec<(TokenId, f32)>>,
}

/// One live beam.
#[derive(Debug, Clone)]
struct Beam {
    /// Generated tokens.
    tokens: Vec<TokenId>,
    /// Sum of the processed log-probabilities (transformers' `running_beam_scores`).
    score: f32,
    /// Raw log-probability of each generated token.
    logprobs: Vec<f32>,
    /// The best raw alternatives of each generated token (empty lists without `top_logprobs`).
    top: Vec<Vec<(TokenId, f32)>>,
    /// The beam's position in the guide; `None` unguided, or once the guide refused a token
    /// (a beam that took a `-inf` filler: it can never win, every token is `-inf` for it).
    guide: Option<GuideState>,
}

impl Beam {
    /// A hypothesis of this beam extended by `c`.
    fn extended(
        &self,
        c: &Candidate,
        row_top: &[(TokenId, f32)],
        score: f32,
        eos: bool,
    ) -> Hypothesis {
        let mut token_ids = self.tokens.clone();
        token_ids.push(c.token);
        let mut logprobs = self.logprobs.clone();
        logprobs.push(c.logprob);
        let mut top_logprobs = self.top.clone();
        top_logprobs.push(row_top.to_vec());
        Hypothesis {
            token_ids,
            score,
            finished_by_eos: eos,
            logprobs,
            top_logprobs,
        }
    }
}

/// One of the `num_beams` slots of kept hypotheses (transformers' `sequences`/`beam_scores`/
/// `is_sent_finished`). A slot may hold a non-finished candidate at about `-1e9` when fewer than
/// `num_beams` hypotheses finished; it is never returned.
#[derive(Debug, Clone)]
struct Slot {
    score: f32,
    hyp: Option<Hypothesis>,
}

/// One of the top-K continuations of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    score: f32,
    beam: usize,
    token: TokenId,
    /// The token's raw log-probability in its beam's row.
    logprob: f32,
}

/// A beam's guide mask and whether it allows EOS alone.
type BeamMask = (Vec<u32>, bool);

/// A step between [`BeamSearch::propose`] and [`BeamSearch::commit`].
#[derive(Debug)]
struct Pending {
    cands: Vec<Candidate>,
    /// Per beam, the best raw alternatives of its row.
    tops: Vec<Vec<(TokenId, f32)>>,
}

/// The state of one beam search (batch size 1).
#[derive(Debug)]
pub struct BeamSearch {
    cfg: BeamConfig,
    /// `beams_to_keep`.
    keep: usize,
    /// `eos_token_ids`, sorted and deduplicated.
    eos: Vec<TokenId>,
    /// The row processors' inputs shared by all beams.
    shared: select::Shared,
    beams: Vec<Beam>,
    slots: Vec<Slot>,
    /// transformers' `is_early_stop_heuristic_unsatisfied`.
    may_improve: bool,
    steps: usize,
    done: bool,
    pending: Option<Pending>,
}

fn invalid(parameter: &'static str, message: String) -> SamplerError {
    SamplerError::InvalidParameter { parameter, message }
}

/// `len ** length_penalty` as Python computes `int ** float`, then as the `f32` torch divides by.
fn length_divisor(len: usize, length_penalty: f64) -> f32 {
    (len as f64).powf(length_penalty) as f32
}

/// Best first: higher score, then lower `key` (NaN counts as `-inf`).
fn better(a: (f32, usize), b: (f32, usize)) -> std::cmp::Ordering {
    let na = if a.0.is_nan() { f32::NEG_INFINITY } else { a.0 };
    let nb = if b.0.is_nan() { f32::NEG_INFINITY } else { b.0 };
    nb.total_cmp(&na).then(a.1.cmp(&b.1))
}

impl BeamSearch {
    /// Validates `cfg`; the error names the first bad parameter, its bound and the value.
    pub fn new(cfg: BeamConfig) -> Result<Self> {
        if cfg.num_beams == 0 {
            return Err(invalid(
                "num_beams",
                format!("must be >= 1, got {}", cfg.num_beams),
            ));
        }
        if cfg.num_return == 0 || cfg.num_return > cfg.num_beams {
            return Err(invalid(
                "num_return",
                format!(
                    "must be in [1, num_beams = {}], got {}",
                    cfg.num_beams, cfg.num_return
                ),
            ));
        }
        if !cfg.length_penalty.is_finite() {
            return Err(invalid(
                "length_penalty",
                format!("must be a finite number, got {}", cfg.length_penalty),
            ));
        }
        if cfg.max_new_tokens == 0 {
            return Err(invalid(
                "max_new_tokens",
                format!("must be >= 1, got {}", cfg.max_new_tokens),
            ));
        }
        if cfg.vocab_size == 0 || cfg.vocab_size > TokenId::MAX as usize {
            return Err(invalid(
                "vocab_size",
                format!("must be in [1, 2^32), got {}", cfg.vocab_size),
            ));
        }
        let mut eos = cfg.eos_token_ids.clone();
        eos.sort_unstable();
        eos.dedup();
        let keep = 2.max(1 + cfg.eos_token_ids.len()) * cfg.num_beams;
        if keep > cfg.num_beams * cfg.vocab_size {
            return Err(invalid(
                "vocab_size",
                format!(
                    "must be >= {} (beam search keeps {keep} candidates from {} beams), got {}",
                    keep.div_ceil(cfg.num_beams),
                    cfg.num_beams,
                    cfg.vocab_size
                ),
            ));
        }
        let check = |parameter: &'static str, ids: &[TokenId]| -> Result<()> {
            match ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                Some(&token) => Err(SamplerError::TokenOutOfRange {
                    parameter,
                    token,
                    vocab_size: cfg.vocab_size,
                }),
                None => Ok(()),
            }
        };
        check("eos_token_ids", &eos)?;
        check("prompt_token_ids", &cfg.prompt_token_ids)?;
        if let Some(p) = &cfg.params {
            p.check_vocab(cfg.vocab_size)?;
        }
        if let Some(g) = &cfg.guide {
            if g.vocab_len() > cfg.vocab_size {
                return Err(invalid(
                    "guide",
                    format!(
                        "compiled for {} tokens, more than vocab_size = {}",
                        g.vocab_len(),
                        cfg.vocab_size
                    ),
                ));
            }
        }
        let shared = select::Shared::new(cfg.params.clone(), &cfg.prompt_token_ids);
        let beams = (0..cfg.num_beams)
            .map(|b| Beam {
                tokens: Vec::new(),
                score: if b == 0 { 0.0 } else { EXCLUDED },
                logprobs: Vec::new(),
                top: Vec::new(),
                guide: cfg.guide.as_ref().map(GuideState::new),
            })
            .collect();
        let slots = vec![
            Slot {
                score: EXCLUDED,
                hyp: None
            };
            cfg.num_beams
        ];
        Ok(Self {
            keep,
            eos,
            shared,
            beams,
            slots,
            may_improve: true,
            steps: 0,
            done: false,
            pending: None,
            cfg,
        })
    }

    /// The settings.
    pub fn config(&self) -> &BeamConfig {
        &self.cfg
    }

    /// Steps taken so far (tokens generated per beam).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// No further step can change the result: call [`BeamSearch::finalize`].
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn is_eos(&self, t: TokenId) -> bool {
        self.eos.binary_search(&t).is_ok()
    }

    /// One step over `logits`, `[num_beams, width]` row-major with `width >= vocab_size` (row
    /// `b` = live beam `b`). Returns, for each beam of the next step, `(parent, token)`: the
    /// current beam it extends and the token to feed. [`BeamSearch::propose`] then
    /// [`BeamSearch::commit`] with no extra stops.
    pub fn step(&mut self, logits: &[f32], width: usize) -> Result<Vec<(usize, TokenId)>> {
        self.propose(logits, width)?;
        self.commit(None)
    }

    /// The first half of a step: the top-K candidates `(beam, token)` of `logits`, best first
    /// (see [`BeamSearch::step`] for the layout). [`BeamSearch::commit`] must follow.
    pub fn propose(&mut self, logits: &[f32], width: usize) -> Result<Vec<(usize, TokenId)>> {
        let k = self.cfg.num_beams;
        let v = self.cfg.vocab_size;
        if self.done {
            return Err(invalid(
                "step",
                "called after the search is done (is_done() is true)".to_string(),
            ));
        }
        if width < v || logits.len() != k * width {
            return Err(SamplerError::BadLogits(format!(
                "must be [num_beams = {k}, width >= vocab_size = {v}], got {} values with width {width}",
                logits.len()
            )));
        }
        let pending = self.top_candidates(logits, width)?;
        let out = pending.cands.iter().map(|c| (c.beam, c.token)).collect();
        self.pending = Some(pending);
        Ok(out)
    }

    /// The second half of a step: `stops[i]` says whether the caller ends candidate `i` of
    /// [`BeamSearch::propose`] (a stop string), which then hits like an EOS. Returns the next
    /// beams as [`BeamSearch::step`] does.
    pub fn commit(&mut self, stops: Option<&[bool]>) -> Result<Vec<(usize, TokenId)>> {
        let k = self.cfg.num_beams;
        let Some(Pending { cands, tops }) = self.pending.take() else {
            return Err(invalid(
                "commit",
                "called without a proposed step (call propose() first)".to_string(),
            ));
        };
        if let Some(stops) = stops {
            if stops.len() != cands.len() {
                let n = cands.len();
                self.pending = Some(Pending { cands, tops });
                return Err(invalid(
                    "stops",
                    format!(
                        "must hold one flag per candidate ({n}), got {}",
                        stops.len()
                    ),
                ));
            }
        }
        let t = self.steps;
        let at_limit = t + 1 >= self.cfg.max_new_tokens;
        let hits: Vec<bool> = cands
            .iter()
            .enumerate()
            .map(|(i, c)| at_limit || self.is_eos(c.token) || stops.is_some_and(|s| s[i]))
            .collect();

        // Next running beams: the best `k` of `s + hits * -1e9`.
        let mut order: Vec<(f32, usize)> = cands
            .iter()
            .zip(&hits)
            .enumerate()
            .map(|(i, (c, &h))| (c.score + if h { EXCLUDED } else { -0.0 }, i))
            .collect();
        order.sort_by(|&a, &b| better(a, b));
        order.truncate(k);

        // Finished hypotheses: merge the old slots with this step's candidates.
        let div = length_divisor(t + 1, self.cfg.length_penalty);
        let full = self.cfg.early_stopping == EarlyStopping::WhenFull
            && self.slots.iter().all(|s| s.hyp.is_some());
        let mut merged: Vec<(f32, usize)> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.score, i))
            .collect();
        for (i, (c, &h)) in cands.iter().zip(&hits).enumerate() {
            let mut s = c.score / div;
            s += if full { EXCLUDED } else { -0.0 };
            s += if self.may_improve { -0.0 } else { EXCLUDED };
            s += if h && i < k { -0.0 } else { EXCLUDED };
            merged.push((s, k + i));
        }
        merged.sort_by(|&a, &b| better(a, b));
        let slots: Vec<Slot> = merged[..k]
            .iter()
            .map(|&(score, j)| {
                if j < k {
                    return self.slots[j].clone();
                }
                let i = j - k;
                let c = &cands[i];
                let hyp = (hits[i] && i < k).then(|| {
                    self.beams[c.beam].extended(c, &tops[c.beam], score, self.is_eos(c.token))
                });
                Slot { score, hyp }
            })
            .collect();
        self.slots = slots;

        let next: Vec<(usize, TokenId)> = order
            .iter()
            .map(|&(_, i)| (cands[i].beam, cands[i].token))
            .collect();
        self.beams = order
            .iter()
            .map(|&(score, i)| {
                let c = &cands[i];
                let parent = &self.beams[c.beam];
                let mut tokens = Vec::with_capacity(t + 1);
                tokens.extend_from_slice(&parent.tokens);
                tokens.push(c.token);
                let mut logprobs = Vec::with_capacity(t + 1);
                logprobs.extend_from_slice(&parent.logprobs);
                logprobs.push(c.logprob);
                let mut top = parent.top.clone();
                top.push(tops[c.beam].clone());
                let guide = parent
                    .guide
                    .clone()
                    .and_then(|mut g| g.advance(c.token).then_some(g));
                Beam {
                    tokens,
                    score,
                    logprobs,
                    top,
                    guide,
                }
            })
            .collect();
        self.steps = t + 1;

        // The stopping rule, as transformers evaluates it after the step.
        let best_len =
            if self.cfg.early_stopping == EarlyStopping::Never && self.cfg.length_penalty > 0.0 {
                self.cfg.max_new_tokens
            } else {
                self.steps
            };
        let best_possible = self.beams[0].score / length_divisor(best_len, self.cfg.length_penalty);
        let worst = self
            .slots
            .iter()
            .map(|s| s.score)
            .fold(f32::INFINITY, f32::min);
        self.may_improve &= self.slots.iter().any(|s| {
            let w = if s.hyp.is_some() { worst } else { EXCLUDED };
            best_possible > w
        });
        let all_finished = self.slots.iter().all(|s| s.hyp.is_some());
        let open = !(all_finished && self.cfg.early_stopping == EarlyStopping::WhenFull);
        let continues = !hits.iter().all(|&h| h);
        self.done = !(self.may_improve && open && continues);
        Ok(next)
    }

    /// Each beam's guide mask and whether it allows EOS alone (`None` unguided); a beam whose
    /// guide refused its last token gets an all-clear mask.
    fn masks(&mut self) -> Result<Vec<Option<BeamMask>>> {
        let Some(guide) = self.cfg.guide.clone() else {
            return Ok(vec![None; self.beams.len()]);
        };
        let words = 2 * self.cfg.vocab_size.div_ceil(CHUNK);
        let fill = |(b, beam): (usize, &mut Beam)| -> Result<Option<BeamMask>> {
            let mut mask = vec![0u32; words];
            if let Some(state) = &mut beam.guide {
                state
                    .fill_mask(&mut mask)
                    .map_err(|e| SamplerError::Guide {
                        seq_id: b as u64,
                        message: format!("computing beam {b}'s token mask: {e}"),
                    })?;
            }
            let only_eos = guide.allows_only_eos(&mask);
            Ok(Some((mask, only_eos)))
        };
        if self.steps == 0 {
            // Every beam starts at the guide's start: one mask serves all.
            let first = fill((0, &mut self.beams[0]))?;
            return Ok(vec![first; self.beams.len()]);
        }
        self.beams.par_iter_mut().enumerate().map(fill).collect()
    }

    /// The top `K` continuations over all beams, best first, with each beam's raw alternatives.
    fn top_candidates(&mut self, logits: &[f32], width: usize) -> Result<Pending> {
        let v = self.cfg.vocab_size;
        let keep = self.keep;
        let masks = self.masks()?;
        let row = |b: usize| -> select::RowTop {
            let beam = &self.beams[b];
            let mask = masks[b].as_ref().map(|(bits, only_eos)| select::RowMask {
                bits,
                only_eos: *only_eos,
            });
            select::row_top(&select::RowInput {
                raw: &logits[b * width..b * width + v],
                shared: &self.shared,
                generated: &beam.tokens,
                eos: &self.eos,
                running: beam.score,
                keep,
                mask,
                top_n: self.cfg.top_logprobs,
            })
        };
        let rows: Vec<select::RowTop> = if self.cfg.num_beams * v >= PARALLEL_MIN_ELEMENTS {
            (0..self.cfg.num_beams).into_par_iter().map(row).collect()
        } else {
            (0..self.cfg.num_beams).map(row).collect()
        };
        let mut all: Vec<(f32, usize)> = rows
            .iter()
            .enumerate()
            .flat_map(|(b, r)| r.cands.iter().map(move |&(s, t)| (s, b * v + t as usize)))
            .collect();
        all.sort_by(|&a, &b| better(a, b));
        all.truncate(keep);
        let cands = all
            .into_iter()
            .map(|(score, flat)| {
                let (beam, token) = (flat / v, flat % v);
                Candidate {
                    score,
                    beam,
                    token: token as TokenId,
                    logprob: rows[beam].lse.logprob(logits[beam * width + token]),
                }
            })
            .collect();
        let tops = rows.into_iter().map(|r| r.top).collect();
        Ok(Pending { cands, tops })
    }

    /// The `num_return` best hypotheses, best first. When the search is not done (the engine
    /// stops early), the running beams compete too, scored as if they ended now. Before any
    /// step there is nothing to return: an error.
    pub fn finalize(&self) -> Result<Vec<Hypothesis>> {
        if self.steps == 0 {
            return Err(invalid(
                "finalize",
                "called before the first step: there is no hypothesis yet".to_string(),
            ));
        }
        let n = self.cfg.num_return;
        let mut hyps: Vec<Hypothesis> = self.slots.iter().filter_map(|s| s.hyp.clone()).collect();
        if self.done && hyps.len() >= n {
            hyps.truncate(n);
            return Ok(hyps);
        }
        let div = length_divisor(self.steps, self.cfg.length_penalty);
        hyps.extend(
            self.beams
                .iter()
                .filter(|b| b.score > EXCLUDED / 2.0)
                .map(|b| Hypothesis {
                    token_ids: b.tokens.clone(),
                    score: b.score / div,
                    finished_by_eos: false,
                    logprobs: b.logprobs.clone(),
                    top_logprobs: b.top.clone(),
                }),
        );
        let mut order: Vec<(f32, usize)> =
            hyps.iter().enumerate().map(|(i, h)| (h.score, i)).collect();
        order.sort_by(|&a, &b| better(a, b));
        Ok(order
            .iter()
            .take(n)
            .map(|&(_, i)| hyps[i].clone())
            .collect())
    }
}
