//! A byte DFA determinized on demand: the JSON Schema compiler's rule automata.
//!
//! Compiling a rule parses its pattern and builds a Thompson NFA (`regex-automata`); states of
//! the DFA (sets of NFA states) and their transitions are made when a walk first takes them.
//! A schema's rules are large (an object's keys, values and optional members inlined into one
//! pattern) while a generation visits a small part of them, so most of the subset construction
//! an eager DFA pays for at compile time is never needed; what is needed is paid once, by the
//! first mask or step that reaches it, and shared by every later one (and every schema with the
//! same rule).
//!
//! Reads take no lock: transitions live in atomically published segments of the table, indexed
//! by premultiplied state id (`index << stride2`). Making a state or a transition takes the
//! determinizer's mutex. NFA states from which no match is reachable are pruned before subset
//! construction, so every non-empty set is live: a state is either dead (id 0) or can still
//! reach a match, as in the eager tables.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use regex_automata::nfa::thompson::{self, State, NFA};
use regex_automata::util::primitives::StateID as NfaId;

use super::dfa::{error_of, repetition_copies, DfaLimits, GENERATED_NEST_LIMIT};
use super::error::{GuideError, Result};
use super::StateId;

/// The dead state.
const DEAD: StateId = 0;
/// Table entries per segment (premultiplied ids `s >> SEG_BITS` pick the segment).
const SEG_BITS: u32 = 12;
const SEG: usize = 1 << SEG_BITS;
/// [`LazyDfa`] state info bits.
const ACCEPT: u8 = 1;
const CONTINUE: u8 = 2;

/// Walks cut at a state budget, process-wide (a cheap first check before asking each DFA).
static OVERFLOWS: AtomicU32 = AtomicU32::new(0);

/// Whether any [`LazyDfa`] of the process has hit its state budget.
pub(crate) fn any_overflow() -> bool {
    OVERFLOWS.load(Ordering::Relaxed) != 0
}

/// FxHash (the rustc hasher): NFA state sets are short slices of `u32`.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }
    fn write_u32(&mut self, x: u32) {
        self.add(u64::from(x));
    }
    fn write_usize(&mut self, x: usize) {
        self.add(x as u64);
    }
}

impl Fx {
    #[inline]
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// Per-state values in segments made on demand, indexed by premultiplied state id.
pub(crate) struct Segments<T> {
    segs: Box<[OnceLock<Box<[T]>>]>,
    /// Entries per state (the stride for the table, 1 for per-state values).
    per_state_shift: u32,
    stride2: u32,
}

impl<T: Default> Segments<T> {
    pub(crate) fn new(max_states: usize, stride2: u32, per_state_shift: u32) -> Self {
        let entries = (max_states + 1) << stride2;
        let n = entries.div_ceil(SEG);
        Segments {
            segs: (0..n).map(|_| OnceLock::new()).collect(),
            per_state_shift,
            stride2,
        }
    }

    /// The entry of premultiplied id `s` plus `offset` (< the stride), if its segment exists.
    #[inline(always)]
    pub(crate) fn get(&self, s: StateId, offset: usize) -> Option<&T> {
        let s = s as usize;
        let seg = self.segs.get(s >> SEG_BITS)?.get()?;
        let i = ((s & (SEG - 1)) >> (self.stride2 - self.per_state_shift)) + offset;
        seg.get(i)
    }

