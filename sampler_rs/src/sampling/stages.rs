//! The pipeline's stages, one small function each; [`super`] runs them in order.
//!
//! Edit stages change a few tokens of a [`RowView`] in place. Filter stages produce or shrink a
//! list of [`Candidate`]s: the tokens still allowed, with their temperature-scaled scores. The
//! semantics of each filter follow the transformers warper it is named after, ties and `-inf`
//! included (`src/transformers/generation/logits_process.py`).

use std::cmp::Ordering;

use super::kernels::{exp_nonpos, exp_weights};
use super::row::{kth_largest, RowView, CHUNK};
use super::TokenId;

/// A token that survived the filters so far, with its scaled score `logit / temperature`.
pub type Candidate = (TokenId, f32);

/// Logit bias: `x += bias`.
pub fn apply_logit_bias(view: &mut RowView<'_>, bias: &[(TokenId, f32)]) {
    for &(t, b) in bias {
        view.set(t, view.get(t) + b);
    }
}

/// Masks `tokens` (EOS while `min_tokens` is not reached, or always with `ignore_eos`): `x = -inf`.
pub fn mask_tokens(view: &mut RowView<'_>, tokens: impl Iterator<Item = TokenId>) {
    for t in tokens {
        view.set(t, f32::NEG_INFINITY);
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor` over each distinct token `seen` (prompt and
/// generated): `x * p` when `x < 0`, else `x / p`.
pub fn apply_repetition_penalty(
    view: &mut RowView<'_>,
    seen: impl Iterator<Item = TokenId>,
    penalty: f32,
) {
    for t in seen {
        let x = view.get(t);
        view.set(t, if x < 0.0 { x * penalty } else { x / penalty });
    }
}

/// OpenAI frequency and presence penalties over the generated tokens' counts:
/// `x -= count * frequency; x -= presence` (two float32 steps, as vLLM computes them).
pub fn apply_frequency_presence(
    view: &mut RowView<'_>,
    counts: impl Iterator<Item = (TokenId, u32)>,
    frequency: f32,
    presence: f32,
) {
    for (t, n) in counts {
        if n > 0 {
            view.set(t, view.get(t) - n as f32 * frequency - presence);
        }
    }
}

/// Greedy decoding: the first token holding the maximum (torch.argmax's tie-break), NaN ignored.
pub fn argmax(view: &RowView<'_>) -> TokenId {
    let m = view.max();
    (0..view.n_chunks())
        .filter(|&c| view.chunk_max(c) == m)
        .find_map(|c| {
            let pos = view.chunk(c).iter().position(|&x| x == m)?;
            Some((c * CHUNK + pos) as TokenId)
        })
        .unwrap_or(0)
}

/// Descending by score; among equal scores the higher token id first, which is the order
/// `torch.sort` (stable, ascending) visits them backwards.
fn by_score_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.1.total_cmp(&a.1).then(b.0.cmp(&a.0))
}

/// transformers' `TopKLogitsWarper`: keeps every token whose scaled score is `>=` the k-th
/// largest (ties with the k-th are kept). Needs `k < view.len()`.
///
/// The k largest entries lie in the chunks whose maxima reach the k-th largest chunk maximum,
/// so only those chunks are read.
pub fn top_k(
    view: &RowView<'_>,
    t: f32,
    k: usize,
    out: &mut Vec<Candidate>,
    scratch: &mut Vec<f32>,
) {
    out.clear();
    let n_chunks = view.n_chunks();
    let mut thr = f32::NEG_INFINITY;
    if k < n_chunks {
        thr = kth_largest(view.chunk_maxima(), k, scratch) / t;
    }
    gather(view, t, thr, out);
    if out.len() > k {
        let (_, kth, _) = out.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        let kth = kth.1;
        out.retain(|&(_, s)| s >= kth);
    }
}

/// The maximum of the candidates' scores, and their softmax weights `exp(s - max)` into `w`.
fn softmax_weights(cands: &[Candidate], w: &mut Vec<f32>) -> f32 {
    let m = cands
        .iter()
        .fold(f32::NEG_INFINITY, |m, &(_, s)| if s > m { s } else { m });
    exp_weights(cands, m, w);
    m
}

fn total(w: &[f32]) -> f64 {
    w.iter().map(|&x| f64::from(x)).sum()
}

/// transformers' `TopPLogitsWarper` on a candidate list: keeps the shortest best-first prefix
/// whose probability mass reaches `top_p` (at least one token). `norm` is the softmax's
/// `(max, sum)` over the whole row when the candidates are only its best part.
///
/// The prefix is found by quickselect on its length (expected linear time), so only the last
/// few candidates around the boundary are ever sorted. The kept candidates end up first, in an
/// unspecified but deterministic order.
pub fn top_p(cands: &mut Vec<Candidate>, top_p: f64, norm: Option<(f32, f64)>, w: &mut Vec<f32>) {
    let (m, z) = match norm {
        Some(n) => n,
        None => {
            let m = softmax_weights(cands, w);
            (m, total(w))
        }
    };
    if z.is_nan() || z <= 0.0 || m == f32::NEG_INFINITY {
        return;
    }
    // A token is dropped when the mass strictly above it already reaches top_p: transformers'
    // `cumsum(ascending) <= 1 - top_p`, read from the top. So the kept prefix has the smallest
    // length `len >= 1` whose mass reaches `top_p * z`.
    let target = top_p * z;
    // Invariant: cands[..lo] are the `lo` best, of mass `mass_lo < target` (or lo == 0), and
    // the answer lies in (lo, hi].
    let (mut lo, mut hi, mut mass_lo) = (0, cands.len(), 0f64);
    while hi - lo > 32 {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable_by(mid - lo, by_score_desc);
        exp_weights(&cands[lo..mid], m, w);
        let mass_mid = mass_lo + total(w);
        if mass_mid >= target {
            hi = mid;
        } else {
            (lo, mass_lo) = (mid, mass_mid);
        }
    }
    cands[lo..hi].sort_unstable_by(by_score_desc);
    exp_weights(&cands[lo..hi], m, w);
    let mut above = mass_lo;
    for (i, &wi) in (lo..hi).zip(w.iter()) {
        if i > 0 && above >= target {
            cands.truncate(i);
            return;
        }
        above += f64::from(wi);
    }
    cands.truncate(hi);
}

/// [`top_p`] straight from the row, without a top-k before it: gathers the tokens in bands
/// below the maximum (`[m - 4, m]`, then bands twice as wide each time) until they hold
/// `top_p` of the mass, then runs [`top_p`] on them. A peaked row is done after one band; a
/// flat one ends up gathering the whole row.
pub fn top_p_dense(
    view: &RowView<'_>,
    t: f32,
    p: f64,
    out: &mut Vec<Candidate>,
    sums: &mut Vec<f32>,
    w: &mut Vec<f32>,
) {
    let m = view.max() / t;
    out.clear();
    if m == f32::NEG_INFINITY || m.is_nan() {
        return;
    }
    view.chunk_exp_sums(t, m, sums);
    let z: f64 = sums.iter().map(|&s| f64::from(s)).sum();
    let target = p * z;
    let (mut hi, mut width, mut mass) = (f32::INFINITY, 4f32, 0f64);
    while mass < target && hi > f32::NEG_INFINITY {
        let lo = if width > 128.0 {
            f32::NEG_INFINITY
        } else {
            m - width
        };
        let start = out.len();
        gather_band(view, t, lo, hi, out);
        exp_weights(&out[start..], m, w);
        mass += total(w);
        (hi, width) = (lo, width * 2.0);
    }
    top_p(out, p, Some((m, z)), w);
}

/// Appends every token whose scaled score `s = x / t` is `>= lo`, in token order, when few are
/// expected to pass (top-k, min-p): chunks whose max falls short are skipped, and inside a chunk
/// a cheap test on the unscaled value (`x >= lo * t`, with a margin for rounding) comes first.
fn gather(view: &RowView<'_>, t: f32, lo: f32, out: &mut Vec<Candidate>) {
    let pre = lo * t;
    let pre = pre - pre.abs() * 1e-5 - f32::MIN_POSITIVE;
    // A chunk whose scaled max is -inf (all masked by a guide, say) has nothing of weight to
    // offer even when `lo` is -inf: the chunk test skips it (its tokens would be kept at -inf).
    let chunk_lo = if lo == f32::NEG_INFINITY {
        f32::MIN
    } else {
        lo
    };
    for c in 0..view.n_chunks() {
        if view.chunk_max(c) / t < chunk_lo {
            continue;
        }
        let base = c * CHUNK;
        for (j, &x) in view.chunk(c).iter().enumerate() {
            if x >= pre {
                let s = x / t;
                if s >= lo {
                    out.push(((base + j) as TokenId, s));
                }
            }
        }
    }
}

/// Appends every token with `lo <= x / t < hi`, in token order, when many may pass (a band of a
/// flat row): branch-free inside a chunk (every token is written to a small buffer, and the
/// write position advances only when it passes).
fn gather_band(view: &RowView<'_>, t: f32, lo: f32, hi: f32, out: &mut Vec<Candidate>) {
    let mut buf = [(0 as TokenId, 0f32); CHUNK];
    for c in 0..view.n_chunks() {
        if view.chunk_max(c) / t < lo {
            continue;
        }
        let base = c * CHUNK;
        let mut n = 0;
        for (j, &x) in view.chunk(c).iter().enumerate() {
            let s = x / t;
            buf[n] = ((base + j) as TokenId, s);
            n += usize::from(s >= lo && s < hi);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// transformers' `MinPLogitsWarper` on a candidate list: drops tokens whose probability is below
/// `min_p` times the top probability, i.e. `exp(s - max) < min_p`. The best token always stays.
pub fn min_p(cands: &mut Vec<Candidate>, min_p: f64, w: &mut Vec<f32>) {
    let m = softmax_weights(cands, w);
    if m == f32::NEG_INFINITY {
        return;
    }
    let mut i = 0;
    cands.retain(|&(_, s)| {
        i += 1;
        f64::from(w[i - 1]) >= min_p || s == m
    });
}

/// [`min_p`] straight from the row: gathers the tokens within `-ln(min_p)` of the maximum
/// (with a margin), then applies the exact test.
pub fn min_p_dense(view: &RowView<'_>, t: f32, p: f64, out: &mut Vec<Candidate>, w: &mut Vec<f32>) {
    let m = view.max() / t;
    out.clear();
    if m == f32::NEG_INFINITY || m.is_nan() {
        return;
    }
    let thr = m + (p.ln() as f32) - 1e-2 * (1.0 + m.abs());
    gather(view, t, thr, out);
    min_p(out, p, w);
}

/// Samples from the softmax of the candidates' scores: the first token where the running sum of
/// weights passes `u * total`, `u` uniform in `[0, 1)`. `None` when no candidate has weight.
pub fn sample_candidates(cands: &[Candidate], u: f64, w: &mut Vec<f32>) -> Option<TokenId> {
    let m = softmax_weights(cands, w);
    let z = total(w);
    if z.is_nan() || z <= 0.0 || m == f32::NEG_INFINITY {
        return None;
    }
    let target = u * z;
    let mut acc = 0f64;
    let mut last = None;
    for (&(tok, s), &w) in cands.iter().zip(w.iter()) {
        let w = f64::from(w);
        if w > 0.0 && s >= m - 88.0 {
            acc += w;
            last = Some(tok);
            if acc > target {
                return last;
            }
        }
    }
    last
}

/// Samples from the softmax of the whole scaled row (no filter active), chunk sums first so that
/// only one chunk is walked token by token.
pub fn sample_dense(view: &RowView<'_>, t: f32, u: f64, sums: &mut Vec<f32>) -> Option<TokenId> {
    let m = view.max() / t;
    if m == f32::NEG_INFINITY || m.is_nan() {
        return None;
    }
    view.chunk_exp_sums(t, m, sums);
    let z: f64 = sums.iter().map(|&s| f64::from(s)).sum();
    let target = u * z;
    let mut acc = 0f64;
    let mut last_chunk = None;
    for (c, &s) in sums.iter().enumerate() {
        if s > 0.0 {
            last_chunk = Some(c);
            if acc + f64::from(s) > target {
                break;
            }
            acc += f64::from(s);
        }
    }
    let c = last_chunk?;
    let mut last = None;
    for (j, &x) in view.chunk(c).iter().enumerate() {
        let s = x / t;
        if s >= m - 88.0 {
            let w = f64::from(exp_nonpos(s - m));
            if w > 0.0 {
                acc += w;
                last = Some((c * CHUNK + j) as TokenId);
                if acc > target {
                    break;
                }
            }
        }
    }
    last
}
