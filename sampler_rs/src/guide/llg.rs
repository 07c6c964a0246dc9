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

impl LlgGuide {
    fn new(
        vocab: &VocabCore,
        grammar: TopLevelGrammar,
        invalid: fn(String) -> GuideError,
    ) -> Result<LlgGuide> {
        let factory = vocab.llg_factory()?;
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| classify(e, invalid))?;
        let matcher = Matcher::new(Ok(parser));
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
