//! The JSON Schema engine's automaton: a recursive transition network (RTN) of byte DFAs.
//!
//! A *rule* is a byte DFA (a [`LazyDfa`], determinized as walks reach its states) whose
//! pattern may contain *call markers*:
//! the byte `0xFF` (never part of UTF-8 text) followed by two bytes naming another rule. Taking
//! a marker edge from state `s` means "match the callee, then go on from the state after the
//! marker" (the *return state*). Regular parts of a schema (strings, numbers, literals, the
//! shape of an object with its keys, small bounded repetitions) are inlined into one rule's
//! DFA; recursion (`$ref` cycles, any-JSON values) and large sub-schemas are calls.
//!
//! A *counted* rule matches its body DFA between `min` and `max` times without unrolling it:
//! its state is `(n, s)`, `n` the elements completed so far, encoded as `n * table_len + s`
//! (a counted rule's element DFA is small and made whole up front).
//! Masks are cached by a normalized key in which every counter is replaced by its distances to
//! `min` and `max`, clamped at the longest token plus one: a token of at most `L` bytes changes
//! a counter by at most `L` (every element is at least one byte), so states whose clamped
//! distances agree allow the same tokens. `maxLength: 5000` costs one DFA of one character and
//! a handful of cached masks.
//!
//! A matcher state is a small set of stacks (the language is not LL(1) in general: `anyOf`
//! branches are tried in parallel). Each stack is a list of frames, bottom first; the top frame
//! holds the current state of its rule, the frames below hold their rules' return states.
//!
//! The mask of a one-stack state is the top rule's cached context-free part for its state
//! ([`Inner`]: the tokens the rule consumes by itself, computed once per process and
//! vocabulary, and the trie nodes where a pop or call may happen) plus general walks below
//! those nodes (a call before any byte takes the callee's own mask in that context, cached
//! like any other); other states take one general walk of the whole trie. A general walk carries
//! the set of stacks reached by each trie node's bytes (a persistent arena of frames, so pushes
//! and pops cost one entry); an empty set skips the node's subtree. Below a state that loops on
//! string content, a subtree of pure string content is allowed whole. Masks are cached on the
//! guide by the normalized key of the state, shared by every sequence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::sync::OnceLock;

use super::super::error::{GuideError, Result};
use super::super::lazy::{any_overflow, LazyDfa, Segments};
use super::super::vocab::VocabCore;
use super::super::StateId;
use crate::guide::trie::{esc_step, U8};

/// [`Rule`] state flag: the rule may end here.
const ACCEPTING: u8 = 1;
/// [`Rule`] state flag: calls leave from here.
const CALLS: u8 = 2;

/// The first byte of a call marker (`0xFF` never occurs in UTF-8 text).
pub(crate) const MARKER: u8 = 0xFF;
const NONE: u32 = u32::MAX;
/// Most stacks a state may hold (ambiguity between `anyOf` branches); past it, the step fails.
const MAX_STACKS: usize = 256;
/// Most pushes and pops one byte may take before it is consumed (guards against
/// left-recursive rule cycles, which JSON Schema cannot write but a malformed table could).
const MAX_EPSILON: u32 = 256;

/// The calls (callee, return state) leaving a state.
type Calls = Box<[(u32, StateId)]>;

/// Per DFA state of a rule, each part computed on first use.
#[derive(Default)]
struct Meta {
    /// The calls leaving it.
    calls: OnceLock<Calls>,
    /// [`Rule::content_loop`].
    content_loop: OnceLock<bool>,
    /// [`Rule::self_loop`].
    self_loop: OnceLock<[u64; 4]>,
    /// [`Rule::content_closed`].
    closed: OnceLock<Option<[u64; 4]>>,
    /// [`Rule::content_exit`] from inside a character: (decoder state, result).
    mid_exit: OnceLock<(crate::guide::trie::U8, Option<StateId>)>,
    /// The vocabulary table of `self_loop`'s class ([`crate::guide::TokenTrie::within`]), for
    /// the first vocabulary that asked (by id): the walks ask at many nodes, and the trie's
    /// table lookup takes a lock.
    loop_table: OnceLock<(u64, Option<Arc<Vec<u64>>>)>,
}

/// A group of bytes (see [`Rule::byte_groups`]): one of them, and all of them (a bit set).
type ByteGroup = (u8, [u64; 4]);

/// A frame of a stack: a rule and a state of it.
pub(crate) type Frame = (u32, u32);

/// One rule of the network.
pub(crate) struct Rule {
    dfa: LazyDfa,
    /// The rules its pattern calls.
    callees: Box<[u32]>,
    /// By DFA state: see [`Meta`].
    meta: Segments<Meta>,
    /// `Some((min, max))` for a counted rule (`max = None`: unbounded).
    count: Option<(u32, Option<u32>)>,
    /// `dfa.table_len()` of a counted rule (its DFA is made whole up front): the multiplier of
    /// the element counter in its states.
    space: u32,
    /// The bytes that may follow the rule where it is called (a bit set); a pop is only
    /// followed on these.
    follow: [u64; 4],
    /// By (vocabulary id, normalized state): the context-free part of its mask ([`Inner`]).
    inner: Arc<InnerCache>,
    /// A counted rule whose element is one JSON string character, read as unescaped content
    /// (every content character from the start completes an element, and content bytes never
    /// end the rule): below a character boundary, content tokens are counted, not walked.
    char_element: bool,
    /// For a `char_element` rule: the one DFA state every unescaped character leads to from
    /// the element's start (`None` when they end in different states).
    content_end: Option<StateId>,
    /// A rule that counts characters (a string `pattern` with lengths): the counter `n` of
    /// a state `(n, s)` is the characters of JSON string content started so far (escapes
    /// read as one), and `s` runs the pattern's DFA once (no elements). By DFA state index:
    /// its escape context ([`esc_step`]), one per state (checked when the rule is built).
    esc: Option<Box<[u8]>>,
    /// `stride2` of the DFA: a state's index is `s >> esc_shift`.
    esc_shift: u32,
    /// For a rule that counts characters, by DFA state index: the fewest characters that
    /// complete a match from it ([`FAR`]: none do). A step is only taken to a state from which
    /// the count can still be met (no dead ends).
    lo: Box<[u32]>,
    /// The most of `lo`'s finite entries.
    lo_max: u32,
    /// [`Rule::byte_groups`].
    groups: OnceLock<Box<[ByteGroup]>>,
}

/// Most DFA states of a rule that counts characters (made whole when it is built).
const CHARS_STATES: usize = 4096;

/// [`Rule::lo`] of a state from which no match can be completed.
const FAR: u32 = u32::MAX;

/// [`Inner`] entries by (vocabulary id, normalized state). Rules with the same pattern and
/// follow set share one (a counted rule's normalized states do not depend on its bounds past
/// the clamp: every `maxLength` string shares the masks of its first characters).
pub(crate) type InnerCache = Mutex<HashMap<(u64, u32, u32, u32), Arc<Inner>>>;

/// What a state of a rule allows whatever the stack below it, and where the stack matters.
/// `mask`: the tokens whose bytes the rule consumes by itself (no pop, no call). `frontier`:
/// the trie nodes after which a walk may pop or call instead, where the general walk takes
/// over for the node's descendants (node 0: before any byte). Computed once per (rule,
/// normalized state, vocabulary) and shared by every schema using the rule.
pub(crate) struct Inner {
    mask: Box<[u32]>,
    frontier: Vec<Front>,
}

/// A frontier entry (see [`Inner`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Front {
    /// The rule may end just before this node (its byte is in the rule's follow set): the
    /// parent's frame continues with the node's byte and its descendants.
    Pop(u32),
    /// Calls leave the rule after this node, from the state `(n + dn, s)` (`dn` relative to
    /// the count of the state the entry was computed for; 0 in a non-counted rule).
    Call(u32, u32, StateId),
}

/// Most masks one mask's computation may nest (calls before any byte, each a mask of its own).
const MAX_NESTED_MASKS: u32 = 16;

/// Most in-rule states one trie depth may carry in [`Rule::inner`]; past it the general walk
/// is used.
const INNER_WIDTH: usize = 8;

/// Most [`Inner`] entries one rule keeps (per process).
const INNER_ENTRIES: usize = 4096;

