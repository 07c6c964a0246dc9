//! A copy-on-write, chunked view of one logits row, and the vectorised kernels that scan it.
//!
//! The caller's buffer is never written: the sparse edits of the early stages (bias, EOS mask,
//! penalties) copy the few [`CHUNK`]-sized chunks they touch into a patch area. Every chunk's
//! maximum is kept, so later stages skip whole chunks that cannot matter (top-k, top-n
//! logprobs, greedy) and read the row once in the common case.

use super::kernels::{add_exp, add_exp_max, max_of, ExpSum, Isa};
use super::TokenId;

/// How far above the reference point of a running sum of exponentials a chunk's maximum may go
/// before the reference moves (`e^60` times a row's length stays far below `f32::MAX`).
const REF_HEADROOM: f32 = 60.0;

/// One pass over the raw row: chunk maxima and the log-sum-exp.
///
/// Each chunk is read once for its max and its exponentials, summed against a reference point
/// `r` that moves, with a rescale of what was summed so far, only when a chunk's max exceeds it
/// by more than [`REF_HEADROOM`] (that chunk is then summed again). The lane accumulators are
/// never reduced per chunk.
fn raw_pass(isa: Isa, raw: &[f32], chunk_max: &mut Vec<f32>) -> LogSumExp {
    let mut r = f32::NEG_INFINITY;
    let mut max = f32::NEG_INFINITY;
    let mut total = 0f64;
    let mut acc = ExpSum::default();
    for xs in raw.chunks(CHUNK) {
        // Optimistically sum against the current reference while finding the chunk's max.
        let before = acc;
        let cm = add_exp_max(isa, &mut acc, xs, r);
        chunk_max.push(cm);
        if cm == f32::NEG_INFINITY {
            acc = before;
            continue;
        }
        max = if cm > max { cm } else { max };
        // `cm - r`, not `cm > r + 60`: for huge logits `r + 60 == r`.
        if r == f32::NEG_INFINITY || cm - r > REF_HEADROOM {
            if r > f32::NEG_INFINITY {
                total = (total + f64::from(before.total())) * (f64::from(r) - f64::from(cm)).exp();
            }
            acc = ExpSum::default();
            r = cm;
            add_exp::<false>(isa, &mut acc, xs, 1.0, r);
        }
    }
    total += f64::from(acc.total());
    LogSumExp {
        max,
        ln_sum: total.ln() + (f64::from(r) - f64::from(max)),
    }
}

/// Tokens per chunk: small enough that a chunk stays in L1 between its max and its exp pass.
pub const CHUNK: usize = 64;
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

    /// Selects from `raw`, reading only the chunks whose maximum reaches the n-th largest chunk
    /// maximum (the n best entries all lie there).
    fn select(&mut self, raw: &[f32], chunk_max: &[f32], tmp: &mut Vec<f32>) {
        if self.n == 0 {
            return;
        }
        let thr = kth_largest(chunk_max, self.n, tmp);
        for (c, &cm) in chunk_max.iter().enumerate() {
            if cm >= thr {
                let xs = &raw[c * CHUNK..raw.len().min((c + 1) * CHUNK)];
                self.offer(c * CHUNK, xs, cm);
            }
        }
    }

    /// Offers the chunk starting at token `base` whose maximum is `cmax`; chunks must be offered
    /// in increasing token order for the tie-break to hold.
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

/// The k-th largest of `xs` (NaN ignored; `-inf` when there are fewer than `k`): a bounded
/// insertion sort in `buf` for small `k` (mostly one comparison per value), quickselect otherwise.
pub fn kth_largest(xs: &[f32], k: usize, buf: &mut Vec<f32>) -> f32 {
    buf.clear();
    if k == 0 {
        return f32::INFINITY;
    }
    if k > 16 {
        return kth_largest_select(xs, k);
    }
    for &x in xs {
        if x.is_nan() || (buf.len() == k && x <= buf[k - 1]) {
            continue;
        }
        let pos = buf.partition_point(|&y| y >= x);
        buf.insert(pos, x);
        buf.truncate(k);
    }
    if buf.len() < k {
        f32::NEG_INFINITY
    } else {
        buf[k - 1]
    }
}

