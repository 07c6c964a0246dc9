//! A flat token trie of a vocabulary: nodes in depth-first preorder, so that a walk is one pass
//! over an array and a rejected byte skips its whole subtree with one jump.

use crate::sampling::TokenId;

/// One trie node (12 bytes): the byte on the edge into it, its depth, where its subtree ends,
/// and the tokens whose bytes end exactly here (a range of [`TokenTrie::token_ids`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Node {
    /// Index one past the last node of this node's subtree.
    pub subtree_end: u32,
    /// First of this node's tokens in `token_ids`.
    pub tok_start: u32,
    /// Depth (the root is 0; a node at depth `d` ends a `d`-byte string).
    pub depth: u16,
    /// How many tokens end here (several when tokens share bytes, e.g. `▁` and `<0x20>`).
    pub n_tok: u8,
    /// The byte on the edge from the parent.
    pub byte: u8,
}

/// A flat trie over the non-empty bytes of the ordinary (non-special) tokens of a vocabulary.
#[derive(Debug)]
pub struct TokenTrie {
    nodes: Vec<Node>,
    token_ids: Vec<TokenId>,
    max_depth: usize,
    /// Per node: whether every path below it is JSON string content (see
    /// [`TokenTrie::content_below`]); built on first use.
    content: std::sync::OnceLock<Vec<bool>>,
    /// See [`TokenTrie::leads`].
    leads: std::sync::OnceLock<Leads>,
    /// See [`TokenTrie::content_from_root`].
    rooted: std::sync::OnceLock<Rooted>,
    /// See [`TokenTrie::or_content_upto`].
    by_leads: std::sync::OnceLock<ByLeads>,
    /// See [`TokenTrie::esc_before`].
    esc: std::sync::OnceLock<EscChars>,
    /// See [`TokenTrie::skeleton`], by lead-byte set.
    skeletons: std::sync::Mutex<std::collections::HashMap<[u64; 4], std::sync::Arc<Skeleton>>>,
    /// See [`TokenTrie::within`].
    within: std::sync::Mutex<std::collections::HashMap<[u64; 4], std::sync::Arc<Vec<u64>>>>,
}

/// String content read from the root (see [`TokenTrie::content_from_root`]).
#[derive(Debug)]
struct Rooted {
    /// Per node (bit set): the path to it is content, ending at a character boundary.
    boundary: Vec<u64>,
    /// The tokens that are content all the way, in slot (preorder) order, and for each slot
    /// of `token_ids` how many of them come before it (one more entry at the end).
    content_ids: Vec<TokenId>,
    content_before: Vec<u32>,
    /// The nodes whose byte is the first on their path that is not content, read at a character
    /// boundary, in preorder.
    exits: Vec<u32>,
    /// The byte of each exit (a walk skips the exits its state dies at without touching them).
    exit_bytes: Vec<u8>,
    /// Per node: the decoder state after its path when that path is content from the root
    /// (an index of `U8::ALL`), else `NOT_CONTENT`.
    decoder: Vec<u8>,
}

/// See [`TokenTrie::skeleton`].
pub(crate) type Skeleton = Vec<(u32, bool)>;

/// Most lead-byte sets [`TokenTrie::skeleton`] keeps (per vocabulary).
const SKELETONS: usize = 64;

/// See `Rooted::decoder`.
const NOT_CONTENT: u8 = 0xFF;

/// The tokens that are string content from the root, as bitmasks by the characters they start
/// (see [`TokenTrie::or_content_upto`]).
#[derive(Debug)]
struct ByLeads {
    /// `upto[r]`: those starting at most `r` characters, for `r` up to [`UPTO_LEVELS`] (and no
    /// further than the longest).
    upto: Vec<Box<[u32]>>,
    /// All of them.
    all: Box<[u32]>,
    /// Those starting more than [`UPTO_LEVELS`] characters (a few), by that count.
    long: Vec<(u16, TokenId)>,
    /// The most characters one of them starts.
    max: u32,
}

