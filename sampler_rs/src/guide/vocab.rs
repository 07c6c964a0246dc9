//! A served model's vocabulary as token bytes, with its token trie and the compile cache.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use super::error::{GuideError, Result};
use super::mask::{self, words_for};
use super::trie::TokenTrie;
use super::{Guide, GuideSpec};
use crate::sampling::TokenId;

/// How many compiled guides a vocabulary keeps (least recently compiled are dropped first).
const CACHE_CAPACITY: usize = 256;

/// The immutable part of a vocabulary, shared by every guide compiled for it.
pub(crate) struct VocabCore {
    /// Token bytes, flat; token `t` is `bytes[offsets[t]..offsets[t + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    eos: Vec<TokenId>,
    /// Bits of the EOS tokens.
    eos_mask: Box<[u32]>,
    /// Bits of the special tokens (EOS included).
    special_mask: Box<[u32]>,
    trie: TokenTrie,
    /// The llguidance tokenizer environment and parser factory, built on first use.
    llg: OnceLock<std::result::Result<Arc<llguidance::ParserFactory>, String>>,
    /// Unique per vocabulary of the process (a key for per-vocabulary caches on shared rules).
    id: u64,
}

impl VocabCore {
    pub(crate) fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Unique per vocabulary of the process.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn mask_words(&self) -> usize {
        words_for(self.len())
    }

    pub(crate) fn token_bytes(&self, t: TokenId) -> &[u8] {
        let t = t as usize;
        &self.bytes[self.offsets[t] as usize..self.offsets[t + 1] as usize]
    }

    pub(crate) fn is_eos(&self, t: TokenId) -> bool {
        mask::get(&self.eos_mask, t)
    }

    pub(crate) fn is_special(&self, t: TokenId) -> bool {
        mask::get(&self.special_mask, t)
    }

    pub(crate) fn eos(&self) -> &[TokenId] {
        &self.eos
    }

    pub(crate) fn eos_mask(&self) -> &[u32] {
        &self.eos_mask
    }

    pub(crate) fn special_mask(&self) -> &[u32] {
        &self.special_mask
    }

    pub(crate) fn trie(&self) -> &TokenTrie {
        &self.trie
    }

    /// The llguidance parser factory over this vocabulary (built once, on first use).
    pub(crate) fn llg_factory(&self) -> Result<Arc<llguidance::ParserFactory>> {
        self.llg
            .get_or_init(|| super::llg::factory(self).map_err(|e| e.to_string()))
            .clone()
            .map_err(GuideError::Engine)
    }
}

#[derive(Default)]
struct GuideCache {
    map: HashMap<GuideSpec, Guide>,
    order: VecDeque<GuideSpec>,
}

/// A served model's vocabulary: every token's bytes (SentencePiece `▁` already turned into a
/// space and `<0xNN>` into the byte, byte-level BPE already decoded), its EOS tokens and its
/// special tokens. Frozen; build once per model. Cheap to clone.
#[derive(Clone)]
pub struct Vocabulary {
    core: Arc<VocabCore>,
    cache: Arc<Mutex<GuideCache>>,
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocabulary")
            .field("len", &self.len())
            .field("eos", &self.core.eos)
            .finish_non_exhaustive()
    }
}