/// Quickselect on integer keys that sort like the floats (`f32::total_cmp`), which compare
/// faster than the floats themselves.
fn kth_largest_select(xs: &[f32], k: usize) -> f32 {
    fn key(x: f32) -> u32 {
        let b = x.to_bits();
        if b >> 31 == 1 {
            !b
        } else {
            b | 1 << 31
        }
    }
    fn unkey(k: u32) -> f32 {
        f32::from_bits(if k >> 31 == 1 { k & !(1 << 31) } else { !k })
    }
    thread_local! {
        static KEYS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    KEYS.with_borrow_mut(|keys| {
        keys.clear();
        keys.extend(xs.iter().filter(|x| !x.is_nan()).map(|&x| key(x)));
        if keys.len() < k {
            return f32::NEG_INFINITY;
        }
        let n = keys.len();
        unkey(*keys.select_nth_unstable(n - k).1)
    })
}

/// `slot` of a chunk that reads the caller's buffer.
const UNPATCHED: u32 = u32::MAX;

/// The reusable storage behind a [`RowView`], kept per thread so that steps do not allocate.
#[derive(Debug)]
pub struct RowBuffers {
    /// For each chunk, its slot in `patches`, or [`UNPATCHED`].
    slot: Vec<u32>,
    patches: Vec<f32>,
    /// The chunks that own a patch slot (their maxima are recomputed by `finish_edits`).
    patched: Vec<u32>,
    /// The slot of the shared all-`-inf` chunk that fully masked chunks read, [`UNPATCHED`]
    /// while there is none. Such chunks are not in `patched`: a write copies them first.
    dead_slot: u32,
    chunk_max: Vec<f32>,
    tmp: Vec<f32>,
}

impl Default for RowBuffers {
    fn default() -> Self {
        Self {
            slot: Vec::new(),
            patches: Vec::new(),
            patched: Vec::new(),
            dead_slot: UNPATCHED,
            chunk_max: Vec::new(),
            tmp: Vec::new(),
        }
    }
}

/// One logits row: the caller's values plus copy-on-write patches, chunk by chunk.
#[derive(Debug)]
pub struct RowView<'a> {
    isa: Isa,
    raw: &'a [f32],
    buf: &'a mut RowBuffers,
}

impl<'a> RowView<'a> {
    /// Scans `raw` once: chunk maxima, the raw log-sum-exp, and the top `top.n` entries.
    pub fn new(raw: &'a [f32], buf: &'a mut RowBuffers, top: &mut TopN) -> (Self, LogSumExp) {
        let n_chunks = raw.len().div_ceil(CHUNK);
        if buf.slot.len() == n_chunks && buf.dead_slot == UNPATCHED {
            for &c in &buf.patched {
                buf.slot[c as usize] = UNPATCHED;
            }
        } else {
            buf.slot.clear();
            buf.slot.resize(n_chunks, UNPATCHED);
        }
        buf.dead_slot = UNPATCHED;
        buf.patched.clear();
        buf.patches.clear();
        buf.chunk_max.clear();
        let isa = Isa::detect();
        let lse = raw_pass(isa, raw, &mut buf.chunk_max);
        top.select(raw, &buf.chunk_max, &mut buf.tmp);
        (Self { isa, raw, buf }, lse)
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
        self.buf.chunk_max.len()
    }

    /// The current values of chunk `c`.
    #[inline]
    pub fn chunk(&self, c: usize) -> &[f32] {
        let len = CHUNK.min(self.raw.len() - c * CHUNK);
        match self.buf.slot[c] {
            UNPATCHED => &self.raw[c * CHUNK..c * CHUNK + len],
            s => &self.buf.patches[s as usize * CHUNK..s as usize * CHUNK + len],
        }
    }

    /// Every chunk's maximum (ignoring NaN), up to date after [`RowView::finish_edits`].
    #[inline]
    pub fn chunk_maxima(&self) -> &[f32] {
        &self.buf.chunk_max
    }

    /// The maximum of chunk `c` (ignoring NaN), up to date after [`RowView::finish_edits`].
    #[inline]
    pub fn chunk_max(&self, c: usize) -> f32 {
        self.buf.chunk_max[c]
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
        let s = self.own_chunk(i / CHUNK);
        self.buf.patches[s * CHUNK + i % CHUNK] = v;
    }

    /// The patch slot of chunk `c`, copying the chunk's current values into a fresh slot first
    /// when it has none of its own (it reads the caller's buffer or the shared `-inf` chunk).
    #[inline]
    fn own_chunk(&mut self, c: usize) -> usize {
        let buf = &mut *self.buf;
        let s = buf.slot[c];
        if s != UNPATCHED && s != buf.dead_slot {
            return s as usize;
        }
        let new = buf.patches.len() / CHUNK;
        let len = CHUNK.min(self.raw.len() - c * CHUNK);
        if s == UNPATCHED {
            buf.patches
                .extend_from_slice(&self.raw[c * CHUNK..c * CHUNK + len]);
        }
        let fill = if s == UNPATCHED {
            0.0
        } else {
            f32::NEG_INFINITY
        };
        buf.patches.resize((new + 1) * CHUNK, fill);
        buf.slot[c] = new as u32;
        buf.patched.push(c as u32);
        new
    }