impl Rule {
    /// Builds a rule from its DFA. `callees` are the rules its pattern calls.
    pub(crate) fn new(
        dfa: LazyDfa,
        callees: &[u32],
        count: Option<(u32, Option<u32>)>,
        chars: bool,
        follow: Option<&[u8]>,
        inner: Arc<InnerCache>,
    ) -> Result<Rule> {
        let mut fset = [u64::MAX; 4];
        if let Some(f) = follow {
            fset = [0; 4];
            for &b in f {
                fset[(b >> 6) as usize] |= 1 << (b & 63);
            }
        }
        let mut space = 0;
        if let Some((min, max)) = count {
            // A counted rule's states are numbered `n * space + s`: its DFA is made whole.
            // A pattern's DFA with lengths is made whole too, up to a few thousand states (a
            // word-count pattern `^(?:\S+\s+){0,99}\S+$` fits; a long repetition of a
            // Unicode class does not, and goes to llguidance).
            dfa.expand(if chars { CHARS_STATES } else { usize::MAX })?;
            space = dfa.table_len() as u32;
            let start = dfa.start();
            if chars {
                // The pattern runs once: its DFA may accept the empty string and loop.
            } else if dfa.is_accepting(start) {
                return Err(GuideError::Invalid(
                    "a counted rule's element must not be empty".into(),
                ));
            }
            let reenters = !chars
                && dfa
                    .states()
                    .any(|s| (0..=255u8).any(|b| dfa.step(s, b) == start));
            if reenters {
                return Err(GuideError::Invalid(
                    "a counted rule's element must not return to its start".into(),
                ));
            }
            let top = u64::from(max.unwrap_or(min)) + 1;
            if top * u64::from(space) >= u64::from(NONE) {
                return Err(GuideError::TooLarge(format!(
                    "a repetition of up to {top} elements is over the counter's range"
                )));
            }
        }
        let (max_states, stride2) = dfa.shape();
        let (esc, lo) = match count {
            Some((min, max)) if chars => {
                let esc = escape_contexts(&dfa, stride2)?;
                let (lo, unbounded) = char_lengths(&dfa, stride2, &esc);
                let least = lo[(dfa.start() >> stride2) as usize];
                // Which bounds the pattern's lengths leave dead-end free with `lo` alone: a
                // maximum (a state is live while its shortest completion fits), and a
                // minimum the pattern implies, or one below which no state's completions
                // stop growing.
                let fits = match max {
                    Some(m) => least <= m && min <= least,
                    None => min <= least || unbounded,
                };
                if least == FAR || !fits {
                    return Err(GuideError::Invalid(
                        "a `pattern` with lengths this engine cannot bound".into(),
                    ));
                }
                (Some(esc), lo)
            }
            _ => (None, Box::default()),
        };
        let lo_max = lo.iter().copied().filter(|&l| l != FAR).max().unwrap_or(0);
        let mut rule = Rule {
            meta: Segments::new(max_states, stride2, 0),
            callees: callees.into(),
            dfa,
            count,
            space,
            follow: fset,
            inner,
            char_element: false,
            content_end: None,
            esc,
            esc_shift: stride2,
            lo,
            lo_max,
            groups: OnceLock::new(),
        };
        if count.is_some() && rule.esc.is_none() {
            if let Some(end) = rule.element_is_one_char() {
                rule.char_element = true;
                rule.content_end = end;
            }
        }
        Ok(rule)
    }

    /// What is known of DFA state `s` (made on first use).
    #[inline]
    fn meta(&self, s: StateId) -> Option<&Meta> {
        if !self.meta.ensure(s) {
            return None;
        }
        self.meta.get(s, 0)
    }

    /// The calls (callee, return state) leaving DFA state `s`.
    #[inline]
    fn calls(&self, s: StateId) -> &[(u32, StateId)] {
        let Some(m) = self.meta(s) else {
            return &[];
        };
        m.calls.get_or_init(|| {
            if self.dfa.step(s, MARKER) == 0 {
                return Box::new([]);
            }
            self.callees
                .iter()
                .filter_map(|&c| self.dfa.walk(s, &marker_bytes(c)).map(|ret| (c, ret)))
                .collect()
        })
    }

    /// [`ACCEPTING`] and [`CALLS`] of DFA state `s`.
    #[inline(always)]
    fn flags(&self, s: StateId) -> u8 {
        (u8::from(self.dfa.is_accepting(s)) * ACCEPTING)
            | (u8::from(!self.calls(s).is_empty()) * CALLS)
    }

    /// Whether a walk of this rule was cut at its state budget.
    pub(crate) fn overflowed(&self) -> bool {
        self.dfa.overflowed()
    }

    /// Normalizes a counter after `n` elements (unbounded repetitions forget counts past
    /// `min`).
    #[inline(always)]
    fn clamp_n(&self, n: u32) -> u32 {
        match self.count {
            Some((min, None)) => n.min(min),
            _ => n,
        }
    }

    /// Records the calls that may leave the rule from in-rule state `st` after trie node
    /// `node`.
    fn boundary(&self, st: u32, n0: u32, node: u32, out: &mut Vec<Front>) {
        self.positions(st, |p| {
            let (n, s) = self.split(p);
            if !self.calls(s).is_empty() {
                out.push(Front::Call(node, n.saturating_sub(n0), s));
            }
        });
    }

    /// The context-free part of the mask of state `st` (see [`Inner`]); `None` when the rule is
    /// too ambiguous there for the in-rule walk.
    fn inner(&self, vocab: &VocabCore, st: u32, clamp: u32) -> Option<Arc<Inner>> {
        let mut k = Vec::with_capacity(3);
        self.key(st, clamp, &mut k);
        k.resize(3, 0);
        let key = (vocab.id(), k[0], k[1], k[2]);
        self.cached_inner(key, || {
            if self.count.is_none() {
                Some(self.inner_dfa(vocab, st))
            } else if self.esc.is_some() {
                self.inner_chars(vocab, st)
            } else {
                self.inner_counted(vocab, st)
            }
        })
    }

