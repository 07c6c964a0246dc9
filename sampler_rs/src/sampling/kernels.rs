//! Vectorised kernels over logits (max, sums of exponentials), portable and AVX2+FMA / AVX-512.
//!
//! Every instruction-set variant performs the same IEEE operations in the same order, lane by
//! lane (products-and-sums are fused multiply-adds everywhere: `mul_add` in the portable code),
//! so a sequence's tokens do not depend on the machine it runs on.

/// Lanes of every sum accumulator: element `i` of a chunk goes to lane `i % LANES`.
pub const LANES: usize = 16;

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

/// `exp(d)` for `-87 <= d <= 60` (Cephes' `expf` polynomial, within 2 ulp); inputs below -87,
/// `-inf` and NaN count as -87 and give about 1.6e-38, which no sum of a row can notice.
#[inline(always)]
fn exp_clamped(d: f32) -> f32 {
    let x = if d > -87.0 { d } else { -87.0 };
    let t = x.mul_add(std::f32::consts::LOG2_E, MAGIC);
    let n = t - MAGIC;
    let r = n.mul_add(-EXP_C2, n.mul_add(-EXP_C1, x));
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p.mul_add(r, c);
    }
    let e = p.mul_add(r * r, r) + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32 - 127);
    e * f32::from_bits((k as u32) << 23)
}

/// `exp(d)` for `d <= 0`, within 2 ulp of `f32::exp`; exactly 0 for `d < -87` and `-inf`.
#[inline(always)]
pub fn exp_nonpos(d: f32) -> f32 {
    if d < -87.0 {
        0.0
    } else {
        exp_clamped(d)
    }
}

/// The instruction set the kernels run with, detected once per call site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust.
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512F.
    Avx512,
}

impl Isa {
    /// The best variant this CPU runs (std caches the CPUID probe).
    #[inline]
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// A running `sum(exp(...))`: [`LANES`] lanes plus a scalar tail for a chunk's last
/// `len % LANES` elements.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExpSum {
    lanes: [f32; LANES],
    tail: f32,
}

impl ExpSum {
    /// The sum: lanes added pairwise (`j` with `j + 8`, then `+ 4`, `+ 2`, `+ 1`), then the tail.
    pub fn total(&self) -> f32 {
        let mut l = self.lanes;
        let mut width = LANES / 2;
        while width > 0 {
            for j in 0..width {
                l[j] += l[j + width];
            }
            width /= 2;
        }
        l[0] + self.tail
    }
}

/// `exp_nonpos(s - m)` of each `(token, s)` into `out` (cleared first): softmax weights of a
/// candidate list. Compiled with FMA where the CPU has it, so `mul_add` is one instruction.
pub fn exp_weights(cands: &[(u32, f32)], m: f32, out: &mut Vec<f32>) {
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() != Isa::Portable {
        // SAFETY: AVX2 and FMA are present (every AVX-512F CPU has them too).
        return unsafe { x86::exp_weights_fma(cands, m, out) };
    }
    exp_weights_portable(cands, m, out);
}

#[inline(always)]
fn exp_weights_portable(cands: &[(u32, f32)], m: f32, out: &mut Vec<f32>) {
    out.extend(cands.iter().map(|&(_, s)| exp_nonpos(s - m)));
}

