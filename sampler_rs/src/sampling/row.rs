//! A copy-on-write, chunked view of one logits row, and the vectorised kernels that scan it.
//!
//! The caller's buffer is never written: the sparse edits of the early stages (bias, EOS mask,
//! penalties) copy the few [`CHUNK`]-sized chunks they touch into a patch area. Every chunk's
//! maximum is kept, so later stages skip whole chunks that cannot matter (top-k, top-n
//! logprobs, greedy) and read the row once in the common case.

use super::TokenId;

/// Tokens per chunk: small enough that a chunk stays in L1 between its max and its exp pass.
pub const CHUNK: usize = 64;
const LANES: usize = 8;

const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the low bits
#[allow(clippy::excessive_precision)] // exactly 355/512
const EXP_C1: f32 = 0.693_359_375;
const EXP_C2: f32 = -2.121_944_4e-4;
#[allow(clippy::excessive_precision)]
const EXP_POLY: [f32; 6] = [
    1.987_569_150_0e-4,
    1.398_199_950_7e-3,
    8.333_451_907_3e-3,
    4.166_579_589_4e-2,
    1.666_666_545_9e-1,
    5.000_000_120_1e-1,
];

/// `exp(d)` for `d <= 0`, within 2 ulp of `f32::exp` (Cephes' `expf` polynomial). `-inf` and
/// anything below -87 give 0; NaN gives a number below 2e-38. The AVX2 kernel computes the very
/// same operations eight lanes at a time, so both paths agree to the bit.
#[inline(always)]
pub fn exp_nonpos(d: f32) -> f32 {
    let x = if d > -87.0 { d } else { -87.0 };
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * EXP_C1 - n * EXP_C2;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((k + 127) as u32) << 23);
    if d < -87.0 {
        0.0
    } else {
        e * scale
    }
}

/// The maximum of `xs` ignoring NaN; `-inf` when empty.
#[inline]
pub fn max_of(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2::max_of(xs) };
    }
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = xs.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    fold_max(acc, it.remainder())
}

#[inline(always)]
fn fold_max(acc: [f32; LANES], rest: &[f32]) -> f32 {
    let mut m = f32::NEG_INFINITY;
    for &x in acc.iter().chain(rest) {
        m = if x > m { x } else { m };
    }
    m
}

/// `sum(exp(x / t - m))` over `xs`, dividing by `t` only when `SCALE`. `m` must be >= every
/// `x / t`. Lane `j` sums elements `j, j + 8, ...`; the lanes are then added in order, so the
/// AVX2 and the portable paths give the same bits.
#[inline]
fn sum_exp<const SCALE: bool>(xs: &[f32], t: f32, m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2::sum_exp::<SCALE>(xs, t, m) };
    }
    let s = |x: f32| if SCALE { x / t } else { x };
    let mut acc = [0f32; LANES];
    let mut it = xs.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            acc[j] += exp_nonpos(s(c[j]) - m);
        }
    }
    fold_sum(acc, it.remainder().iter().map(|&x| exp_nonpos(s(x) - m)))
}

#[inline(always)]
fn fold_sum(acc: [f32; LANES], rest: impl Iterator<Item = f32>) -> f32 {
    let mut total = 0f32;
    for x in acc.into_iter().chain(rest) {
        total += x;
    }
    total
}

/// AVX2 versions of the kernels, operation for operation the same as the portable ones.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{fold_max, fold_sum, EXP_C1, EXP_C2, EXP_POLY, LANES, MAGIC};

    /// `exp_nonpos` on eight lanes.
    #[target_feature(enable = "avx2")]
    fn exp8(d: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.0);
        let x = _mm256_max_ps(d, lo); // d > lo ? d : lo, NaN -> lo
        let magic = _mm256_set1_ps(MAGIC);
        let t = _mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            magic,
        );
        let n = _mm256_sub_ps(t, magic);
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(EXP_C1))),
            _mm256_mul_ps(n, _mm256_set1_ps(EXP_C2)),
        );
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let e = _mm256_add_ps(
            _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r),
            _mm256_set1_ps(1.0),
        );
        let k = _mm256_sub_epi32(
            _mm256_castps_si256(t),
            _mm256_set1_epi32(MAGIC.to_bits() as i32),
        );
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            k,
            _mm256_set1_epi32(127),
        )));
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(d, lo);
        _mm256_andnot_ps(under, _mm256_mul_ps(e, scale))
    }

    /// `max_of`.
    #[target_feature(enable = "avx2")]
    pub(super) fn max_of(xs: &[f32]) -> f32 {
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut it = xs.chunks_exact(LANES);
        for c in &mut it {
            // SAFETY: `c` holds exactly eight f32; unaligned loads are allowed.
            let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            acc = _mm256_max_ps(v, acc); // v > acc ? v : acc, as the portable loop
        }
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` has room for eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        fold_max(lanes, it.remainder())
    }

    /// `sum_exp`.
    #[target_feature(enable = "avx2")]
    pub(super) fn sum_exp<const SCALE: bool>(xs: &[f32], t: f32, m: f32) -> f32 {
        let (tv, mv) = (_mm256_set1_ps(t), _mm256_set1_ps(m));
        let mut acc = _mm256_setzero_ps();
        let mut it = xs.chunks_exact(LANES);
        for c in &mut it {
            // SAFETY: `c` holds exactly eight f32; unaligned loads are allowed.
            let mut v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            if SCALE {
                v = _mm256_div_ps(v, tv);
            }
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(v, mv)));
        }
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` has room for eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let s = |x: f32| if SCALE { x / t } else { x };
        fold_sum(
            lanes,
            it.remainder().iter().map(|&x| super::exp_nonpos(s(x) - m)),
        )
    }
}