    /// The guided-decoding mask: every token whose bit is clear in `mask` (bit `t % 32` of word
    /// `t / 32`; `mask.len() >= 2 * n_chunks()`, bits past the row ignored) becomes `-inf`, in
    /// one pass over the mask. A chunk with every bit set is left alone; one with none set
    /// reads a shared `-inf` chunk (no copy) and gets maximum `-inf` at once; a mixed one is
    /// copied and masked with selects. Call it among the edits, before
    /// [`RowView::finish_edits`].
    pub fn apply_mask(&mut self, mask: &[u32]) {
        let n = self.n_chunks();
        assert!(mask.len() >= 2 * n, "the mask must cover every chunk");
        for c in 0..n {
            let len = CHUNK.min(self.raw.len() - c * CHUNK);
            let full = if len == CHUNK {
                u64::MAX
            } else {
                (1u64 << len) - 1
            };
            let bits = (u64::from(mask[2 * c]) | u64::from(mask[2 * c + 1]) << 32) & full;
            if bits == full {
                continue;
            }
            if bits == 0 {
                self.kill_chunk(c);
                continue;
            }
            let s = self.own_chunk(c);
            let xs = &mut self.buf.patches[s * CHUNK..s * CHUNK + len];
            for (j, x) in xs.iter_mut().enumerate() {
                *x = if bits >> j & 1 == 1 {
                    *x
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
    }

    /// Points chunk `c` at the shared all-`-inf` chunk.
    fn kill_chunk(&mut self, c: usize) {
        let buf = &mut *self.buf;
        if buf.dead_slot == UNPATCHED {
            let s = buf.patches.len() / CHUNK;
            buf.patches.resize((s + 1) * CHUNK, f32::NEG_INFINITY);
            buf.dead_slot = s as u32;
        }
        // A chunk patched before keeps its place in `patched`: its maximum is recomputed, as -inf.
        buf.slot[c] = buf.dead_slot;
        buf.chunk_max[c] = f32::NEG_INFINITY;
    }

    /// Copies the whole row into the patch area at once: cheaper than chunk-by-chunk copies when
    /// the edits will touch most chunks (a long prompt under a repetition penalty).
    pub fn patch_all(&mut self) {
        let n = self.n_chunks();
        let buf = &mut *self.buf;
        buf.dead_slot = UNPATCHED;
        buf.patches.clear();
        buf.patches.reserve(n * CHUNK);
        buf.patches.extend_from_slice(self.raw);
        buf.patches.resize(n * CHUNK, 0.0);
        buf.patched.clear();
        buf.patched.extend(0..n as u32);
        for (c, slot) in buf.slot.iter_mut().enumerate() {
            *slot = c as u32;
        }
    }

    /// Recomputes the maxima of the patched chunks; call once after the edit stages.
    pub fn finish_edits(&mut self) {
        for k in 0..self.buf.patched.len() {
            let c = self.buf.patched[k] as usize;
            self.buf.chunk_max[c] = max_of(self.isa, self.chunk(c));
        }
    }

    /// The maximum of the current values (ignoring NaN).
    pub fn max(&self) -> f32 {
        max_of(self.isa, &self.buf.chunk_max)
    }

    /// `sum(exp(x / t - m))` per chunk into `out`; `m` must be >= every `x / t`.
    pub fn chunk_exp_sums(&self, t: f32, m: f32, out: &mut Vec<f32>) {
        out.clear();
        for c in 0..self.n_chunks() {
            let mut acc = ExpSum::default();
            if self.buf.chunk_max[c] / t > f32::NEG_INFINITY {
                add_exp::<true>(self.isa, &mut acc, self.chunk(c), t, m);
            }
            out.push(acc.total());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_pass_matches_naive() {
        let raw: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32) * 0.1 - 3.0)
            .collect();
        let mut top = TopN::new(3);
        let mut buf = RowBuffers::default();
        let (view, lse) = RowView::new(&raw, &mut buf, &mut top);
        let max = raw.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = raw.iter().map(|&x| f64::from(x - max).exp()).sum();
        assert_eq!(lse.max, max);
        assert!((lse.ln_sum - sum.ln()).abs() < 1e-6);
        assert_eq!(view.n_chunks(), 16);
        // 7.0 is reached where i*37 % 101 == 100: first at i = 30, then every 101 steps.
        assert_eq!(top.items(), &[(30, 7.0), (131, 7.0), (232, 7.0)]);
    }

    #[test]
    fn raw_pass_handles_huge_and_rising_logits() {
        // A rising row moves the reference point; huge logits must not overflow the sums.
        for scale in [1.0f32, 1e3, 1e30] {
            let raw: Vec<f32> = (0..1000).map(|i| i as f32 * 0.2 * scale).collect();
            let mut buf = RowBuffers::default();
            let (_, lse) = RowView::new(&raw, &mut buf, &mut TopN::new(0));
            let max = raw[999];
            let sum: f64 = raw.iter().map(|&x| f64::from(x - max).exp()).sum();
            assert_eq!(lse.max, max);
            assert!((lse.ln_sum - sum.ln()).abs() < 1e-6, "{scale}: {lse:?}");
        }
    }

    #[test]
    fn kth_largest_counts_ties() {
        let mut buf = Vec::new();
        let xs = [1.0, 5.0, f32::NAN, 3.0, 5.0, 2.0];
        assert_eq!(kth_largest(&xs, 1, &mut buf), 5.0);
        assert_eq!(kth_largest(&xs, 2, &mut buf), 5.0);
        assert_eq!(kth_largest(&xs, 3, &mut buf), 3.0);
        assert_eq!(kth_largest(&xs, 5, &mut buf), 1.0);
        assert_eq!(kth_largest(&xs, 6, &mut buf), f32::NEG_INFINITY);
        let many: Vec<f32> = (0..100).map(|i| (i % 10) as f32).collect();
        assert_eq!(kth_largest(&many, 10, &mut buf), 9.0);
        assert_eq!(kth_largest(&many, 25, &mut buf), 7.0);
        let mixed = [-0.5, f32::NEG_INFINITY, 3.5, -2.0, 0.0, 1e-30, -1e30];
        let mut sorted = mixed.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for k in 1..=mixed.len() {
            assert_eq!(kth_largest_select(&mixed, k), sorted[k - 1], "k = {k}");
        }
    }

    /// `apply_mask` among other edits, against the same edits on a plain vector.
    #[test]
    fn mask_matches_naive() {
        use proptest::prelude::*;
        use proptest::test_runner::TestRunner;
        let strategy = (1usize..400, any::<u64>(), 0usize..6, any::<bool>());
        TestRunner::default()
            .run(&strategy, |(len, seed, pattern, patch_all)| {
                let mut rng = crate::sampling::Rng::seed_from_u64(seed);
                let raw: Vec<f32> = (0..len)
                    .map(|_| rng.next_f64() as f32 * 8.0 - 4.0)
                    .collect();
                let words = 2 * len.div_ceil(CHUNK);
                // Runs of zero and full words, and mixed ones.
                let mask: Vec<u32> = (0..words)
                    .map(|w| match (pattern + w * 7 / 3) % 4 {
                        0 => 0,
                        1 => u32::MAX,
                        _ => rng.next_u64() as u32,
                    })
                    .collect();
                let edits: Vec<(TokenId, f32)> = (0..8)
                    .map(|_| {
                        (
                            (rng.next_u64() % len as u64) as TokenId,
                            rng.next_f64() as f32,
                        )
                    })
                    .collect();
                let mut want = raw.clone();
                let mut buf = RowBuffers::default();
                // A first, unmasked row through the same buffers: a reused buffer must reset.
                let (mut view, _) = RowView::new(&raw, &mut buf, &mut TopN::new(0));
                view.set(0, 99.0);
                view.finish_edits();
                let (mut view, _) = RowView::new(&raw, &mut buf, &mut TopN::new(0));
                if patch_all {
                    view.patch_all();
                }
                for &(t, v) in &edits[..4] {
                    view.set(t, view.get(t) + v);
                    want[t as usize] += v;
                }
                view.apply_mask(&mask);
                for (t, x) in want.iter_mut().enumerate() {
                    if mask[t / 32] >> (t % 32) & 1 == 0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
                for &(t, v) in &edits[4..] {
                    view.set(t, view.get(t) - v);
                    want[t as usize] -= v;
                }
                view.finish_edits();
                for (t, &w) in want.iter().enumerate() {
                    prop_assert_eq!(view.get(t as TokenId), w, "token {}", t);
                }
                for c in 0..view.n_chunks() {
                    let m = want[c * CHUNK..len.min((c + 1) * CHUNK)]
                        .iter()
                        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    prop_assert_eq!(view.chunk_max(c), m, "chunk {}", c);
                }
                prop_assert_eq!(raw.iter().all(|x| x.is_finite()), true);
                // The next row through these buffers starts clean.
                let (view, _) = RowView::new(&raw, &mut buf, &mut TopN::new(0));
                for (t, &x) in raw.iter().enumerate() {
                    prop_assert_eq!(view.get(t as TokenId), x);
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn patches_copy_on_write() {
        let raw = vec![0f32; 130];
        let mut top = TopN::new(0);
        let mut buf = RowBuffers::default();
        let (mut view, _) = RowView::new(&raw, &mut buf, &mut top);
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
        view.patch_all();
        view.set(0, 7.0);
        view.finish_edits();
        assert_eq!((view.get(0), view.get(129), view.get(3)), (7.0, 0.0, 0.0));
        assert_eq!(view.max(), 7.0);
    }
}