/// Characters of JSON string content with escapes read as one character each (see
/// [`esc_step`]), counted from a character boundary outside an escape.
#[derive(Debug)]
struct EscChars {
    /// Per node: the characters started on its path before its own byte.
    before: Vec<u16>,
    /// Every token, as bitmasks by the characters it starts: `upto[r]`, those starting at most
    /// `r`, for `r` up to [`UPTO_LEVELS`] (and no further than the most).
    upto: Vec<Box<[u32]>>,
    /// Every token with the characters it starts, by that count.
    sorted: Vec<(u16, TokenId)>,
    /// Where in `sorted` the tokens starting more than [`UPTO_LEVELS`] characters begin.
    long: usize,
    /// The most characters a token starts.
    max: u32,
}

/// One byte of JSON string content read by escape context `ctx` (0: outside an escape, 1:
/// after a backslash, 2..=5: after `\u` and `ctx - 2` hex digits): the context after it, and
/// whether the byte starts a character (neither a UTF-8 continuation byte nor inside an
/// escape). Content that is not valid JSON is read somehow; callers only count valid content.
#[inline(always)]
pub(crate) fn esc_step(ctx: u8, b: u8) -> (u8, bool) {
    match ctx {
        0 if b == b'\\' => (1, true),
        0 => (0, b & 0xC0 != 0x80),
        1 if b == b'u' => (2, false),
        2..=4 => (ctx + 1, false),
        _ => (0, false),
    }
}

/// For tokens sorted by a count (each with its count): bitmasks of `words` words of those
/// counting at most `r`, for `r` from 0 up to [`UPTO_LEVELS`] (and no further than the most);
/// how many tokens the last level holds (the rest count more), and the most.
fn upto_masks(toks: &[(u16, TokenId)], words: usize) -> (Vec<Box<[u32]>>, usize, u32) {
    let max = toks.last().map_or(0, |x| u32::from(x.0));
    let levels = (max as usize).min(UPTO_LEVELS);
    let mut upto = Vec::with_capacity(levels + 1);
    let mut m = vec![0u32; words].into_boxed_slice();
    let mut k = 0;
    for level in 0..=levels {
        while k < toks.len() && usize::from(toks[k].0) <= level {
            let t = toks[k].1;
            m[(t / 32) as usize] |= 1 << (t % 32);
            k += 1;
        }
        upto.push(m.clone());
    }
    (upto, k, max)
}

/// Bitmask levels of [`ByLeads::upto`].
const UPTO_LEVELS: usize = 32;

/// Most byte classes [`TokenTrie::within`] keeps tables for (per vocabulary).
const WITHIN_CLASSES: usize = 256;

/// Characters started (bytes that are not UTF-8 continuation bytes) on the path to each node,
/// and the same for each slot of `token_ids` (its token's end node).
#[derive(Debug, Clone)]
struct Leads {
    node: Vec<u16>,
    slot: Vec<u16>,
}

/// UTF-8 decoding states for [`TokenTrie::content_below`]: at a character boundary, or inside a
/// character (which continuation bytes may come).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum U8 {
    Boundary,
    Cont1,
    Cont2,
    Cont3,
    AfterE0,
    AfterED,
    AfterF0,
    AfterF4,
}

impl U8 {
    const ALL: [U8; 8] = [
        U8::Boundary,
        U8::Cont1,
        U8::Cont2,
        U8::Cont3,
        U8::AfterE0,
        U8::AfterED,
        U8::AfterF0,
        U8::AfterF4,
    ];

    /// The state after byte `b` of a JSON string's unescaped content, or `None` (a quote, a
    /// backslash, a control character or invalid UTF-8).
    pub(crate) fn next(self, b: u8) -> Option<U8> {
        use U8::*;
        let cont = (0x80..=0xBF).contains(&b);
        match self {
            Boundary => match b {
                0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7F => Some(Boundary),
                0xC2..=0xDF => Some(Cont1),
                0xE0 => Some(AfterE0),
                0xED => Some(AfterED),
                0xE1..=0xEC | 0xEE..=0xEF => Some(Cont2),
                0xF0 => Some(AfterF0),
                0xF1..=0xF3 => Some(Cont3),
                0xF4 => Some(AfterF4),
                _ => None,
            },
            Cont1 => cont.then_some(Boundary),
            Cont2 => cont.then_some(Cont1),
            Cont3 => cont.then_some(Cont2),
            AfterE0 => (0xA0..=0xBF).contains(&b).then_some(Cont1),
            AfterED => (0x80..=0x9F).contains(&b).then_some(Cont1),
            AfterF0 => (0x90..=0xBF).contains(&b).then_some(Cont2),
            AfterF4 => (0x80..=0x8F).contains(&b).then_some(Cont2),
        }
    }
}