/// `max + ln(sum)` of the row, kept apart for precision: `log_softmax(x) = (x - max) - ln_sum`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogSumExp {
    /// The row's maximum (`-inf` when every entry is -inf or NaN).
    pub max: f32,
    /// `ln(sum(exp(x - max)))`.
    pub ln_sum: f64,
}

impl LogSumExp {
    /// `log_softmax` at a value of the row.
    pub fn logprob(&self, x: f32) -> f32 {
        (f64::from(x - self.max) - self.ln_sum) as f32
    }
}

/// The best `n` entries of a row, best first, ties broken by the lower token id.
#[derive(Debug, Clone, Default)]
pub struct TopN {
    n: usize,
    items: Vec<(TokenId, f32)>,
}

impl TopN {
    /// An empty selection of capacity `n`.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            items: Vec::with_capacity(n + 1),
        }
    }

    /// Offers the chunk starting at token `base` whose maximum is `cmax`; rows must be offered
    /// in increasing token order for the tie-break to hold.
    #[inline(always)]
    fn offer(&mut self, base: usize, xs: &[f32], cmax: f32) {
        if self.n == 0 || (self.items.len() == self.n && cmax <= self.items[self.n - 1].1) {
            return;
        }
        for (j, &x) in xs.iter().enumerate() {
            if x.is_nan() || (self.items.len() == self.n && x <= self.items[self.n - 1].1) {
                continue;
            }
            let pos = self.items.partition_point(|&(_, y)| y >= x);
            self.items.insert(pos, ((base + j) as TokenId, x));
            self.items.truncate(self.n);
        }
    }

    /// The selected `(token, value)` pairs, best first.
    pub fn items(&self) -> &[(TokenId, f32)] {
        &self.items
    }
}

fn raw_pass(raw: &[f32], chunk_max: &mut Vec<f32>, top: &mut TopN) -> LogSumExp {
    let mut m = f32::NEG_INFINITY;
    let mut sum = 0f64;
    for (c, xs) in raw.chunks(CHUNK).enumerate() {
        let cm = max_of(xs);
        chunk_max.push(cm);
        top.offer(c * CHUNK, xs, cm);
        if cm == f32::NEG_INFINITY {
            continue;
        }
        if cm > m {
            if m > f32::NEG_INFINITY {
                sum *= (f64::from(m) - f64::from(cm)).exp();
            }
            m = cm;
        }
        sum += f64::from(sum_exp::<false>(xs, 1.0, m));
    }
    LogSumExp {
        max: m,
        ln_sum: sum.ln(),
    }
}

fn chunk_sums(view: &RowView<'_>, t: f32, m: f32, out: &mut Vec<f32>) {
    out.clear();
    for c in 0..view.n_chunks() {
        let s = if view.chunk_max[c] / t == f32::NEG_INFINITY {
            0.0
        } else {
            sum_exp::<true>(view.chunk(c), t, m)
        };
        out.push(s);
    }
}

/// One logits row: the caller's values plus copy-on-write patches, chunk by chunk.
#[derive(Debug)]
pub struct RowView<'a> {
    raw: &'a [f32],
    /// For each chunk, its slot in `patches`, or `u32::MAX` when unpatched.
    slot: Vec<u32>,
    patches: Vec<f32>,
    patched: Vec<u32>,
    chunk_max: Vec<f32>,
}