    /// The [`Inner`] cached under `key`, else `make`'s, kept unless the rule's state budget cut
    /// it short (the caller reports that) or the cache is full.
    fn cached_inner(
        &self,
        key: (u64, u32, u32, u32),
        make: impl FnOnce() -> Option<Inner>,
    ) -> Option<Arc<Inner>> {
        if let Some(x) = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Some(x.clone());
        }
        let x = Arc::new(make()?);
        if !self.overflowed() {
            let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if c.len() < INNER_ENTRIES {
                c.insert(key, x.clone());
            }
        }
        Some(x)
    }

    /// [`Rule::inner`] of a non-counted rule: one state per trie depth.
    fn inner_dfa(&self, vocab: &VocabCore, st: StateId) -> Inner {
        let trie = vocab.trie();
        let nodes = trie.nodes();
        let mut mask = vec![0u32; vocab.mask_words()].into_boxed_slice();
        let mut frontier = Vec::new();
        self.boundary(st, 0, 0, &mut frontier);
        let depth = trie.max_depth() + 2;
        let mut stack = vec![0 as StateId; depth];
        let mut acc = vec![false; depth];
        stack[0] = st;
        acc[0] = self.dfa.is_accepting(st);
        // Where most string content goes on from `st` (a key of an open object: any name),
        // the mask starts as every token of content from the root, and the walk clears the
        // content tokens below the nodes where it dies, instead of setting the bits of every
        // subtree it takes.
        let subtract = self.mostly_content(st);
        if subtract {
            trie.or_content_upto(None, &mut mask);
        }
        // Ranges of the trie to walk: (first node, end, state before the first node).
        let mut work: Vec<(usize, usize, StateId)> = vec![(1, nodes.len(), st)];
        let skeleton = if subtract {
            self.content_closed(st)
                .map(|leads| trie.skeleton(&leads))
                .filter(|sk| sk.len() <= nodes.len() / 4)
        } else {
            None
        };
        if let Some(skeleton) = skeleton {
            // Every string content keeps the rule alive from `st` (an unanchored `pattern`
            // before its match, or after it; a key of an open object), but for characters
            // with a few first bytes: all content tokens stand, and only the paths to the
            // quotes, backslashes and those first bytes are stepped, to walk on from there.
            work.clear();
            for &(i, exit) in skeleton.iter() {
                let n = &nodes[i as usize];
                let d = n.depth as usize;
                if exit {
                    work.push((i as usize, n.subtree_end as usize, stack[d - 1]));
                } else {
                    stack[d] = self.dfa.step(stack[d - 1], n.byte);
                }
            }
        }
        while let Some((from, to, before)) = work.pop() {
            if from >= to {
                continue;
            }
            let d0 = nodes[from].depth as usize;
            stack[d0 - 1] = before;
            acc[d0 - 1] = self.dfa.is_accepting(before);
            let mut i = from;
            while i < to {
                let n = &nodes[i];
                let d = n.depth as usize;
                if acc[d - 1] && self.follow[(n.byte >> 6) as usize] & (1 << (n.byte & 63)) != 0 {
                    frontier.push(Front::Pop(i as u32));
                }
                let t = if n.byte == MARKER {
                    0
                } else {
                    self.dfa.step(stack[d - 1], n.byte)
                };
                if t == 0 {
                    if subtract {
                        for &tok in trie.content_in_subtree(i) {
                            mask[(tok / 32) as usize] &= !(1 << (tok % 32));
                        }
                    }
                    i = n.subtree_end as usize;
                    continue;
                }
                stack[d] = t;
                let f = self.flags(t);
                acc[d] = f & ACCEPTING != 0;
                for &tok in trie.tokens_of(n) {
                    mask[(tok / 32) as usize] |= 1 << (tok % 32);
                }
                if f & CALLS != 0 {
                    frontier.push(Front::Call(i as u32, 0, t));
                }
                if f & CALLS == 0 && n.subtree_end as usize > i + 1 {
                    // Inside a loop (string content, or bytes looping on one state): every
                    // token below is allowed, without walking it.
                    if self.takes_subtree(vocab, t, i) {
                        if !(subtract && trie.content_below(i) && trie.content_path(i)) {
                            for &tok in trie.tokens_below(i) {
                                mask[(tok / 32) as usize] |= 1 << (tok % 32);
                            }
                        }
                        i = n.subtree_end as usize;
                        continue;
                    }
                }
                if f == 0 && n.subtree_end as usize > i + 1 {
                    // In a string-content loop, on a path that is content from the root: the
                    // tokens below that are content all the way are allowed, and only the
                    // nodes where content stops are walked on (from this state). The same
                    // inside a character on such a path (a lead byte of a multi-byte
                    // character) when every content continuation completes it into one
                    // content loop `l`, the state before every exit below.
                    let shortcut = if self.is_content_loop(t) {
                        trie.content_from_root(i).map(|(c, e, b)| (c, e, b, t))
                    } else {
                        None
                    }
                    .or_else(|| {
                        let u = trie.content_decoder(i).filter(|&u| u != U8::Boundary)?;
                        let l = self.content_exit(t, u)?;
                        let (e, b) = trie.exits_below(i);
                        Some((trie.content_in_subtree(i), e, b, l))
                    });
                    if let Some((content, exits, bytes, l)) = shortcut {
                        if !subtract {
                            for &tok in content {
                                mask[(tok / 32) as usize] |= 1 << (tok % 32);
                            }
                        }
                        // A content loop neither accepts nor calls: an exit whose byte is
                        // dead from `l` (a control character, often) adds nothing.
                        for (&e, &b) in exits.iter().zip(bytes) {
                            if b != MARKER && self.dfa.step(l, b) != 0 {
                                work.push((e as usize, nodes[e as usize].subtree_end as usize, l));
                            }
                        }
                        i = n.subtree_end as usize;
                        continue;
                    }
                }
                i += 1;
            }
        }
        Inner { mask, frontier }
    }

    /// Whether nearly every printable ASCII byte goes on from `s` (see [`Rule::inner_dfa`]).
    fn mostly_content(&self, s: StateId) -> bool {
        let live = (0x20..0x7Fu8)
            .filter(|&b| b != b'"' && b != b'\\' && self.dfa.step(s, b) != 0)
            .count();
        live >= 80
    }

    /// The bytes that lead from `s` back to `s` when `s` does not call (a bit set; empty
    /// otherwise), but for the bytes that may follow the rule where `s` accepts: below a trie
    /// node reached in `s`, a subtree made of these bytes only is allowed whole (no byte of it
    /// can pop: an accepting word of a word-count pattern takes the letters of every token
    /// below without walking them). Computed once per state.
    fn self_loop(&self, s: StateId) -> [u64; 4] {
        let Some(m) = self
            .meta(s)
            .filter(|_| self.count.is_none() || self.esc.is_some())
        else {
            return [0; 4];
        };
        *m.self_loop.get_or_init(|| {
            let mut set = [0u64; 4];
            let f = self.flags(s);
            if f & CALLS == 0 {
                for b in (0..=255u8).filter(|&b| b != MARKER) {
                    if self.dfa.step(s, b) == s {
                        set[(b >> 6) as usize] |= 1 << (b & 63);
                    }
                }
                if f & ACCEPTING != 0 {
                    for (x, f) in set.iter_mut().zip(self.follow) {
                        *x &= !f;
                    }
                }
            }
            set
        })
    }

    /// Whether a walk in state `s` (not calling) may take every token below trie node `i`
    /// without walking them: string content below a content loop, or bytes that all loop on
    /// `s` (none of which may follow the rule where `s` accepts).
    fn takes_subtree(&self, vocab: &VocabCore, s: StateId, i: usize) -> bool {
        let trie = vocab.trie();
        if trie.content_below(i) && self.is_content_loop(s) {
            return true;
        }
        // Only where the subtree's first byte loops (the walk takes that step anyway) is the
        // state's whole loop set computed (every byte's transition).
        let first = trie.nodes()[i + 1].byte;
        if first == MARKER || self.dfa.step(s, first) != s {
            return false;
        }
        let set = self.self_loop(s);
        if set == [0; 4] {
            return false;
        }
        let bit = |t: &Vec<u64>| t[i / 64] & (1 << (i % 64)) != 0;
        let Some(m) = self.meta(s) else { return false };
        match m.loop_table.get_or_init(|| (vocab.id(), trie.within(&set))) {
            (id, t) if *id == vocab.id() => t.as_deref().is_some_and(bit),
            _ => trie.within(&set).as_deref().is_some_and(bit),
        }
    }

    /// The bytes by what the searches over string content tell apart: the DFA's byte class
    /// and the byte's part in UTF-8 and JSON content (see [`U8::next`]; a quote, a backslash,
    /// the call marker), as (a byte of the group, the group's bytes). A few dozen groups, so
    /// that a search steps each state a few dozen times, not 256.
    fn byte_groups(&self) -> &[ByteGroup] {
        self.groups.get_or_init(|| {
            let kind = |b: u8| -> u8 {
                match b {
                    0x00..=0x1F => 0,
                    b'"' => 1,
                    b'\\' => 2,
                    0x20..=0x7F => 3,
                    0x80..=0x8F => 4,
                    0x90..=0x9F => 5,
                    0xA0..=0xBF => 6,
                    0xC0..=0xC1 => 7,
                    0xC2..=0xDF => 8,
                    0xE0 => 9,
                    0xE1..=0xEC => 10,
                    0xED => 11,
                    0xEE..=0xEF => 12,
                    0xF0 => 13,
                    0xF1..=0xF3 => 14,
                    0xF4 => 15,
                    MARKER => 16,
                    _ => 17,
                }
            };
            let mut out: Vec<ByteGroup> = Vec::new();
            let mut index = HashMap::new();
            for b in 0..=255u8 {
                let i = *index
                    .entry((self.dfa.class_of(b), kind(b)))
                    .or_insert_with(|| {
                        out.push((b, [0; 4]));
                        out.len() - 1
                    });
                out[i].1[(b >> 6) as usize] |= 1 << (b & 63);
            }
            out.into_boxed_slice()
        })
    }

    /// [`Rule::content_loop`], computed once per state.
    #[inline]
    fn is_content_loop(&self, l: StateId) -> bool {
        self.meta(l)
            .is_some_and(|m| *m.content_loop.get_or_init(|| self.content_loop(l)))
    }

    /// Whether every string content (valid UTF-8, no quote, backslash or control character;
    /// possibly ending inside a character) read from boundary state `t` goes through live states
    /// that do not call (and accept only where no content may follow the rule), every other
    /// byte inside a character being dead — but for the characters whose first bytes are
    /// returned (a set): those may die or leave that region, and a walk steps them. `None`:
    /// not so (or past the bounded search). Every boundary state the search went through is
    /// closed too, with at most the same first bytes (its reachable set is a subset), and is
    /// marked so.
    fn content_closed(&self, t: StateId) -> Option<[u64; 4]> {
        let m = self.meta(t)?;
        if let Some(c) = m.closed.get() {
            return *c;
        }
        let content_follows = (0x20..=0xFFu8)
            .filter(|&b| b != b'"' && b != b'\\')
            .any(|b| self.follow[(b >> 6) as usize] & (1 << (b & 63)) != 0);
        let fine = |x: StateId| {
            let f = if x == 0 { CALLS } else { self.flags(x) };
            f & CALLS == 0 && (f & ACCEPTING == 0 || !content_follows)
        };
        let found = if fine(t) {
            self.closed_plain(t, &fine)
                .map(|seen| ([0u64; 4], seen))
                .or_else(|| self.closed_leads(t, &fine))
        } else {
            None
        };
        let Some((leads, seen)) = found else {
            let _ = m.closed.set(None);
            return None;
        };
        for &s in &seen {
            if let Some(m) = self.meta(s) {
                let _ = m.closed.set(Some(leads));
            }
        }
        Some(leads)
    }

    /// [`Rule::content_closed`] from `t` (a state `fine` takes) with no first bytes left out:
    /// one search over (state, decoder state) pairs; the boundary states it went through.
    fn closed_plain(&self, t: StateId, fine: &impl Fn(StateId) -> bool) -> Option<Vec<StateId>> {
        let mut seen: Vec<(StateId, U8)> = vec![(t, U8::Boundary)];
        let mut todo = vec![(t, U8::Boundary)];
        while let Some((s, u)) = todo.pop() {
            if u == U8::Boundary && s != t {
                match self.meta(s).and_then(|m| m.closed.get()) {
                    Some(Some(l)) if *l == [0; 4] => continue,
                    Some(_) => return None,
                    None => {}
                }
            }
            for &(b, _) in self.byte_groups() {
                let next = if b == MARKER { 0 } else { self.dfa.step(s, b) };
                let Some(v) = u.next(b) else {
                    // Only a quote or a backslash may go on where content stops (the walk
                    // steps those); inside a character nothing else may.
                    if next != 0 && !(u == U8::Boundary && (b == b'"' || b == b'\\')) {
                        return None;
                    }
                    continue;
                };
                if !fine(next) {
                    return None;
                }
                if !seen.contains(&(next, v)) {
                    if seen.len() >= CLOSED_SEARCH {
                        return None;
                    }
                    seen.push((next, v));
                    todo.push((next, v));
                }
            }
        }
        Some(
            seen.into_iter()
                .filter(|x| x.1 == U8::Boundary)
                .map(|x| x.0)
                .collect(),
        )
    }

    /// [`Rule::content_closed`] from `t` (a state `fine` takes) leaving out the characters of
    /// some first bytes (a smaller
    /// search: the few states of a pattern like `^.*$`); the first bytes and the boundary
    /// states it went through.
    fn closed_leads(
        &self,
        t: StateId,
        fine: &impl Fn(StateId) -> bool,
    ) -> Option<([u64; 4], Vec<StateId>)> {
        let mut leads = [0u64; 4];
        let mut seen: Vec<StateId> = vec![t];
        let mut todo = vec![t];
        let mut ends = Vec::new();
        while let Some(s) = todo.pop() {
            if s != t {
                if let Some(Some(l)) = self.meta(s).and_then(|m| m.closed.get()) {
                    for (a, b) in leads.iter_mut().zip(l) {
                        *a |= b;
                    }
                    continue;
                }
            }
            for &(b, members) in self.byte_groups() {
                let next = if b == MARKER { 0 } else { self.dfa.step(s, b) };
                let Some(v) = U8::Boundary.next(b) else {
                    if next != 0 && b != b'"' && b != b'\\' {
                        return None;
                    }
                    continue;
                };
                ends.clear();
                if !self.one_char(next, v, fine, &mut ends) {
                    for (a, m) in leads.iter_mut().zip(members) {
                        *a |= m;
                    }
                    continue;
                }
                for &e in &ends {
                    if !seen.contains(&e) {
                        if seen.len() >= 16 {
                            return None;
                        }
                        seen.push(e);
                        todo.push(e);
                    }
                }
            }
        }
        Some((leads, seen))
    }

    /// The rest of one character from state `x` (decoder state `u`, after its first byte):
    /// whether every content continuation goes through states `fine` accepts, every other
    /// byte being dead; the boundary states it ends in are added to `ends`.
    fn one_char(
        &self,
        x: StateId,
        u: U8,
        fine: &impl Fn(StateId) -> bool,
        ends: &mut Vec<StateId>,
    ) -> bool {
        if !fine(x) {
            return false;
        }
        if u == U8::Boundary {
            ends.push(x);
            return true;
        }
        // Inside a character the DFA has few states: each (state, decoder state) once.
        let mut seen = vec![(x, u)];
        let mut todo = vec![(x, u)];
        while let Some((x, u)) = todo.pop() {
            for &(b, _) in self.byte_groups() {
                let next = self.dfa.step(x, b);
                let Some(v) = u.next(b) else {
                    if next != 0 {
                        return false;
                    }
                    continue;
                };
                if !fine(next) {
                    return false;
                }
                if v == U8::Boundary {
                    if !ends.contains(&next) {
                        ends.push(next);
                    }
                } else if !seen.contains(&(next, v)) {
                    if seen.len() >= 64 {
                        return false;
                    }
                    seen.push((next, v));
                    todo.push((next, v));
                }
            }
        }
        true
    }

    /// From state `t` inside a character (decoder state `u`): the content loop every content
    /// continuation completes the character into, if there is one and on the way every state is
    /// live and neither accepts nor calls, and every byte that does not continue the character
    /// is dead. Cached per state (for the decoder state it was first asked with).
    fn content_exit(&self, t: StateId, u: U8) -> Option<StateId> {
        let m = self.meta(t)?;
        let (u0, l) = *m.mid_exit.get_or_init(|| (u, self.find_content_exit(t, u)));
        if u0 == u {
            l
        } else {
            self.find_content_exit(t, u)
        }
    }

    fn find_content_exit(&self, t: StateId, u: U8) -> Option<StateId> {
        let mut ends = Vec::new();
        let fine = |x: StateId| x != 0 && self.flags(x) == 0;
        if !self.one_char(t, u, &fine, &mut ends) {
            return None;
        }
        match ends[..] {
            [l] if self.is_content_loop(l) => Some(l),
            _ => None,
        }
    }

    /// For a counted rule: whether every JSON string character (unescaped, valid UTF-8) read
    /// from the element's start completes exactly one element there (no byte goes on from
    /// it), through states that neither accept nor call, and no content byte may end the rule
    /// (its follow set holds none). `Some(end)`: it does, and `end` is the one state they all
    /// end in, if there is one.
    fn element_is_one_char(&self) -> Option<Option<StateId>> {
        use crate::guide::trie::U8;
        let content_follows = (0x20..=0xFFu8)
            .filter(|&b| b != b'"' && b != b'\\')
            .any(|b| self.follow[(b >> 6) as usize] & (1 << (b & 63)) != 0);
        if content_follows {
            return None;
        }
        let mut end: Option<StateId> = None;
        let mut one_end = true;
        let start = self.dfa.start();
        let mut seen: Vec<(StateId, U8)> = vec![(start, U8::Boundary)];
        let mut todo = vec![(start, U8::Boundary)];
        while let Some((s, u)) = todo.pop() {
            for &(b, _) in self.byte_groups() {
                let Some(v) = u.next(b) else { continue };
                let t = self.dfa.step(s, b);
                if t == 0 || !self.calls(t).is_empty() {
                    return None;
                }
                if v == U8::Boundary {
                    if !self.dfa.is_accepting(t) || self.dfa.can_continue(t) {
                        return None;
                    }
                    one_end &= *end.get_or_insert(t) == t;
                } else if self.dfa.is_accepting(t) {
                    return None;
                } else if !seen.contains(&(t, v)) {
                    seen.push((t, v));
                    todo.push((t, v));
                }
            }
        }
        Some(end.filter(|_| one_end))
    }

    /// Whether every JSON string character (unescaped, valid UTF-8) leads from `l` back to `l`
    /// through live states where the rule neither ends nor calls, and nothing but such
    /// characters goes on from inside one: then any string content (ending inside a character
    /// or not) is allowed from `l`, and content can only stop at a character boundary.
    fn content_loop(&self, l: StateId) -> bool {
        use crate::guide::trie::U8;
        let mut seen: Vec<(StateId, U8)> = vec![(l, U8::Boundary)];
        let mut todo = vec![(l, U8::Boundary)];
        while let Some((s, u)) = todo.pop() {
            for &(b, _) in self.byte_groups() {
                let Some(v) = u.next(b) else {
                    // Inside a character, a byte that does not continue it must be dead.
                    if u != U8::Boundary && self.dfa.step(s, b) != 0 {
                        return false;
                    }
                    continue;
                };
                let t = self.dfa.step(s, b);
                if t == 0 || self.flags(t) != 0 {
                    return false;
                }
                if v == U8::Boundary {
                    if t != l {
                        return false;
                    }
                } else if !seen.contains(&(t, v)) {
                    seen.push((t, v));
                    todo.push((t, v));
                }
            }
        }
        true
    }

    /// [`Rule::inner`] of a counted rule: a few states per trie depth.
    fn inner_counted(&self, vocab: &VocabCore, st: u32) -> Option<Inner> {
        let n0 = self.split(st).0;
        let trie = vocab.trie();
        let nodes = trie.nodes();
        let mut mask = vec![0u32; vocab.mask_words()].into_boxed_slice();
        let mut frontier = Vec::new();
        self.boundary(st, n0, 0, &mut frontier);
        if let Some(end) = self.content_end {
            let (n, s) = self.split(st);
            if s == self.dfa.start() || s == end {
                // At a character boundary of a string-character element: the tokens of
                // string content from the root are allowed iff the characters they start fit
                // the count's room (a precomputed mask per room); only the nodes where content
                // stops (a quote, an escape) are walked, from the state after their content.
                let done = if s == end { n + 1 } else { n };
                let room = self
                    .count
                    .and_then(|(_, max)| max)
                    .map(|m| m.saturating_sub(done));
                trie.or_content_upto(room, &mut mask);
                if let Some((_, exits, _)) = trie.content_from_root(0) {
                    let leads = trie.node_leads();
                    for &e in exits {
                        let nd = &nodes[e as usize];
                        // Characters on the path before the exit's byte.
                        let k = u32::from(leads[e as usize]) - u32::from(nd.byte & 0xC0 != 0x80);
                        let before = if k == 0 {
                            st
                        } else if room.is_some_and(|r| k > r) {
                            continue;
                        } else {
                            self.join(self.clamp_n(done + k - 1), end)
                        };
                        // Most exits are dead at once (a control character, a quote where the
                        // rule may not end): nothing to walk.
                        let b = nd.byte;
                        let mut live = self.accepting(before)
                            && self.follow[(b >> 6) as usize] & (1 << (b & 63)) != 0;
                        self.positions(before, |p| live |= self.dfa.step(self.split(p).1, b) != 0);
                        if !live {
                            continue;
                        }
                        self.counted_walk(
                            vocab,
                            before,
                            n0,
                            (e as usize, nd.subtree_end as usize),
                            &mut mask,
                            &mut frontier,
                        )?;
                    }
                    return Some(Inner { mask, frontier });
                }
                mask.fill(0);
            }
        }
        self.counted_walk(vocab, st, n0, (1, nodes.len()), &mut mask, &mut frontier)?;
        Some(Inner { mask, frontier })
    }

    /// The in-rule walk of [`Rule::inner_counted`] over trie nodes `range.0..range.1` (a
    /// subtree, or the whole trie below the root) from state `st` before the first of them;
    /// `n0` is the count the entry is computed for. `None` when too ambiguous.
    fn counted_walk(
        &self,
        vocab: &VocabCore,
        st: u32,
        n0: u32,
        range: (usize, usize),
        mask: &mut [u32],
        frontier: &mut Vec<Front>,
    ) -> Option<()> {
        let trie = vocab.trie();
        let nodes = trie.nodes();
        let (from, to) = range;
        let base = nodes[from].depth as usize - 1;
        // In-rule states per relative depth: `sets[level[d]..level[d + 1]]`.
        let depth = trie.max_depth() + 2 - base;
        let mut level = vec![0usize; depth + 1];
        // Whether some in-rule state of relative depth `d` may end the rule.
        let mut acc = vec![false; depth + 1];
        acc[0] = self.accepting(st);
        let mut sets: Vec<u32> = vec![st];
        level[1] = 1;
        let mut i = from;
        while i < to {
            let n = &nodes[i];
            let d = n.depth as usize - base;
            sets.truncate(level[d]);
            if acc[d - 1] && self.follow[(n.byte >> 6) as usize] & (1 << (n.byte & 63)) != 0 {
                frontier.push(Front::Pop(i as u32));
            }
            if n.byte != MARKER {
                for j in level[d - 1]..level[d] {
                    let q = sets[j];
                    self.positions(q, |p| {
                        if let Some(x) = self.next_in(p, n.byte) {
                            if !sets[level[d]..].contains(&x) {
                                sets.push(x);
                            }
                        }
                    });
                }
            }
            let found = sets.len() - level[d];
            if found == 0 {
                i = n.subtree_end as usize;
                continue;
            }
            if found > INNER_WIDTH {
                return None;
            }
            level[d + 1] = sets.len();
            for &tok in trie.tokens_of(n) {
                mask[(tok / 32) as usize] |= 1 << (tok % 32);
            }
            acc[d] = false;
            for &q in &sets[level[d]..level[d + 1]] {
                self.boundary(q, n0, i as u32, frontier);
                acc[d] |= self.accepting(q);
            }
            // At a character boundary of a string-character element, below a subtree of pure
            // content: a token is allowed iff the characters it starts fit the count's room.
            if self.char_element && found == 1 && n.subtree_end as usize > i + 1 {
                let (c, s) = self.split(sets[level[d]]);
                if s != self.dfa.start() && self.dfa.is_accepting(s) && trie.content_below(i) {
                    let room = self
                        .count
                        .and_then(|(_, max)| max)
                        .map(|m| m.saturating_sub(c + 1));
                    let (at, leads) = trie.leads(i);
                    for (&tok, &l) in trie.tokens_below(i).iter().zip(leads) {
                        if room.is_none_or(|r| u32::from(l - at) <= r) {
                            mask[(tok / 32) as usize] |= 1 << (tok % 32);
                        }
                    }
                    i = n.subtree_end as usize;
                    continue;
                }
            }
            i += 1;
        }
        Some(())
    }

    /// The in-rule state after byte `b` from position `p` (see [`Rule::positions`]), if any.
    #[inline(always)]
    fn next_in(&self, p: u32, b: u8) -> Option<u32> {
        let (n, s) = self.split(p);
        let t = self.dfa.step(s, b);
        if t == 0 {
            return None;
        }
        let Some(esc) = &self.esc else {
            return Some(self.join(n, t));
        };
        let n = n + u32::from(esc_step(esc[(s >> self.esc_shift) as usize], b).1);
        let lo = self.lo[(t >> self.esc_shift) as usize];
        let dead = lo == FAR
            || self
                .count
                .is_some_and(|(_, max)| max.is_some_and(|m| n + lo > m));
        if dead {
            return None;
        }
        Some(self.join(self.clamp_n(n), t))
    }

    /// [`Rule::inner`] of a rule that counts characters. Outside an escape: the context-free
    /// part of the pattern's own state (computed as if uncounted, and cached) less the tokens
    /// that start more characters than the count has room for, and less the places to end
    /// before the count's minimum or past its room. Inside an escape (rare): the counted walk.
    fn inner_chars(&self, vocab: &VocabCore, st: u32) -> Option<Inner> {
        let (n, s) = self.split(st);
        let esc = self.esc.as_deref()?;
        if esc[(s >> self.esc_shift) as usize] != 0 {
            let mut mask = vec![0u32; vocab.mask_words()].into_boxed_slice();
            let mut frontier = Vec::new();
            let nodes = vocab.trie().nodes().len();
            self.counted_walk(vocab, st, n, (1, nodes), &mut mask, &mut frontier)?;
            return Some(Inner { mask, frontier });
        }
        // The pattern's own state, as if uncounted (every count shares it).
        let base = self.cached_inner((vocab.id(), s, NONE, NONE), || {
            Some(self.inner_dfa(vocab, s))
        })?;
        let (min, max) = self.count?;
        let room = max.map(|m| m - n);
        let trie = vocab.trie();
        let mut mask = base.mask.clone();
        if let Some(r) = room.filter(|&r| r < trie.esc_max() + self.lo_max) {
            // Tokens that fit the room with any completion stand; the few that start nearly
            // as many characters as it has are read to their end state, whose shortest
            // completion must fit what is left.
            trie.and_esc_upto(r, &mut mask);
            for t in trie.esc_band((r + 1).saturating_sub(self.lo_max), r) {
                let (w, bit) = ((t / 32) as usize, 1u32 << (t % 32));
                if mask[w] & bit == 0 {
                    continue;
                }
                let mut p = Some(st);
                for &b in vocab.token_bytes(t) {
                    p = p.and_then(|p| self.next_in(p, b));
                }
                if p.is_none() {
                    mask[w] &= !bit;
                }
            }
        }
        let frontier = base
            .frontier
            .iter()
            .filter(|f| match **f {
                Front::Pop(i) => {
                    let c = trie.esc_before(i as usize);
                    room.is_none_or(|r| c <= r) && n + c >= min
                }
                Front::Call(..) => false,
            })
            .copied()
            .collect();
        Some(Inner { mask, frontier })
    }

    /// The rules this rule may call before consuming any byte.
    pub(crate) fn start_callees(&self) -> Vec<u32> {
        let mut out = Vec::new();
        self.positions(self.start(), |p| {
            let s = self.split(p).1;
            out.extend(self.calls(s).iter().map(|&(c, _)| c));
        });
        out
    }

    #[inline(always)]
    fn split(&self, st: u32) -> (u32, StateId) {
        if self.count.is_some() {
            (st / self.space, st % self.space)
        } else {
            (0, st)
        }
    }

    #[inline(always)]
    fn join(&self, n: u32, s: StateId) -> u32 {
        n * self.space + s
    }

    fn start(&self) -> u32 {
        self.dfa.start()
    }

    /// The rule may end in state `st`.
    #[inline]
    fn accepting(&self, st: u32) -> bool {
        match self.count {
            None => self.dfa.is_accepting(st),
            Some((min, _)) => {
                let (n, s) = self.split(st);
                if self.esc.is_some() {
                    self.dfa.is_accepting(s) && n >= min
                } else if s == self.dfa.start() {
                    n >= min
                } else {
                    self.dfa.is_accepting(s) && n + 1 >= min
                }
            }
        }
    }

    /// Some byte or call leads on from `st` within this rule.
    fn can_continue(&self, st: u32) -> bool {
        match self.count {
            None => self.dfa.can_continue(st),
            Some(_) => {
                let mut any = false;
                self.positions(st, |p| any |= self.dfa.can_continue(self.split(p).1));
                any
            }
        }
    }

    /// The states `st` stands for before its next byte: itself and, in a counted rule whose
    /// element just completed, the start of the next element.
    #[inline(always)]
    fn positions(&self, st: u32, mut f: impl FnMut(u32)) {
        f(st);
        if let (Some((min, max)), None) = (self.count, &self.esc) {
            let (n, s) = self.split(st);
            if s != self.dfa.start() && self.dfa.is_accepting(s) && max.is_none_or(|m| n + 1 < m) {
                let n1 = if max.is_none() {
                    (n + 1).min(min)
                } else {
                    n + 1
                };
                f(self.join(n1, self.dfa.start()));
            }
        }
    }

    /// Normalized key of a state (see the module docs).
    fn key(&self, st: u32, clamp: u32, out: &mut Vec<u32>) {
        match self.count {
            None => out.push(st),
            Some((min, max)) => {
                let (n, s) = self.split(st);
                out.push(s);
                out.push(min.saturating_sub(n).min(clamp));
                out.push(max.map_or(clamp, |m| (m - n).min(clamp)));
            }
        }
    }
}

