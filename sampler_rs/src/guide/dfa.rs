//! Our regex engine: a pattern → an anchored byte DFA (`regex-automata`) → a compact table of
//! its live states, and per-state token masks walked from the token trie and cached.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson;
use regex_automata::util::{start, syntax};
use regex_automata::{Anchored, MatchKind};
use regex_syntax::hir::{Hir, HirKind};

use super::error::{GuideError, Result};
use super::mask::MaskWords;
use super::vocab::VocabCore;
use super::StateId;

/// The dead state: no string of the language starts with the text that led here.
const DEAD: StateId = 0;

/// Deepest nesting of groups and repetitions a user's pattern may have.
const NEST_LIMIT: u32 = 100;
/// The same for the JSON Schema compiler's generated patterns (a key trie nests one group per
/// character of the longest property name; the parser's stacks are on the heap).
pub(crate) const GENERATED_NEST_LIMIT: u32 = 2000;

/// Size budgets for compiling a regex; past any of them the compile fails with "too large".
#[derive(Debug, Clone)]
pub struct DfaLimits {
    /// Thompson NFA heap size, bytes.
    pub nfa_bytes: usize,
    /// Dense DFA size, bytes (also bounds determinization time).
    pub dfa_bytes: usize,
    /// Determinization working memory, bytes. It also bounds the time, which grows with it:
    /// short patterns of many optional copies of a large class need a lot of both (on a
    /// 2-core machine, `(?:\p{L}?){300}` compiled in 14 s and `(?:\p{L}?){400}` failed after
    /// 24 s under a 64 MiB budget; under 16 MiB both fail in ~6 s, the slowest known).
    pub determinize_bytes: usize,
    /// Most copies of a sub-pattern a counted repetition may make, times the counts of the
    /// repetitions around it. Determinization time grows with its square for some patterns
    /// while their memory stays small, so the budgets above miss them: on a 2-core machine
    /// `a{0,100000}` took 16 s and `(?:a|$){100000}` 40 s; at 10,000 copies they take 0.2 s
    /// and 0.4 s.
    pub max_repetition: u32,
    /// Live states of the final table.
    pub max_states: usize,
    /// Memory for cached per-state masks; past it, masks are computed on every call instead.
    pub mask_cache_bytes: usize,
}

impl Default for DfaLimits {
    fn default() -> Self {
        DfaLimits {
            nfa_bytes: 16 << 20,
            dfa_bytes: 64 << 20,
            determinize_bytes: 16 << 20,
            max_repetition: 10_000,
            max_states: 200_000,
            mask_cache_bytes: 512 << 20,
        }
    }
}

/// A regex compiled to a table of live DFA states.
pub(crate) struct DfaGuide {
    /// Byte → equivalence class.
    classes: [u8; 256],
    /// Number of byte classes: state ids are premultiplied by it.
    stride: usize,
    /// `trans[s + class]`; row 0 is the dead state (all zeros).
    trans: Vec<StateId>,
    start: StateId,
    /// Per state index (`s / stride`): the text so far is a full match.
    accept: Vec<bool>,
    /// Per state index: some byte leads to a live state.
    can_continue: Vec<bool>,
    /// Per state index: the allowed tokens (EOS bits included), computed on first use.
    masks: Vec<OnceLock<MaskWords>>,
    cached_bytes: AtomicUsize,
    mask_cache_bytes: usize,
}

fn build_error(e: dense::BuildError) -> GuideError {
    let size = e.is_size_limit_exceeded();
    error_of(&e, size)
}

pub(crate) fn error_of(e: &dyn std::error::Error, size: bool) -> GuideError {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    if size || msg.contains("exceeded size limit") || msg.contains("exceeded limit") {
        GuideError::TooLarge(format!("the regex's automaton is over budget ({msg})"))
    } else {
        GuideError::InvalidRegex(msg)
    }
}

/// The most copies a counted repetition in `hir` makes, times the counts of the repetitions
/// around it (saturating; `hir` is at most the syntax nest limit deep).
pub(crate) fn repetition_copies(hir: &Hir) -> u64 {
    match hir.kind() {
        HirKind::Repetition(r) => {
            let count = u64::from(r.max.unwrap_or(r.min).max(r.min)).max(1);
            count.saturating_mul(repetition_copies(&r.sub))
        }
        HirKind::Capture(c) => repetition_copies(&c.sub),
        HirKind::Concat(v) | HirKind::Alternation(v) => {
            v.iter().map(repetition_copies).max().unwrap_or(1)
        }
        _ => 1,
    }
}

impl DfaGuide {
    pub(crate) fn new(vocab: &VocabCore, pattern: &str, limits: &DfaLimits) -> Result<DfaGuide> {
        let _ = vocab;
        Self::build(pattern, limits, true)
    }

