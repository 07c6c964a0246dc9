//! Our JSON Schema compiler (`tokenwire-json`): schema → rules of byte-DFA patterns with calls
//! ([`emit`]) → a recursive transition network of DFAs ([`rtn`]) whose masks are cached per
//! (normalized) matcher state.
//!
//! What it does not implement it reports as [`Outcome::Unsupported`]; the caller then compiles
//! the schema with llguidance (which implements more keywords and fails closed on the rest).

mod emit;
pub(crate) mod rtn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

use super::dfa::{DfaGuide, DfaLimits};
use super::vocab::VocabCore;
use rtn::{InnerCache, Rtn, Rule};

/// The result of trying our compiler.
pub(crate) enum Outcome {
    /// Compiled.
    Compiled(Rtn),
    /// Not for us (a keyword or form we do not implement, or over our budgets): the reason.
    Unsupported(#[allow(dead_code)] String),
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
    for src in srcs {
        match rule(src, &limits) {
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

/// Compiled rules by (pattern, count), shared by every schema of the process: a rule is the
/// same automaton whatever schema it came from (any-JSON, plain strings, common sub-schemas).
type RuleCache = HashMap<RuleKey, Arc<Rule>>;

/// (pattern, count, follow bytes)
type RuleKey = (String, Option<(u32, Option<u32>)>, Option<Vec<u8>>);

/// The shared [`InnerCache`]s, by (pattern, follow bytes).
type InnerCaches = HashMap<(String, Option<Vec<u8>>), Arc<InnerCache>>;

/// Most rules kept in [`RuleCache`]; past it the cache starts over.
const RULE_CACHE_ENTRIES: usize = 4096;

fn rule(src: emit::RuleSrc, limits: &DfaLimits) -> Result<Arc<Rule>, String> {
    static CACHE: OnceLock<Mutex<RuleCache>> = OnceLock::new();
    static INNER: OnceLock<Mutex<InnerCaches>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (src.pattern, src.count, src.follow);
    if let Some(r) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(r.clone());
    }
    let dfa = DfaGuide::build(&key.0, limits, false)
        .map_err(|e| format!("a rule does not compile: {e}"))?;
    let inner = {
        let mut m = INNER
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if m.len() >= RULE_CACHE_ENTRIES {
            m.clear();
        }
        m.entry((key.0.clone(), key.2.clone())).or_default().clone()
    };
    let r = Arc::new(
        Rule::new(dfa, &src.callees, key.1, key.2.as_deref(), inner).map_err(|e| e.to_string())?,
    );
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if c.len() >= RULE_CACHE_ENTRIES {
        c.clear();
    }
    c.insert(key, r.clone());
    Ok(r)
}

#[cfg(test)]
mod tests;
