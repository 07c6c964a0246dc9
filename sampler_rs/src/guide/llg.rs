//! The llguidance engine: JSON Schema, `json_object` and grammars, through the `llguidance` crate
//! over our vocabulary (a non-canonical tokenizer environment, so masks are exact, not
//! restricted to canonical tokenizations of forced text).

use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use super::error::{GuideError, Result};
use super::vocab::VocabCore;
use crate::sampling::TokenId;

/// Builds llguidance's tokenizer environment and parser factory for `vocab`.
pub(crate) fn factory(vocab: &VocabCore) -> anyhow::Result<Arc<ParserFactory>> {
    let n = vocab.len();
    let words: Vec<Vec<u8>> = (0..n as TokenId)
        .map(|t| {
            if vocab.is_special(t) {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(format!("<[{t}]>").as_bytes());
                w
            } else {
                vocab.token_bytes(t).to_vec()
            }
        })
        .collect();
    let info = TokRxInfo::new(n as u32, vocab.eos()[0]);
    let trie = TokTrie::from(&info, &words);
    // `ApproximateTokEnv::new` is non-canonical: llguidance then forces no tokenization of
    // forced bytes, and its masks list every viable token.
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut f = ParserFactory::new_simple(&env)?;
    f.quiet();
    Ok(Arc::new(f))
}

/// A compiled llguidance constraint; each sequence gets a clone of the prototype matcher.
pub(crate) struct LlgGuide {
    proto: Mutex<Matcher>,
}

fn classify(e: anyhow::Error, invalid: fn(String) -> GuideError) -> GuideError {
    let msg = format!("{e:#}");
    if let Some(rest) = msg.split("Unimplemented keys: [").nth(1) {
        let keys = rest
            .split(']')
            .next()
            .unwrap_or("")
            .split(',')
            .map(|k| k.trim().trim_matches('"').to_string())
            .filter(|k| !k.is_empty())
            .collect::<Vec<_>>();
        return GuideError::UnsupportedKeyword(keys);
    }
    let lower = msg.to_lowercase();
    if lower.contains("fuel")
        || lower.contains("limit")
        || lower.contains("too many")
        || lower.contains("too large")
    {
        return GuideError::TooLarge(msg);
    }
    invalid(msg)
}

// llguidance compiles recursively: stack frames per rule reference, `$ref` or nesting level
// followed. Measured (release build): ~3 KiB per rule of a Lark grammar whose rules each name
// the next, ~40 KiB per rule when each also nests 27 groups, 4-8 KiB per `$ref` hop and ~5 KiB
// per nesting level of a schema. A stack overflow aborts the whole process, and on a 2 MiB
// (8 MiB) thread a grammar of ~1,000 (~3,000) such rules or a schema of ~1,000 (~2,300)
// chained `$defs` does it. So llguidance compiles on a thread of its own with a large stack
// (address space: only the pages the recursion touches are committed), and inputs too large to
// be sure of fitting in it are refused first.

/// Stack of the compile thread. Unoptimized builds (`cargo test`) have frames up to ~7x as
/// large, so they get 8x the stack.
const COMPILE_STACK_BYTES: usize = if cfg!(debug_assertions) {
    4 << 30
} else {
    512 << 20
};
/// Longest grammar text: the worst case measured needs ~620 bytes of stack per byte of Lark
/// (GBNF converts to about as many structural Lark bytes), so 256 KiB needs at most ~240 MiB.
pub(crate) const MAX_GRAMMAR_BYTES: usize = 256 << 10;
/// Most JSON objects in a schema: the recursion visits an object at most once per path, and
/// the worst case measured needs ~5 KiB of stack per object on the path, so 50,000 objects
/// need at most ~250 MiB.
pub(crate) const MAX_SCHEMA_OBJECTS: usize = 50_000;

/// Number of JSON objects in `v` (iterative: `v` may be deep).
pub(crate) fn count_objects(v: &Value) -> usize {
    let mut stack = vec![v];
    let mut n = 0;
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                n += 1;
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a.iter()),
            _ => {}
        }
    }
    n
}