impl TokenTrie {
    /// Builds the trie of `tokens` (id, bytes); empty byte strings are skipped.
    pub fn new<'a>(tokens: impl IntoIterator<Item = (TokenId, &'a [u8])>) -> TokenTrie {
        let mut toks: Vec<(TokenId, &[u8])> =
            tokens.into_iter().filter(|(_, b)| !b.is_empty()).collect();
        toks.sort_unstable_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(&b.0)));
        let mut nodes = vec![Node {
            subtree_end: 0,
            tok_start: 0,
            depth: 0,
            n_tok: 0,
            byte: 0,
        }];
        // `path[d]` is the node at depth `d` on the current path (path[0] = root).
        let mut path: Vec<usize> = vec![0];
        let mut prev: &[u8] = &[];
        let mut token_ids = Vec::with_capacity(toks.len());
        let mut max_depth = 0;
        for (i, &(id, bytes)) in toks.iter().enumerate() {
            let bytes = &bytes[..bytes.len().min(u16::MAX as usize)];
            let lcp = prev.iter().zip(bytes).take_while(|(a, b)| a == b).count();
            if lcp == bytes.len() && lcp == prev.len() && i > 0 {
                let last = *path.last().expect("non-empty path");
                if nodes[last].n_tok < u8::MAX {
                    nodes[last].n_tok += 1;
                    token_ids.push(id);
                }
                continue;
            }
            while path.len() > lcp + 1 {
                let n = path.pop().expect("non-empty path");
                nodes[n].subtree_end = nodes.len() as u32;
            }
            for (d, &b) in bytes.iter().enumerate().skip(lcp) {
                path.push(nodes.len());
                nodes.push(Node {
                    subtree_end: 0,
                    tok_start: token_ids.len() as u32,
                    depth: (d + 1) as u16,
                    n_tok: 0,
                    byte: b,
                });
            }
            let last = *path.last().expect("non-empty path");
            nodes[last].n_tok = 1;
            nodes[last].tok_start = token_ids.len() as u32;
            token_ids.push(id);
            max_depth = max_depth.max(bytes.len());
            prev = bytes;
        }
        while let Some(n) = path.pop() {
            nodes[n].subtree_end = nodes.len() as u32;
        }
        let trie = TokenTrie {
            nodes,
            token_ids,
            max_depth,
            content: std::sync::OnceLock::new(),
            leads: std::sync::OnceLock::new(),
            within: Default::default(),
            skeletons: Default::default(),
            rooted: std::sync::OnceLock::new(),
            by_leads: std::sync::OnceLock::new(),
            esc: std::sync::OnceLock::new(),
        };
        // The per-vocabulary tables of the JSON engine's string shortcuts (a few ms for a
        // 131k vocabulary): made with the trie, not by the first request that needs them.
        trie.content_below(0);
        trie.by_leads.get_or_init(|| trie.build_by_leads());
        trie.skeleton(&[0; 4]);
        trie
    }

    /// Whether every path below node `i`, read from a character boundary, is unescaped JSON
    /// string content: no quote, backslash or control character, valid UTF-8 (a path may end
    /// inside a character). The JSON Schema engine allows such a subtree's tokens at once from
    /// a state that loops on string content.
    pub(crate) fn content_below(&self, i: usize) -> bool {
        self.content.get_or_init(|| self.build_content())[i]
    }

    fn build_content(&self) -> Vec<bool> {
        let n = self.nodes.len();
        // ok[i] bit u: every path below node i is content when read from UTF-8 state u.
        let mut ok = vec![u8::MAX; n];
        let parent = self.parents();
        for i in (1..n).rev() {
            let b = self.nodes[i].byte;
            let mut keep = 0u8;
            for (k, u) in U8::ALL.iter().enumerate() {
                if let Some(v) = u.next(b) {
                    let vi = U8::ALL.iter().position(|x| *x == v).unwrap_or(0);
                    if ok[i] & (1 << vi) != 0 {
                        keep |= 1 << k;
                    }
                }
            }
            ok[parent[i]] &= keep;
        }
        ok.iter().map(|&m| m & 1 != 0).collect()
    }

    /// The characters started on the path to node `i` (its bytes that are not UTF-8
    /// continuation bytes), and for each token of [`TokenTrie::tokens_below`]`(i)` the same
    /// count of the whole token: below a character boundary at node `i`, a token starts
    /// `slot - node` more characters.
    pub(crate) fn leads(&self, i: usize) -> (u16, &[u16]) {
        let l = self.leads_table();
        let (from, to) = self.below_range(i);
        (l.node[i], &l.slot[from..to])
    }

    /// Per node: the characters started on the path to it (see [`TokenTrie::leads`]).
    pub(crate) fn node_leads(&self) -> &[u16] {
        &self.leads_table().node
    }

    fn leads_table(&self) -> &Leads {
        self.leads.get_or_init(|| {
            let mut node = vec![0u16; self.nodes.len()];
            let mut path: Vec<u16> = vec![0];
            for (i, n) in self.nodes.iter().enumerate().skip(1) {
                let d = n.depth as usize;
                path.truncate(d);
                let lead = path[d - 1] + u16::from(n.byte & 0xC0 != 0x80);
                path.push(lead);
                node[i] = lead;
            }
            let mut slot = vec![0u16; self.token_ids.len()];
            for (i, n) in self.nodes.iter().enumerate() {
                let from = n.tok_start as usize;
                for x in slot.iter_mut().skip(from).take(n.n_tok as usize) {
                    *x = node[i];
                }
            }
            Leads { node, slot }
        })
    }

    /// For a byte set `class` (a bitset): a bitset over nodes, set where every byte below the
    /// node is in `class`. Built once per class (at most [`WITHIN_CLASSES`] of them; `None`
    /// past that).
    pub(crate) fn within(&self, class: &[u64; 4]) -> Option<std::sync::Arc<Vec<u64>>> {
        let mut m = self.within.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = m.get(class) {
            return Some(t.clone());
        }
        if m.len() >= WITHIN_CLASSES {
            return None;
        }
        let n = self.nodes.len();
        let mut bits = vec![u64::MAX; n.div_ceil(64)];
        let parent = self.parents();
        for i in (1..n).rev() {
            let b = self.nodes[i].byte;
            let ok = class[(b >> 6) as usize] & (1 << (b & 63)) != 0
                && bits[i / 64] & (1 << (i % 64)) != 0;
            if !ok {
                let p = parent[i];
                bits[p / 64] &= !(1 << (p % 64));
            }
        }
        let t = std::sync::Arc::new(bits);
        m.insert(*class, t.clone());
        Some(t)
    }

    /// Below node `i`, where the path from the root is string content ending at a character
    /// boundary: the tokens below `i` that are content all the way (a walk looping on string
    /// content at `i` allows them all), and the nodes below `i` where content first stops (the
    /// only places such a walk must step). `None` when the path to `i` is not such content.
    pub(crate) fn content_from_root(&self, i: usize) -> Option<(&[TokenId], &[u32], &[u8])> {
        let r = self.rooted.get_or_init(|| self.build_rooted());
        if r.boundary[i / 64] & (1 << (i % 64)) == 0 {
            return None;
        }
        let (from, to) = self.below_range(i);
        let end = self.nodes[i].subtree_end;
        let a = r.exits.partition_point(|&e| e <= i as u32);
        let b = r.exits.partition_point(|&e| e < end);
        let (c0, c1) = (
            r.content_before[from] as usize,
            r.content_before[to] as usize,
        );
        Some((&r.content_ids[c0..c1], &r.exits[a..b], &r.exit_bytes[a..b]))
    }

    /// Sets in `out` (a token bitmask) the bits of the tokens that are string content from the
    /// root (the tokens [`TokenTrie::content_from_root`]`(0)` lists) starting at most `room`
    /// characters (`None`: any number) — a copy of a precomputed mask, where a walk would
    /// visit every such token.
    pub(crate) fn or_content_upto(&self, room: Option<u32>, out: &mut [u32]) {
        let b = self.by_leads.get_or_init(|| self.build_by_leads());
        let or = |out: &mut [u32], m: &[u32]| {
            for (o, x) in out.iter_mut().zip(m) {
                *o |= x;
            }
        };
        match room {
            Some(r) if r < b.max => {
                let level = (r as usize).min(b.upto.len() - 1);
                or(out, &b.upto[level]);
                for &(l, t) in &b.long {
                    if u32::from(l) <= r {
                        out[(t / 32) as usize] |= 1 << (t % 32);
                    }
                }
            }
            _ => or(out, &b.all),
        }
    }

    fn build_by_leads(&self) -> ByLeads {
        let r = self.rooted.get_or_init(|| self.build_rooted());
        let leads = self.leads(0).1;
        let words = self
            .token_ids
            .iter()
            .max()
            .map_or(0, |&t| t as usize / 32 + 1);
        let mut toks: Vec<(u16, TokenId)> = (0..self.token_ids.len())
            .filter(|&k| r.content_before[k + 1] > r.content_before[k])
            .map(|k| (leads[k], self.token_ids[k]))
            .collect();
        toks.sort_unstable();
        let (upto, k, max) = upto_masks(&toks, words);
        let mut m = upto[upto.len() - 1].clone();
        let long = toks[k..].to_vec();
        for &(_, t) in &long {
            m[(t / 32) as usize] |= 1 << (t % 32);
        }
        ByLeads {
            upto,
            all: m,
            long,
            max,
        }
    }

    /// The decoder state after the path to node `i` when that path is string content from the
    /// root (possibly ending inside a character).
    pub(crate) fn content_decoder(&self, i: usize) -> Option<U8> {
        let r = self.rooted.get_or_init(|| self.build_rooted());
        U8::ALL.get(r.decoder[i] as usize).copied()
    }

    /// The nodes on the paths from the root to the *exits* of string content read from the
    /// root: a quote or a backslash at a character boundary, or a byte of `leads` there (the
    /// first bytes of the characters a state does not keep in its closed region), in preorder,
    /// each with whether it is such an exit (nothing below an exit is listed). From a state
    /// that every other string content keeps alive, the only nodes a walk must step.
    pub(crate) fn skeleton(&self, leads: &[u64; 4]) -> std::sync::Arc<Skeleton> {
        let mut m = self.skeletons.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = m.get(leads) {
            return t.clone();
        }
        let t = std::sync::Arc::new(self.build_skeleton(leads));
        if m.len() < SKELETONS {
            m.insert(*leads, t.clone());
        }
        t
    }

    fn build_skeleton(&self, leads: &[u64; 4]) -> Skeleton {
        let n = self.nodes.len();
        let r = self.rooted.get_or_init(|| self.build_rooted());
        let boundary = |i: usize| r.boundary[i / 64] & (1 << (i % 64)) != 0;
        let parent = self.parents();
        let mut exit = vec![false; n];
        // At or below an exit: nothing there is listed (the walk takes an exit's subtree).
        let mut below = vec![false; n];
        let mut on_path = vec![false; n];
        for i in 1..n {
            let (p, b) = (parent[i], self.nodes[i].byte);
            below[i] = below[p] || exit[p];
            if below[i] || !boundary(p) {
                continue;
            }
            if b == b'"' || b == b'\\' || leads[(b >> 6) as usize] & (1 << (b & 63)) != 0 {
                exit[i] = true;
                let mut j = i;
                while j != 0 && !on_path[j] {
                    on_path[j] = true;
                    j = parent[j];
                }
            }
        }
        (1..n)
            .filter(|&i| on_path[i])
            .map(|i| (i as u32, exit[i]))
            .collect()
    }

    /// The exits (see [`TokenTrie::content_from_root`]) strictly below node `i`, and their
    /// bytes.
    pub(crate) fn exits_below(&self, i: usize) -> (&[u32], &[u8]) {
        let r = self.rooted.get_or_init(|| self.build_rooted());
        let end = self.nodes[i].subtree_end;
        let a = r.exits.partition_point(|&e| e <= i as u32);
        let b = r.exits.partition_point(|&e| e < end);
        (&r.exits[a..b], &r.exit_bytes[a..b])
    }

    /// Whether the path to node `i` is string content from the root, ending at a character
    /// boundary.
    pub(crate) fn content_path(&self, i: usize) -> bool {
        let r = self.rooted.get_or_init(|| self.build_rooted());
        r.boundary[i / 64] & (1 << (i % 64)) != 0
    }

    /// The tokens of node `i` and below it that are string content from the root (those of
    /// [`TokenTrie::content_from_root`]`(0)` in `i`'s subtree).
    pub(crate) fn content_in_subtree(&self, i: usize) -> &[TokenId] {
        let r = self.rooted.get_or_init(|| self.build_rooted());
        let from = self.nodes[i].tok_start as usize;
        let to = self
            .nodes
            .get(self.nodes[i].subtree_end as usize)
            .map_or(self.token_ids.len(), |x| x.tok_start as usize);
        let (c0, c1) = (
            r.content_before[from] as usize,
            r.content_before[to] as usize,
        );
        &r.content_ids[c0..c1]
    }

    fn build_rooted(&self) -> Rooted {
        let n = self.nodes.len();
        let mut boundary = vec![0u64; n.div_ceil(64)];
        let mut content = vec![false; n];
        let mut slot = vec![false; self.token_ids.len()];
        let mut exits = Vec::new();
        let mut decoder = vec![NOT_CONTENT; n];
        decoder[0] = 0;
        // The decoder state on the path to each node (`None`: content stopped above or at it).
        let mut path: Vec<Option<U8>> = vec![Some(U8::Boundary)];
        content[0] = true;
        boundary[0] |= 1;
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            let d = node.depth as usize;
            path.truncate(d);
            let here = match path[d - 1] {
                Some(u) => {
                    let v = u.next(node.byte);
                    // Content stops here. Inside a character it is invalid UTF-8, which a
                    // content loop never takes (see `Rule::content_loop`): only the stops at a
                    // character boundary are walked on.
                    if v.is_none() && u == U8::Boundary {
                        exits.push(i as u32);
                    }
                    v
                }
                None => None,
            };
            path.push(here);
            content[i] = here.is_some();
            if let Some(u) = here {
                decoder[i] = U8::ALL.iter().position(|x| *x == u).unwrap_or(0) as u8;
            }
            if here == Some(U8::Boundary) {
                boundary[i / 64] |= 1 << (i % 64);
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if content[i] {
                let from = node.tok_start as usize;
                for x in slot.iter_mut().skip(from).take(node.n_tok as usize) {
                    *x = true;
                }
            }
        }
        let mut content_ids = Vec::new();
        let mut content_before = Vec::with_capacity(slot.len() + 1);
        for (k, &c) in slot.iter().enumerate() {
            content_before.push(content_ids.len() as u32);
            if c {
                content_ids.push(self.token_ids[k]);
            }
        }
        content_before.push(content_ids.len() as u32);
        let exit_bytes: Vec<u8> = exits.iter().map(|&e| self.nodes[e as usize].byte).collect();
        Rooted {
            boundary,
            content_ids,
            content_before,
            exits,
            exit_bytes,
            decoder,
        }
    }

    /// The characters of JSON string content (escapes read as one character) started on the
    /// path to node `i` before its byte, read from a character boundary outside an escape.
    pub(crate) fn esc_before(&self, i: usize) -> u32 {
        u32::from(self.esc_chars().before[i])
    }

    /// The most characters (as [`TokenTrie::esc_before`] counts them) a token starts.
    pub(crate) fn esc_max(&self) -> u32 {
        self.esc_chars().max
    }

    /// Clears in `out` (a token bitmask) the bits of the tokens that start more than `room`
    /// characters (as [`TokenTrie::esc_before`] counts them).
    pub(crate) fn and_esc_upto(&self, room: u32, out: &mut [u32]) {
        let e = self.esc_chars();
        if room >= e.max {
            return;
        }
        if let Some(m) = e.upto.get(room as usize) {
            for (o, x) in out.iter_mut().zip(m.iter()) {
                *o &= x;
            }
            out.iter_mut().skip(m.len()).for_each(|o| *o = 0);
        } else {
            for &(l, t) in &e.sorted[e.long..] {
                if u32::from(l) > room {
                    out[(t / 32) as usize] &= !(1 << (t % 32));
                }
            }
        }
    }

    /// The tokens that start `from..=upto` characters (as [`TokenTrie::esc_before`] counts
    /// them).
    pub(crate) fn esc_band(&self, from: u32, upto: u32) -> impl Iterator<Item = TokenId> + '_ {
        let e = self.esc_chars();
        let from = e.sorted.partition_point(|x| u32::from(x.0) < from);
        e.sorted[from..]
            .iter()
            .take_while(move |x| u32::from(x.0) <= upto)
            .map(|x| x.1)
    }

    fn esc_chars(&self) -> &EscChars {
        self.esc.get_or_init(|| {
            let mut before = vec![0u16; self.nodes.len()];
            // Characters and escape context after the path, by depth.
            let mut cnt = vec![0u16; self.max_depth + 1];
            let mut ctx = vec![0u8; self.max_depth + 1];
            let mut toks: Vec<(u16, TokenId)> = Vec::with_capacity(self.token_ids.len());
            for (i, n) in self.nodes.iter().enumerate().skip(1) {
                let d = n.depth as usize;
                let (c, starts) = esc_step(ctx[d - 1], n.byte);
                before[i] = cnt[d - 1];
                cnt[d] = cnt[d - 1] + u16::from(starts);
                ctx[d] = c;
                toks.extend(self.tokens_of(n).iter().map(|&t| (cnt[d], t)));
            }
            toks.sort_unstable();
            let words = self
                .token_ids
                .iter()
                .max()
                .map_or(0, |&t| t as usize / 32 + 1);
            let (upto, k, max) = upto_masks(&toks, words);
            EscChars {
                before,
                upto,
                sorted: toks,
                long: k,
                max,
            }
        })
    }

    /// Each node's parent (the root's is itself), from the preorder and the depths.
    fn parents(&self) -> Vec<usize> {
        let mut parent = vec![0usize; self.nodes.len()];
        let mut path: Vec<usize> = vec![0];
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            let d = node.depth as usize;
            path.truncate(d);
            parent[i] = path[d - 1];
            path.push(i);
        }
        parent
    }

    fn below_range(&self, i: usize) -> (usize, usize) {
        let end_node = self.nodes[i].subtree_end as usize;
        if i + 1 >= end_node {
            return (0, 0);
        }
        let from = self.nodes[i + 1].tok_start as usize;
        let to = self
            .nodes
            .get(end_node)
            .map_or(self.token_ids.len(), |x| x.tok_start as usize);
        (from, to)
    }

    /// The tokens of the nodes strictly below node `i` (a contiguous range: preorder).
    pub(crate) fn tokens_below(&self, i: usize) -> &[TokenId] {
        let (from, to) = self.below_range(i);
        &self.token_ids[from..to]
    }

    /// The nodes, root first, in depth-first preorder.
    pub(crate) fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The tokens of `node`.
    #[inline(always)]
    pub(crate) fn tokens_of(&self, node: &Node) -> &[TokenId] {
        let s = node.tok_start as usize;
        &self.token_ids[s..s + node.n_tok as usize]
    }

    /// The longest token, in bytes.
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// Number of nodes (including the root).
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_below_follows_json_string_content() {
        let toks: Vec<(TokenId, &[u8])> = vec![
            (0, b"a"),
            (1, b"ab"),
            (2, "aé".as_bytes()),
            (3, b"a\xc3"),
            (4, b"b"),
            (5, b"b\""),
            (6, b"c"),
            (7, b"c\xa9"),
            (8, b"d"),
            (9, b"d\xed\xa0"),
        ];
        let t = TokenTrie::new(toks.iter().map(|(i, b)| (*i, *b)));
        let node = |bytes: &[u8]| {
            (1..t.nodes.len())
                .find(|&i| {
                    let mut path = Vec::new();
                    let mut d = t.nodes[i].depth as usize;
                    let mut j = i;
                    while d > 0 {
                        if t.nodes[j].depth as usize == d {
                            path.push(t.nodes[j].byte);
                            d -= 1;
                        }
                        j -= 1;
                    }
                    path.reverse();
                    path == bytes
                })
                .unwrap_or(0)
        };
        // Below `a`: "b", "é" and a partial "é": all content.
        assert!(t.content_below(node(b"a")));
        let mut below: Vec<TokenId> = t.tokens_below(node(b"a")).to_vec();
        below.sort_unstable();
        assert_eq!(below, vec![1, 2, 3]);
        // A quote, a stray continuation byte, a surrogate half: not content.
        assert!(!t.content_below(node(b"b")));
        assert!(!t.content_below(node(b"c")));
        assert!(!t.content_below(node(b"d")));
        assert!(t.tokens_below(node(b"ab")).is_empty());
    }
}