    /// Compiles `pattern`; with `utf8 = false` the pattern may match bytes that are not UTF-8
    /// (`(?-u:\xFF)`): the JSON Schema compiler's call markers.
    pub(crate) fn build(pattern: &str, limits: &DfaLimits, utf8: bool) -> Result<DfaGuide> {
        let nest = if utf8 {
            NEST_LIMIT
        } else {
            GENERATED_NEST_LIMIT
        };
        let thompson = thompson::Config::new()
            .nfa_size_limit(Some(limits.nfa_bytes))
            .utf8(utf8)
            .which_captures(thompson::WhichCaptures::None);
        let mut builder = dense::Builder::new();
        builder
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Anchored)
                    .minimize(false)
                    .accelerate(false)
                    .dfa_size_limit(Some(limits.dfa_bytes))
                    .determinize_size_limit(Some(limits.determinize_bytes)),
            )
            .syntax(syntax::Config::new().nest_limit(nest).utf8(utf8))
            .thompson(thompson.clone());
        // Parsed once: checked for repetition budgets, then compiled from the same HIR. A
        // pattern that does not parse goes to the builder, for its message.
        let dfa = match regex_syntax::ParserBuilder::new()
            .nest_limit(nest)
            .utf8(utf8)
            .build()
            .parse(pattern)
        {
            Ok(hir) => {
                let copies = repetition_copies(&hir);
                if copies > u64::from(limits.max_repetition) {
                    return Err(GuideError::TooLarge(format!(
                        "a counted repetition makes {copies} copies, over the limit of {}",
                        limits.max_repetition
                    )));
                }
                let nfa = thompson::Compiler::new()
                    .configure(thompson)
                    .build_from_hir(&hir)
                    .map_err(|e| error_of(&e, e.size_limit().is_some()))?;
                builder.build_from_nfa(&nfa)
            }
            Err(_) => builder.build(pattern),
        }
        .map_err(build_error)?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .map_err(|e| GuideError::InvalidRegex(e.to_string()))?;

        // Byte classes and one representative byte per class.
        let mut classes = [0u8; 256];
        let mut reps: Vec<u8> = Vec::new();
        for b in 0..=255u8 {
            let c = dfa.byte_classes().get(b);
            classes[b as usize] = c;
            if c as usize >= reps.len() {
                reps.resize(c as usize + 1, b);
            }
        }
        // Make sure every class's representative is a byte of that class.
        for b in (0..=255u8).rev() {
            reps[classes[b as usize] as usize] = b;
        }
        let stride = reps.len();

        // Explore the reachable states; index 0 is the dead state.
        // By the dense DFA's state index (its ids are premultiplied by 2^stride2): our id + 1.
        let stride2 = dfa.stride2();
        let mut index: Vec<u32> = Vec::new();
        let mut order = vec![start];
        let mut raw: Vec<u32> = vec![0; stride]; // row 0: dead
        let mut accept = vec![false];
        if dfa.is_dead_state(start) {
            return Err(GuideError::Empty);
        }
        let slot = |index: &mut Vec<u32>, sid: regex_automata::util::primitives::StateID| {
            let k = sid.as_usize() >> stride2;
            if k >= index.len() {
                index.resize(k + 1, 0);
            }
            k
        };
        let k = slot(&mut index, start);
        index[k] = 1;
        let mut seen = 1u32;
        let mut i = 0;
        while i < order.len() {
            let sid = order[i];
            i += 1;
            accept.push(dfa.is_match_state(dfa.next_eoi_state(sid)));
            for &b in &reps {
                let next = dfa.next_state(sid, b);
                if dfa.is_dead_state(next) || dfa.is_quit_state(next) {
                    raw.push(0);
                    continue;
                }
                let k = slot(&mut index, next);
                if index[k] == 0 {
                    seen += 1;
                    index[k] = seen;
                    order.push(next);
                }
                raw.push(index[k]);
            }
            if order.len() > limits.max_states {
                return Err(GuideError::TooLarge(format!(
                    "the regex's DFA has more than {} states",
                    limits.max_states
                )));
            }
        }
        let n = order.len() + 1;

        // Live states: those from which an accepting state is reachable (reverse BFS).
        let mut rev_start = vec![0u32; n + 1];
        for s in 1..n {
            for &t in &raw[s * stride..(s + 1) * stride] {
                if t != 0 {
                    rev_start[t as usize + 1] += 1;
                }
            }
        }
        for k in 1..=n {
            rev_start[k] += rev_start[k - 1];
        }
        let mut fill = rev_start.clone();
        let mut rev = vec![0u32; rev_start[n] as usize];
        for s in 1..n {
            for &t in &raw[s * stride..(s + 1) * stride] {
                if t != 0 {
                    rev[fill[t as usize] as usize] = s as u32;
                    fill[t as usize] += 1;
                }
            }
        }
        let mut live = accept.clone();
        let mut queue: Vec<u32> = (1..n as u32).filter(|&s| live[s as usize]).collect();
        while let Some(t) = queue.pop() {
            for &s in &rev[rev_start[t as usize] as usize..rev_start[t as usize + 1] as usize] {
                if !live[s as usize] {
                    live[s as usize] = true;
                    queue.push(s);
                }
            }
        }
        if !live[1] {
            return Err(GuideError::Empty);
        }

        // Renumber the live states (premultiplied ids), dead ones all become 0.
        let mut new_id = vec![DEAD; n];
        let mut count = 1usize;
        for s in 1..n {
            if live[s] {
                new_id[s] = (count * stride) as StateId;
                count += 1;
            }
        }
        if count.saturating_mul(stride) >= StateId::MAX as usize {
            return Err(GuideError::TooLarge(
                "the regex's DFA table is too big".into(),
            ));
        }
        let mut trans = vec![DEAD; count * stride];
        let mut acc = vec![false; count];
        let mut cont = vec![false; count];
        for s in 1..n {
            if !live[s] {
                continue;
            }
            let k = new_id[s] as usize / stride;
            acc[k] = accept[s];
            for c in 0..stride {
                let t = new_id[raw[s * stride + c] as usize];
                trans[k * stride + c] = t;
                cont[k] |= t != DEAD;
            }
        }
        let masks = (0..count).map(|_| OnceLock::new()).collect();
        Ok(DfaGuide {
            classes,
            stride,
            trans,
            start: new_id[1],
            accept: acc,
            can_continue: cont,
            masks,
            cached_bytes: AtomicUsize::new(0),
            mask_cache_bytes: limits.mask_cache_bytes,
        })
    }

    pub(crate) fn start(&self) -> StateId {
        self.start
    }

    /// One byte from `s` (`DEAD`, 0, when the byte leads nowhere).
    #[inline(always)]
    pub(crate) fn step(&self, s: StateId, b: u8) -> StateId {
        self.trans[s as usize + self.classes[b as usize] as usize]
    }

    pub(crate) fn num_states(&self) -> usize {
        self.accept.len() - 1
    }

    #[inline]
    pub(crate) fn is_accepting(&self, s: StateId) -> bool {
        self.accept[s as usize / self.stride]
    }

    #[inline]
    pub(crate) fn can_continue(&self, s: StateId) -> bool {
        self.can_continue[s as usize / self.stride]
    }

    /// The state after `bytes` from `s`, or `None` if it is dead.
    #[inline]
    pub(crate) fn walk(&self, mut s: StateId, bytes: &[u8]) -> Option<StateId> {
        for &b in bytes {
            s = self.trans[s as usize + self.classes[b as usize] as usize];
            if s == DEAD {
                return None;
            }
        }
        (s != DEAD && !bytes.is_empty()).then_some(s)
    }

    /// Writes the mask of state `s` into `out` (exactly `vocab.mask_words()` long).
    pub(crate) fn fill_mask(&self, vocab: &VocabCore, s: StateId, out: &mut [u32]) {
        let k = s as usize / self.stride;
        if let Some(m) = self.masks[k].get() {
            out.copy_from_slice(m);
            return;
        }
        let bytes = out.len() * 4;
        let within =
            self.cached_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.mask_cache_bytes;
        if !within {
            self.cached_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.compute_mask(vocab, s, out);
            return;
        }
        let m = self.masks[k].get_or_init(|| {
            let mut m = vec![0u32; out.len()].into_boxed_slice();
            self.compute_mask(vocab, s, &mut m);
            m
        });
        out.copy_from_slice(m);
    }

    /// Walks the token trie through the table from `s`: one pass over the trie's nodes, a dead
    /// transition skips the node's subtree.
    fn compute_mask(&self, vocab: &VocabCore, s: StateId, out: &mut [u32]) {
        out.fill(0);
        let trie = vocab.trie();
        let nodes = trie.nodes();
        let mut stack = vec![DEAD; trie.max_depth() + 1];
        stack[0] = s;
        let mut i = 1;
        while i < nodes.len() {
            let n = &nodes[i];
            let d = n.depth as usize;
            let next = self.trans[stack[d - 1] as usize + self.classes[n.byte as usize] as usize];
            if next == DEAD {
                i = n.subtree_end as usize;
                continue;
            }
            stack[d] = next;
            for &t in trie.tokens_of(n) {
                out[(t / 32) as usize] |= 1 << (t % 32);
            }
            i += 1;
        }
        if self.is_accepting(s) {
            for (o, e) in out.iter_mut().zip(vocab.eos_mask()) {
                *o |= e;
            }
        }
    }
}