impl LlgGuide {
    fn new(
        vocab: &VocabCore,
        grammar: TopLevelGrammar,
        invalid: fn(String) -> GuideError,
    ) -> Result<LlgGuide> {
        let factory = vocab.llg_factory()?;
        // The compile (and the matcher's first step) on a thread with a large stack; see
        // `COMPILE_STACK_BYTES`.
        let compiled = std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("llguidance-compile".into())
                .stack_size(COMPILE_STACK_BYTES)
                .spawn_scoped(scope, move || {
                    let parser = factory.create_parser(grammar)?;
                    Ok(Matcher::new(Ok(parser)))
                })
                .map_err(|e| GuideError::Engine(format!("cannot start a compile thread: {e}")))?;
            worker
                .join()
                .map_err(|_| GuideError::Engine("the compile panicked".into()))
        })?;
        let matcher = compiled.map_err(|e| classify(e, invalid))?;
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        Ok(LlgGuide {
            proto: Mutex::new(matcher),
        })
    }

    /// A JSON Schema; `whitespace_pattern` is the whitespace allowed between JSON tokens
    /// (`None`: none, compact JSON).
    pub(crate) fn json_schema(
        vocab: &VocabCore,
        schema: &str,
        whitespace_pattern: Option<&str>,
    ) -> Result<LlgGuide> {
        let schema: Value = serde_json::from_str(schema)
            .map_err(|e| GuideError::InvalidSchema(format!("not valid JSON: {e}")))?;
        let mut schema = match schema {
            Value::Bool(true) => Value::Object(Default::default()),
            Value::Bool(false) => return Err(GuideError::Empty),
            Value::Object(_) => schema,
            other => {
                return Err(GuideError::InvalidSchema(format!(
                    "a schema is an object or a boolean, got {}",
                    match other {
                        Value::Array(_) => "an array",
                        Value::String(_) => "a string",
                        Value::Number(_) => "a number",
                        _ => "null",
                    }
                )))
            }
        };
        let objects = count_objects(&schema);
        if objects > MAX_SCHEMA_OBJECTS {
            return Err(GuideError::TooLarge(format!(
                "the schema has {objects} JSON objects, over the limit of {MAX_SCHEMA_OBJECTS}"
            )));
        }
        if let Some(ws) = whitespace_pattern {
            regex_syntax::Parser::new()
                .parse(ws)
                .map_err(|e| GuideError::InvalidRegex(format!("`whitespace_pattern`: {e}")))?;
        }
        // Our options replace any the caller put in `x-guidance`.
        let options = serde_json::json!({
            "item_separator": ",",
            "key_separator": ":",
            "whitespace_flexible": false,
            "whitespace_pattern": whitespace_pattern,
            "coerce_one_of": false,
            "lenient": false,
        });
        if let Some(obj) = schema.as_object_mut() {
            obj.insert("x-guidance".to_string(), options);
        }
        Self::new(
            vocab,
            TopLevelGrammar::from_json_schema(schema),
            GuideError::InvalidSchema,
        )
    }

    /// A Lark-style grammar (GBNF `::=` rules accepted by llguidance's Lark front end).
    pub(crate) fn grammar(vocab: &VocabCore, grammar: &str) -> Result<LlgGuide> {
        if grammar.trim().is_empty() {
            return Err(GuideError::InvalidGrammar("the grammar is empty".into()));
        }
        if grammar.len() > MAX_GRAMMAR_BYTES {
            return Err(GuideError::TooLarge(format!(
                "the grammar is {} bytes, over the limit of {MAX_GRAMMAR_BYTES}",
                grammar.len()
            )));
        }
        let lark = if super::gbnf::is_gbnf(grammar) {
            super::gbnf::to_lark(grammar)?
        } else {
            grammar.to_string()
        };
        Self::new(
            vocab,
            TopLevelGrammar::from_lark(lark),
            GuideError::InvalidGrammar,
        )
    }

    /// A fresh matcher at the start of the constraint.
    pub(crate) fn matcher(&self) -> Matcher {
        self.proto
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deep_clone()
    }

    /// Writes the mask into `out` (special tokens cleared, our EOS tokens set iff accepting);
    /// returns whether the matcher is accepting.
    pub(crate) fn fill_mask(
        &self,
        vocab: &VocabCore,
        m: &mut Matcher,
        out: &mut [u32],
    ) -> Result<bool> {
        if m.is_stopped() {
            out.fill(0);
            let accepting = !m.is_error();
            if accepting {
                out.copy_from_slice(vocab.eos_mask());
            }
            return Ok(accepting);
        }
        let v = m
            .compute_mask()
            .map_err(|e| GuideError::Engine(format!("{e:#}")))?;
        let src = v.as_slice();
        let k = src.len().min(out.len());
        out[..k].copy_from_slice(&src[..k]);
        out[k..].fill(0);
        let accepting = m.is_accepting().unwrap_or(false);
        for (o, sp) in out.iter_mut().zip(vocab.special_mask()) {
            *o &= !sp;
        }
        if accepting {
            for (o, e) in out.iter_mut().zip(vocab.eos_mask()) {
                *o |= e;
            }
        }
        Ok(accepting)
    }

    /// Consumes `token` if it is allowed; `false` (and no change) otherwise.
    pub(crate) fn advance(&self, m: &mut Matcher, token: TokenId) -> bool {
        if m.is_stopped() {
            return false;
        }
        matches!(m.try_consume_tokens(&[token]), Ok(1))
    }

    pub(crate) fn is_accepting(m: &mut Matcher) -> bool {
        if m.is_stopped() {
            return !m.is_error();
        }
        m.is_accepting().unwrap_or(false)
    }

    pub(crate) fn is_finished(m: &mut Matcher) -> bool {
        if m.is_stopped() {
            return true;
        }
        if !m.is_accepting().unwrap_or(false) {
            return false;
        }
        let eos = m.tok_env().map(|e| e.tok_trie().eos_token()).ok();
        match m.compute_mask() {
            Ok(v) => {
                let mut n = v.num_set();
                if let Some(e) = eos {
                    n -= usize::from(v.is_allowed(e));
                }
                n == 0
            }
            Err(_) => true,
        }
    }
}