/// A byte of each group of bytes that both the DFA and [`esc_step`] treat alike (the DFA's
/// byte classes split where `esc_step` tells bytes apart: backslash, `u`, UTF-8 continuation
/// bytes, the rest), so that whole-DFA passes step a few dozen bytes per state, not 256.
fn esc_reps(dfa: &LazyDfa) -> Vec<u8> {
    let kind = |b: u8| match b {
        b'\\' => 0u8,
        b'u' => 1,
        _ if b & 0xC0 == 0x80 => 2,
        _ => 3,
    };
    let mut seen = std::collections::HashSet::new();
    (0..=255u8)
        .filter(|&b| seen.insert((dfa.class_of(b), kind(b))))
        .collect()
}

/// The escape context ([`esc_step`]) of every state of a whole DFA over JSON string content,
/// by state index; an error when a state is reached in two contexts (the pattern's DFA does
/// not tell where characters start: the schema goes to the other engine).
fn escape_contexts(dfa: &LazyDfa, stride2: u32) -> Result<Box<[u8]>> {
    const UNSEEN: u8 = u8::MAX;
    let mut ctx = vec![UNSEEN; (dfa.table_len() >> stride2) + 1];
    let start = dfa.start();
    ctx[(start >> stride2) as usize] = 0;
    let mut todo = vec![start];
    let reps = esc_reps(dfa);
    while let Some(s) = todo.pop() {
        let c = ctx[(s >> stride2) as usize];
        for &b in &reps {
            let t = dfa.step(s, b);
            if t == 0 {
                continue;
            }
            let next = esc_step(c, b).0;
            let slot = &mut ctx[(t >> stride2) as usize];
            if *slot == UNSEEN {
                *slot = next;
                todo.push(t);
            } else if *slot != next {
                return Err(GuideError::Invalid(
                    "a `pattern` whose states do not tell where characters start".into(),
                ));
            }
        }
    }
    Ok(ctx.into_boxed_slice())
}

