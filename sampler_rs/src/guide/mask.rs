//! Token bitmasks: `u32` words, bit `t % 32` of word `t / 32` set iff token `t` is allowed.

/// A bitmask over a vocabulary, as words.
pub type MaskWords = Box<[u32]>;

/// Number of `u32` words for `n` bits.
pub fn words_for(n: usize) -> usize {
    n.div_ceil(32)
}

/// Sets bit `t`.
#[inline(always)]
pub fn set(mask: &mut [u32], t: u32) {
    mask[(t / 32) as usize] |= 1 << (t % 32);
}

/// Whether bit `t` is set.
#[inline(always)]
pub fn get(mask: &[u32], t: u32) -> bool {
    mask.get((t / 32) as usize)
        .is_some_and(|w| w & (1 << (t % 32)) != 0)
}
