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
    /// Scratch of [`LazyDfa::fill_row`]: NFA targets grouped by class, and where each class's
    /// group starts.
    targets: Vec<u32>,
    starts: Vec<u32>,
    /// The state whose groups `targets`/`starts` hold.
    row: Option<usize>,
}

/// A lazily determinized, anchored byte DFA (see the module docs).
pub(crate) struct LazyDfa {
    nfa: Nfa,
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
    /// A complement rule's DFA (see [`COMPLEMENT`]).
    complement: bool,
}

impl LazyDfa {
    /// Compiles `pattern` (over bytes: `(?-u:\xFF)` may match non-UTF-8 bytes) up to the NFA;
    /// the DFA's states are made on demand, at most `limits.max_states` of them (and at most
    /// the larger of 16,384 and 8 per NFA state).
    #[cfg(test)]
    pub(crate) fn build(pattern: &str, limits: &DfaLimits) -> Result<LazyDfa> {
        Self::build_with(pattern, &[], limits)
    }

    /// [`LazyDfa::build`] of a pattern that may splice in `fragments` (see [`INLINE`]).
    pub(crate) fn build_with(
        pattern: &str,
        fragments: &[(u32, String)],
        limits: &DfaLimits,
    ) -> Result<LazyDfa> {
        let nfa = Splicer::new(fragments, limits).run(pattern)?;
        // Only the sentinel itself is a transition on exactly that byte (it is no UTF-8 byte).
        let complement = nfa.states.iter().any(|st| match st {
            St::Range(lo, hi, _) => (*lo, *hi) == (COMPLEMENT, COMPLEMENT),
            St::Sparse(t) => t
                .iter()
                .any(|&(lo, hi, _)| (lo, hi) == (COMPLEMENT, COMPLEMENT)),
            _ => false,
        });
        let live = nfa.co_reachable();
        let (classes, reps) = nfa.byte_classes();
        let stride2 = reps.len().next_power_of_two().trailing_zeros();
        // The tables' segment directories are sized for the states this rule may make: the
        // budget, or far less for a small NFA (a DFA of these patterns rarely has more states
        // than its NFA; the floor covers small exponential ones, `(a|b)*a(a|b){13}`).
        let max_states = limits
            .max_states
            .min(MIN_STATE_CAP.max(8 * nfa.states.len()));
        let n = nfa.states.len();
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
                targets: Vec::new(),
                starts: Vec::new(),
                row: None,
            }),
            states: AtomicU32::new(0),
            overflow: AtomicBool::new(false),
            complement,
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
        let start = dfa.nfa.start;
        dfa.closure(&mut det, start);
        if det.buf.is_empty() {
            return Err(GuideError::Empty);
        }
        let mut set = std::mem::take(&mut det.buf);
        let s = dfa.add_state(&mut det, &mut set);
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
            match &self.nfa.states[id as usize] {
                St::Range(..) | St::Sparse(_) | St::Match => {
                    if self.live[id as usize] {
                        det.buf.push(id);
                    }
                }
                St::Split(next) => det.stack.extend(next.iter().rev()),
                St::Fail => {}
            }
        }
    }

    /// The state of NFA set `set` (sorted here, copied if new), made if new; `DEAD` past the
    /// state budget.
    fn add_state(&self, det: &mut Det, set: &mut [u32]) -> StateId {
        if set.is_empty() {
            return DEAD;
        }
        set.sort_unstable();
        if let Some(&k) = det.index.get(&*set) {
            return k << self.stride2;
        }
        let mut bits = 0;
        // The bytes some state of the set consumes: every other class's transition is dead,
        // written now (a walk then never takes the lock to find a dead end; the set of a
        // large alternation is long to search).
        let mut live = [0u64; 4];
        for &n in set.iter() {
            match &self.nfa.states[n as usize] {
                St::Match => bits |= ACCEPT,
                St::Range(lo, hi, _) => {
                    bits |= CONTINUE;
                    fill_bytes(&mut live, *lo, *hi);
                }
                St::Sparse(t) => {
                    bits |= CONTINUE;
                    for &(lo, hi, _) in t.iter() {
                        fill_bytes(&mut live, lo, hi);
                    }
                }
                _ => bits |= CONTINUE,
            }
        }
        if self.complement {
            let has = |live: &[u64; 4], b: u8| live[(b >> 6) as usize] & (1 << (b & 63)) != 0;
            let accept = has(&live, COMPLEMENT) && !has(&live, VETO);
            for b in [COMPLEMENT, VETO] {
                live[(b >> 6) as usize] &= !(1 << (b & 63));
            }
            bits = (u8::from(accept) * ACCEPT) | (u8::from(live != [0; 4]) * CONTINUE);
            if bits == 0 {
                // Only the veto ends here (a declared name's closing quote): a dead end.
                return DEAD;
            }
        }
        let k = det.sets.len();
        let id = (k as StateId) << self.stride2;
        if k > self.max_states || !self.table.ensure(id) || !self.info.ensure(id) {
            if !self.overflow.swap(true, Ordering::Relaxed) {
                OVERFLOWS.fetch_add(1, Ordering::Relaxed);
            }
            return DEAD;
        }
        for (c, &b) in self.reps.iter().enumerate() {
            if live[(b >> 6) as usize] & (1 << (b & 63)) == 0 {
                if let Some(e) = self.table.get(id, c) {
                    e.store(DEAD + 1, Ordering::Release);
                }
            }
        }
        if let Some(i) = self.info.get(id, 0) {
            i.store(bits, Ordering::Release);
        }
        let set: Box<[u32]> = (&*set).into();
        det.index.insert(set.clone(), k as u32);
        det.sets.push(set);
        self.states.fetch_add(1, Ordering::Relaxed);
        id
    }

    pub(crate) fn start(&self) -> StateId {
        self.start
    }

    /// The byte class of `b` (bytes of one class lead every state to the same state).
    pub(crate) fn class_of(&self, b: u8) -> u8 {
        self.classes[b as usize]
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
        self.fill_row(&mut det, s, Some(c));
        // Past the state budget the walk is cut here and the overflow reported by the caller:
        // nothing was cached, so nothing wrong is kept.
        entry.load(Ordering::Acquire).saturating_sub(1)
    }

    /// Makes the transitions of `s`: every class's (`only: None`, what [`LazyDfa::expand`]
    /// needs), or class `c`'s and those of every class with the same NFA targets (`Some(c)`,
    /// a step of a walk: the many classes one Unicode range is cut into, or every byte that
    /// continues no name of a key, then cost one closure, not one each). One pass over the
    /// state's NFA set sorts its targets by class; a class whose targets are those of the
    /// class before it reuses that class's closure.
    fn fill_row(&self, det: &mut Det, s: StateId, only: Option<usize>) {
        let k = (s >> self.stride2) as usize;
        let set = std::mem::take(&mut det.sets[k]);
        let nc = self.reps.len();
        // Each class's NFA targets, in the set's order, by a counting sort on the class (kept
        // for the next call: a walk steps one state's bytes one after another).
        let mut starts = std::mem::take(&mut det.starts);
        let mut targets = std::mem::take(&mut det.targets);
        if det.row != Some(k) {
            starts.clear();
            starts.resize(nc + 1, 0);
            let each = |f: &mut dyn FnMut(usize, u32)| {
                for &n in set.iter() {
                    let mut range = |lo: u8, hi: u8, next: u32| {
                        for c in self.classes[lo as usize]..=self.classes[hi as usize] {
                            f(c as usize, next);
                        }
                    };
                    match &self.nfa.states[n as usize] {
                        St::Range(lo, hi, next) => range(*lo, *hi, *next),
                        St::Sparse(t) => t.iter().for_each(|&(lo, hi, next)| range(lo, hi, next)),
                        _ => {}
                    }
                }
            };
            each(&mut |c, _| starts[c + 1] += 1);
            for c in 0..nc {
                starts[c + 1] += starts[c];
            }
            targets.clear();
            targets.resize(starts[nc] as usize, 0);
            let mut at: Vec<u32> = starts[..nc].to_vec();
            each(&mut |c, next| {
                targets[at[c] as usize] = next;
                at[c] += 1;
            });
            det.row = Some(k);
        }
        det.sets[k] = set;
        let group = |c: usize| &targets[starts[c] as usize..starts[c + 1] as usize];
        let wanted = only.map(group);
        let mut prev: (&[u32], StateId) = (&[], DEAD);
        for c in 0..nc {
            let g = group(c);
            if g.is_empty() || wanted.is_some_and(|w| w != g) {
                continue;
            }
            let Some(entry) = self.table.get(s, c) else {
                continue;
            };
            if entry.load(Ordering::Acquire) != 0 {
                continue;
            }
            let t = if prev.0 == g {
                prev.1
            } else {
                det.generation += 1;
                det.buf.clear();
                for &next in g {
                    self.closure(det, next);
                }
                let mut out = std::mem::take(&mut det.buf);
                let t = self.add_state(det, &mut out);
                det.buf = out;
                t
            };
            if self.overflowed() {
                break;
            }
            entry.store(t + 1, Ordering::Release);
            prev = (g, t);
        }
        det.starts = starts;
        det.targets = targets;
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
    pub(crate) fn expand(&self, cap: usize) -> Result<()> {
        let mut k = 1usize;
        while k <= self.num_states() {
            self.fill_row(&mut self.lock(), (k as StateId) << self.stride2, None);
            if self.overflowed() || self.num_states() > cap {
                return Err(GuideError::TooLarge(format!(
                    "the rule's DFA has more than {} states",
                    cap.min(self.max_states)
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

/// Fragment markers, `\xFD\xHH\xLL` and `\xFE\xHH\xLL` (bytes never in UTF-8 text), splice
/// fragment `HH * ID_BASE + LL` (see [`id_bytes`]) into a rule's NFA. `INLINE` enters a *group*: the fragment runs, and
/// where it matches the pattern goes on after the marker. `JUMP`, only inside a fragment and
/// only at its end, goes to another fragment of the same group, whose matches then end the
/// group. All fragments of a group end where the group does, so one referenced from several
/// places of a group is spliced once: the JSON Schema compiler writes an object's optional
/// members as fragments (member `i`, then a jump to the rest from `i + 1`) without copying the
/// rest into every branch — linear where a regex is quadratic.
pub(crate) const INLINE: u8 = 0xFD;
/// See [`INLINE`].
pub(crate) const JUMP: u8 = 0xFE;

/// A *complement* rule's pattern is `(?:V)\xF8|(?:C)\xF9` (bytes never in UTF-8 text, and
/// above every id byte): its DFA accepts where `C` matches and `V` does not — a key of an open
/// object that is no declared name and matches no `patternProperties` pattern — and the two
/// bytes themselves lead nowhere. (Where `V` matches, the state consumes `VETO`; where `C`
/// does, `COMPLEMENT`; the accepting bit is read off those when the state is made.) A state
/// that then neither accepts nor continues is dead: the JSON Schema compiler ends both
/// alternatives with the key's closing quote, so that a declared name's quote leads nowhere
/// and the key's content states are plain (not accepting) content loops.
pub(crate) const COMPLEMENT: u8 = 0xF9;
/// See [`COMPLEMENT`].
pub(crate) const VETO: u8 = 0xF8;

/// The base of the two id bytes after a marker byte (a fragment's, or a rule's call): each is
/// below `0xF0`, so an id byte is never read as a marker byte (`0xFD`..`0xFF`).
pub(crate) const ID_BASE: u32 = 0xF0;

/// Most ids two id bytes hold.
pub(crate) const MAX_IDS: u32 = ID_BASE * ID_BASE;

/// The two bytes of id `id` (below [`MAX_IDS`]).
pub(crate) fn id_bytes(id: u32) -> [u8; 2] {
    debug_assert!(id < MAX_IDS);
    [(id / ID_BASE) as u8, (id % ID_BASE) as u8]
}

/// The id of two id bytes (see [`id_bytes`]); `None` for bytes that are not id bytes.
pub(crate) fn id_from(hi: u8, lo: u8) -> Option<u32> {
    let (h, l) = (u32::from(hi), u32::from(lo));
    (h < ID_BASE && l < ID_BASE).then_some(h * ID_BASE + l)
}

/// The fewest states a rule's DFA may make before its budget is checked (see `build_with`).
const MIN_STATE_CAP: usize = 16_384;

/// Most NFA states of a rule with its fragments spliced in.
const MAX_NFA_STATES: usize = 4 << 20;

/// Our NFA: `regex-automata`'s Thompson NFAs of a pattern and its fragments, spliced, in a
/// compact form.
struct Nfa {
    states: Vec<St>,
    start: u32,
}

enum St {
    /// A byte in `lo..=hi`, then `next`.
    Range(u8, u8, u32),
    Sparse(Box<[(u8, u8, u32)]>),
    /// Epsilon moves.
    Split(Box<[u32]>),
    Match,
    Fail,
}

impl Nfa {
    /// States from which a `Match` is reachable.
    fn co_reachable(&self) -> Vec<bool> {
        let n = self.states.len();
        let mut rev: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut live = vec![false; n];
        let mut todo = Vec::new();
        for (i, st) in self.states.iter().enumerate() {
            let i = i as u32;
            match st {
                St::Range(_, _, t) => rev[*t as usize].push(i),
                St::Sparse(ts) => ts.iter().for_each(|x| rev[x.2 as usize].push(i)),
                St::Split(ts) => ts.iter().for_each(|&t| rev[t as usize].push(i)),
                St::Match => {
                    live[i as usize] = true;
                    todo.push(i);
                }
                St::Fail => {}
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

    /// Byte → class (bytes that no transition tells apart share one), and a byte of each.
    fn byte_classes(&self) -> ([u8; 256], Vec<u8>) {
        let mut cut = [false; 257];
        let mut mark = |lo: u8, hi: u8| {
            cut[lo as usize] = true;
            cut[hi as usize + 1] = true;
        };
        for st in &self.states {
            match st {
                St::Range(lo, hi, _) => mark(*lo, *hi),
                St::Sparse(ts) => ts.iter().for_each(|x| mark(x.0, x.1)),
                _ => {}
            }
        }
        let mut classes = [0u8; 256];
        let mut reps = vec![0u8];
        for (b, c) in classes.iter_mut().enumerate().skip(1) {
            if cut[b] {
                reps.push(b as u8);
            }
            *c = (reps.len() - 1) as u8;
        }
        (classes, reps)
    }
}

/// Builds an [`Nfa`] from a pattern and the fragments it may splice in.
struct Splicer<'a> {
    fragments: &'a [(u32, String)],
    limits: &'a DfaLimits,
    /// Compiled fragments, by id.
    compiled: HashMap<u32, NFA>,
    out: Vec<St>,
    /// (fragment, group exit) → entry state.
    entries: HashMap<(u32, u32), u32>,
    /// Split states waiting for a fragment's entry: (state, fragment, group exit).
    pending: Vec<(u32, u32, u32)>,
}

type NfaState = regex_automata::util::primitives::StateID;

impl<'a> Splicer<'a> {
    fn new(fragments: &'a [(u32, String)], limits: &'a DfaLimits) -> Self {
        Splicer {
            fragments,
            limits,
            compiled: HashMap::new(),
            out: Vec::new(),
            entries: HashMap::new(),
            pending: Vec::new(),
        }
    }

    fn compile(&self, pattern: &str) -> Result<NFA> {
        let hir = regex_syntax::ParserBuilder::new()
            .nest_limit(GENERATED_NEST_LIMIT)
            .utf8(false)
            .build()
            .parse(pattern)
            .map_err(|e| error_of(&e, false))?;
        let copies = repetition_copies(&hir);
        if copies > u64::from(self.limits.max_repetition) {
            return Err(GuideError::TooLarge(format!(
                "a counted repetition makes {copies} copies, over the limit of {}",
                self.limits.max_repetition
            )));
        }
        let config = thompson::Config::new()
            .nfa_size_limit(Some(self.limits.nfa_bytes))
            .utf8(false)
            .which_captures(thompson::WhichCaptures::None);
        // One compiler per thread: a new one allocates (and zeroes) a 10,000-entry table for
        // its first Unicode class, which cost more than most fragments' whole compilation.
        thread_local! {
            static COMPILER: std::cell::RefCell<thompson::Compiler> =
                std::cell::RefCell::new(thompson::Compiler::new());
        }
        let nfa = COMPILER.with(|c| {
            let mut c = c.borrow_mut();
            c.configure(config);
            c.build_from_hir(&hir)
                .map_err(|e| error_of(&e, e.size_limit().is_some()))
        })?;
        if !nfa.look_set_any().is_empty() {
            return Err(GuideError::InvalidRegex(
                "anchors and word boundaries are not supported here".into(),
            ));
        }
        Ok(nfa)
    }

    fn run(mut self, pattern: &str) -> Result<Nfa> {
        let main = self.compile(pattern)?;
        let start = self.splice(&main, None)?;
        while let Some((at, frag, exit)) = self.pending.pop() {
            let entry = match self.entries.get(&(frag, exit)) {
                Some(&e) => e,
                None => {
                    let nfa = match self.compiled.remove(&frag) {
                        Some(n) => n,
                        None => {
                            let text =
                                self.fragments.iter().find(|f| f.0 == frag).ok_or_else(|| {
                                    GuideError::Invalid(format!("no fragment {frag}"))
                                })?;
                            self.compile(&text.1)?
                        }
                    };
                    let e = self.splice(&nfa, Some(exit));
                    self.compiled.insert(frag, nfa);
                    let e = e?;
                    self.entries.insert((frag, exit), e);
                    e
                }
            };
            self.out[at as usize] = St::Split(Box::new([entry]));
        }
        Ok(Nfa {
            states: self.out,
            start,
        })
    }

    /// Appends `nfa`'s states; `exit`: where its matches go (`None`: they are the rule's
    /// matches). Returns its entry state.
    fn splice(&mut self, nfa: &NFA, exit: Option<u32>) -> Result<u32> {
        let base = self.out.len() as u32;
        if self.out.len() + nfa.states().len() > MAX_NFA_STATES {
            return Err(GuideError::TooLarge(format!(
                "the rule's NFA has more than {MAX_NFA_STATES} states"
            )));
        }
        let id = |s: NfaState| base + s.as_u32();
        // The (fragment, state after the marker) pairs of a marker whose first byte leads to
        // `next`. An alternation of markers may share the marker's bytes (the NFA compiler
        // factors common literal prefixes), so each byte after the first may branch.
        let marker = |next: NfaState| -> Result<Vec<(u32, u32)>> {
            let mut out = Vec::new();
            let mut his = Vec::new();
            byte_edges(nfa, next, &mut his, 0)?;
            for (hi, s2) in his {
                let mut los = Vec::new();
                byte_edges(nfa, s2, &mut los, 0)?;
                for (lo, s3) in los {
                    let frag = id_from(hi, lo)
                        .ok_or_else(|| GuideError::Invalid("a malformed fragment marker".into()))?;
                    out.push((frag, id(s3)));
                }
            }
            Ok(out)
        };
        let len = nfa.states().len() as u32;
        // States made beside the fragment's own (after them): a marker among other bytes.
        let mut extra: Vec<St> = Vec::new();
        let mut pending = Vec::new();
        for st in nfa.states() {
            let trans: Vec<(u8, u8, NfaState)> = match st {
                State::ByteRange { trans } => vec![(trans.start, trans.end, trans.next)],
                State::Sparse(t) => t
                    .transitions
                    .iter()
                    .map(|x| (x.start, x.end, x.next))
                    .collect(),
                State::Dense(t) => {
                    let mut ts: Vec<(u8, u8, NfaState)> = Vec::new();
                    for (b, &n) in t.transitions.iter().enumerate() {
                        if n.as_usize() == 0 {
                            continue;
                        }
                        match ts.last_mut() {
                            Some(l) if l.2 == n && usize::from(l.1) + 1 == b => l.1 = b as u8,
                            _ => ts.push((b as u8, b as u8, n)),
                        }
                    }
                    ts
                }
                _ => Vec::new(),
            };
            let new = if matches!(
                st,
                State::ByteRange { .. } | State::Sparse(_) | State::Dense(_)
            ) {
                let mut bytes = Vec::new();
                let mut jumps = Vec::new();
                for (lo, hi, next) in trans {
                    // (A class that merely includes a marker byte, as the NFA's unanchored prefix
                    // `\x00-\xFF` does, unreachable here, is data.)
                    if lo == hi && (lo == INLINE || lo == JUMP) {
                        for (frag, after) in marker(next)? {
                            // A group ends after the marker that entered it; a jump keeps the
                            // end of the group it is in.
                            let group_exit = if lo == INLINE {
                                after
                            } else {
                                exit.ok_or_else(|| {
                                    GuideError::Invalid("a jump outside a group".into())
                                })?
                            };
                            jumps.push((frag, group_exit));
                        }
                    } else {
                        bytes.push((lo, hi, id(next)));
                    }
                }
                let plain = |bytes: Vec<(u8, u8, u32)>| match bytes.as_slice() {
                    [(lo, hi, n)] => St::Range(*lo, *hi, *n),
                    _ => St::Sparse(bytes.into()),
                };
                if jumps.is_empty() {
                    plain(bytes)
                } else {
                    let mut alts = Vec::new();
                    for (frag, group_exit) in jumps {
                        let at = base + len + extra.len() as u32;
                        extra.push(St::Split(Box::new([])));
                        pending.push((at, frag, group_exit));
                        alts.push(at);
                    }
                    if !bytes.is_empty() {
                        alts.push(base + len + extra.len() as u32);
                        extra.push(plain(bytes));
                    }
                    St::Split(alts.into())
                }
            } else {
                match st {
                    State::Union { alternates } => {
                        St::Split(alternates.iter().map(|&x| id(x)).collect())
                    }
                    State::BinaryUnion { alt1, alt2 } => {
                        St::Split(Box::new([id(*alt1), id(*alt2)]))
                    }
                    State::Capture { next, .. } => St::Split(Box::new([id(*next)])),
                    State::Look { .. } => {
                        return Err(GuideError::InvalidRegex("look-around".into()));
                    }
                    State::Fail => St::Fail,
                    State::Match { .. } => match exit {
                        None => St::Match,
                        Some(e) => St::Split(Box::new([e])),
                    },
                    _ => St::Fail,
                }
            };
            self.out.push(new);
        }
        self.out.extend(extra);
        self.pending.extend(pending);
        Ok(id(nfa.start_anchored()))
    }
}

/// Checks that [`LazyDfa`] and the eager tables of [`super::dfa::DfaGuide`] agree on `pattern`
/// (byte mode): the same dead, accepting and continuing states along every byte from the start
/// (a product walk over all reachable pairs, at most `max_pairs` of them). `Ok(false)` when
/// the eager one does not compile or the pattern has anchors; an error when only the eager one
/// compiles otherwise.
/// Sets bits `lo..=hi` of a 256-bit set.
fn fill_bytes(set: &mut [u64; 4], lo: u8, hi: u8) {
    for (w, word) in set.iter_mut().enumerate() {
        let (a, b) = ((w as u32) * 64, (w as u32) * 64 + 63);
        let (lo, hi) = (u32::from(lo).max(a), u32::from(hi).min(b));
        if lo <= hi {
            let n = hi - lo + 1;
            let m = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << (lo - a)
            };
            *word |= m;
        }
    }
}

/// The (byte, next state) edges of marker byte state `s` of `nfa` (through unions, which an
/// alternation of markers factored by their common bytes may leave between them).
fn byte_edges(nfa: &NFA, s: NfaState, out: &mut Vec<(u8, NfaState)>, depth: u32) -> Result<()> {
    let bad = || GuideError::Invalid("a malformed fragment marker".into());
    if depth > 64 {
        return Err(bad());
    }
    match nfa.state(s) {
        State::ByteRange { trans } => {
            out.extend((trans.start..=trans.end).map(|b| (b, trans.next)))
        }
        State::Sparse(t) => {
            for x in t.transitions.iter() {
                out.extend((x.start..=x.end).map(|b| (b, x.next)));
            }
        }
        State::Dense(t) => {
            for (b, &n) in t.transitions.iter().enumerate() {
                if n.as_usize() != 0 {
                    out.push((b as u8, n));
                }
            }
        }
        State::Union { alternates } => {
            for &a in alternates.iter() {
                byte_edges(nfa, a, out, depth + 1)?;
            }
        }
        State::BinaryUnion { alt1, alt2 } => {
            byte_edges(nfa, *alt1, out, depth + 1)?;
            byte_edges(nfa, *alt2, out, depth + 1)?;
        }
        _ => return Err(bad()),
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn agrees_with_eager(
    pattern: &str,
    max_pairs: usize,
) -> std::result::Result<bool, String> {
    let limits = DfaLimits::default();
    let (eager, lazy) = match (
        super::dfa::DfaGuide::build(pattern, &limits, false),
        LazyDfa::build(pattern, &limits),
    ) {
        (Ok(e), Ok(l)) => (e, l),
        // The eager determinizer has budgets the lazy one does not need.
        (Err(_), _) => return Ok(false),
        // Generated rules have no anchors or word boundaries; the lazy DFA refuses them.
        (Ok(_), Err(GuideError::InvalidRegex(m))) if m.starts_with("anchors") => return Ok(false),
        (Ok(_), Err(e)) => return Err(format!("{pattern:?}: only the eager DFA compiles: {e}")),
    };
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![(eager.start(), lazy.start())];
    seen.insert(todo[0]);
    // A complement rule's DFA accepts where the eager DFA would take the complement sentinel
    // (to a match) and not the veto, and it takes neither byte itself.
    let sentinel = |e: StateId, b: u8| {
        let s = eager.step(e, b);
        s != DEAD && eager.is_accepting(s)
    };
    let sentinels = |b: u8| lazy.complement && (b == COMPLEMENT || b == VETO);
    let info = |e: StateId| {
        if lazy.complement {
            (
                sentinel(e, COMPLEMENT) && !sentinel(e, VETO),
                (0..=255u8).any(|b| !sentinels(b) && eager.step(e, b) != DEAD),
            )
        } else {
            (eager.is_accepting(e), eager.can_continue(e))
        }
    };
    // (A complement rule's state that neither accepts nor continues is dead.)
    let dead = |e: StateId| e == DEAD || info(e) == (false, false);
    while let Some((e, l)) = todo.pop() {
        let (accepting, continuing) = info(e);
        if accepting != lazy.is_accepting(l) || continuing != lazy.can_continue(l) {
            return Err(format!("{pattern:?}: accepting/continuing differ"));
        }
        for b in (0..=255u8).filter(|&b| !sentinels(b)) {
            let (e2, l2) = (eager.step(e, b), lazy.step(l, b));
            if dead(e2) != (l2 == DEAD) {
                return Err(format!(
                    "{pattern:?}: byte {b:#04x} is dead in one DFA only"
                ));
            }
            if !dead(e2) && seen.len() < max_pairs && seen.insert((e2, l2)) {
                todo.push((e2, l2));
            }
        }
    }
    Ok(true)
}

/// Whether two lazy DFAs accept the same language (a product walk from their starts, at most
/// `max_pairs` pairs): the first difference found, if any.
#[cfg(test)]
pub(crate) fn same_language(
    a: &LazyDfa,
    b: &LazyDfa,
    max_pairs: usize,
) -> std::result::Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![(a.start(), b.start(), Vec::new())];
    seen.insert((a.start(), b.start()));
    while let Some((x, y, path)) = todo.pop() {
        if a.is_accepting(x) != b.is_accepting(y) {
            return Err(format!("after {path:?}: accepting in one only"));
        }
        for c in 0..=255u8 {
            let (x2, y2) = (a.step(x, c), b.step(y, c));
            if (x2 == DEAD) != (y2 == DEAD) {
                return Err(format!("after {path:?}: byte {c:#04x} dead in one only"));
            }
            if x2 != DEAD && seen.len() < max_pairs && seen.insert((x2, y2)) {
                let mut p = path.clone();
                p.push(c);
                todo.push((x2, y2, p));
            }
        }
    }
    Ok(())
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
        assert!(matches!(d.expand(usize::MAX), Err(GuideError::TooLarge(_))));
        // Nothing wrong was cached: a larger budget's DFA walks the same text to the end.
        let d = LazyDfa::build("abcdef", &DfaLimits::default()).unwrap();
        assert!(d
            .walk(d.start(), b"abcdef")
            .is_some_and(|s| d.is_accepting(s)));
    }
}