impl<'a> RowView<'a> {
    /// Scans `raw` once: chunk maxima, the raw log-sum-exp, and the top `top.n` entries.
    pub fn new(raw: &'a [f32], top: &mut TopN) -> (Self, LogSumExp) {
        let n_chunks = raw.len().div_ceil(CHUNK);
        let mut chunk_max = Vec::with_capacity(n_chunks);
        let lse = raw_pass(raw, &mut chunk_max, top);
        let view = Self {
            raw,
            slot: vec![u32::MAX; n_chunks],
            patches: Vec::new(),
            patched: Vec::new(),
            chunk_max,
        };
        (view, lse)
    }

    /// The row's length (the vocabulary size).
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether the row is empty.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The caller's values, before any edit.
    pub fn raw(&self) -> &'a [f32] {
        self.raw
    }

    /// Number of chunks.
    pub fn n_chunks(&self) -> usize {
        self.chunk_max.len()
    }

    /// The current values of chunk `c`.
    #[inline]
    pub fn chunk(&self, c: usize) -> &[f32] {
        let len = CHUNK.min(self.raw.len() - c * CHUNK);
        match self.slot[c] {
            u32::MAX => &self.raw[c * CHUNK..c * CHUNK + len],
            s => &self.patches[s as usize * CHUNK..s as usize * CHUNK + len],
        }
    }

    /// The maximum of chunk `c` (ignoring NaN), up to date after [`RowView::finish_edits`].
    #[inline]
    pub fn chunk_max(&self, c: usize) -> f32 {
        self.chunk_max[c]
    }

    /// The current value of token `i`.
    #[inline]
    pub fn get(&self, i: TokenId) -> f32 {
        let i = i as usize;
        self.chunk(i / CHUNK)[i % CHUNK]
    }

    /// Sets token `i`, copying its chunk into the patch area on first write.
    pub fn set(&mut self, i: TokenId, v: f32) {
        let i = i as usize;
        let c = i / CHUNK;
        if self.slot[c] == u32::MAX {
            self.slot[c] = self.patched.len() as u32;
            self.patched.push(c as u32);
            let len = CHUNK.min(self.raw.len() - c * CHUNK);
            self.patches
                .extend_from_slice(&self.raw[c * CHUNK..c * CHUNK + len]);
            self.patches.resize(self.patched.len() * CHUNK, 0.0);
        }
        self.patches[self.slot[c] as usize * CHUNK + i % CHUNK] = v;
    }

    /// Recomputes the maxima of the patched chunks; call once after the edit stages.
    pub fn finish_edits(&mut self) {
        for k in 0..self.patched.len() {
            let c = self.patched[k] as usize;
            self.chunk_max[c] = max_of(self.chunk(c));
        }
    }

    /// The maximum of the current values (ignoring NaN).
    pub fn max(&self) -> f32 {
        max_of(&self.chunk_max)
    }

    /// `sum(exp(x / t - m))` per chunk into `out`; `m` must be >= every `x / t`.
    pub fn chunk_exp_sums(&self, t: f32, m: f32, out: &mut Vec<f32>) {
        chunk_sums(self, t, m, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut d = 0f32;
        while d > -87.0 {
            let (a, b) = (exp_nonpos(d), d.exp());
            worst = worst.max(((a - b) / b).abs());
            d -= 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-100.0), 0.0);
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert!(exp_nonpos(f32::NAN) < 2e-38);
    }

    #[test]
    fn raw_pass_matches_naive() {
        let raw: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32) * 0.1 - 3.0)
            .collect();
        let mut top = TopN::new(3);
        let (view, lse) = RowView::new(&raw, &mut top);
        let max = raw.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = raw.iter().map(|&x| f64::from(x - max).exp()).sum();
        assert_eq!(lse.max, max);
        assert!((lse.ln_sum - sum.ln()).abs() < 1e-6);
        assert_eq!(view.n_chunks(), 16);
        // 7.0 is reached where i*37 % 101 == 100: first at i = 30, then every 101 steps.
        assert_eq!(top.items(), &[(30, 7.0), (131, 7.0), (232, 7.0)]);
    }

    #[test]
    fn patches_copy_on_write() {
        let raw = vec![0f32; 130];
        let mut top = TopN::new(0);
        let (mut view, _) = RowView::new(&raw, &mut top);
        view.set(129, 5.0);
        view.set(3, -1.0);
        view.finish_edits();
        assert_eq!(view.get(129), 5.0);
        assert_eq!(view.get(3), -1.0);
        assert_eq!(view.get(4), 0.0);
        assert_eq!(view.chunk(2), &[0.0, 5.0]);
        assert_eq!(view.chunk_max(2), 5.0);
        assert_eq!(view.max(), 5.0);
        assert_eq!(raw[129], 0.0);
    }
}
