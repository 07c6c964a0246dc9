//! One beam's row: log-softmax, the processors (steps 1–6 of [`super`]), and its best `K`
//! continuations, reading the row once plus the few chunks that can hold them.
//!
//! Processed scores are computed only for the tokens a processor touches ("edited" tokens) and
//! for the best unedited ones: every other token's score is `(x - max) - ln_sum + running`,
//! monotone in its raw logit `x`, so the best unedited tokens are the best raw values once the
//! edited ones are masked out of the row view.

use std::cell::RefCell;
use std::sync::Arc;

use crate::sampling::row::{kth_largest, LogSumExp, RowBuffers, RowView, TopN, CHUNK};
use crate::sampling::{SamplingParams, TokenId};

/// What the processors need besides a beam's own history, shared by all beams.
#[derive(Debug)]
pub(super) struct Shared {
    params: Option<Arc<SamplingParams>>,
    /// Distinct prompt tokens, sorted; kept only when the repetition penalty is on.
    prompt: Vec<TokenId>,
}

impl Shared {
    pub(super) fn new(params: Option<Arc<SamplingParams>>, prompt_token_ids: &[TokenId]) -> Self {
        let mut prompt = Vec::new();
        if params
            .as_ref()
            .is_some_and(|p| p.repetition_penalty().is_some())
        {
            prompt = prompt_token_ids.to_vec();
            prompt.sort_unstable();
            prompt.dedup();
        }
        Self { params, prompt }
    }
}

/// Reusable per-thread buffers.
#[derive(Debug, Default)]
struct Scratch {
    row: RowBuffers,
    floats: Vec<f32>,
    /// Edited tokens, sorted, with their processed log-probabilities.
    edited: Vec<(TokenId, f32)>,
    ids: Vec<TokenId>,
    generated: Vec<TokenId>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

fn contains(sorted: &[TokenId], t: TokenId) -> bool {
    sorted.binary_search(&t).is_ok()
}

/// What one beam's row yields for a step.
#[derive(Debug)]
pub(super) struct RowTop {
    /// The best `keep` continuations, `(score, token)` best first (ties: lower token), with
    /// `score = processed log-probability + running`.
    pub cands: Vec<(f32, TokenId)>,
    /// The raw row's log-sum-exp (for the raw log-probability of any token).
    pub lse: LogSumExp,
    /// The best `top_n` raw tokens with their raw log-probabilities, best first.
    pub top: Vec<(TokenId, f32)>,
}

/// How a guide constrains one beam's row.
#[derive(Debug, Clone, Copy)]
pub(super) struct RowMask<'a> {
    /// The allowed-token bitmask (bit `t % 32` of word `t / 32`), `2 * chunks` words.
    pub bits: &'a [u32],
    /// The mask allows an EOS id and nothing else: the `min_tokens` EOS rule is then skipped
    /// (as when sampling), or nothing would be allowed.
    pub only_eos: bool,
}

fn allowed(mask: Option<RowMask<'_>>, t: TokenId) -> bool {
    mask.is_none_or(|m| m.bits[t as usize / 32] >> (t % 32) & 1 == 1)
}

/// One beam's row and what its processors need.
#[derive(Debug, Clone, Copy)]
pub(super) struct RowInput<'a> {
    /// The row's first `vocab_size` logits.
    pub raw: &'a [f32],
    pub shared: &'a Shared,
    /// The beam's generated tokens.
    pub generated: &'a [TokenId],
    /// EOS ids, sorted.
    pub eos: &'a [TokenId],
    /// The beam's running score.
    pub running: f32,
    /// Continuations to return.
    pub keep: usize,
    /// The beam's guide mask, if guided.
    pub mask: Option<RowMask<'a>>,
    /// Raw alternatives to return.
    pub top_n: usize,
}

/// The best continuations of one beam (see [`RowTop`]).
pub(super) fn row_top(input: &RowInput<'_>) -> RowTop {
    SCRATCH.with_borrow_mut(|s| row_top_in(input, s))
}

