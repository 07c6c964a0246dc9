//! Guided decoding: compiled constraints ([`Guide`]) and the per-sequence matcher ([`GuideState`])
//! that turns "what may come next" into a token bitmask.
//!
//! # Engines
//!
//! A [`Guide`] is compiled by one of three engines, named by [`Guide::engine`]:
//!
//! - **`tokenwire-dfa`** (ours): regexes and `choice`. The pattern becomes a byte-level DFA
//!   (`regex-automata`, anchored, full match), re-tabled into a compact transition table whose
//!   states are exactly the *live* ones (a state from which some accepting string is still
//!   reachable; every other state is the single dead state 0). The allowed tokens of a state come
//!   from walking the vocabulary's [`TokenTrie`] through that table (a rejected byte skips the
//!   whole subtree), computed the first time the state is reached and then cached on the guide,
//!   which is shared by every sequence: a step on a regular constraint copies a cached bitmask.
//! - **`tokenwire-json`** (ours): JSON Schema and `json_object`. The schema compiles to a
//!   recursive transition network of byte DFAs (see `json`): regular parts are inlined into
//!   DFA patterns, recursion and any-JSON values are calls onto a stack, and `minLength`/
//!   `maxLength`/`minItems`/`maxItems` are counters, not unrolled automata. Masks are cached per
//!   normalized matcher state, shared by every sequence. Keywords it does not implement make the
//!   compile fall back to llguidance.
//! - **`llguidance`** (the `llguidance` crate, MIT): grammars (Lark-style EBNF, which also
//!   accepts GBNF's `::=` rules) and the JSON Schemas our compiler does not cover. It runs with a
//!   non-canonical tokenizer environment, so its masks allow every token that extends a valid
//!   prefix (no canonical-tokenization forcing), like ours. It fails closed on unsupported JSON
//!   Schema keywords.
//!
//! # Conventions (every engine)
//!
//! - Bit `t` of a mask is set iff token `t` is allowed; words are `u32`, little bit first, and
//!   bits past the vocabulary (logit-row padding) are always 0.
//! - A token is allowed iff the text so far followed by its bytes is a prefix of some string of
//!   the language. Tokens that end inside a multi-byte UTF-8 character are therefore allowed
//!   exactly when they extend a valid prefix. Special tokens are never allowed, except EOS.
//! - Every EOS token is allowed iff the text so far is a complete match; advancing with EOS
//!   ends the sequence ([`GuideState::is_finished`]).
//! - A token that is not allowed leaves the state unchanged ([`GuideState::advance`] returns
//!   `false`); the caller decides what to do.

mod dfa;
mod error;
mod gbnf;
mod json;
mod lazy;
mod llg;
mod mask;
mod trie;
mod vocab;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::sync::{Arc, Mutex};

pub use dfa::DfaLimits;
pub use error::{GuideError, Result};
pub use mask::MaskWords;
pub use trie::TokenTrie;
pub use vocab::Vocabulary;

use crate::sampling::TokenId;
use dfa::DfaGuide;
use json::rtn::Rtn;
use llg::LlgGuide;
use vocab::VocabCore;

/// A DFA state id in the re-tabled automaton (premultiplied by the number of byte classes).
pub type StateId = u32;

/// What a guide was compiled from; the key of the vocabulary's compile cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GuideSpec {
    /// A regex that must match the whole output.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A JSON Schema (draft 2020-12 subset), with the whitespace allowed between JSON tokens.
    JsonSchema {
        /// The schema, as JSON text.
        schema: String,
        /// A regex for whitespace allowed between JSON tokens; `None` = compact JSON.
        whitespace_pattern: Option<String>,
    },
    /// Any JSON object.
    JsonObject {
        /// As for [`GuideSpec::JsonSchema`].
        whitespace_pattern: Option<String>,
    },
    /// A Lark-style EBNF grammar (GBNF `::=` rules accepted).
    Grammar(String),
}