/// The maximum of `xs`, NaN ignored; `-inf` when empty.
#[inline]
pub fn max_of(isa: Isa, xs: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only detected on CPUs with AVX-512F.
        Isa::Avx512 => unsafe { x86::max_of_avx512(xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only detected on CPUs with AVX2 and FMA.
        Isa::Avx2 => unsafe { x86::max_of_avx2(xs) },
        _ => max_of_portable(xs),
    }
}

#[inline(always)]
fn max_scalar(m: f32, x: f32) -> f32 {
    if x > m {
        x
    } else {
        m
    }
}

fn max_of_portable(xs: &[f32]) -> f32 {
    xs.iter().fold(f32::NEG_INFINITY, |m, &x| max_scalar(m, x))
}

/// [`add_exp`] without scaling, also returning the chunk's maximum (NaN ignored) from the same
/// read. `r` may turn out too low for the chunk (its max above `r + 60`): the caller then
/// discards `acc` and sums the chunk again.
#[inline]
pub fn add_exp_max(isa: Isa, acc: &mut ExpSum, xs: &[f32], r: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only detected on CPUs with AVX-512F.
        Isa::Avx512 => unsafe { x86::add_exp_max_avx512(acc, xs, r) },
        _ => {
            add_exp::<false>(isa, acc, xs, 1.0, r);
            max_of(isa, xs)
        }
    }
}

/// Adds `exp(x / t - r)` (`x - r` when `!SCALE`) of every `x` in `xs` (one chunk) to `acc`.
/// `r` must be within 60 below every `x / t`'s maximum or above it.
#[inline]
pub fn add_exp<const SCALE: bool>(isa: Isa, acc: &mut ExpSum, xs: &[f32], t: f32, r: f32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only detected on CPUs with AVX-512F.
        Isa::Avx512 => unsafe { x86::add_exp_avx512::<SCALE>(acc, xs, t, r) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only detected on CPUs with AVX2 and FMA.
        Isa::Avx2 => unsafe { x86::add_exp_avx2::<SCALE>(acc, xs, t, r) },
        _ => add_exp_portable::<SCALE>(acc, xs, t, r),
    }
}

#[inline(always)]
fn scaled<const SCALE: bool>(x: f32, t: f32) -> f32 {
    if SCALE {
        x / t
    } else {
        x
    }
}

/// The elements past the last full group of lanes, in order, into the scalar tail.
#[inline(always)]
fn add_exp_tail<const SCALE: bool>(acc: &mut ExpSum, rest: &[f32], t: f32, r: f32) {
    for &x in rest {
        acc.tail += exp_clamped(scaled::<SCALE>(x, t) - r);
    }
}