fn row_top_in(input: &RowInput<'_>, s: &mut Scratch) -> RowTop {
    let &RowInput {
        raw,
        shared,
        generated,
        eos,
        running,
        keep,
        mask,
        top_n,
    } = input;
    let Scratch {
        row,
        floats,
        edited,
        ids,
        generated: gen_sorted,
    } = s;
    let mut top = TopN::new(top_n);
    let (mut view, lse) = RowView::new(raw, row, &mut top);
    // torch's CPU log_softmax: `(x - max) - log(sum)`, in f32.
    let ln_sum = lse.ln_sum as f32;
    let logprob = |x: f32| (x - lse.max) - ln_sum;

    // Steps 2–5 on the edited tokens only.
    edited.clear();
    if let Some(p) = shared.params.as_deref() {
        let bias = p.logit_bias();
        let masks_eos = !eos.is_empty()
            && !mask.is_some_and(|m| m.only_eos)
            && (p.config().ignore_eos || (generated.len() as i64) < p.config().min_tokens);
        let rep = p.repetition_penalty();
        let fp = p.frequency_presence();
        gen_sorted.clear();
        if rep.is_some() || fp.is_some() {
            gen_sorted.extend_from_slice(generated);
            gen_sorted.sort_unstable();
        }
        ids.clear();
        ids.extend(bias.iter().map(|&(t, _)| t));
        if masks_eos {
            ids.extend_from_slice(eos);
        }
        if rep.is_some() {
            ids.extend_from_slice(&shared.prompt);
        }
        if rep.is_some() || fp.is_some() {
            ids.extend_from_slice(gen_sorted);
        }
        ids.sort_unstable();
        ids.dedup();
        for &t in ids.iter() {
            let mut v = logprob(raw[t as usize]);
            if let Ok(i) = bias.binary_search_by_key(&t, |&(b, _)| b) {
                v += bias[i].1;
            }
            if masks_eos && contains(eos, t) {
                v = f32::NEG_INFINITY;
            }
            if let Some(pen) = rep {
                if contains(&shared.prompt, t) || contains(gen_sorted, t) {
                    v = if v < 0.0 { v * pen } else { v / pen };
                }
            }
            if let Some((f, pr)) = fp {
                let lo = gen_sorted.partition_point(|&g| g < t);
                let n = gen_sorted[lo..].partition_point(|&g| g == t);
                if n > 0 {
                    v = v - n as f32 * f - pr;
                }
            }
            if !allowed(mask, t) {
                v = f32::NEG_INFINITY;
            }
            edited.push((t, v));
        }
        if edited.len() > view.n_chunks() {
            view.patch_all();
        }
        for &(t, _) in edited.iter() {
            view.set(t, f32::NEG_INFINITY);
        }
    }
    // The guide's mask (after log-softmax, as transformers' `PrefixConstrainedLogitsProcessor`
    // adds `-inf` to the log-probabilities): every token it does not allow is `-inf`.
    if let Some(m) = mask {
        view.apply_mask(m.bits);
    }
    view.finish_edits();

    // The best unedited tokens: every token at or above the `keep`-th largest chunk maximum
    // (`keep` chunks reach it, so at least `keep` tokens do). With fewer than `keep` chunks
    // holding a finite value (a guide allowing few tokens), every finite token of the row, and
    // the first `keep` `-inf` ones by id as fillers (transformers' top-K takes `-inf` entries
    // when nothing better is left; they never win).
    let thr = kth_largest(view.chunk_maxima(), keep, floats);
    let mut out: Vec<(f32, TokenId)> = Vec::with_capacity(2 * keep + edited.len());
    let mut fillers = 0;
    for c in 0..view.n_chunks() {
        let cmax = view.chunk_max(c);
        if thr > f32::NEG_INFINITY && cmax < thr {
            continue;
        }
        if cmax == f32::NEG_INFINITY && fillers >= keep {
            continue;
        }
        let base = c * CHUNK;
        for (j, &x) in view.chunk(c).iter().enumerate() {
            let t = (base + j) as TokenId;
            if x == f32::NEG_INFINITY {
                if thr > f32::NEG_INFINITY
                    || fillers >= keep
                    || edited.binary_search_by_key(&t, |&(e, _)| e).is_ok()
                {
                    continue;
                }
                fillers += 1;
                out.push((f32::NEG_INFINITY, t));
            } else if x >= thr || thr == f32::NEG_INFINITY {
                out.push((logprob(x) + running, t));
            }
        }
    }
    out.extend(edited.iter().map(|&(t, v)| (v + running, t)));
    out.sort_unstable_by(|a, b| {
        let na = if a.0.is_nan() { f32::NEG_INFINITY } else { a.0 };
        let nb = if b.0.is_nan() { f32::NEG_INFINITY } else { b.0 };
        nb.total_cmp(&na).then(a.1.cmp(&b.1))
    });
    out.truncate(keep);
    let top = top
        .items()
        .iter()
        .map(|&(t, x)| (t, lse.logprob(x)))
        .collect();
    RowTop {
        cands: out,
        lse,
        top,
    }
}