/// Which engine compiled a guide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Our byte-DFA engine.
    TokenwireDfa,
    /// Our JSON Schema compiler (a network of byte DFAs with calls and counters).
    TokenwireJson,
    /// The `llguidance` crate.
    Llguidance,
}

impl Engine {
    /// The engine's name as reported to users and logs.
    pub fn name(self) -> &'static str {
        match self {
            Engine::TokenwireDfa => "tokenwire-dfa",
            Engine::TokenwireJson => "tokenwire-json",
            Engine::Llguidance => "llguidance",
        }
    }
}

// One per compiled guide, behind an `Arc`: size does not matter.
#[allow(clippy::large_enum_variant)]
enum GuideKind {
    Dfa(DfaGuide),
    Json(Box<Rtn>),
    Llg(Box<LlgGuide>),
}

struct GuideInner {
    vocab: Arc<VocabCore>,
    kind: GuideKind,
    /// Why our JSON Schema compiler passed the schema to llguidance.
    fallback: Option<String>,
}

/// A compiled constraint: immutable, cheap to clone (an `Arc`), shareable across sequences and
/// threads.
#[derive(Clone)]
pub struct Guide {
    inner: Arc<GuideInner>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("engine", &self.engine().name())
            .finish_non_exhaustive()
    }
}

impl Guide {
    /// Compiles `spec` for `vocab` (uncached; see [`Vocabulary::compile`] for the cached call).
    pub fn compile(vocabulary: &Vocabulary, spec: &GuideSpec) -> Result<Guide> {
        let vocab = &**vocabulary.core();
        let mut fallback = None;
        let kind = match spec {
            GuideSpec::Regex(pattern) => {
                GuideKind::Dfa(DfaGuide::new(vocab, pattern, &DfaLimits::default())?)
            }
            GuideSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err(GuideError::Invalid(
                        "`choice` needs at least one string".into(),
                    ));
                }
                let pattern = choices
                    .iter()
                    .map(|c| regex_syntax::escape(c))
                    .collect::<Vec<_>>()
                    .join("|");
                GuideKind::Dfa(DfaGuide::new(vocab, &pattern, &DfaLimits::default())?)
            }
            GuideSpec::JsonSchema {
                schema,
                whitespace_pattern,
            } => json_guide(vocab, schema, whitespace_pattern.as_deref(), &mut fallback)?,
            GuideSpec::JsonObject { whitespace_pattern } => {
                let ws = whitespace_pattern.as_deref();
                json_guide(vocab, r#"{"type":"object"}"#, ws, &mut fallback)?
            }
            GuideSpec::Grammar(grammar) => {
                GuideKind::Llg(Box::new(LlgGuide::grammar(vocab, grammar)?))
            }
        };
        Ok(Guide {
            inner: Arc::new(GuideInner {
                vocab: vocabulary.core().clone(),
                kind,
                fallback,
            }),
        })
    }

    /// Which engine compiled this guide.
    pub fn engine(&self) -> Engine {
        match self.inner.kind {
            GuideKind::Dfa(_) => Engine::TokenwireDfa,
            GuideKind::Json(_) => Engine::TokenwireJson,
            GuideKind::Llg(_) => Engine::Llguidance,
        }
    }

    /// Why our JSON Schema compiler passed this schema to llguidance (`None` otherwise).
    pub fn fallback_reason(&self) -> Option<&str> {
        self.inner.fallback.as_deref()
    }

    /// The size of the vocabulary this guide was compiled for.
    pub fn vocab_len(&self) -> usize {
        self.inner.vocab.len()
    }

    /// Whether `mask` (a mask of this guide's states) allows some EOS token and nothing else:
    /// the text is complete and the constraint lets nothing follow.
    pub fn allows_only_eos(&self, mask: &[u32]) -> bool {
        let eos = self.inner.vocab.eos_mask();
        let mut any_eos = false;
        for (i, &w) in mask.iter().enumerate() {
            let e = eos.get(i).copied().unwrap_or(0);
            if w & !e != 0 {
                return false;
            }
            any_eos |= w & e != 0;
        }
        any_eos
    }

    /// Number of live DFA states (`None` for the llguidance engine); for tests and stats.
    pub fn dfa_states(&self) -> Option<usize> {
        match &self.inner.kind {
            GuideKind::Dfa(d) => Some(d.num_states()),
            GuideKind::Json(_) | GuideKind::Llg(_) => None,
        }
    }
}

