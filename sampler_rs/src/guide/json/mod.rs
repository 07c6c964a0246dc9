//! Our JSON Schema compiler (`tokenwire-json`): schema → rules of byte-DFA patterns with calls
//! ([`emit`]) → a recursive transition network of DFAs ([`rtn`]) whose masks are cached per
//! (normalized) matcher state.
//!
//! What it does not implement it reports as [`Outcome::Unsupported`]; the caller then compiles
//! the schema with llguidance (which implements more keywords and fails closed on the rest).

mod emit;
pub(crate) mod rtn;

use serde_json::Value;

use super::dfa::{DfaGuide, DfaLimits};
use super::vocab::VocabCore;
use rtn::{Rtn, Rule};

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
    for src in &srcs {
        let dfa = match DfaGuide::build(&src.pattern, &limits, false) {
            Ok(d) => d,
            Err(e) => return Outcome::Unsupported(format!("a rule does not compile: {e}")),
        };
        match Rule::new(dfa, &src.callees, src.count) {
            Ok(r) => rules.push(r),
            Err(e) => return Outcome::Unsupported(e.to_string()),
        }
    }
    Outcome::Compiled(Rtn::new(rules, 0, vocab.trie().max_depth()))
}

#[cfg(test)]
mod tests;