/// For a whole DFA over JSON string content with its states' escape contexts: by state
/// index, the fewest characters that complete a match ([`FAR`]: none), and whether from every
/// state that can complete one, completions of any length can (no state's are bounded).
fn char_lengths(dfa: &LazyDfa, stride2: u32, esc: &[u8]) -> (Box<[u32]>, bool) {
    let len = esc.len();
    // Reversed edges (source index, starts a character), one per source and weight.
    let mut rev: Vec<Vec<(u32, bool)>> = vec![Vec::new(); len];
    let reps = esc_reps(dfa);
    for (i, &c) in esc.iter().enumerate() {
        if c == u8::MAX {
            continue;
        }
        let s = (i as u32) << stride2;
        for &b in &reps {
            let t = dfa.step(s, b);
            if t == 0 {
                continue;
            }
            let e = (i as u32, esc_step(c, b).1);
            let r = &mut rev[(t >> stride2) as usize];
            if !r.contains(&e) {
                r.push(e);
            }
        }
    }
    // Shortest completions: a 0-1 breadth-first search back from the accepting states.
    let mut lo = vec![FAR; len];
    let mut todo = std::collections::VecDeque::new();
    for i in 0..len {
        if esc[i] != u8::MAX && dfa.is_accepting((i as u32) << stride2) {
            lo[i] = 0;
            todo.push_back(i);
        }
    }
    while let Some(u) = todo.pop_front() {
        for &(v, w) in &rev[u] {
            let d = lo[u] + u32::from(w);
            if d < lo[v as usize] {
                lo[v as usize] = d;
                if w {
                    todo.push_back(v as usize);
                } else {
                    todo.push_front(v as usize);
                }
            }
        }
    }
    // Bounded completions: the live states that reach no cycle of live states, peeled from
    // the ends backwards.
    let sources = |t: usize| {
        let mut v: Vec<usize> = rev[t].iter().map(|e| e.0 as usize).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut out = vec![0u32; len];
    for t in (0..len).filter(|&t| lo[t] != FAR) {
        for s in sources(t) {
            out[s] += 1;
        }
    }
    let mut peel: Vec<usize> = (0..len).filter(|&i| lo[i] != FAR && out[i] == 0).collect();
    let mut bounded = false;
    while let Some(t) = peel.pop() {
        bounded = true;
        for s in sources(t) {
            out[s] -= 1;
            if out[s] == 0 && lo[s] != FAR {
                peel.push(s);
            }
        }
    }
    (lo.into_boxed_slice(), !bounded)
}

/// Most (state, decoder state) pairs [`Rule::closed_plain`] visits (a search that fails is
/// paid by every new state that asks: a word-count pattern's next word).
const CLOSED_SEARCH: usize = 128;

/// Most different top frames whose masks [`Rtn::compute_mask`] unites instead of walking them
/// together.
const UNION_TOPS: usize = 4;

/// The different top frames of `stacks` when there are 2 to [`UNION_TOPS`] of them.
fn union_tops(stacks: &Stacks) -> Option<Vec<Frame>> {
    let mut tops = stacks
        .iter()
        .map(|st| st.last().copied())
        .collect::<Option<Vec<Frame>>>()?;
    tops.sort_unstable();
    tops.dedup();
    (tops.len() > 1 && tops.len() <= UNION_TOPS).then_some(tops)
}

/// The bytes of the call marker of rule `id`.
pub(crate) fn marker_bytes(id: u32) -> [u8; 3] {
    let [hi, lo] = super::super::lazy::id_bytes(id);
    [MARKER, hi, lo]
}

#[derive(Clone, Copy)]
struct Node {
    rule: u32,
    state: u32,
    parent: u32,
}

/// Masks by normalized state key.
type MaskCache = HashMap<Box<[u32]>, Arc<[u32]>>;

/// The network, with its mask cache.
pub(crate) struct Rtn {
    rules: Vec<Arc<Rule>>,
    root: u32,
    /// Counter distances are clamped here: the longest token, plus one.
    clamp: u32,
    cache: Mutex<MaskCache>,
    cached_bytes: AtomicUsize,
    cache_limit: usize,
}

/// A matcher position: a sorted set of stacks, bottom frame first.
pub(crate) type Stacks = Vec<Vec<Frame>>;

impl Rtn {
    pub(crate) fn new(rules: Vec<Arc<Rule>>, root: u32, max_token_len: usize) -> Rtn {
        Rtn {
            rules,
            root,
            clamp: max_token_len as u32 + 1,
            cache: Mutex::new(HashMap::new()),
            cached_bytes: AtomicUsize::new(0),
            cache_limit: 512 << 20,
        }
    }

    /// Number of cached masks (for tests).
    #[cfg(test)]
    pub(crate) fn cached_masks(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The start position.
    pub(crate) fn start(&self) -> Stacks {
        vec![vec![(self.root, self.rules[self.root as usize].start())]]
    }

    /// Whether the text so far is a complete match.
    pub(crate) fn is_accepting(&self, stacks: &Stacks) -> bool {
        stacks
            .iter()
            .any(|st| st.iter().all(|&(r, s)| self.rules[r as usize].accepting(s)))
    }

    /// Whether some byte may follow.
    pub(crate) fn can_continue(&self, stacks: &Stacks) -> bool {
        stacks.iter().any(|st| {
            // The top frame continues, or it may end and the frame below continues, ...
            for &(r, s) in st.iter().rev() {
                let rule = &self.rules[r as usize];
                if rule.can_continue(s) {
                    return true;
                }
                if !rule.accepting(s) {
                    return false;
                }
            }
            false
        })
    }

    /// The position after `bytes`, or `None` if they lead nowhere.
    pub(crate) fn advance(&self, stacks: &Stacks, bytes: &[u8]) -> Result<Option<Stacks>> {
        let mut w = Walker::new(self);
        let mut cur: Vec<u32> = stacks.iter().map(|s| w.load(s)).collect();
        let mut next = Vec::new();
        for &b in bytes {
            next.clear();
            for &top in &cur {
                w.step(top, b, &mut next, MAX_EPSILON);
            }
            w.dedup(&mut next, 0);
            w.check()?;
            if next.is_empty() {
                return Ok(None);
            }
            std::mem::swap(&mut cur, &mut next);
        }
        let mut out: Stacks = cur.iter().map(|&t| w.materialize(t)).collect();
        out.sort_unstable();
        out.dedup();
        Ok(Some(out))
    }

    fn cache_key(&self, stacks: &Stacks) -> Box<[u32]> {
        let mut key = Vec::with_capacity(stacks.iter().map(|s| s.len() * 2 + 1).sum());
        for st in stacks {
            for &(r, s) in st {
                key.push(r);
                self.rules[r as usize].key(s, self.clamp, &mut key);
            }
            key.push(NONE);
        }
        key.into_boxed_slice()
    }

    /// Writes the mask of `stacks` into `out` (exactly `vocab.mask_words()` long).
    pub(crate) fn fill_mask(
        &self,
        vocab: &VocabCore,
        stacks: &Stacks,
        out: &mut [u32],
    ) -> Result<()> {
        self.fill_mask_at(vocab, stacks, out, 0)
    }

    /// [`Rtn::fill_mask`] from inside another mask's computation, `depth` levels down.
    fn fill_mask_at(
        &self,
        vocab: &VocabCore,
        stacks: &Stacks,
        out: &mut [u32],
        depth: u32,
    ) -> Result<()> {
        let key = self.cache_key(stacks);
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = cache.get(&key) {
                out.copy_from_slice(m);
                return Ok(());
            }
        }
        self.compute_mask(vocab, stacks, out, depth)?;
        let bytes = out.len() * 4 + key.len() * 4;
        if self.cached_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.cache_limit {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.insert(key, Arc::from(&*out));
        } else {
            self.cached_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The mask of `stacks`: with one stack, the top state's cached context-free part (see
    /// [`Inner`]) plus general walks below its frontier; otherwise one general walk of the
    /// whole token trie.
    fn compute_mask(
        &self,
        vocab: &VocabCore,
        stacks: &Stacks,
        out: &mut [u32],
        depth: u32,
    ) -> Result<()> {
        out.fill(0);
        let trie = vocab.trie();
        let nodes = trie.nodes();
        let mut w = Walker::new(self);
        // Every stack has the same top frame (one stack, or alternatives that differ only
        // below it, as an `anyOf` of objects sharing a member): the top's cached context-free
        // part serves them all, and only the walks below its frontier see the stacks' rest.
        let top = stacks.first().and_then(|st| st.last().copied());
        let inner = match top {
            Some((r, s)) if stacks.iter().all(|st| st.last() == Some(&(r, s))) => self.rules
                [r as usize]
                .inner(vocab, s, self.clamp)
                .map(|x| (r, s, x)),
            _ => None,
        };
        if let Some((r, s, inner)) = inner {
            let rule = &self.rules[r as usize];
            let n = rule.split(s).0;
            let belows: Vec<&[Frame]> = stacks.iter().map(|st| &st[..st.len() - 1]).collect();
            out.copy_from_slice(&inner.mask);
            for &f in &inner.frontier {
                w.arena.clear();
                let mut tops = Vec::new();
                let (from, to, base) = match f {
                    Front::Pop(node) => {
                        for below in belows.iter().filter(|b| !b.is_empty()) {
                            tops.push(w.load(below));
                        }
                        if tops.is_empty() {
                            continue;
                        }
                        let nd = &nodes[node as usize];
                        (
                            node as usize,
                            nd.subtree_end as usize,
                            nd.depth as usize - 1,
                        )
                    }
                    Front::Call(0, dn, q) if depth < MAX_NESTED_MASKS => {
                        // A call before any byte: the callee's whole mask in that context,
                        // itself built (and cached) from the callee's context-free part.
                        let nq = rule.clamp_n(n + dn);
                        let mut tmp = vec![0u32; out.len()];
                        for &(c, ret) in rule.calls(q).iter() {
                            let pushed: Stacks = belows
                                .iter()
                                .map(|below| {
                                    let mut p = below.to_vec();
                                    p.push((r, rule.join(nq, ret)));
                                    p.push((c, self.rules[c as usize].start()));
                                    p
                                })
                                .collect();
                            self.fill_mask_at(vocab, &pushed, &mut tmp, depth + 1)?;
                            for ((o, t), e) in out.iter_mut().zip(&tmp).zip(vocab.eos_mask()) {
                                *o |= t & !e;
                            }
                        }
                        continue;
                    }
                    Front::Call(node, dn, q) => {
                        let nq = rule.clamp_n(n + dn);
                        for below in &belows {
                            let parent = w.load(below);
                            for &(c, ret) in rule.calls(q).iter() {
                                let p = w.push(r, rule.join(nq, ret), parent);
                                let child = w.push(c, self.rules[c as usize].start(), p);
                                tops.push(child);
                            }
                        }
                        let nd = &nodes[node as usize];
                        let to = if node == 0 {
                            nodes.len()
                        } else {
                            nd.subtree_end as usize
                        };
                        (node as usize + 1, to, nd.depth as usize)
                    }
                };
                self.walk(vocab, &mut w, tops, from, to, base, out);
            }
        } else if let Some(tops) = union_tops(stacks).filter(|_| depth < MAX_NESTED_MASKS) {
            // A few different top frames (the alternatives of a key, say: a pattern's, and the
            // complement rule's for every other key): the union of each one's mask (a token
            // is allowed where some stack takes it), each cached and made from its top's
            // cached context-free part, where one walk of the whole trie would carry them all.
            let mut tmp = vec![0u32; out.len()];
            for t in tops {
                let group: Stacks = stacks
                    .iter()
                    .filter(|st| st.last() == Some(&t))
                    .cloned()
                    .collect();
                self.fill_mask_at(vocab, &group, &mut tmp, depth + 1)?;
                for (o, x) in out.iter_mut().zip(&tmp) {
                    *o |= x;
                }
            }
            return Ok(());
        } else {
            let tops: Vec<u32> = stacks.iter().map(|s| w.load(s)).collect();
            self.walk(vocab, &mut w, tops, 1, nodes.len(), 0, out);
        }
        w.check()?;
        if self.is_accepting(stacks) {
            for (o, e) in out.iter_mut().zip(vocab.eos_mask()) {
                *o |= e;
            }
        }
        Ok(())
    }

    /// Walks trie nodes `from..to` (a subtree's descendants, or the whole trie) whose parent at
    /// depth `base` has the stacks `tops`, setting the bits of every token they allow.
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        vocab: &VocabCore,
        w: &mut Walker<'_>,
        mut sets: Vec<u32>,
        from: usize,
        to: usize,
        base: usize,
        out: &mut [u32],
    ) {
        let trie = vocab.trie();
        let nodes = trie.nodes();
        let depth = trie.max_depth() + 2 - base;
        // The set of relative depth `d` is `sets[level[d]..level[d + 1]]`; the arena entries
        // made for it start at `mark[d]`.
        let mut level = vec![0usize; depth + 1];
        let mut mark = vec![0usize; depth + 1];
        level[1] = sets.len();
        mark[1] = w.arena.len();
        let mut i = from;
        while i < to {
            let n = &nodes[i];
            let d = n.depth as usize - base;
            sets.truncate(level[d]);
            w.arena.truncate(mark[d]);
            for k in level[d - 1]..level[d] {
                let top = sets[k];
                w.step(top, n.byte, &mut sets, MAX_EPSILON);
            }
            w.dedup(&mut sets, level[d]);
            if sets.len() == level[d] {
                i = n.subtree_end as usize;
                continue;
            }
            level[d + 1] = sets.len();
            mark[d + 1] = w.arena.len();
            for &t in trie.tokens_of(n) {
                out[(t / 32) as usize] |= 1 << (t % 32);
            }
            // A stack that takes the whole subtree in a loop (string content, or bytes that
            // loop on its state; no pop, no call): every token below is allowed (the mask is
            // the union over the stacks).
            if n.subtree_end as usize > i + 1
                && sets[level[d]..].iter().any(|&top| {
                    let x = w.arena[top as usize];
                    let r = &self.rules[x.rule as usize];
                    r.count.is_none()
                        && r.flags(x.state) & CALLS == 0
                        && r.takes_subtree(vocab, x.state, i)
                })
            {
                for &t in trie.tokens_below(i) {
                    out[(t / 32) as usize] |= 1 << (t % 32);
                }
                i = n.subtree_end as usize;
                continue;
            }
            i += 1;
        }
    }
}

/// Steps sets of stacks held in an arena of frames (each stack is its top frame's index).
struct Walker<'a> {
    rtn: &'a Rtn,
    arena: Vec<Node>,
    overflow: bool,
}

impl<'a> Walker<'a> {
    fn new(rtn: &'a Rtn) -> Self {
        Walker {
            rtn,
            arena: Vec::with_capacity(1024),
            overflow: false,
        }
    }

    fn push(&mut self, rule: u32, state: u32, parent: u32) -> u32 {
        self.arena.push(Node {
            rule,
            state,
            parent,
        });
        (self.arena.len() - 1) as u32
    }

    fn load(&mut self, stack: &[Frame]) -> u32 {
        let mut parent = NONE;
        for &(r, s) in stack {
            parent = self.push(r, s, parent);
        }
        parent
    }

    fn materialize(&self, mut top: u32) -> Vec<Frame> {
        let mut out = Vec::new();
        while top != NONE {
            let n = self.arena[top as usize];
            out.push((n.rule, n.state));
            top = n.parent;
        }
        out.reverse();
        out
    }

    /// Appends to `out` the stacks reached from `top` by consuming `b`.
    fn step(&mut self, top: u32, b: u8, out: &mut Vec<u32>, budget: u32) {
        if budget == 0 {
            self.overflow = true;
            return;
        }
        let Node {
            rule,
            state,
            parent,
        } = self.arena[top as usize];
        let rtn = self.rtn;
        let r = &rtn.rules[rule as usize];
        if b != MARKER {
            r.positions(state, |p| {
                let (n, s) = r.split(p);
                if let Some(x) = r.next_in(p, b) {
                    let id = self.push(rule, x, parent);
                    out.push(id);
                }
                for &(c, ret) in r.calls(s) {
                    let p = self.push(rule, r.join(n, ret), parent);
                    let child = self.push(c, rtn.rules[c as usize].start(), p);
                    self.step(child, b, out, budget - 1);
                }
            });
        }
        let accepting = if r.count.is_none() {
            r.dfa.is_accepting(state)
        } else {
            r.accepting(state)
        };
        if parent != NONE && accepting {
            self.step(parent, b, out, budget - 1);
        }
    }

    fn same(&self, mut a: u32, mut b: u32) -> bool {
        loop {
            if a == b {
                return true;
            }
            if a == NONE || b == NONE {
                return false;
            }
            let (x, y) = (self.arena[a as usize], self.arena[b as usize]);
            if x.rule != y.rule || x.state != y.state {
                return false;
            }
            a = x.parent;
            b = y.parent;
        }
    }

    /// Removes duplicate stacks from `set[from..]`.
    fn dedup(&mut self, set: &mut Vec<u32>, from: usize) {
        if set.len() - from < 2 {
            return;
        }
        let mut k = from;
        for i in from..set.len() {
            let x = set[i];
            if !(from..k).any(|j| self.same(set[j], x)) {
                set[k] = x;
                k += 1;
            }
        }
        set.truncate(k);
        if k - from > MAX_STACKS {
            self.overflow = true;
            set.truncate(from + MAX_STACKS);
        }
    }

    fn check(&self) -> Result<()> {
        if self.overflow {
            return Err(GuideError::TooLarge(
                "the JSON Schema is too ambiguous at this point (too many parallel parses)".into(),
            ));
        }
        if any_overflow() && self.rtn.rules.iter().any(|r| r.overflowed()) {
            return Err(GuideError::TooLarge(
                "the JSON Schema's automaton grew past its state budget".into(),
            ));
        }
        Ok(())
    }
}