enum StateKind {
    Dfa(StateId),
    Json(json::rtn::Stacks),
    // Boxed: a matcher is large, and a DFA state is one word.
    Llg(Box<Mutex<llguidance::Matcher>>),
}

/// One sequence's position in a guide: mutable, one per sequence.
pub struct GuideState {
    guide: Guide,
    kind: StateKind,
    /// EOS was consumed: nothing more may follow.
    ended: bool,
    /// Cached `is_accepting` of the llguidance matcher (it costs a parser query).
    llg_accepting: Option<bool>,
}

impl std::fmt::Debug for GuideState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuideState")
            .field("engine", &self.guide.engine().name())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Clone for GuideState {
    /// An independent copy at the same position (a beam extended by two tokens).
    fn clone(&self) -> Self {
        let kind = match &self.kind {
            StateKind::Dfa(s) => StateKind::Dfa(*s),
            StateKind::Json(s) => StateKind::Json(s.clone()),
            StateKind::Llg(m) => {
                let m = m.lock().unwrap_or_else(|p| p.into_inner());
                StateKind::Llg(Box::new(Mutex::new(m.clone())))
            }
        };
        GuideState {
            guide: self.guide.clone(),
            kind,
            ended: self.ended,
            llg_accepting: self.llg_accepting,
        }
    }
}

impl GuideState {
    /// A sequence at the start of `guide`.
    pub fn new(guide: &Guide) -> GuideState {
        let kind = match &guide.inner.kind {
            GuideKind::Dfa(d) => StateKind::Dfa(d.start()),
            GuideKind::Json(r) => StateKind::Json(r.start()),
            GuideKind::Llg(l) => StateKind::Llg(Box::new(Mutex::new(l.matcher()))),
        };
        GuideState {
            guide: guide.clone(),
            kind,
            ended: false,
            llg_accepting: None,
        }
    }

    /// The guide this state walks.
    pub fn guide(&self) -> &Guide {
        &self.guide
    }

    /// Writes the allowed-token bitmask into `out` (`out.len() * 32 >= vocab size`); bits past
    /// the vocabulary are cleared.
    pub fn fill_mask(&mut self, out: &mut [u32]) -> Result<()> {
        let vocab = &self.guide.inner.vocab;
        let words = vocab.mask_words();
        if out.len() < words {
            return Err(GuideError::Invalid(format!(
                "mask buffer has {} words, the vocabulary of {} tokens needs {words}",
                out.len(),
                vocab.len()
            )));
        }
        if self.ended {
            out.fill(0);
            return Ok(());
        }
        match (&mut self.kind, &self.guide.inner.kind) {
            (StateKind::Dfa(s), GuideKind::Dfa(d)) => {
                d.fill_mask(vocab, *s, &mut out[..words]);
            }
            (StateKind::Json(s), GuideKind::Json(r)) => {
                r.fill_mask(vocab, s, &mut out[..words])?;
            }
            (StateKind::Llg(m), GuideKind::Llg(l)) => {
                let m = m.get_mut().unwrap_or_else(|p| p.into_inner());
                let accepting = l.fill_mask(vocab, m, &mut out[..words])?;
                self.llg_accepting = Some(accepting);
            }
            _ => unreachable!("a state always matches its guide's engine"),
        }
        out[words..].fill(0);
        Ok(())
    }

