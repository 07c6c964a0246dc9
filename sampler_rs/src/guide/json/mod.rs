//! Our JSON Schema compiler (`tokenwire-json`): schema → rules of byte-DFA patterns with calls
//! ([`emit`]) → a recursive transition network of DFAs ([`rtn`]) whose masks are cached per
//! (normalized) matcher state.
//!
//! What it does not implement it reports as [`Outcome::Unsupported`]; the caller then compiles
//! the schema with llguidance (which implements more keywords and fails closed on the rest).

mod distribute;
mod emit;
pub(crate) mod rtn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

use super::dfa::DfaLimits;
use super::lazy::LazyDfa;
use super::vocab::VocabCore;
use rtn::{InnerCache, Rtn, Rule};

/// The result of trying our compiler.
pub(crate) enum Outcome {
    /// Compiled.
    Compiled(Rtn),
    /// Not for us (a keyword or form we do not implement, or over our budgets): the reason.
    Unsupported(String),
}

/// Compiles a parsed schema. `whitespace` is the whitespace pattern allowed between JSON tokens.
pub(crate) fn compile(vocab: &VocabCore, schema: &Value, whitespace: Option<&str>) -> Outcome {
    let srcs = match emit::emit(schema, whitespace) {
        Ok(s) => s,
        Err(emit::Fail::Unsupported(why)) => return Outcome::Unsupported(why),
        Err(emit::Fail::TooLarge(why)) => return Outcome::Unsupported(why),
        // llguidance then gives its own verdict (and message) on a schema we think matches
        // nothing.
        Err(emit::Fail::Unsatisfiable(why)) => return Outcome::Unsupported(why),
    };
    let limits = DfaLimits {
        max_states: 50_000,
        ..DfaLimits::default()
    };
    let mut rules = Vec::with_capacity(srcs.len());
    for (i, src) in srcs.into_iter().enumerate() {
        // Rules 1 and 2 (any-JSON, plain strings) are the same in every schema: kept across
        // `clear_caches`.
        match rule(src, &limits, i == 1 || i == 2) {
            Ok(r) => rules.push(r),
            Err(why) => return Outcome::Unsupported(why),
        }
    }
    // A rule that calls itself before consuming anything (`{"$ref": "#"}`) would recurse
    // forever: not for us.
    let edges: Vec<Vec<u32>> = rules.iter().map(|r| r.start_callees()).collect();
    let mut color = vec![0u8; rules.len()];
    fn cyclic(r: usize, edges: &[Vec<u32>], color: &mut [u8]) -> bool {
        color[r] = 1;
        for &c in &edges[r] {
            let c = c as usize;
            if c >= color.len() || color[c] == 1 || (color[c] == 0 && cyclic(c, edges, color)) {
                return true;
            }
        }
        color[r] = 2;
        false
    }
    for r in 0..rules.len() {
        if color[r] == 0 && cyclic(r, &edges, &mut color) {
            return Outcome::Unsupported("a `$ref` cycle that consumes nothing".into());
        }
    }
    Outcome::Compiled(Rtn::new(rules, 0, vocab.trie().max_depth()))
}

/// Compiled rules by (pattern, count, follow), shared by every schema of the process: a rule is
/// the same automaton whatever schema it came from (any-JSON, plain strings, common
/// sub-schemas). The flag marks the built-in rules that [`clear_caches`] keeps.
type RuleCache = HashMap<RuleKey, (Arc<Rule>, bool)>;

/// (pattern, its fragments, count, follow bytes, counts characters)
type RuleKey = (
    String,
    Vec<(u32, String)>,
    Option<(u32, Option<u32>)>,
    Option<Vec<u8>>,
    bool,
);

/// The shared [`InnerCache`]s, by (pattern, follow bytes, counts characters), with the same
/// flag.
type InnerCaches = HashMap<(String, Option<Vec<u8>>, bool), (Arc<InnerCache>, bool)>;

/// Most rules kept in [`RuleCache`]; past it the cache starts over (but for the built-in rules).
const RULE_CACHE_ENTRIES: usize = 4096;

static RULES: OnceLock<Mutex<RuleCache>> = OnceLock::new();
static INNERS: OnceLock<Mutex<InnerCaches>> = OnceLock::new();

fn lock<T: Default>(m: &'static OnceLock<Mutex<T>>) -> std::sync::MutexGuard<'static, T> {
    m.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Forgets every cached rule of a schema (and its cached masks), keeping the built-in ones
/// (any-JSON, plain strings) that every schema shares: what a process holds after its first
/// schema. Benchmarks call it between schemas so that no schema compiles faster for the rules an
/// earlier one left behind.
pub(crate) fn clear_caches() {
    lock(&RULES).retain(|_, v| v.1);
    lock(&INNERS).retain(|_, v| v.1);
}

fn rule(src: emit::RuleSrc, limits: &DfaLimits, builtin: bool) -> Result<Arc<Rule>, String> {
    let key = (src.pattern, src.fragments, src.count, src.follow, src.chars);
    if let Some(r) = lock(&RULES).get(&key) {
        return Ok(r.0.clone());
    }
    let dfa = LazyDfa::build_with(&key.0, &key.1, limits)
        .map_err(|e| format!("a rule does not compile: {e}"))?;
    // Masks cached by state are shared by rules of the same pattern only where states are
    // numbered the same in each: counted rules, whose DFAs are made whole in breadth-first
    // order. A lazily made DFA numbers states in the order walks reach them.
    let inner = if key.2.is_none() {
        Arc::default()
    } else {
        let mut m = lock(&INNERS);
        if m.len() >= RULE_CACHE_ENTRIES {
            m.retain(|_, v| v.1);
        }
        let e = m
            .entry((key.0.clone(), key.3.clone(), key.4))
            .or_insert_with(|| (Arc::default(), builtin));
        e.1 |= builtin;
        e.0.clone()
    };
    let r = Arc::new(
        Rule::new(dfa, &src.callees, key.2, key.4, key.3.as_deref(), inner)
            .map_err(|e| e.to_string())?,
    );
    let mut c = lock(&RULES);
    if c.len() >= RULE_CACHE_ENTRIES {
        c.retain(|_, v| v.1);
    }
    c.insert(key, (r.clone(), builtin));
    Ok(r)
}

/// The patterns of the rules `schema` compiles to (none if it is not for us) that splice in
/// no fragments (a plain regex), for tests.
#[cfg(test)]
pub(crate) fn rule_patterns(schema: &Value) -> Vec<String> {
    emit::emit(schema, Some("[ ]"))
        .map(|v| {
            v.into_iter()
                .filter(|r| r.fragments.is_empty())
                .map(|r| r.pattern)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