    /// Makes the segment holding state `s`.
    pub(crate) fn ensure(&self, s: StateId) -> bool {
        let Some(slot) = self.segs.get(s as usize >> SEG_BITS) else {
            return false;
        };
        slot.get_or_init(|| {
            let len = SEG >> (self.stride2 - self.per_state_shift);
            (0..len.max(1)).map(|_| T::default()).collect()
        });
        true
    }
}

/// The determinizer's state, behind the mutex.
struct Det {
    /// NFA state sets by state index (0: dead, the empty set).
    sets: Vec<Box<[u32]>>,
    index: HashMap<Box<[u32]>, u32, BuildHasherDefault<Fx>>,
    /// Scratch: the epsilon closure's stack, visit marks (by generation) and output.
    stack: Vec<u32>,
    mark: Vec<u32>,
    generation: u32,
    buf: Vec<u32>,
}

/// A lazily determinized, anchored byte DFA (see the module docs).
pub(crate) struct LazyDfa {
    nfa: NFA,
    /// NFA states from which a match is reachable.
    live: Vec<bool>,
    classes: [u8; 256],
    /// A byte of each class.
    reps: Vec<u8>,
    stride2: u32,
    start: StateId,
    max_states: usize,
    /// Transitions: 0 unknown, else the target's premultiplied id + 1.
    table: Segments<AtomicU32>,
    /// [`ACCEPT`], [`CONTINUE`] by state.
    info: Segments<AtomicU8>,
    det: Mutex<Det>,
    states: AtomicU32,
    overflow: AtomicBool,
}

impl LazyDfa {
    /// Compiles `pattern` (over bytes: `(?-u:\xFF)` may match non-UTF-8 bytes) up to the NFA;
    /// the DFA's states are made on demand, at most `limits.max_states` of them.
    pub(crate) fn build(pattern: &str, limits: &DfaLimits) -> Result<LazyDfa> {
        let hir = regex_syntax::ParserBuilder::new()
            .nest_limit(GENERATED_NEST_LIMIT)
            .utf8(false)
            .build()
            .parse(pattern)
            .map_err(|e| error_of(&e, false))?;
        let copies = repetition_copies(&hir);
        if copies > u64::from(limits.max_repetition) {
            return Err(GuideError::TooLarge(format!(
                "a counted repetition makes {copies} copies, over the limit of {}",
                limits.max_repetition
            )));
        }
        let nfa = thompson::Compiler::new()
            .configure(
                thompson::Config::new()
                    .nfa_size_limit(Some(limits.nfa_bytes))
                    .utf8(false)
                    .which_captures(thompson::WhichCaptures::None),
            )
            .build_from_hir(&hir)
            .map_err(|e| error_of(&e, e.size_limit().is_some()))?;
        if !nfa.look_set_any().is_empty() {
            return Err(GuideError::InvalidRegex(
                "anchors and word boundaries are not supported here".into(),
            ));
        }
        let live = co_reachable(&nfa);
        let mut classes = [0u8; 256];
        let mut reps: Vec<u8> = Vec::new();
        for b in 0..=255u8 {
            let c = nfa.byte_classes().get(b);
            classes[b as usize] = c;
            if c as usize >= reps.len() {
                reps.resize(c as usize + 1, b);
            }
            reps[c as usize] = b;
        }
        let stride2 = reps.len().next_power_of_two().trailing_zeros();
        let max_states = limits.max_states;
        let n = nfa.states().len();
        let dfa = LazyDfa {
            live,
            classes,
            reps,
            stride2,
            start: 1 << stride2,
            max_states,
            table: Segments::new(max_states, stride2, stride2),
            info: Segments::new(max_states, stride2, 0),
            det: Mutex::new(Det {
                sets: vec![Box::new([])],
                index: HashMap::default(),
                stack: Vec::new(),
                mark: vec![0; n],
                generation: 0,
                buf: Vec::new(),
            }),
            states: AtomicU32::new(0),
            overflow: AtomicBool::new(false),
            nfa,
        };
        // The dead state's row: every byte stays dead.
        dfa.table.ensure(0);
        for c in 0..dfa.reps.len() {
            if let Some(e) = dfa.table.get(DEAD, c) {
                e.store(DEAD + 1, Ordering::Relaxed);
            }
        }
        let mut det = dfa.lock();
        det.generation += 1;
        det.buf.clear();
        let start = dfa.nfa.start_anchored().as_u32();
        dfa.closure(&mut det, start);
        if det.buf.is_empty() {
            return Err(GuideError::Empty);
        }
        let set = std::mem::take(&mut det.buf);
        let s = dfa.add_state(&mut det, set);
        debug_assert_eq!(s, dfa.start);
        drop(det);
        Ok(dfa)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Det> {
        self.det.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the NFA states reachable from `id` without consuming a byte (and from which a match
    /// is reachable) to `det.buf`.
    fn closure(&self, det: &mut Det, id: u32) {
        det.stack.push(id);
        while let Some(id) = det.stack.pop() {
            let g = det.generation;
            let m = &mut det.mark[id as usize];
            if *m == g {
                continue;
            }
            *m = g;
            match self.nfa.state(NfaId::new_unchecked(id as usize)) {
                State::ByteRange { .. }
                | State::Sparse(_)
                | State::Dense(_)
                | State::Match { .. } => {
                    if self.live[id as usize] {
                        det.buf.push(id);
                    }
                }
                State::Union { alternates } => {
                    det.stack
                        .extend(alternates.iter().rev().map(|s| s.as_u32()));
                }
                State::BinaryUnion { alt1, alt2 } => {
                    det.stack.push(alt2.as_u32());
                    det.stack.push(alt1.as_u32());
                }
                State::Capture { next, .. } => det.stack.push(next.as_u32()),
                // Rejected at build (no look-around); a failing state matches nothing.
                State::Look { .. } | State::Fail => {}
            }
        }
    }

    /// The state of NFA set `set` (sorted here), made if new; `DEAD` past the state budget.
    fn add_state(&self, det: &mut Det, mut set: Vec<u32>) -> StateId {
        if set.is_empty() {
            return DEAD;
        }
        set.sort_unstable();
        if let Some(&k) = det.index.get(set.as_slice()) {
            return k << self.stride2;
        }
        let k = det.sets.len();
        let id = (k as StateId) << self.stride2;
        if k > self.max_states || !self.table.ensure(id) || !self.info.ensure(id) {
            if !self.overflow.swap(true, Ordering::Relaxed) {
                OVERFLOWS.fetch_add(1, Ordering::Relaxed);
            }
            return DEAD;
        }
        let mut bits = 0;
        for &n in &set {
            match self.nfa.state(NfaId::new_unchecked(n as usize)) {
                State::Match { .. } => bits |= ACCEPT,
                _ => bits |= CONTINUE,
            }
        }
        if let Some(i) = self.info.get(id, 0) {
            i.store(bits, Ordering::Release);
        }
        let set: Box<[u32]> = set.into();
        det.index.insert(set.clone(), k as u32);
        det.sets.push(set);
        self.states.fetch_add(1, Ordering::Relaxed);
        id
    }

    pub(crate) fn start(&self) -> StateId {
        self.start
    }

    /// One byte from `s` (`DEAD`, 0, when the byte leads nowhere).
    #[inline(always)]
    pub(crate) fn step(&self, s: StateId, b: u8) -> StateId {
        let c = self.classes[b as usize] as usize;
        match self.table.get(s, c).map(|e| e.load(Ordering::Acquire)) {
            Some(v) if v != 0 => v - 1,
            _ => self.slow_step(s, c),
        }
    }

    #[cold]
    fn slow_step(&self, s: StateId, c: usize) -> StateId {
        let Some(entry) = self.table.get(s, c) else {
            return DEAD;
        };
        let mut det = self.lock();
        let v = entry.load(Ordering::Acquire);
        if v != 0 {
            return v - 1;
        }
        let b = self.reps[c];
        det.generation += 1;
        det.buf.clear();
        let k = (s >> self.stride2) as usize;
        let set = std::mem::take(&mut det.sets[k]);
        for &n in set.iter() {
            let next = match self.nfa.state(NfaId::new_unchecked(n as usize)) {
                State::ByteRange { trans } => trans.matches_byte(b).then_some(trans.next),
                State::Sparse(t) => t.matches_byte(b),
                State::Dense(t) => t.matches_byte(b),
                _ => None,
            };
            if let Some(next) = next {
                self.closure(&mut det, next.as_u32());
            }
        }
        det.sets[k] = set;
        let out = std::mem::take(&mut det.buf);
        let t = self.add_state(&mut det, out);
        det.buf = Vec::new();
        // Past the state budget the walk is cut here and the overflow reported by the caller:
        // not cached, so nothing wrong is kept.
        if !self.overflowed() {
            entry.store(t + 1, Ordering::Release);
        }
        t
    }

    /// The state after `bytes` from `s`, or `None` if it is dead.
    #[inline]
    pub(crate) fn walk(&self, mut s: StateId, bytes: &[u8]) -> Option<StateId> {
        for &b in bytes {
            s = self.step(s, b);
            if s == DEAD {
                return None;
            }
        }
        (s != DEAD && !bytes.is_empty()).then_some(s)
    }

    #[inline(always)]
    fn info(&self, s: StateId) -> u8 {
        self.info.get(s, 0).map_or(0, |i| i.load(Ordering::Acquire))
    }

    /// The text so far is a full match.
    #[inline(always)]
    pub(crate) fn is_accepting(&self, s: StateId) -> bool {
        self.info(s) & ACCEPT != 0
    }

    /// Some byte leads on from `s` (to a live state).
    #[inline]
    pub(crate) fn can_continue(&self, s: StateId) -> bool {
        self.info(s) & CONTINUE != 0
    }

    /// The state budget and `log2` of the stride (for per-state tables beside this one).
    pub(crate) fn shape(&self) -> (usize, u32) {
        (self.max_states, self.stride2)
    }

    /// States made so far.
    pub(crate) fn num_states(&self) -> usize {
        self.states.load(Ordering::Relaxed) as usize
    }

    /// Whether a walk has hit the state budget (its results then are cut short).
    pub(crate) fn overflowed(&self) -> bool {
        self.overflow.load(Ordering::Relaxed)
    }

    /// Makes every reachable state (for rules whose states are enumerated up front); fails past
    /// the state budget.
    pub(crate) fn expand(&self) -> Result<()> {
        let mut k = 1usize;
        while k <= self.num_states() {
            let s = (k as StateId) << self.stride2;
            for &b in &self.reps {
                self.step(s, b);
            }
            if self.overflowed() {
                return Err(GuideError::TooLarge(format!(
                    "the rule's DFA has more than {} states",
                    self.max_states
                )));
            }
            k += 1;
        }
        Ok(())
    }

    /// The states made so far, premultiplied ids.
    pub(crate) fn states(&self) -> impl Iterator<Item = StateId> + '_ {
        (1..=self.num_states()).map(move |k| (k as StateId) << self.stride2)
    }

    /// One past the largest premultiplied id made so far (after [`LazyDfa::expand`]: of all).
    pub(crate) fn table_len(&self) -> usize {
        (self.num_states() + 1) << self.stride2
    }
}

/// NFA states from which a `Match` state is reachable.
fn co_reachable(nfa: &NFA) -> Vec<bool> {
    let n = nfa.states().len();
    let mut rev: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut live = vec![false; n];
    let mut todo = Vec::new();
    for (i, st) in nfa.states().iter().enumerate() {
        let mut edge = |t: NfaId| rev[t.as_usize()].push(i as u32);
        match st {
            State::ByteRange { trans } => edge(trans.next),
            State::Sparse(t) => t.transitions.iter().for_each(|x| edge(x.next)),
            State::Dense(t) => t
                .transitions
                .iter()
                .filter(|x| **x != NfaId::ZERO)
                .for_each(|&x| edge(x)),
            State::Look { next, .. } | State::Capture { next, .. } => edge(*next),
            State::Union { alternates } => alternates.iter().for_each(|&x| edge(x)),
            State::BinaryUnion { alt1, alt2 } => {
                edge(*alt1);
                edge(*alt2);
            }
            State::Match { .. } => {
                live[i] = true;
                todo.push(i as u32);
            }
            State::Fail => {}
        }
    }
    while let Some(t) = todo.pop() {
        for &s in &rev[t as usize] {
            if !live[s as usize] {
                live[s as usize] = true;
                todo.push(s);
            }
        }
    }
    live
}

/// Checks that [`LazyDfa`] and the eager tables of [`super::dfa::DfaGuide`] agree on `pattern`
/// (byte mode): the same dead, accepting and continuing states along every byte from the start
/// (a product walk over all reachable pairs, at most `max_pairs` of them). `Ok(false)` when
/// either does not compile.
#[cfg(test)]
pub(crate) fn agrees_with_eager(
    pattern: &str,
    max_pairs: usize,
) -> std::result::Result<bool, String> {
    let limits = DfaLimits::default();
    let (Ok(eager), Ok(lazy)) = (
        super::dfa::DfaGuide::build(pattern, &limits, false),
        LazyDfa::build(pattern, &limits),
    ) else {
        return Ok(false);
    };
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![(eager.start(), lazy.start())];
    seen.insert(todo[0]);
    while let Some((e, l)) = todo.pop() {
        if eager.is_accepting(e) != lazy.is_accepting(l)
            || eager.can_continue(e) != lazy.can_continue(l)
        {
            return Err(format!("{pattern:?}: accepting/continuing differ"));
        }
        for b in 0..=255u8 {
            let (e2, l2) = (eager.step(e, b), lazy.step(l, b));
            if (e2 == DEAD) != (l2 == DEAD) {
                return Err(format!(
                    "{pattern:?}: byte {b:#04x} is dead in one DFA only"
                ));
            }
            if e2 != DEAD && seen.len() < max_pairs && seen.insert((e2, l2)) {
                todo.push((e2, l2));
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_the_eager_dfa() {
        for p in [
            r"abc|abd|a[0-9]+",
            r#""(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*""#,
            r"(?-u:\xFF\x00\x01)(?:,(?-u:\xFF\x00\x02))*",
            // A branch that can never match is pruned: `a` alone is dead.
            r"a[^\x00-\x{10FFFF}]|b",
            r"(?:x|y){2,5}z?",
            r"[^\x00-\x7f]{1,3}",
        ] {
            assert_eq!(agrees_with_eager(p, 100_000), Ok(true), "{p}");
        }
    }

    #[test]
    fn pruned_states_are_dead_and_flags_are_exact() {
        let d = LazyDfa::build(r"a[^\x00-\x{10FFFF}]|bc?", &DfaLimits::default()).unwrap();
        assert_eq!(d.step(d.start(), b'a'), DEAD);
        let b = d.step(d.start(), b'b');
        assert!(d.is_accepting(b) && d.can_continue(b));
        let c = d.step(b, b'c');
        assert!(d.is_accepting(c) && !d.can_continue(c));
        assert_eq!(d.walk(d.start(), b"bcc"), None);
        assert!(matches!(
            LazyDfa::build(r"[^\x00-\x{10FFFF}]", &DfaLimits::default()),
            Err(GuideError::Empty)
        ));
        assert!(LazyDfa::build(r"^a", &DfaLimits::default()).is_err());
    }

    #[test]
    fn the_state_budget_cuts_walks_and_is_reported() {
        let limits = DfaLimits {
            max_states: 3,
            ..DfaLimits::default()
        };
        let d = LazyDfa::build("abcdef", &limits).unwrap();
        assert!(!d.overflowed());
        assert_eq!(d.walk(d.start(), b"abcdef"), None);
        assert!(d.overflowed() && any_overflow());
        assert!(matches!(d.expand(), Err(GuideError::TooLarge(_))));
        // Nothing wrong was cached: a larger budget's DFA walks the same text to the end.
        let d = LazyDfa::build("abcdef", &DfaLimits::default()).unwrap();
        assert!(d
            .walk(d.start(), b"abcdef")
            .is_some_and(|s| d.is_accepting(s)));
    }
}