    /// Advances by `token`; returns `false` (and changes nothing) if the token is not allowed.
    pub fn advance(&mut self, token: TokenId) -> bool {
        if self.ended {
            return false;
        }
        let vocab = &self.guide.inner.vocab;
        if vocab.is_eos(token) {
            if self.is_accepting() {
                self.ended = true;
                return true;
            }
            return false;
        }
        if vocab.is_special(token) || token as usize >= vocab.len() {
            return false;
        }
        match (&mut self.kind, &self.guide.inner.kind) {
            (StateKind::Dfa(s), GuideKind::Dfa(d)) => match d.walk(*s, vocab.token_bytes(token)) {
                Some(next) => {
                    *s = next;
                    true
                }
                None => false,
            },
            (StateKind::Json(s), GuideKind::Json(r)) => {
                match r.advance(s, vocab.token_bytes(token)) {
                    Ok(Some(next)) => {
                        *s = next;
                        true
                    }
                    Ok(None) | Err(_) => false,
                }
            }
            (StateKind::Llg(m), GuideKind::Llg(l)) => {
                let m = m.get_mut().unwrap_or_else(|p| p.into_inner());
                let ok = l.advance(m, token);
                if ok {
                    self.llg_accepting = None;
                }
                ok
            }
            _ => unreachable!("a state always matches its guide's engine"),
        }
    }

    /// Whether the text so far is a complete match (EOS is allowed).
    pub fn is_accepting(&mut self) -> bool {
        if self.ended {
            return true;
        }
        match (&mut self.kind, &self.guide.inner.kind) {
            (StateKind::Dfa(s), GuideKind::Dfa(d)) => d.is_accepting(*s),
            (StateKind::Json(s), GuideKind::Json(r)) => r.is_accepting(s),
            (StateKind::Llg(m), GuideKind::Llg(_)) => {
                if let Some(a) = self.llg_accepting {
                    return a;
                }
                let m = m.get_mut().unwrap_or_else(|p| p.into_inner());
                let a = LlgGuide::is_accepting(m);
                self.llg_accepting = Some(a);
                a
            }
            _ => unreachable!("a state always matches its guide's engine"),
        }
    }

    /// Whether generation must end: EOS was consumed, or the text is a complete match and no
    /// other token may follow.
    pub fn is_finished(&mut self) -> bool {
        if self.ended {
            return true;
        }
        match (&mut self.kind, &self.guide.inner.kind) {
            (StateKind::Dfa(s), GuideKind::Dfa(d)) => d.is_accepting(*s) && !d.can_continue(*s),
            (StateKind::Json(s), GuideKind::Json(r)) => r.is_accepting(s) && !r.can_continue(s),
            (StateKind::Llg(m), GuideKind::Llg(_)) => {
                let m = m.get_mut().unwrap_or_else(|p| p.into_inner());
                LlgGuide::is_finished(m)
            }
            _ => unreachable!("a state always matches its guide's engine"),
        }
    }

    /// Whether EOS was consumed.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

/// A JSON Schema guide: our compiler when it implements everything the schema uses, else
/// llguidance (which fails closed on what it does not implement either).
fn json_guide(
    vocab: &VocabCore,
    schema: &str,
    whitespace: Option<&str>,
    fallback: &mut Option<String>,
) -> Result<GuideKind> {
    let parsed: Option<serde_json::Value> = serde_json::from_str(schema).ok();
    let ws_ok = whitespace.is_none_or(|w| regex_syntax::Parser::new().parse(w).is_ok());
    let why = match parsed {
        None => "not JSON".to_string(),
        Some(_) if !ws_ok => "the whitespace pattern does not parse".to_string(),
        Some(v) if !(v.is_object() || v.as_bool() == Some(true)) => "not a schema".to_string(),
        Some(v) if llg::count_objects(&v) > llg::MAX_SCHEMA_OBJECTS => {
            "too many sub-schemas".into()
        }
        Some(v) => match json::compile(vocab, &v, whitespace) {
            json::Outcome::Compiled(r) => return Ok(GuideKind::Json(Box::new(r))),
            json::Outcome::Unsupported(why) => why,
        },
    };
    let g = LlgGuide::json_schema(vocab, schema, whitespace)?;
    *fallback = Some(why);
    Ok(GuideKind::Llg(Box::new(g)))
}