impl Vocabulary {
    /// A vocabulary of `token_bytes.len()` tokens. EOS tokens count as special; special tokens
    /// never match text (their bytes are ignored).
    pub fn new(
        token_bytes: &[impl AsRef<[u8]>],
        eos_token_ids: &[TokenId],
        special_token_ids: &[TokenId],
    ) -> Result<Vocabulary> {
        let n = token_bytes.len();
        if n == 0 || n >= u32::MAX as usize {
            return Err(GuideError::Invalid(format!(
                "a vocabulary needs between 1 and 2^32 - 1 tokens, got {n}"
            )));
        }
        if eos_token_ids.is_empty() {
            return Err(GuideError::Invalid(
                "`eos_token_ids` must name at least one token".into(),
            ));
        }
        let words = words_for(n);
        let mut eos_mask = vec![0u32; words].into_boxed_slice();
        let mut special_mask = vec![0u32; words].into_boxed_slice();
        for (name, ids) in [
            ("eos_token_ids", eos_token_ids),
            ("special_token_ids", special_token_ids),
        ] {
            if let Some(&t) = ids.iter().find(|&&t| t as usize >= n) {
                return Err(GuideError::Invalid(format!(
                    "`{name}` holds token id {t}, outside the vocabulary of size {n}"
                )));
            }
        }
        for &t in eos_token_ids {
            mask::set(&mut eos_mask, t);
            mask::set(&mut special_mask, t);
        }
        for &t in special_token_ids {
            mask::set(&mut special_mask, t);
        }
        let total: usize = token_bytes.iter().map(|b| b.as_ref().len()).sum();
        if total >= u32::MAX as usize {
            return Err(GuideError::Invalid("token bytes exceed 4 GiB".into()));
        }
        let mut bytes = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        for b in token_bytes {
            bytes.extend_from_slice(b.as_ref());
            offsets.push(bytes.len() as u32);
        }
        let trie = {
            let (bytes, offsets, special) = (&bytes, &offsets, &special_mask);
            TokenTrie::new(
                (0..n as TokenId)
                    .filter(|&t| !mask::get(special, t))
                    .map(|t| {
                        let t2 = t as usize;
                        (t, &bytes[offsets[t2] as usize..offsets[t2 + 1] as usize])
                    }),
            )
        };
        let mut eos: Vec<TokenId> = eos_token_ids.to_vec();
        eos.sort_unstable();
        eos.dedup();
        Ok(Vocabulary {
            core: Arc::new(VocabCore {
                bytes,
                offsets,
                eos,
                eos_mask,
                special_mask,
                trie,
                llg: OnceLock::new(),
                id: {
                    static NEXT: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(0);
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                },
            }),
            cache: Arc::default(),
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.core.len()
    }

    /// Always `false`: a vocabulary has at least one token.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes of token `t` (empty for special tokens given no bytes).
    pub fn token_bytes(&self, t: TokenId) -> &[u8] {
        self.core.token_bytes(t)
    }

    /// The EOS tokens, sorted.
    pub fn eos_token_ids(&self) -> &[TokenId] {
        self.core.eos()
    }

    /// Whether `t` is special (EOS included).
    pub fn is_special(&self, t: TokenId) -> bool {
        self.core.is_special(t)
    }

    /// The token trie of the ordinary tokens.
    pub fn trie(&self) -> &TokenTrie {
        self.core.trie()
    }

    pub(crate) fn core(&self) -> &Arc<VocabCore> {
        &self.core
    }

    /// Compiles `spec`, or returns the guide compiled earlier for the same spec (the cache is
    /// per vocabulary, bounded; errors are not cached). Concurrent compiles of one spec may
    /// both run; the first to finish is kept.
    pub fn compile(&self, spec: &GuideSpec) -> Result<Guide> {
        if let Some(g) = self.lock_cache().map.get(spec) {
            return Ok(g.clone());
        }
        let guide = Guide::compile(self, spec)?;
        let mut cache = self.lock_cache();
        if let Some(g) = cache.map.get(spec) {
            return Ok(g.clone());
        }
        if cache.order.len() >= CACHE_CAPACITY {
            if let Some(old) = cache.order.pop_front() {
                cache.map.remove(&old);
            }
        }
        cache.order.push_back(spec.clone());
        cache.map.insert(spec.clone(), guide.clone());
        Ok(guide)
    }

    /// Empties this vocabulary's compile cache and the process-wide caches of the JSON Schema
    /// compiler's rules, keeping what every schema shares (any-JSON, plain strings): the state
    /// of a process that has compiled one schema. For benchmarks and memory pressure; compiled
    /// guides stay valid.
    pub fn clear_caches(&self) {
        let mut cache = self.lock_cache();
        cache.map.clear();
        cache.order.clear();
        drop(cache);
        super::json::clear_caches();
    }

    /// Number of guides in the compile cache.
    pub fn cached_guides(&self) -> usize {
        self.lock_cache().map.len()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, GuideCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