fn add_exp_portable<const SCALE: bool>(acc: &mut ExpSum, xs: &[f32], t: f32, r: f32) {
    let mut it = xs.chunks_exact(LANES);
    for c in &mut it {
        for (a, &x) in acc.lanes.iter_mut().zip(c) {
            *a += exp_clamped(scaled::<SCALE>(x, t) - r);
        }
    }
    add_exp_tail::<SCALE>(acc, it.remainder(), t, r);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The x86-64 variants; each mirrors the portable code operation for operation.
    use std::arch::x86_64::*;

    use super::{
        add_exp_tail, exp_weights_portable, max_scalar, ExpSum, EXP_C1, EXP_C2, EXP_POLY, LANES,
        MAGIC,
    };

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_weights_fma(cands: &[(u32, f32)], m: f32, out: &mut Vec<f32>) {
        exp_weights_portable(cands, m, out);
    }

    /// `exp_clamped` on eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(d: __m256) -> __m256 {
        let x = _mm256_max_ps(d, _mm256_set1_ps(-87.0)); // d > -87 ? d : -87; NaN -> -87
        let magic = _mm256_set1_ps(MAGIC);
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), magic);
        let n = _mm256_sub_ps(t, magic);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_C1), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_C2), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let k = _mm256_sub_epi32(
            _mm256_castps_si256(t),
            _mm256_set1_epi32(MAGIC.to_bits() as i32 - 127),
        );
        _mm256_mul_ps(e, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(k)))
    }

    /// `exp_clamped` on sixteen lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(d: __m512) -> __m512 {
        let x = _mm512_max_ps(d, _mm512_set1_ps(-87.0));
        let magic = _mm512_set1_ps(MAGIC);
        let t = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), magic);
        let n = _mm512_sub_ps(t, magic);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_C1), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_C2), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let e = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        // e * 2^n in one instruction; n is an integer in [-126, 87], so this is the same exact
        // product as building 2^n from its bits.
        _mm512_scalef_ps(e, n)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn max_of_avx2(xs: &[f32]) -> f32 {
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut it = xs.chunks_exact(8);
        for c in &mut it {
            // SAFETY: `c` holds exactly eight f32; unaligned loads are allowed.
            let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            acc = _mm256_max_ps(v, acc); // v > acc ? v : acc: NaN never enters
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
        it.remainder()
            .iter()
            .fold(_mm_cvtss_f32(m), |m, &x| max_scalar(m, x))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn max_of_avx512(xs: &[f32]) -> f32 {
        let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut it = xs.chunks_exact(16);
        for c in &mut it {
            // SAFETY: `c` holds exactly sixteen f32; unaligned loads are allowed.
            let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
            acc = _mm512_max_ps(v, acc);
        }
        it.remainder()
            .iter()
            .fold(_mm512_reduce_max_ps(acc), |m, &x| max_scalar(m, x))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn add_exp_avx2<const SCALE: bool>(acc: &mut ExpSum, xs: &[f32], t: f32, r: f32) {
        let (tv, rv) = (_mm256_set1_ps(t), _mm256_set1_ps(r));
        // SAFETY: `acc.lanes` holds sixteen f32.
        let (mut a0, mut a1) = unsafe {
            (
                _mm256_loadu_ps(acc.lanes.as_ptr()),
                _mm256_loadu_ps(acc.lanes.as_ptr().add(8)),
            )
        };
        let mut it = xs.chunks_exact(LANES);
        for c in &mut it {
            // SAFETY: `c` holds exactly sixteen f32; unaligned loads are allowed.
            let (mut v0, mut v1) = unsafe {
                (
                    _mm256_loadu_ps(c.as_ptr()),
                    _mm256_loadu_ps(c.as_ptr().add(8)),
                )
            };
            if SCALE {
                v0 = _mm256_div_ps(v0, tv);
                v1 = _mm256_div_ps(v1, tv);
            }
            a0 = _mm256_add_ps(a0, exp8(_mm256_sub_ps(v0, rv)));
            a1 = _mm256_add_ps(a1, exp8(_mm256_sub_ps(v1, rv)));
        }
        // SAFETY: as above.
        unsafe {
            _mm256_storeu_ps(acc.lanes.as_mut_ptr(), a0);
            _mm256_storeu_ps(acc.lanes.as_mut_ptr().add(8), a1);
        }
        add_exp_tail::<SCALE>(acc, it.remainder(), t, r);
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn add_exp_max_avx512(acc: &mut ExpSum, xs: &[f32], r: f32) -> f32 {
        let rv = _mm512_set1_ps(r);
        // SAFETY: `acc.lanes` holds sixteen f32.
        let mut a = unsafe { _mm512_loadu_ps(acc.lanes.as_ptr()) };
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut it = xs.chunks_exact(LANES);
        for c in &mut it {
            // SAFETY: `c` holds exactly sixteen f32; unaligned loads are allowed.
            let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
            mx = _mm512_max_ps(v, mx);
            a = _mm512_add_ps(a, exp16(_mm512_sub_ps(v, rv)));
        }
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(acc.lanes.as_mut_ptr(), a) };
        add_exp_tail::<false>(acc, it.remainder(), 1.0, r);
        it.remainder()
            .iter()
            .fold(_mm512_reduce_max_ps(mx), |m, &x| max_scalar(m, x))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn add_exp_avx512<const SCALE: bool>(acc: &mut ExpSum, xs: &[f32], t: f32, r: f32) {
        let (tv, rv) = (_mm512_set1_ps(t), _mm512_set1_ps(r));
        // SAFETY: `acc.lanes` holds sixteen f32.
        let mut a = unsafe { _mm512_loadu_ps(acc.lanes.as_ptr()) };
        let mut it = xs.chunks_exact(LANES);
        for c in &mut it {
            // SAFETY: `c` holds exactly sixteen f32; unaligned loads are allowed.
            let mut v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
            if SCALE {
                v = _mm512_div_ps(v, tv);
            }
            a = _mm512_add_ps(a, exp16(_mm512_sub_ps(v, rv)));
        }
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(acc.lanes.as_mut_ptr(), a) };
        add_exp_tail::<SCALE>(acc, it.remainder(), t, r);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn isas_agree_on_random_rows(
            xs in prop::collection::vec(
                prop_oneof![8 => -30.0f32..30.0, 1 => Just(f32::NEG_INFINITY), 1 => Just(f32::NAN)],
                0..300,
            ),
            t in 0.2f32..3.0,
        ) {
            let m = max_of(Isa::Portable, &xs);
            prop_assume!(m.is_finite());
            let (mut want, mut want_scaled) = (ExpSum::default(), ExpSum::default());
            let want_max = add_exp_max(Isa::Portable, &mut want, &xs, m);
            add_exp::<true>(Isa::Portable, &mut want_scaled, &xs, t, m / t);
            let mut w_want = Vec::new();
            let cands: Vec<(u32, f32)> = xs.iter().map(|&x| (0, x)).collect();
            exp_weights_portable(&cands, m, &mut w_want);
            for isa in isas() {
                let (mut got, mut got_scaled) = (ExpSum::default(), ExpSum::default());
                prop_assert_eq!(add_exp_max(isa, &mut got, &xs, m).to_bits(), want_max.to_bits());
                add_exp::<true>(isa, &mut got_scaled, &xs, t, m / t);
                prop_assert_eq!(got.total().to_bits(), want.total().to_bits());
                prop_assert_eq!(got_scaled.total().to_bits(), want_scaled.total().to_bits());
            }
            let mut w_got = Vec::new();
            exp_weights(&cands, m, &mut w_got);
            prop_assert_eq!(
                w_got.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                w_want.iter().map(|w| w.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

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
        assert!(exp_clamped(f32::NAN) < 2e-38);
    }

    #[test]
    fn every_isa_gives_the_same_bits() {
        let xs: Vec<f32> = (0..203)
            .map(|i| match i % 17 {
                0 => f32::NEG_INFINITY,
                5 => f32::NAN,
                _ => ((i * 7919 % 613) as f32) * 0.037 - 11.0,
            })
            .collect();
        let want_max = max_of(Isa::Portable, &xs);
        let mut want = ExpSum::default();
        add_exp::<false>(Isa::Portable, &mut want, &xs[..64], 1.0, want_max);
        add_exp::<true>(Isa::Portable, &mut want, &xs[64..], 0.7, want_max / 0.7);
        for isa in isas() {
            assert_eq!(max_of(isa, &xs).to_bits(), want_max.to_bits(), "{isa:?}");
            let (mut a, mut b) = (ExpSum::default(), ExpSum::default());
            let m = add_exp_max(isa, &mut a, &xs[7..], want_max);
            add_exp::<false>(Isa::Portable, &mut b, &xs[7..], 1.0, want_max);
            assert_eq!((m, a), (max_of(Isa::Portable, &xs[7..]), b), "{isa:?}");
            let mut got = ExpSum::default();
            add_exp::<false>(isa, &mut got, &xs[..64], 1.0, want_max);
            add_exp::<true>(isa, &mut got, &xs[64..], 0.7, want_max / 0.7);
            assert_eq!(got, want, "{isa:?}");
        }
        let naive: f64 = xs[..64]
            .iter()
            .map(|&x| f64::from(x - want_max).exp())
            .filter(|v| !v.is_nan())
            .sum::<f64>()
            + xs[64..]
                .iter()
                .map(|&x| f64::from(x / 0.7 - want_max / 0.7).exp())
                .filter(|v| !v.is_nan())
                .sum::<f64>();
        assert!((f64::from(want.total()) / naive - 1.0).abs() < 1e-5);
    }
}
