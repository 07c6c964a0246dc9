//! JSON Schema → rules of the recursive transition network ([`super::rtn`]).
//!
//! Every sub-schema becomes a regex over bytes. Small ones are inlined into their parent's
//! pattern (one DFA for the shape of an object, its keys and its scalar values); a sub-schema
//! becomes a rule of its own, reached by a call marker, when it is recursive (`$ref` cycles),
//! large, any-JSON (`true`, `additionalProperties` by default), or a counted repetition (a
//! string's `minLength`/`maxLength` but `minLength: 1` alone, arrays' `minItems`/`maxItems`
//! past [`INLINE_COUNT`]), which is a counted rule instead of an unrolled pattern.
//!
//! Fail closed: every JSON Schema validation keyword is either implemented here or reported as
//! [`Fail::Unsupported`] (the caller then tries llguidance, which implements more keywords and
//! refuses what neither engine supports); keywords outside JSON Schema's vocabularies are
//! annotations and are ignored, as the specification says.
//!
//! Policies (shared with our llguidance configuration, so both engines accept the same texts):
//! properties appear in the schema's order, declared ones before additional ones, each at most
//! once; strings use JSON escapes (`\"`, `\\`, `\/`, `\b\f\n\r\t`, `\uXXXX`); numbers are JSON
//! numbers and integers have no fraction or exponent; whitespace between JSON tokens is
//! `whitespace_pattern`, at most once (none when it is not given); `oneOf` is accepted when its
//! branches cannot both match (disjoint JSON types), since the engine cannot enforce "exactly one".

use std::collections::{BTreeSet, HashMap};

use regex_syntax::hir::{self, Class, ClassUnicode, ClassUnicodeRange, Hir, HirKind, Look};
use serde_json::{Map, Value};

use super::super::lazy::{COMPLEMENT, VETO};
use super::rtn::MARKER;

/// Counted repetitions up to this many copies are inlined into the DFA.
pub(crate) const INLINE_COUNT: u32 = 8;
/// Sub-schemas whose pattern is longer than this become rules of their own.
const INLINE_BYTES: usize = 400;
/// Most bytes of one object's members' pattern (with its fragments); past it the schema goes to
/// llguidance.
const OBJECT_INLINE_BYTES: usize = 32 << 10;
/// An object's members' pattern past this many bytes is written as fragments instead (see
/// `Emitter::object_fragments`).
const OBJECT_FLAT_BYTES: usize = 1 << 10;
/// Fragment markers (see `LazyDfa`): enter a group of fragments, jump within one.
const INLINE: u8 = super::super::lazy::INLINE;
use super::super::lazy::{id_bytes, id_from, MAX_IDS};
const JUMP: u8 = super::super::lazy::JUMP;
/// Most rules a schema may compile to.
const MAX_RULES: usize = 4096;
/// Most pattern bytes, all rules together (DFA builds take ~1 µs per pattern byte); past it
/// the schema goes to llguidance.
const MAX_PATTERN_BYTES: usize = 96 << 10;
/// Deepest nesting of sub-schemas the emitter follows.
const MAX_DEPTH: u32 = 200;

/// The id of the any-JSON rule.
const ANY_RULE: u32 = 1;
/// The id of the rule of a JSON string without constraints (quotes included).
const STRING_RULE: u32 = 2;

/// Why the emitter did not produce rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fail {
    /// A keyword or form our compiler does not implement (another engine may).
    Unsupported(String),
    /// The schema (or a part that must match) matches no JSON value.
    Unsatisfiable(String),
    /// Past a size budget.
    TooLarge(String),
}

type R<T> = std::result::Result<T, Fail>;

/// One rule's source: a pattern over bytes with call markers.
pub(crate) struct RuleSrc {
    pub pattern: String,
    /// The rules its pattern calls.
    pub callees: Vec<u32>,
    /// A counted rule: the pattern is one element, repeated `min..=max` times; or, with
    /// `chars`, the pattern once, over JSON string content of `min..=max` characters.
    pub count: Option<(u32, Option<u32>)>,
    /// See `count`.
    pub chars: bool,
    /// The bytes that may follow the rule where it is called (`None`: any).
    pub follow: Option<Vec<u8>>,
    /// The fragments its pattern splices in (directly or through other fragments), by id.
    pub fragments: Vec<(u32, String)>,
}

/// Keywords of JSON Schema's validation vocabularies (all drafts) that this compiler does not
/// implement in any form.
const UNSUPPORTED: &[&str] = &[
    "if",
    "then",
    "else",
    "dependencies",
    "dependentRequired",
    "dependentSchemas",
    "propertyNames",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedItems",
    "unevaluatedProperties",
    "$dynamicRef",
    "$recursiveRef",
    "$dynamicAnchor",
    "$recursiveAnchor",
    "$anchor",
];

/// Whether `k` is a keyword this compiler implements (in some forms).
pub(super) fn is_implemented(k: &str) -> bool {
    IMPLEMENTED.contains(&k)
}

/// Whether `k` is a validation keyword (implemented here or not).
pub(super) fn is_validation_keyword(k: &str) -> bool {
    UNSUPPORTED.contains(&k) || IMPLEMENTED.contains(&k)
}

/// Keywords implemented here (some only in some forms; the others fail as unsupported).
const IMPLEMENTED: &[&str] = &[
    "not",
    "patternProperties",
    "type",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "items",
    "prefixItems",
    "additionalItems",
    "minItems",
    "maxItems",
    "uniqueItems",
    "properties",
    "required",
    "additionalProperties",
    "minProperties",
    "maxProperties",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
];

const JSON_TYPES: [&str; 6] = ["null", "boolean", "object", "array", "number", "string"];

/// One JSON string character: an unescaped one or an escape.
const CHAR: &str = r#"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})"#;
const NUMBER: &str = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?";
const INTEGER: &str = r"-?(?:0|[1-9][0-9]*)";

fn marker(id: u32) -> String {
    marker_of(MARKER, id)
}

fn marker_of(byte: u8, id: u32) -> String {
    let [hi, lo] = id_bytes(id);
    format!("(?-u:\\x{byte:02X}\\x{hi:02X}\\x{lo:02X})")
}

/// The callees named by the markers in `pattern`.
pub(crate) fn callees_of(pattern: &str) -> Vec<u32> {
    ids_of(pattern, |b| b == MARKER)
}

/// The fragments (see [`INLINE`], [`JUMP`]) named in `pattern`.
fn fragments_of(pattern: &str) -> Vec<u32> {
    ids_of(pattern, |b| b == INLINE || b == JUMP)
}

/// The ids named by the markers in `pattern` whose byte `byte` takes (sorted, each once): one
/// pass over the text for every kind of marker (`(?-u:\xBB\xHH\xLL)`).
fn ids_of(pattern: &str, byte: impl Fn(u8) -> bool) -> Vec<u32> {
    static FINDER: std::sync::OnceLock<memchr::memmem::Finder<'static>> =
        std::sync::OnceLock::new();
    let finder = FINDER.get_or_init(|| memchr::memmem::Finder::new(b"(?-u:\\x"));
    let hex = |x: &[u8]| {
        std::str::from_utf8(x)
            .ok()
            .and_then(|t| u8::from_str_radix(t, 16).ok())
    };
    let bytes = pattern.as_bytes();
    let mut out = Vec::new();
    for i in finder.find_iter(bytes) {
        // `BB\xHH\xLL)` after the needle.
        let Some(tail) = bytes.get(i + 7..i + 17) else {
            continue;
        };
        if &tail[2..4] != b"\\x" || &tail[6..8] != b"\\x" {
            continue;
        }
        if let (Some(b), Some(h), Some(l)) = (hex(&tail[0..2]), hex(&tail[4..6]), hex(&tail[8..10]))
        {
            if byte(b) {
                out.extend(id_from(h, l));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

struct Emitter<'a> {
    root: &'a Value,
    /// Optional whitespace between JSON tokens, as a pattern (`""` when none is allowed).
    w: String,
    rules: Vec<Option<RuleSrc>>,
    ref_rules: HashMap<String, u32>,
    /// The patterns of references short enough to be written where they are used: a schema
    /// whose definitions refer to each other expands each once, not once per path to it (the
    /// same text; where a later expansion would meet a cycle, the cached one is its finite
    /// unrolling, the same language).
    ref_inline: HashMap<String, String>,
    /// [`string_pattern`] by `pattern` (a schema repeats its patterns: each language tag of a
    /// localized object, dates), and each `patternProperties` pattern's matcher.
    pattern_texts: HashMap<String, String>,
    pattern_vms: HashMap<String, regex_automata::nfa::thompson::pikevm::PikeVM>,
    expanding: Vec<String>,
    any_rule: Option<u32>,
    string_rules: HashMap<(u32, Option<u32>), u32>,
    /// The bytes whitespace may start with (`Some(empty)` without whitespace; `None`: unknown).
    w_first: Option<Vec<u8>>,
    pattern_bytes: usize,
    depth: u32,
    /// Fragments by id (see [`INLINE`]).
    fragments: Vec<String>,
    /// By fragment id: the fragments and the rules it names (read once, when it is made).
    fragment_refs: Vec<(Vec<u32>, Vec<u32>)>,
    /// Rules made so far by (pattern, count, follow), and fragments by text: a sub-schema
    /// emitted twice (an `anyOf` distributed over an object's members, a `$ref` reached by two
    /// paths) is one rule, so that stacks of the alternatives share their frames.
    made: HashMap<RuleShape, u32>,
    fragment_ids: HashMap<String, u32>,
}

/// (pattern, count, follow, counts characters)
type RuleShape = (String, Option<(u32, Option<u32>)>, Option<Vec<u8>>, bool);

/// Compiles `schema` (the root, for `$ref`) into rules; rule 0 is the start.
pub(crate) fn emit(schema: &Value, whitespace: Option<&str>) -> R<Vec<RuleSrc>> {
    let distributed = super::distribute::distribute(schema);
    let schema = distributed.as_ref().unwrap_or(schema);
    if has_nested_id(schema, true) && has_key(schema, "$ref") {
        return Err(Fail::Unsupported(
            "`$id` in a sub-schema (a new base for `$ref`)".into(),
        ));
    }
    let mut e = Emitter {
        root: schema,
        w: whitespace.map_or(String::new(), optional),
        rules: vec![None, None, None],
        ref_rules: HashMap::new(),
        ref_inline: HashMap::new(),
        pattern_texts: HashMap::new(),
        pattern_vms: HashMap::new(),
        expanding: Vec::new(),
        any_rule: None,
        string_rules: HashMap::new(),
        w_first: whitespace.map_or(Some(Vec::new()), first_bytes),
        pattern_bytes: 0,
        depth: 0,
        fragments: Vec::new(),
        fragment_refs: Vec::new(),
        made: HashMap::new(),
        fragment_ids: HashMap::new(),
    };
    let body = e.value(schema)?;
    e.set_rule(0, body, None)?;
    // Rule 1 is always any-JSON (its pattern names itself, so it is the same text, compiled
    // once per process, for every schema).
    e.any()?;
    e.plain_string()?;
    let fragments = std::mem::take(&mut e.fragments);
    let refs = std::mem::take(&mut e.fragment_refs);
    e.rules
        .into_iter()
        .map(|r| {
            let mut r = r.ok_or_else(|| Fail::Unsupported("an unfinished rule".into()))?;
            // A rule's fragments, and the calls made from them.
            let mut todo = fragments_of(&r.pattern);
            let mut seen = BTreeSet::new();
            while let Some(f) = todo.pop() {
                if seen.insert(f) {
                    let (frags, calls) = &refs[f as usize];
                    todo.extend_from_slice(frags);
                    r.callees.extend_from_slice(calls);
                }
            }
            r.callees.sort_unstable();
            r.callees.dedup();
            r.fragments = seen
                .into_iter()
                .map(|f| (f, fragments[f as usize].clone()))
                .collect();
            Ok(r)
        })
        .collect()
}

/// The bytes a match of `pattern` may start with (`None` if it does not compile); cached per
/// process (a whitespace pattern is the same for every schema of a deployment).
fn first_bytes(pattern: &str) -> Option<Vec<u8>> {
    type Cache = std::sync::Mutex<HashMap<String, Option<Vec<u8>>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(x) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(pattern) {
        return x.clone();
    }
    let limits = super::super::dfa::DfaLimits::default();
    let first = super::super::dfa::DfaGuide::build(pattern, &limits, true)
        .ok()
        .map(|d| {
            (0..=255u8)
                .filter(|&b| d.step(d.start(), b) != 0)
                .collect::<Vec<u8>>()
        });
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if c.len() >= 64 {
        c.clear();
    }
    c.insert(pattern.to_string(), first.clone());
    first
}

fn has_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Object(m) => m.contains_key(key) || m.values().any(|x| has_key(x, key)),
        Value::Array(a) => a.iter().any(|x| has_key(x, key)),
        _ => false,
    }
}

fn has_nested_id(v: &Value, root: bool) -> bool {
    match v {
        Value::Object(m) => {
            (!root && m.get("$id").is_some_and(Value::is_string))
                || m.iter()
                    .any(|(k, x)| k != "enum" && k != "const" && has_nested_id(x, false))
        }
        Value::Array(a) => a.iter().any(|x| has_nested_id(x, false)),
        _ => false,
    }
}

fn unsupported<T>(what: impl Into<String>) -> R<T> {
    Err(Fail::Unsupported(what.into()))
}

/// The JSON types a `not` sub-schema excludes (all six for `{}`/`true`); unsupported unless
/// it constrains nothing but `type`.
fn not_types(n: &Value) -> R<Vec<&'static str>> {
    match n {
        Value::Bool(true) => Ok(JSON_TYPES.to_vec()),
        Value::Bool(false) => Ok(Vec::new()),
        Value::Object(o) => {
            let keys: Vec<&str> = o
                .keys()
                .map(String::as_str)
                .filter(|k| IMPLEMENTED.contains(k) || UNSUPPORTED.contains(k))
                .collect();
            if keys.is_empty() {
                return Ok(JSON_TYPES.to_vec());
            }
            if keys != ["type"] {
                return unsupported("`not` of a schema other than `{}` or a `type`");
            }
            let named: Vec<&str> = match &o["type"] {
                Value::String(t) => vec![t.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => return unsupported("a `not` `type` that is neither a string nor a list"),
            };
            let mut out = Vec::new();
            for t in named {
                match JSON_TYPES.iter().find(|x| **x == t) {
                    Some(x) => out.push(*x),
                    // `not: {type: integer}` keeps non-integral numbers: not a type-level rule.
                    None => return unsupported(format!("`not` `type` {t}")),
                }
            }
            Ok(out)
        }
        _ => unsupported("a `not` that is not a schema"),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_integer(n: &serde_json::Number) -> bool {
    n.is_i64()
        || n.is_u64()
        || n.as_f64()
            .is_some_and(|f| f.fract() == 0.0 && f.is_finite())
}

impl<'a> Emitter<'a> {
    fn new_rule(&mut self) -> R<u32> {
        if self.rules.len() >= MAX_RULES {
            return Err(Fail::TooLarge(format!(
                "the schema needs more than {MAX_RULES} rules"
            )));
        }
        self.rules.push(None);
        Ok((self.rules.len() - 1) as u32)
    }

    fn set_rule(&mut self, id: u32, pattern: String, count: Option<(u32, Option<u32>)>) -> R<()> {
        self.set_rule_follow(id, pattern, count, None)
    }

    fn set_rule_follow(
        &mut self,
        id: u32,
        pattern: String,
        count: Option<(u32, Option<u32>)>,
        follow: Option<Vec<u8>>,
    ) -> R<()> {
        self.pattern_bytes += pattern.len();
        if self.pattern_bytes > MAX_PATTERN_BYTES {
            return Err(Fail::TooLarge(format!(
                "the schema's patterns exceed {MAX_PATTERN_BYTES} bytes"
            )));
        }
        let callees = callees_of(&pattern);
        self.rules[id as usize] = Some(RuleSrc {
            pattern,
            callees,
            count,
            chars: false,
            follow,
            fragments: Vec::new(),
        });
        Ok(())
    }

    /// The rule of `pattern` (with `count` and `follow`): made once per schema.
    fn rule_for(
        &mut self,
        pattern: String,
        count: Option<(u32, Option<u32>)>,
        follow: Option<Vec<u8>>,
    ) -> R<u32> {
        let shape = (pattern, count, follow, false);
        if let Some(&id) = self.made.get(&shape) {
            return Ok(id);
        }
        let id = self.new_rule()?;
        self.set_rule_follow(id, shape.0.clone(), count, shape.2.clone())?;
        self.made.insert(shape, id);
        Ok(id)
    }

    /// The rule of a string's content matching `pattern` (a JSON-escaped content pattern)
    /// with `min..=max` characters: the pattern's DFA with a character counter (a
    /// `pattern` with `minLength`/`maxLength`), followed by the closing quote.
    fn chars_rule(&mut self, pattern: String, min: u32, max: Option<u32>) -> R<u32> {
        let shape = (pattern, Some((min, max)), Some(vec![b'"']), true);
        if let Some(&id) = self.made.get(&shape) {
            return Ok(id);
        }
        let id = self.new_rule()?;
        self.set_rule_follow(id, shape.0.clone(), shape.1, shape.2.clone())?;
        if let Some(r) = self.rules[id as usize].as_mut() {
            r.chars = true;
        }
        self.made.insert(shape, id);
        Ok(id)
    }

    /// A new fragment (see [`INLINE`]); its id.
    fn fragment(&mut self, text: String) -> R<u32> {
        if let Some(&id) = self.fragment_ids.get(&text) {
            return Ok(id);
        }
        self.pattern_bytes += text.len();
        if self.pattern_bytes > MAX_PATTERN_BYTES {
            return Err(Fail::TooLarge(format!(
                "the schema's patterns exceed {MAX_PATTERN_BYTES} bytes"
            )));
        }
        if self.fragments.len() >= MAX_IDS as usize {
            return Err(Fail::TooLarge("too many fragments".into()));
        }
        let id = self.fragments.len() as u32;
        self.fragment_ids.insert(text.clone(), id);
        self.fragment_refs
            .push((fragments_of(&text), callees_of(&text)));
        self.fragments.push(text);
        Ok(id)
    }

    /// [`string_pattern`], once per pattern text.
    fn string_pattern(&mut self, p: &str) -> R<String> {
        if let Some(t) = self.pattern_texts.get(p) {
            return Ok(t.clone());
        }
        let t = string_pattern(p)?;
        self.pattern_texts.insert(p.to_string(), t.clone());
        Ok(t)
    }

    /// The length of `text` with the fragments it splices in (each counted once), up to `cap`.
    fn expanded_len(&self, text: &str, cap: usize) -> usize {
        let mut len = text.len();
        let mut todo = fragments_of(text);
        let mut seen = BTreeSet::new();
        while let Some(f) = todo.pop() {
            if len > cap {
                break;
            }
            if seen.insert(f) {
                len += self.fragments[f as usize].len();
                todo.extend_from_slice(&self.fragment_refs[f as usize].0);
            }
        }
        len
    }

    /// [`object_body`] as fragments (linear in the members where the flat pattern is
    /// quadratic): `rest[i]` is what may follow once something was written, from item `i` on,
    /// written once and jumped to; the heads (each way to write the first member) jump into it.
    /// Returns the members' pattern (a marker entering the heads).
    fn object_fragments(&mut self, items: &[(String, bool)], extra: Option<&str>) -> R<String> {
        let w = self.w.clone();
        let sep = format!("{w},{w}");
        let mut rest = vec![0u32; items.len() + 1];
        let tail = extra.map_or(String::new(), |x| format!("(?:{sep}{x})*"));
        rest[items.len()] = self.fragment(tail)?;
        for i in (0..items.len()).rev() {
            let (p, req) = &items[i];
            let next = marker_of(JUMP, rest[i + 1]);
            let body = if *req {
                format!("{sep}{p}{next}")
            } else {
                format!("(?:{sep}{p})?{next}")
            };
            rest[i] = self.fragment(body)?;
        }
        let heads: Vec<String> = (0..items.len())
            .map(|i| format!("{}{}", items[i].0, marker_of(JUMP, rest[i + 1])))
            .collect();
        let first = extra.map(|x| format!("{x}{}", marker_of(JUMP, rest[items.len()])));
        let (alts, _) = first_member(items, heads, first);
        let entry = self.fragment(alts)?;
        Ok(marker_of(INLINE, entry))
    }

    /// A pattern that matches `body` as a rule of its own when it is large.
    fn maybe_call(&mut self, body: String) -> R<String> {
        if self.expanded_len(&body, INLINE_BYTES + 1) <= INLINE_BYTES {
            return Ok(body);
        }
        Ok(marker(self.rule_for(body, None, None)?))
    }

    fn ws(&self) -> &str {
        &self.w
    }

    /// A JSON string without constraints: a call to a rule of its own, the same for every
    /// schema, so its masks' context-free parts are shared by all of them.
    fn plain_string(&mut self) -> R<String> {
        if self.rules[STRING_RULE as usize].is_none() {
            self.set_rule(STRING_RULE, format!("\"{CHAR}*\""), None)?;
        }
        Ok(marker(STRING_RULE))
    }

    /// Any JSON value.
    fn any(&mut self) -> R<String> {
        if let Some(id) = self.any_rule {
            return Ok(marker(id));
        }
        let id = ANY_RULE;
        self.any_rule = Some(id);
        let w = self.w.clone();
        let call = marker(id);
        let string = self.plain_string()?;
        let body = format!(
            "(?:null|true|false|{NUMBER}|{string}|\\[{w}(?:{call}(?:{w},{w}{call})*{w})?\\]|\\{{{w}(?:{string}{w}:{w}{call}(?:{w},{w}{string}{w}:{w}{call})*{w})?\\}})"
        );
        self.set_rule(id, body, None)?;
        Ok(call)
    }

    fn resolve(&self, reference: &str) -> R<&'a Value> {
        let Some(pointer) = reference.strip_prefix('#') else {
            return unsupported(format!("`$ref` to another document ({reference})"));
        };
        let pointer = percent_decode(pointer);
        if !pointer.is_empty() && !pointer.starts_with('/') {
            return unsupported(format!("`$ref` to an anchor ({reference})"));
        }
        self.root
            .pointer(&pointer)
            .ok_or_else(|| Fail::Unsupported(format!("`$ref` {reference} does not resolve")))
    }

    fn reference(&mut self, reference: &str) -> R<String> {
        if let Some(&id) = self.ref_rules.get(reference) {
            return Ok(marker(id));
        }
        if let Some(body) = self.ref_inline.get(reference) {
            return Ok(body.clone());
        }
        let target = self.resolve(reference)?;
        if self.expanding.iter().any(|r| r == reference) {
            // A cycle: the reference becomes a rule, called from here and from now on.
            let id = self.new_rule()?;
            self.ref_rules.insert(reference.to_string(), id);
            self.expanding.push(format!("{reference} (rule)"));
            let body = self.value(target);
            self.expanding.pop();
            self.set_rule(id, body?, None)?;
            return Ok(marker(id));
        }
        self.expanding.push(reference.to_string());
        let body = self.value(target);
        self.expanding.pop();
        let body = body?;
        if let Some(&id) = self.ref_rules.get(reference) {
            // Recursive: its rule was made while expanding it.
            return Ok(marker(id));
        }
        if body.len() > INLINE_BYTES {
            let id = self.rule_for(body, None, None)?;
            self.ref_rules.insert(reference.to_string(), id);
            return Ok(marker(id));
        }
        self.ref_inline.insert(reference.to_string(), body.clone());
        Ok(body)
    }

    fn value(&mut self, schema: &'a Value) -> R<String> {
        self.depth += 1;
        let out = if self.depth > MAX_DEPTH {
            Err(Fail::TooLarge(format!(
                "the schema nests deeper than {MAX_DEPTH} levels"
            )))
        } else {
            match schema {
                Value::Bool(true) => self.any(),
                Value::Bool(false) => Err(Fail::Unsatisfiable("`false`".into())),
                Value::Object(m) => self.object_schema(m),
                _ => unsupported("a schema that is neither an object nor a boolean"),
            }
        };
        self.depth -= 1;
        out
    }

    fn object_schema(&mut self, m: &'a Map<String, Value>) -> R<String> {
        // (A schema has a few keys: they are looked up in the list, not the list in the map.)
        if m.keys().any(|k| UNSUPPORTED.contains(&k.as_str())) {
            for k in UNSUPPORTED {
                if m.contains_key(*k) {
                    return unsupported(format!("`{k}`"));
                }
            }
        }
        // `not`: only as "not these types" (`{}` / `true`: nothing matches).
        let mut excluded: Vec<&str> = Vec::new();
        if let Some(n) = m.get("not") {
            excluded = not_types(n)?;
            if excluded.len() == JSON_TYPES.len() {
                return Err(Fail::Unsatisfiable("`not: {}`".into()));
            }
            let structural = ["$ref", "allOf", "anyOf", "oneOf", "enum", "const"];
            if !excluded.is_empty() && structural.iter().any(|k| m.contains_key(*k)) {
                return unsupported("`not` beside `$ref`/`allOf`/`anyOf`/`oneOf`/`enum`/`const`");
            }
        }
        let validating: Vec<&str> = m
            .keys()
            .map(String::as_str)
            .filter(|k| IMPLEMENTED.contains(k) && *k != "not")
            .collect();
        let only = |k: &str| validating.iter().all(|x| *x == k);

        if let Some(r) = m.get("$ref") {
            let Some(r) = r.as_str() else {
                return unsupported("a `$ref` that is not a string");
            };
            if !only("$ref") {
                return unsupported("`$ref` with sibling keywords");
            }
            return self.reference(r);
        }
        if let Some(all) = m.get("allOf") {
            let Some(all) = all.as_array() else {
                return unsupported("an `allOf` that is not an array");
            };
            if all.len() == 1 && only("allOf") {
                return self.value(&all[0]);
            }
            return unsupported("`allOf` of several schemas");
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(any) = m.get(key) {
                let Some(branches) = any.as_array() else {
                    return unsupported(format!("a `{key}` that is not an array"));
                };
                if !only(key) {
                    return unsupported(format!("`{key}` with sibling keywords"));
                }
                if key == "oneOf" && !self.disjoint(branches) {
                    return unsupported("`oneOf` whose branches may overlap");
                }
                let mut alts = Vec::new();
                for b in branches {
                    match self.value(b) {
                        Ok(p) => alts.push(p),
                        Err(Fail::Unsatisfiable(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                if alts.is_empty() {
                    return Err(Fail::Unsatisfiable(format!("every `{key}` branch")));
                }
                return Ok(format!("(?:{})", alts.join("|")));
            }
        }

        let types: Vec<&str> = self
            .types(m)?
            .into_iter()
            .filter(|t| {
                let gone =
                    excluded.contains(t) || (*t == "integer" && excluded.contains(&"number"));
                !gone
            })
            .collect();
        if let Some(c) = m.get("const") {
            return self.literals(m, std::slice::from_ref(c), &types);
        }
        if let Some(e) = m.get("enum") {
            let Some(e) = e.as_array() else {
                return unsupported("an `enum` that is not an array");
            };
            return self.literals(m, e, &types);
        }
        let mut alts = Vec::new();
        for t in &types {
            let p = match *t {
                "null" => "null".to_string(),
                "boolean" => "(?:true|false)".to_string(),
                // A long range (many digits) is a rule of its own, one per schema however
                // many members share it.
                "integer" => {
                    let p = self.integer(m)?;
                    self.maybe_call(p)?
                }
                "number" => {
                    let p = self.number(m)?;
                    self.maybe_call(p)?
                }
                "string" => match self.string(m) {
                    Ok(p) => p,
                    Err(Fail::Unsatisfiable(_)) if types.len() > 1 => continue,
                    Err(e) => return Err(e),
                },
                "array" => match self.array(m) {
                    Ok(p) => p,
                    Err(Fail::Unsatisfiable(_)) if types.len() > 1 => continue,
                    Err(e) => return Err(e),
                },
                "object" => match self.object(m) {
                    Ok(p) => p,
                    Err(Fail::Unsatisfiable(_)) if types.len() > 1 => continue,
                    Err(e) => return Err(e),
                },
                other => return unsupported(format!("`type` {other}")),
            };
            alts.push(p);
        }
        match alts.len() {
            0 => Err(Fail::Unsatisfiable("no type can match".into())),
            1 => Ok(alts.pop().unwrap_or_default()),
            _ => Ok(format!("(?:{})", alts.join("|"))),
        }
    }

    /// The schema's types, `integer` dropped when `number` is there; all of them when `type`
    /// is absent.
    fn types(&self, m: &Map<String, Value>) -> R<Vec<&'static str>> {
        let named: Vec<&str> = match m.get("type") {
            None => return Ok(JSON_TYPES.to_vec()),
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => {
                let mut v = Vec::new();
                for t in a {
                    match t.as_str() {
                        Some(s) => v.push(s),
                        None => return unsupported("a `type` list with a non-string"),
                    }
                }
                v
            }
            Some(_) => return unsupported("a `type` that is neither a string nor a list"),
        };
        for t in &named {
            if !JSON_TYPES.contains(t) && *t != "integer" {
                return unsupported(format!("`type` {t}"));
            }
        }
        let mut out = Vec::new();
        for t in [
            "null", "boolean", "object", "array", "number", "integer", "string",
        ] {
            if named.contains(&t) && !(t == "integer" && named.contains(&"number")) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// The JSON types a schema can match, when they follow from `type`/`const`/`enum` (for
    /// `oneOf`).
    fn type_set(&self, v: &Value, depth: u32) -> Option<BTreeSet<&'static str>> {
        let m = v.as_object()?;
        if depth > 32 {
            return None;
        }
        if let Some(r) = m.get("$ref").and_then(Value::as_str) {
            return self.type_set(self.resolve(r).ok()?, depth + 1);
        }
        let lit = m
            .get("const")
            .map(std::slice::from_ref)
            .or_else(|| m.get("enum").and_then(Value::as_array).map(Vec::as_slice));
        if let Some(lits) = lit {
            return Some(lits.iter().map(json_type).collect());
        }
        m.get("type")?;
        let types = self.types(m).ok()?;
        Some(
            types
                .into_iter()
                .map(|t| if t == "integer" { "number" } else { t })
                .collect(),
        )
    }

    fn disjoint(&self, branches: &[Value]) -> bool {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for b in branches {
            let Some(ts) = self.type_set(b, 0) else {
                return false;
            };
            for t in ts {
                if !seen.insert(t) {
                    return false;
                }
            }
        }
        true
    }

    fn literals(&mut self, m: &Map<String, Value>, values: &[Value], types: &[&str]) -> R<String> {
        let others = m
            .keys()
            .filter(|k| {
                IMPLEMENTED.contains(&k.as_str())
                    && !["type", "enum", "const"].contains(&k.as_str())
            })
            .count();
        if others > 0 {
            return unsupported("`enum`/`const` with other validation keywords");
        }
        let mut alts = Vec::new();
        for v in values {
            let t = json_type(v);
            let ok = types.contains(&t)
                || (t == "number"
                    && types.contains(&"integer")
                    && v.as_number().is_some_and(is_integer));
            if ok {
                alts.push(self.literal(v));
            }
        }
        if alts.is_empty() {
            return Err(Fail::Unsatisfiable(
                "no `enum` value has the schema's type".into(),
            ));
        }
        Ok(format!("(?:{})", alts.join("|")))
    }

    /// A JSON value written exactly (whitespace between its tokens allowed).
    fn literal(&self, v: &Value) -> String {
        let w = self.ws();
        match v {
            Value::Array(a) => {
                let items: Vec<String> = a.iter().map(|x| self.literal(x)).collect();
                if items.is_empty() {
                    return format!("\\[{w}\\]");
                }
                format!("\\[{w}{}{w}\\]", items.join(&format!("{w},{w}")))
            }
            Value::Object(o) => {
                let items: Vec<String> = o
                    .iter()
                    .map(|(k, x)| format!("{}{w}:{w}{}", json_string_literal(k), self.literal(x)))
                    .collect();
                if items.is_empty() {
                    return format!("\\{{{w}\\}}");
                }
                format!("\\{{{w}{}{w}\\}}", items.join(&format!("{w},{w}")))
            }
            Value::String(s) => json_string_literal(s),
            other => regex_syntax::escape(&other.to_string()),
        }
    }

    fn integer(&mut self, m: &Map<String, Value>) -> R<String> {
        if let Some(k) = m.get("multipleOf") {
            if k.as_f64() != Some(1.0) {
                return unsupported("`multipleOf` other than 1");
            }
        }
        let (lo, hi) = int_bounds(m)?;
        if lo.is_none() && hi.is_none() {
            return Ok(INTEGER.to_string());
        }
        let (lo, hi) = (lo.unwrap_or(i64::MIN), hi.unwrap_or(i64::MAX));
        if lo > hi {
            return Err(Fail::Unsatisfiable("empty integer range".into()));
        }
        Ok(int_range(lo, hi))
    }

    fn number(&mut self, m: &Map<String, Value>) -> R<String> {
        if m.contains_key("multipleOf") {
            return unsupported("`multipleOf` on a number");
        }
        let (lo, hi) = number_bounds(m)?;
        const EXP: &str = "(?:[eE][+-]?[0-9]+)?";
        match (lo, hi) {
            (None, None) => Ok(NUMBER.to_string()),
            // A lower bound of 0 alone keeps the exponent (every form is exact there).
            (Some((0.0, false)), None) => Ok(format!("(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?{EXP}")),
            (Some((0.0, true)), None) => Ok(format!(
                "(?:[1-9][0-9]*(?:\\.[0-9]+)?|0\\.[0-9]*[1-9][0-9]*){EXP}"
            )),
            // Other bounds: decimals without an exponent (as llguidance writes bounded
            // numbers), compared exactly with the bound's shortest decimal form.
            _ => decimal_range(lo, hi),
        }
    }

    fn string(&mut self, m: &Map<String, Value>) -> R<String> {
        let min = count_kw(m, "minLength")?.unwrap_or(0);
        let max = count_kw(m, "maxLength")?;
        if max.is_some_and(|x| x < min) {
            return Err(Fail::Unsatisfiable("`maxLength` < `minLength`".into()));
        }
        let bounded = min > 0 || max.is_some();
        if let Some(f) = m.get("format") {
            let Some(f) = f.as_str() else {
                return unsupported("a `format` that is not a string");
            };
            if bounded || m.contains_key("pattern") {
                return unsupported("`format` with `pattern` or lengths");
            }
            return match format_pattern(f) {
                Some(p) => Ok(format!("\"{p}\"")),
                None => unsupported(format!("`format` {f}")),
            };
        }
        if let Some(p) = m.get("pattern") {
            let Some(p) = p.as_str() else {
                return unsupported("a `pattern` that is not a string");
            };
            // `^C{m,n}$` for one character class C: a counted rule (not an unrolled DFA),
            // and lengths intersect with its counts.
            if let Some((elem, rmin, rmax)) = class_repetition(p)? {
                let lo = rmin.max(min);
                let hi = match (rmax, max) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if hi.is_some_and(|h| h < lo) {
                    return Err(Fail::Unsatisfiable("`pattern` and lengths".into()));
                }
                if inline_chars(lo, hi) {
                    let h = hi.map_or(String::new(), |x| x.to_string());
                    return Ok(format!("\"(?:{elem}){{{lo},{h}}}\""));
                }
                let id = self.rule_for(elem, Some((lo, hi)), Some(vec![b'"']))?;
                return Ok(format!("\"{}\"", marker(id)));
            }
            let content = self.string_pattern(p)?;
            if bounded {
                let id = self.chars_rule(content, min, max)?;
                return Ok(format!("\"{}\"", marker(id)));
            }
            return Ok(format!("\"{content}\""));
        }
        if !bounded {
            return self.plain_string();
        }
        if inline_chars(min, max) {
            let hi = max.map_or(String::new(), |x| x.to_string());
            return Ok(format!("\"{CHAR}{{{min},{hi}}}\""));
        }
        let key = (min, max);
        let id = match self.string_rules.get(&key) {
            Some(&id) => id,
            None => {
                let id = self.new_rule()?;
                // Always followed by the closing quote.
                self.set_rule_follow(id, CHAR.to_string(), Some((min, max)), Some(vec![b'"']))?;
                self.string_rules.insert(key, id);
                id
            }
        };
        Ok(format!("\"{}\"", marker(id)))
    }

    /// A repetition of `elem` (a pattern that starts with a separator) `min..=max` times.
    fn repeat(&mut self, elem: &str, min: u32, max: Option<u32>) -> R<String> {
        if max == Some(0) {
            return Ok(String::new());
        }
        if max.is_some_and(|x| x <= INLINE_COUNT) || (max.is_none() && min <= INLINE_COUNT) {
            let hi = max.map_or(String::new(), |x| x.to_string());
            if min == 0 && max.is_none() {
                return Ok(format!("(?:{elem})*"));
            }
            return Ok(format!("(?:{elem}){{{min},{hi}}}"));
        }
        // Followed by whitespace or the closing bracket.
        let follow = self.w_first.clone().map(|mut f| {
            f.push(b']');
            f
        });
        Ok(marker(self.rule_for(
            elem.to_string(),
            Some((min, max)),
            follow,
        )?))
    }

    /// The pattern of further items or properties (`items`, `additionalItems`,
    /// `additionalProperties`): any JSON when absent or `true`, `None` when none may appear.
    fn open_schema(&mut self, v: Option<&'a Value>) -> R<Option<String>> {
        match v {
            None | Some(Value::Bool(true)) => Ok(Some(self.any()?)),
            Some(Value::Bool(false)) => Ok(None),
            Some(s) => match self.value(s) {
                Ok(p) => Ok(Some(self.maybe_call(p)?)),
                Err(Fail::Unsatisfiable(_)) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    fn array(&mut self, m: &'a Map<String, Value>) -> R<String> {
        if m.get("uniqueItems").and_then(Value::as_bool) == Some(true) {
            return unsupported("`uniqueItems`");
        }
        let min = count_kw(m, "minItems")?.unwrap_or(0);
        let max = count_kw(m, "maxItems")?;
        if max.is_some_and(|x| x < min) {
            return Err(Fail::Unsatisfiable("`maxItems` < `minItems`".into()));
        }
        // Prefix items, and what follows them (`None`: nothing).
        let (prefix, rest): (&[Value], Option<&Value>) =
            match (m.get("prefixItems"), m.get("items")) {
                (Some(Value::Array(p)), items) => (p.as_slice(), items),
                (Some(_), _) => return unsupported("a `prefixItems` that is not an array"),
                (None, Some(Value::Array(p))) => (p.as_slice(), m.get("additionalItems")),
                (None, items) => (&[], items),
            };
        let rest = self.open_schema(rest)?;
        let w = self.w.clone();
        let k = prefix.len() as u32;
        let mut items = Vec::new();
        let mut truncated = false;
        for (i, p) in prefix.iter().enumerate() {
            if max.is_some_and(|x| i as u32 >= x) {
                truncated = true;
                break;
            }
            match self.value(p) {
                Ok(p) => items.push(self.maybe_call(p)?),
                Err(Fail::Unsatisfiable(_)) => {
                    truncated = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let k_ok = items.len() as u32;
        let tail = if truncated { None } else { rest };
        if min > k_ok && tail.is_none() {
            return Err(Fail::Unsatisfiable(
                "`minItems` is more than the items allowed".into(),
            ));
        }
        let sep_rest = tail.as_ref().map(|r| format!("{w},{w}{r}"));
        // The members (never empty), and whether there may be none.
        let (body, nullable) = if k == 0 {
            match (&tail, &sep_rest) {
                (Some(r), Some(sep)) if max != Some(0) => {
                    let more = self.repeat(sep, min.saturating_sub(1), max.map(|x| x - 1))?;
                    (format!("{r}{more}"), min == 0)
                }
                _ => (String::new(), true),
            }
        } else if items.is_empty() {
            (String::new(), true)
        } else {
            let mut after = match &sep_rest {
                Some(sep) => self.repeat(sep, min.saturating_sub(k), max.map(|x| x - k))?,
                None => String::new(),
            };
            for i in (1..items.len()).rev() {
                let seg = format!("{w},{w}{}{after}", items[i]);
                after = if (i as u32) < min {
                    seg
                } else {
                    format!("(?:{seg})?")
                };
            }
            (format!("{}{after}", items[0]), min == 0)
        };
        Ok(wrap("\\[", "\\]", &body, nullable, &w))
    }

    fn object(&mut self, m: &'a Map<String, Value>) -> R<String> {
        let w = self.w.clone();
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let props = match m.get("properties") {
            None => EMPTY.get_or_init(Map::new),
            Some(Value::Object(p)) => p,
            Some(_) => return unsupported("a `properties` that is not an object"),
        };
        let mut required: Vec<&str> = Vec::new();
        if let Some(r) = m.get("required") {
            let Some(r) = r.as_array() else {
                return unsupported("a `required` that is not an array");
            };
            for x in r {
                match x.as_str() {
                    Some(s) if !required.contains(&s) => required.push(s),
                    Some(_) => {}
                    None => return unsupported("a `required` entry that is not a string"),
                }
            }
        }
        let min_props = count_kw(m, "minProperties")?.unwrap_or(0);
        let max_props = count_kw(m, "maxProperties")?;
        let additional = self.open_schema(m.get("additionalProperties"))?;
        // `patternProperties`: patterns whose schemas are all the same (a key matching several
        // takes each of their schemas, so different ones would need their intersection), none
        // matching a declared or required name (those would take both schemas, or come
        // twice). Keys matching a pattern take its schema; where other properties are
        // allowed, the other keys are a complement rule (no pattern, no name).
        let pattern_props = match m.get("patternProperties") {
            None => None,
            Some(Value::Object(pp)) if pp.is_empty() => None,
            Some(Value::Object(pp)) => {
                let mut schemas = pp.values();
                let schema = schemas.next().expect("non-empty");
                if schemas.any(|s| s != schema) {
                    return unsupported("`patternProperties` with different schemas");
                }
                let names: Vec<&str> = props
                    .keys()
                    .map(String::as_str)
                    .chain(required.iter().copied())
                    .collect();
                let mut contents = Vec::with_capacity(pp.len());
                for p in pp.keys() {
                    // A PikeVM: no automaton to build, so no pattern can make this check slow.
                    use regex_automata::nfa::thompson::{self, pikevm::PikeVM};
                    if !self.pattern_vms.contains_key(p) {
                        let re = PikeVM::builder()
                            .syntax(regex_automata::util::syntax::Config::new().nest_limit(100))
                            .thompson(thompson::Config::new().nfa_size_limit(Some(16 << 20)))
                            .build(&ecma_classes(p)?)
                            .map_err(|e| {
                                Fail::Unsupported(format!("`patternProperties` {p:?}: {e}"))
                            })?;
                        self.pattern_vms.insert(p.clone(), re);
                    }
                    let re = &self.pattern_vms[p];
                    let mut cache = re.create_cache();
                    if names.iter().any(|n| re.is_match(&mut cache, *n)) {
                        return unsupported("`patternProperties` matching a named property");
                    }
                    contents.push(format!("(?:{})", self.string_pattern(p)?));
                }
                Some((format!("(?:{})", contents.join("|")), schema))
            }
            Some(_) => return unsupported("a `patternProperties` that is not an object"),
        };
        // Items in order: (pattern, required).
        let mut items: Vec<(String, bool)> = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for (name, schema) in props {
            names.push(name);
            let req = required.contains(&name.as_str());
            match self.value(schema) {
                Ok(p) => {
                    let p = self.maybe_call(p)?;
                    items.push((format!("{}{w}:{w}{p}", json_string_literal(name)), req));
                }
                Err(Fail::Unsatisfiable(why)) => {
                    if req {
                        return Err(Fail::Unsatisfiable(format!(
                            "required property {name}: {why}"
                        )));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        for r in &required {
            if props.contains_key(*r) {
                continue;
            }
            match &additional {
                Some(a) => {
                    items.push((format!("{}{w}:{w}{a}", json_string_literal(r)), true));
                    names.push(r);
                }
                None => {
                    return Err(Fail::Unsatisfiable(format!(
                        "required property {r} is not allowed"
                    )))
                }
            }
        }
        let n_required = items.iter().filter(|x| x.1).count() as u32;
        if max_props.is_some_and(|x| x < n_required) {
            return Err(Fail::Unsatisfiable(
                "`maxProperties` below the required ones".into(),
            ));
        }
        if min_props > n_required {
            return unsupported("`minProperties` beyond the required properties");
        }
        if let Some(x) = max_props {
            if additional.is_some() || pattern_props.is_some() || (x as usize) < items.len() {
                return unsupported("`maxProperties` below the properties allowed");
            }
        }
        // Keys matching a pattern (none of them named), each with the patterns' schema.
        let patterned = match &pattern_props {
            Some((keys, schema)) => match self.value(schema) {
                Ok(v) => {
                    let v = self.maybe_call(v)?;
                    Some(format!("\"{keys}\"{w}:{w}{v}"))
                }
                Err(Fail::Unsatisfiable(_)) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        let other = match &additional {
            // Keys that are no name (and match no pattern): a complement rule (see `LazyDfa`),
            // whose pattern is as long as the names (a pattern spelling "none of these names"
            // grows with every prefix of every name, ~0.5 KB per name). The closing quote is
            // the rule's own, so that inside the key its content states are plain content
            // loops, not accepting ones (which every walk shortcut of string content needs):
            // a name's closing quote is a dead end.
            Some(a) => {
                let mut vetoed: Vec<String> = pattern_props.iter().map(|x| x.0.clone()).collect();
                for n in &names {
                    if !plain_name(n) {
                        return unsupported(if pattern_props.is_some() {
                            "a non-ASCII or escaped property name beside `patternProperties`"
                        } else {
                            "a non-ASCII or escaped property name beside additional properties"
                        });
                    }
                    vetoed.push(regex_syntax::escape(n));
                }
                if vetoed.is_empty() {
                    Some(format!("\"{CHAR}*\"{w}:{w}{a}"))
                } else {
                    let body = format!(
                        "(?:{})\"(?-u:\\x{VETO:02X})|(?:{})\"(?-u:\\x{COMPLEMENT:02X})",
                        vetoed.join("|"),
                        any_chars()
                    );
                    // Followed by whitespace or the colon.
                    let follow = self.w_first.clone().map(|mut f| {
                        f.push(b':');
                        f
                    });
                    let id = self.rule_for(body, None, follow)?;
                    Some(format!("\"{}{w}:{w}{a}", marker(id)))
                }
            }
            None => None,
        };
        let extra = match (patterned, other) {
            (Some(p), Some(o)) => Some(format!("(?:{p}|{o})")),
            (p, o) => p.or(o),
        };
        // The flat pattern repeats the members after each possible first one: about
        // (ways to start) x (all members) bytes.
        let starts = items
            .iter()
            .position(|x| x.1)
            .map_or(items.len() + 1, |i| i + 1);
        let all: usize = items
            .iter()
            .map(|x| x.0.len() + 2 * w.len() + 8)
            .sum::<usize>()
            + extra.as_ref().map_or(0, String::len);
        let (body, nullable) = if starts.saturating_mul(all) > OBJECT_FLAT_BYTES {
            let (_, nullable) =
                first_member(&items, vec![String::new(); items.len()], extra.clone());
            (self.object_fragments(&items, extra.as_deref())?, nullable)
        } else {
            object_body(&items, extra.as_deref(), &w)
        };
        let len = self.expanded_len(&body, OBJECT_INLINE_BYTES + 1);
        if len > OBJECT_INLINE_BYTES {
            return Err(Fail::TooLarge(format!(
                "an object whose members' pattern is over {OBJECT_INLINE_BYTES} bytes"
            )));
        }
        Ok(wrap("\\{", "\\}", &body, nullable, &w))
    }
}

/// `open`, the members `body` (a pattern that never matches empty; `""` for none at all),
/// `close`, with whitespace after `open` and before `close` only around members.
fn wrap(open: &str, close: &str, body: &str, nullable: bool, w: &str) -> String {
    if body.is_empty() {
        format!("{open}{w}{close}")
    } else if nullable {
        format!("{open}{w}(?:{body}{w})?{close}")
    } else {
        format!("{open}{w}{body}{w}{close}")
    }
}

/// The members of an object: `items` in order (each optional unless required) and, when
/// `extra` is given, any number of further members after them; commas between present ones.
/// Returns a pattern that writes at least one member (`""` if none may be written) and
/// whether writing none is allowed.
fn object_body(items: &[(String, bool)], extra: Option<&str>, w: &str) -> (String, bool) {
    let sep = format!("{w},{w}");
    // `afters[i]`: what may follow once something was written, from item i on.
    let mut afters = vec![String::new(); items.len() + 1];
    let mut after = match extra {
        Some(x) => format!("(?:{sep}{x})*"),
        None => String::new(),
    };
    afters[items.len()] = after.clone();
    for i in (0..items.len()).rev() {
        let (p, req) = &items[i];
        after = if *req {
            format!("{sep}{p}{after}")
        } else {
            format!("(?:{sep}{p})?{after}")
        };
        afters[i] = after.clone();
    }
    let heads: Vec<String> = (0..items.len())
        .map(|i| format!("{}{}", items[i].0, afters[i + 1]))
        .collect();
    let first = extra.map(|x| format!("{x}{}", afters[items.len()]));
    first_member(items, heads, first)
}

/// The ways to write the first member: member `i` (`heads[i]`: it and what may follow), for
/// every `i` up to and including the first required one, or else `extra` (additional members
/// only). One flat alternation (a nested one would pass the parser's nesting limit). Returns
/// `""` when no member may be written, and whether writing none is allowed.
fn first_member(
    items: &[(String, bool)],
    heads: Vec<String>,
    extra: Option<String>,
) -> (String, bool) {
    let mut alts = Vec::new();
    let mut nullable = true;
    for (h, (_, req)) in heads.into_iter().zip(items) {
        alts.push(h);
        if *req {
            nullable = false;
            break;
        }
    }
    if nullable {
        alts.extend(extra);
    }
    let body = match alts.len() {
        0 => String::new(),
        1 => alts.pop().unwrap_or_default(),
        _ => format!("(?:{})", alts.join("|")),
    };
    (body, nullable)
}

/// `w` at most once, as a pattern: `c?` for one plain character (the usual `" "`: whitespace is
/// a quarter of an object's pattern, and a group costs the regex parser more than its bytes).
fn optional(w: &str) -> String {
    let mut cs = w.chars();
    match (cs.next(), cs.next()) {
        (Some(c), None) if c.is_ascii_graphic() || c == ' ' => {
            if regex_syntax::is_meta_character(c) {
                format!("\\{c}?")
            } else {
                format!("{c}?")
            }
        }
        _ => format!("(?:{w})?"),
    }
}

/// Whether a string of `min..=max` characters is written into its parent's pattern rather
/// than as a counted rule: only with no maximum and at most one character required (then every
/// state but the first is a content loop, which masks take whole). Unrolled, `maxLength: 8`
/// is eight levels of the JSON character automaton, each a walk of the whole vocabulary on its
/// first mask (~5 ms on Tekken); a counted rule's masks are its cached per-count tables.
fn inline_chars(min: u32, max: Option<u32>) -> bool {
    max.is_none() && min <= 1
}

/// A JSON string literal, as a pattern (serialized like `json.dumps(..., ensure_ascii=False)`).
fn json_string_literal(s: &str) -> String {
    regex_syntax::escape(&serde_json::to_string(s).unwrap_or_default())
}

/// Whether property name `n` is written in JSON as it is: ASCII, no quote, backslash or
/// control character (key patterns spell such names literally).
fn plain_name(n: &str) -> bool {
    !n.chars()
        .any(|c| c == '"' || c == '\\' || (c as u32) < 0x20 || !c.is_ascii())
}

fn count_kw(m: &Map<String, Value>, k: &str) -> R<Option<u32>> {
    match m.get(k) {
        None => Ok(None),
        Some(v) => match v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                .map(|f| f as u64)
        }) {
            Some(n) => Ok(Some(n.min(u64::from(u32::MAX / 2)) as u32)),
            None => unsupported(format!("a `{k}` that is not a non-negative integer")),
        },
    }
}

/// Inclusive integer bounds from `minimum`/`maximum`/`exclusive*` (drafts 4 and 6+).
fn int_bounds(m: &Map<String, Value>) -> R<(Option<i64>, Option<i64>)> {
    let num = |k: &str| -> R<Option<f64>> {
        match m.get(k) {
            None | Some(Value::Bool(_)) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Fail::Unsupported(format!("a `{k}` that is not a number"))),
        }
    };
    let flag = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
    const LIM: f64 = 9.0e15;
    let mut lo: Option<f64> = None;
    if let Some(a) = num("minimum")? {
        lo = Some(if flag("exclusiveMinimum") {
            a.floor() + 1.0
        } else {
            a.ceil()
        });
    }
    if let Some(b) = num("exclusiveMinimum")? {
        let v = b.floor() + 1.0;
        lo = Some(lo.map_or(v, |x| x.max(v)));
    }
    let mut hi: Option<f64> = None;
    if let Some(a) = num("maximum")? {
        hi = Some(if flag("exclusiveMaximum") {
            a.ceil() - 1.0
        } else {
            a.floor()
        });
    }
    if let Some(b) = num("exclusiveMaximum")? {
        let v = b.ceil() - 1.0;
        hi = Some(hi.map_or(v, |x| x.min(v)));
    }
    let conv = |x: Option<f64>| -> R<Option<i64>> {
        match x {
            None => Ok(None),
            Some(v) if v.abs() <= LIM => Ok(Some(v as i64)),
            Some(_) => unsupported("an integer bound beyond ±9e15"),
        }
    };
    Ok((conv(lo)?, conv(hi)?))
}

/// A number's bounds: (value, exclusive) below and above, from `minimum`/`maximum` with
/// draft-4 boolean `exclusiveMinimum`/`exclusiveMaximum`, or the draft-6 numeric forms (the
/// tighter bound wins; at equal values the exclusive one).
type Bound = Option<(f64, bool)>;

fn number_bounds(m: &Map<String, Value>) -> R<(Bound, Bound)> {
    let num = |k: &str| -> R<Option<f64>> {
        match m.get(k) {
            None | Some(Value::Bool(_)) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|x| Some(x + 0.0))
                .ok_or_else(|| Fail::Unsupported(format!("a `{k}` that is not a number"))),
        }
    };
    let flag = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
    let tighter = |a: Bound, b: Bound, lower: bool| -> Bound {
        match (a, b) {
            (None, x) | (x, None) => x,
            (Some(x), Some(y)) => {
                let pick_y = if lower { y.0 > x.0 } else { y.0 < x.0 };
                Some(if x.0 == y.0 {
                    (x.0, x.1 || y.1)
                } else if pick_y {
                    y
                } else {
                    x
                })
            }
        }
    };
    let lo = tighter(
        num("minimum")?.map(|a| (a, flag("exclusiveMinimum"))),
        num("exclusiveMinimum")?.map(|b| (b, true)),
        true,
    );
    let hi = tighter(
        num("maximum")?.map(|a| (a, flag("exclusiveMaximum"))),
        num("exclusiveMaximum")?.map(|b| (b, true)),
        false,
    );
    Ok((lo, hi))
}

/// A non-negative decimal bound: its integer part and its fraction's digits (no trailing zero).
#[derive(Clone, Debug)]
struct Dec {
    int: u64,
    frac: String,
}

fn dec(x: f64) -> R<Dec> {
    // Rust writes an `f64` as its shortest round-trip decimal, without an exponent.
    let s = format!("{}", x.abs());
    let (i, f) = s.split_once('.').unwrap_or((&s, ""));
    let int = i
        .parse::<u64>()
        .map_err(|_| Fail::Unsupported("a number bound beyond 2^64".into()))?;
    Ok(Dec {
        int,
        frac: f.trim_end_matches('0').to_string(),
    })
}

/// JSON numbers (no exponent) between the bounds, as a pattern; `-0` counts as 0.
fn decimal_range(lo: Bound, hi: Bound) -> R<String> {
    if let (Some((a, ea)), Some((b, eb))) = (lo, hi) {
        if a > b || (a == b && (ea || eb)) {
            return Err(Fail::Unsatisfiable("a number's bounds cross".into()));
        }
    }
    let mut alts = Vec::new();
    // x >= 0
    if hi.is_none_or(|(h, e)| h > 0.0 || (h == 0.0 && !e)) {
        let lower = match lo {
            Some((l, e)) if l >= 0.0 => Some((dec(l)?, e)),
            _ => None,
        };
        let upper = hi.map(|(h, e)| dec(h).map(|d| (d, e))).transpose()?;
        alts.extend(nonneg_range(lower, upper));
    }
    // x < 0 (and -0 where 0 is in), written -y: y from max(-hi, 0) to -lo
    if lo.is_none_or(|(l, e)| l < 0.0 || (l == 0.0 && !e)) {
        let lower = match hi {
            Some((h, e)) if h <= 0.0 => Some((dec(h)?, e)),
            _ => None,
        };
        let upper = lo.map(|(l, e)| dec(l).map(|d| (d, e))).transpose()?;
        if let Some(p) = nonneg_range(lower, upper) {
            alts.push(format!("-{p}"));
        }
    }
    if alts.is_empty() {
        return Err(Fail::Unsatisfiable("no number between the bounds".into()));
    }
    Ok(format!("(?:{})", alts.join("|")))
}

/// Non-negative JSON numbers (`0|[1-9][0-9]*`, then an optional fraction; no sign, no exponent)
/// from `lower` (`None`: 0 inclusive) to `upper` (`None`: unbounded); `None` if there is none.
fn nonneg_range(lower: Option<(Dec, bool)>, upper: Option<(Dec, bool)>) -> Option<String> {
    let (a, ea) = lower.unwrap_or((
        Dec {
            int: 0,
            frac: String::new(),
        },
        false,
    ));
    let any_frac = "(?:\\.[0-9]+)?";
    let mut alts = Vec::new();
    match upper {
        None => {
            if let Some(f) = frac_ge(&a.frac, ea) {
                alts.push(format!("{}{f}", a.int));
            }
            if a.int < u64::MAX {
                alts.push(format!("{}{any_frac}", nat_range(a.int + 1, None)));
            }
        }
        Some((b, eb)) => {
            if a.int < b.int {
                if let Some(f) = frac_ge(&a.frac, ea) {
                    alts.push(format!("{}{f}", a.int));
                }
                if a.int + 1 < b.int {
                    alts.push(format!(
                        "{}{any_frac}",
                        nat_range(a.int + 1, Some(b.int - 1))
                    ));
                }
                if let Some(f) = frac_le(&b.frac, eb) {
                    alts.push(format!("{}{f}", b.int));
                }
            } else if a.int == b.int {
                let zero_in = a.frac.is_empty() && !ea;
                let digits = between_digits(&a.frac, ea, &b.frac, eb);
                let f = match (zero_in, digits) {
                    (true, Some(d)) => Some(format!("(?:\\.{d})?")),
                    (false, Some(d)) => Some(format!("\\.{d}")),
                    (true, None) => Some(String::new()),
                    (false, None) => None,
                };
                if let Some(f) = f {
                    alts.push(format!("{}{f}", a.int));
                }
            }
        }
    }
    (!alts.is_empty()).then(|| format!("(?:{})", alts.join("|")))
}

/// The fraction part (with its dot, or none) of the numbers `>= 0.F` (`> 0.F` if `excl`).
fn frac_ge(f: &str, excl: bool) -> Option<String> {
    let d = ge_digits(f, excl);
    Some(if f.is_empty() && !excl {
        format!("(?:\\.{d})?")
    } else {
        format!("\\.{d}")
    })
}

/// The fraction part of the numbers `<= 0.F` (`< 0.F` if `excl`); `None` if there is none.
fn frac_le(f: &str, excl: bool) -> Option<String> {
    let zero_in = !f.is_empty() || !excl;
    match (zero_in, le_digits(f, excl)) {
        (true, Some(d)) => Some(format!("(?:\\.{d})?")),
        (false, Some(d)) => Some(format!("\\.{d}")),
        (true, None) => Some(String::new()),
        (false, None) => None,
    }
}

/// Non-empty digit strings `d` with `0.d >= 0.F` (`>` if `excl`).
fn ge_digits(f: &str, excl: bool) -> String {
    if f.is_empty() {
        return if excl { "[0-9]*[1-9][0-9]*" } else { "[0-9]+" }.to_string();
    }
    let mut alts = Vec::new();
    for (i, c) in f.bytes().enumerate() {
        if c < b'9' {
            alts.push(format!("{}[{}-9][0-9]*", &f[..i], (c + 1) as char));
        }
    }
    alts.push(if excl {
        format!("{f}[0-9]*[1-9][0-9]*")
    } else {
        format!("{f}[0-9]*")
    });
    format!("(?:{})", alts.join("|"))
}

/// Non-empty digit strings `d` with `0.d <= 0.F` (`<` if `excl`); `None` if there is none.
fn le_digits(f: &str, excl: bool) -> Option<String> {
    if f.is_empty() {
        return (!excl).then(|| "0+".to_string());
    }
    let mut alts = Vec::new();
    for (i, c) in f.bytes().enumerate() {
        if c > b'0' {
            alts.push(format!("{}[0-{}][0-9]*", &f[..i], (c - 1) as char));
        }
    }
    // A proper prefix of F then zeros is less (F ends in a non-zero digit).
    for k in 1..f.len() {
        alts.push(format!("{}0*", &f[..k]));
    }
    if !excl {
        alts.push(format!("{f}0*"));
    }
    Some(format!("(?:{})", alts.join("|")))
}

/// Non-empty digit strings `d` with `0.A <= 0.d <= 0.B` (either end exclusive by its flag), for
/// `0.A <= 0.B`; `None` if there is none.
fn between_digits(a: &str, ea: bool, b: &str, eb: bool) -> Option<String> {
    let n = a.len().max(b.len()).max(1);
    let pad = |x: &str| format!("{x:0<n$}");
    let (pa, pb) = (pad(a), pad(b));
    let Some(i) = pa.bytes().zip(pb.bytes()).position(|(x, y)| x != y) else {
        // 0.A == 0.B
        if ea || eb {
            return None;
        }
        return Some(if a.is_empty() {
            "0+".to_string()
        } else {
            format!("{a}0*")
        });
    };
    let (x, y) = (pa.as_bytes()[i], pb.as_bytes()[i]);
    let prefix = &pa[..i];
    let rest = |p: &str| p[i + 1..].trim_end_matches('0').to_string();
    let mut alts = Vec::new();
    // d = P x r with 0.r >= 0.(A after i); r may be empty when that rest is 0.
    let ra = rest(&pa);
    let ge = ge_digits(&ra, ea);
    alts.push(if ra.is_empty() && !ea {
        format!("{prefix}{}(?:{ge})?", x as char)
    } else {
        format!("{prefix}{}{ge}", x as char)
    });
    if x + 1 < y {
        alts.push(format!(
            "{prefix}[{}-{}][0-9]*",
            (x + 1) as char,
            (y - 1) as char
        ));
    }
    let rb = rest(&pb);
    let le = le_digits(&rb, eb);
    let zero_ok = !rb.is_empty() || !eb;
    match (zero_ok, le) {
        (true, Some(l)) => alts.push(format!("{prefix}{}(?:{l})?", y as char)),
        (false, Some(l)) => alts.push(format!("{prefix}{}{l}", y as char)),
        (true, None) => alts.push(format!("{prefix}{}", y as char)),
        (false, None) => {}
    }
    Some(format!("(?:{})", alts.join("|")))
}

/// Decimal strings of the integers in `lo..=hi`, as a pattern.
fn int_range(lo: i64, hi: i64) -> String {
    // `i64::MIN` / `i64::MAX` stand for no bound.
    let upper = (hi != i64::MAX).then_some(hi);
    let lower = (lo != i64::MIN).then_some(lo);
    let mut alts = Vec::new();
    // Negative numbers: `-n` for n in max(1, -hi)..=-lo.
    if lower.is_none_or(|l| l < 0) {
        let from = match upper {
            Some(h) if h < 0 => h.unsigned_abs(),
            _ => 1,
        };
        alts.push(format!(
            "-{}",
            nat_range(from, lower.map(i64::unsigned_abs))
        ));
    }
    // Zero and positive numbers: max(0, lo)..=hi.
    if upper.is_none_or(|h| h >= 0) {
        let from = lower.map_or(0, |l| l.max(0) as u64);
        alts.push(nat_range(from, upper.map(|h| h as u64)));
        if from == 0 {
            alts.push("-0".to_string());
        }
    }
    format!("(?:{})", alts.join("|"))
}

/// Natural numbers in `lo..=hi` (`None`: unbounded), no leading zeros.
fn nat_range(lo: u64, hi: Option<u64>) -> String {
    let digits = |x: u64| x.to_string().len();
    let mut alts = Vec::new();
    let top_len = hi.map_or(digits(lo), digits);
    for len in digits(lo)..=top_len {
        let a = if len == digits(lo) {
            lo
        } else {
            10u64.pow(len as u32 - 1)
        };
        let b = match hi {
            Some(h) if len == top_len => h,
            _ => 10u64.saturating_pow(len as u32).saturating_sub(1),
        };
        if a <= b {
            alts.push(same_len(&a.to_string(), &b.to_string()));
        }
    }
    if hi.is_none() {
        alts.push(format!("[1-9][0-9]{{{},}}", top_len));
    }
    format!("(?:{})", alts.join("|"))
}

/// Decimal strings of equal length between `a` and `b` (inclusive).
fn same_len(a: &str, b: &str) -> String {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    if x.is_empty() {
        return String::new();
    }
    // The full range of this length: one class (keeps the recursion linear in the digits).
    if x.iter().all(|&c| c == b'0') && y.iter().all(|&c| c == b'9') {
        return format!("[0-9]{{{}}}", x.len());
    }
    if x.len() == 1 {
        return if x[0] == y[0] {
            (x[0] as char).to_string()
        } else {
            format!("[{}-{}]", x[0] as char, y[0] as char)
        };
    }
    if x[0] == y[0] {
        return format!("{}{}", x[0] as char, same_len(&a[1..], &b[1..]));
    }
    let n = x.len() - 1;
    let mut alts = vec![format!(
        "{}{}",
        x[0] as char,
        same_len(&a[1..], &"9".repeat(n))
    )];
    if y[0] > x[0] + 1 {
        alts.push(format!(
            "[{}-{}][0-9]{{{n}}}",
            (x[0] + 1) as char,
            (y[0] - 1) as char
        ));
    }
    alts.push(format!(
        "{}{}",
        y[0] as char,
        same_len(&"0".repeat(n), &b[1..])
    ));
    format!("(?:{})", alts.join("|"))
}

fn format_pattern(f: &str) -> Option<String> {
    // Days per month; 29 February only in leap years (as `datetime.date.fromisoformat`).
    const DATE: &str = "(?:[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)-02-29)";
    const TIME: &str =
        "(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])";
    const OCTET: &str = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
    Some(match f {
        "date" => DATE.to_string(),
        "time" => TIME.to_string(),
        "date-time" => format!("{DATE}[Tt]{TIME}"),
        "uuid" => "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
            .to_string(),
        "ipv4" => format!("{OCTET}(?:\\.{OCTET}){{3}}"),
        // RFC 5321 (4.1.2) Mailbox: a Dot-string local part (not the Quoted-string form), at
        // sub-domains (no length limit in its grammar) or an IPv4 / IPv6 address literal.
        "email" => {
            let atext = r"[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]+";
            let label = "[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?";
            format!(
                "{atext}(?:\\.{atext})*@(?:{label}(?:\\.{label})*|\\[(?:{OCTET}(?:\\.{OCTET}){{3}}|IPv6:{})\\])",
                ipv6()
            )
        }
        "ipv6" => ipv6(),
        "uri" => uri(),
        _ => return None,
    })
}

/// RFC 3986 `IPv6address` (section 3.2.2), exactly: `h16` groups around one optional `::`,
/// the last 32 bits possibly an IPv4 address.
fn ipv6() -> String {
    const H16: &str = "[0-9A-Fa-f]{1,4}";
    let ipv4 = "(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
    let ls32 = format!("(?:{H16}:{H16}|{ipv4})");
    let groups = |n: usize| format!("(?:{H16}:){{{n}}}");
    let mut alts = vec![
        format!("{}{ls32}", groups(6)),
        format!("::{}{ls32}", groups(5)),
    ];
    // `[ *k( h16 ":" ) h16 ] "::"` then the rest, for k = 0..=6.
    for k in 0..=6usize {
        let before = if k == 0 {
            format!("(?:{H16})?")
        } else {
            format!("(?:(?:{H16}:){{0,{k}}}{H16})?")
        };
        let after = match k {
            0..=3 => format!("{}{ls32}", groups(4 - k)),
            4 => ls32.clone(),
            5 => H16.to_string(),
            _ => String::new(),
        };
        alts.push(format!("{before}::{after}"));
    }
    format!("(?:{})", alts.join("|"))
}

/// An RFC 3986 `URI` (section 3): scheme, `:`, hier-part (`//` authority path, or an absolute,
/// rootless or empty path), optional query and fragment.
fn uri() -> String {
    let unreserved = "A-Za-z0-9._~\\-";
    let sub_delims = "!$&'()*+,;=";
    let pct = "%[0-9A-Fa-f]{2}";
    let pchar = format!("(?:[{unreserved}{sub_delims}:@]|{pct})");
    let segment = format!("{pchar}*");
    let segment_nz = format!("{pchar}+");
    let userinfo = format!("(?:[{unreserved}{sub_delims}:]|{pct})*");
    let ip_future = format!("v[0-9A-Fa-f]+\\.[{unreserved}{sub_delims}:]+");
    let ipv4 = "(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
    let reg_name = format!("(?:[{unreserved}{sub_delims}]|{pct})*");
    let host = format!("(?:\\[(?:{}|{ip_future})\\]|{ipv4}|{reg_name})", ipv6());
    let authority = format!("(?:{userinfo}@)?{host}(?::[0-9]*)?");
    let abempty = format!("(?:/{segment})*");
    let absolute = format!("/(?:{segment_nz}(?:/{segment})*)?");
    let rootless = format!("{segment_nz}(?:/{segment})*");
    let hier = format!("(?://{authority}{abempty}|{absolute}|{rootless}|)");
    let tail = format!("(?:{pchar}|[/?])*");
    format!("[A-Za-z][A-Za-z0-9+.-]*:{hier}(?:\\?{tail})?(?:#{tail})?")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

// ---- `pattern`: an ECMA-style regex over the string's characters → a pattern over its JSON
// text (escapes included), anchored as JSON Schema says (a pattern matches anywhere unless
// anchored with `^`/`$`).

fn string_pattern(p: &str) -> R<String> {
    let p = &ecma_classes(p)?;
    let hir = regex_syntax::ParserBuilder::new()
        .nest_limit(100)
        .build()
        .parse(p)
        .map_err(|e| Fail::Unsupported(format!("`pattern` {p:?}: {e}")))?;
    let out = anchored(&hir)?;
    Ok(out.to_string())
}

/// For a `pattern` that is one character class repeated over the whole string (`^C{m,n}$`,
/// `^C+$`, `^C*$`, `^C$`, captures aside): the JSON text of one character of C and the counts.
fn class_repetition(p: &str) -> R<Option<(String, u32, Option<u32>)>> {
    let p = ecma_classes(p)?;
    let Ok(hir) = regex_syntax::ParserBuilder::new()
        .nest_limit(100)
        .build()
        .parse(&p)
    else {
        return Ok(None);
    };
    fn bare(h: &Hir) -> &Hir {
        match h.kind() {
            HirKind::Capture(c) => bare(&c.sub),
            _ => h,
        }
    }
    let HirKind::Concat(v) = bare(&hir).kind() else {
        return Ok(None);
    };
    let [first, x, last] = v.as_slice() else {
        return Ok(None);
    };
    if !matches!(first.kind(), HirKind::Look(Look::Start))
        || !matches!(last.kind(), HirKind::Look(Look::End))
    {
        return Ok(None);
    }
    let (class, min, max) = match bare(x).kind() {
        HirKind::Repetition(r) => match bare(&r.sub).kind() {
            HirKind::Class(Class::Unicode(c)) => (c, r.min, r.max),
            _ => return Ok(None),
        },
        HirKind::Class(Class::Unicode(c)) => (c, 1, Some(1)),
        _ => return Ok(None),
    };
    Ok(Some((json_char_hir(class).to_string(), min, max)))
}

/// `\s`: ECMA-262's whitespace (WhiteSpace and LineTerminator) but U+FEFF, which Python's `re`
/// (the validator the proof runs) does not count as whitespace: a string we allow is valid for
/// both.
const ECMA_SPACE: &str =
    r"\t\n\x0B\x0C\r \xA0\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}";

/// `pattern` with the classes whose meaning differs between ECMA-262 (JSON Schema's regex
/// dialect) and Rust's `regex` written out as ECMA-262 means them: `\d` and `\w` are ASCII
/// (`[0-9]`, `[0-9A-Za-z_]`), `\s` is [`ECMA_SPACE`] (no U+0085), and `.` leaves out every line
/// terminator (`\n`, `\r`, U+2028, U+2029), not only `\n`. Nested classes keep it exact inside
/// brackets (`[^\d.]` becomes `[^[0-9].]`).
fn ecma_classes(pattern: &str) -> R<String> {
    use regex_syntax::ast::{self, Ast, ClassPerlKind, ClassSetItem};
    struct Spans(Vec<(usize, usize, String)>);
    fn perl(c: &ast::ClassPerl) -> (usize, usize, String) {
        let set = match c.kind {
            ClassPerlKind::Digit => "0-9",
            ClassPerlKind::Word => "0-9A-Za-z_",
            ClassPerlKind::Space => ECMA_SPACE,
        };
        let neg = if c.negated { "^" } else { "" };
        (
            c.span.start.offset,
            c.span.end.offset,
            format!("[{neg}{set}]"),
        )
    }
    impl ast::Visitor for Spans {
        type Output = Vec<(usize, usize, String)>;
        type Err = ();
        fn finish(self) -> Result<Self::Output, ()> {
            Ok(self.0)
        }
        fn visit_pre(&mut self, a: &Ast) -> Result<(), ()> {
            match a {
                Ast::ClassPerl(c) => self.0.push(perl(c)),
                Ast::Dot(span) => self.0.push((
                    span.start.offset,
                    span.end.offset,
                    r"[^\n\r\x{2028}\x{2029}]".to_string(),
                )),
                _ => {}
            }
            Ok(())
        }
        fn visit_class_set_item_pre(&mut self, item: &ClassSetItem) -> Result<(), ()> {
            if let ClassSetItem::Perl(c) = item {
                self.0.push(perl(c));
            }
            Ok(())
        }
    }
    let parsed = ast::parse::ParserBuilder::new()
        .nest_limit(100)
        .build()
        .parse(pattern)
        .map_err(|e| Fail::Unsupported(format!("`pattern` {pattern:?}: {e}")))?;
    let mut spans = ast::visit(&parsed, Spans(Vec::new())).unwrap_or_default();
    if spans.is_empty() {
        return Ok(pattern.to_string());
    }
    spans.sort_unstable_by_key(|x| x.0);
    let mut out = String::with_capacity(pattern.len() + 16 * spans.len());
    let mut at = 0;
    for (a, b, text) in spans {
        out.push_str(&pattern[at..a]);
        out.push_str(&text);
        at = b;
    }
    out.push_str(&pattern[at..]);
    Ok(out)
}

/// Any string characters (`.*` around an unanchored `pattern`), built once.
fn any_chars() -> Hir {
    static ANY: std::sync::OnceLock<Hir> = std::sync::OnceLock::new();
    ANY.get_or_init(|| {
        Hir::repetition(hir::Repetition {
            min: 0,
            max: None,
            greedy: true,
            sub: Box::new(json_char_hir(&ClassUnicode::new([ClassUnicodeRange::new(
                '\0',
                char::MAX,
            )]))),
        })
    })
    .clone()
}

fn anchored(h: &Hir) -> R<Hir> {
    match h.kind() {
        HirKind::Alternation(v) => Ok(Hir::alternation(
            v.iter().map(anchored).collect::<R<Vec<_>>>()?,
        )),
        HirKind::Capture(c) => anchored(&c.sub),
        _ => {
            // `^` (`$`) where every path of the pattern starts (ends) with it, however nested
            // (regex-syntax factors `^$|^a$` into `^(?:$|a$)`): dropped, and no other text
            // may come before (after).
            let (h, start) =
                strip_look(h, Look::Start, true).map_or((h.clone(), false), |x| (x, true));
            let (h, end) = strip_look(&h, Look::End, false).map_or((h, false), |x| (x, true));
            let mut parts = Vec::new();
            if !start {
                parts.push(any_chars());
            }
            parts.push(transform(&h)?);
            if !end {
                parts.push(any_chars());
            }
            Ok(Hir::concat(parts))
        }
    }
}

/// `h` without the `look` assertion that every path through it starts with (`front`) or ends
/// with, if every path does.
fn strip_look(h: &Hir, look: Look, front: bool) -> Option<Hir> {
    match h.kind() {
        HirKind::Look(l) if *l == look => Some(Hir::empty()),
        HirKind::Capture(c) => strip_look(&c.sub, look, front).map(group),
        HirKind::Concat(v) if !v.is_empty() => {
            let mut v = v.clone();
            let i = if front { 0 } else { v.len() - 1 };
            v[i] = strip_look(&v[i], look, front)?;
            Some(Hir::concat(v))
        }
        HirKind::Alternation(v) => Some(Hir::alternation(
            v.iter()
                .map(|x| strip_look(x, look, front))
                .collect::<Option<Vec<_>>>()?,
        )),
        _ => None,
    }
}

/// The JSON text of one character of `class`: plain characters as they are, the others as
/// their escapes.
fn json_char_hir(class: &ClassUnicode) -> Hir {
    let mut plain = class.clone();
    plain.intersect(&ClassUnicode::new([
        ClassUnicodeRange::new('\u{20}', '\u{21}'),
        ClassUnicodeRange::new('\u{23}', '\u{5b}'),
        ClassUnicodeRange::new('\u{5d}', char::MAX),
    ]));
    let mut alts = vec![Hir::class(Class::Unicode(plain))];
    let has = |c: char| {
        class
            .ranges()
            .iter()
            .any(|r| r.start() <= c && c <= r.end())
    };
    for c in ['"', '\\', '/'] {
        if has(c) {
            alts.push(Hir::literal(format!("\\{c}").into_bytes()));
        }
    }
    for code in 0u32..0x20 {
        let c = char::from_u32(code).unwrap_or('\0');
        if !has(c) {
            continue;
        }
        if let Some(short) = match c {
            '\u{8}' => Some('b'),
            '\u{c}' => Some('f'),
            '\n' => Some('n'),
            '\r' => Some('r'),
            '\t' => Some('t'),
            _ => None,
        } {
            alts.push(Hir::literal(format!("\\{short}").into_bytes()));
        }
    }
    // `\uXXXX` for any character of the class in the Basic Multilingual Plane is allowed by
    // JSON; we accept it for the characters that must be escaped (controls), as serializers
    // write them.
    let mut ctrl = class.clone();
    ctrl.intersect(&ClassUnicode::new([ClassUnicodeRange::new('\0', '\u{1f}')]));
    for r in ctrl.ranges() {
        for code in r.start() as u32..=r.end() as u32 {
            alts.push(control_escape(code));
        }
    }
    Hir::alternation(alts)
}

/// `\u00XX` for a control character (hex digits in either case).
fn control_escape(code: u32) -> Hir {
    let lo = char::from_digit(code & 15, 16).unwrap_or('0');
    let lo = ClassUnicode::new([
        ClassUnicodeRange::new(lo, lo),
        ClassUnicodeRange::new(lo.to_ascii_uppercase(), lo.to_ascii_uppercase()),
    ]);
    Hir::concat(vec![
        Hir::literal(format!("\\u00{}", code >> 4).into_bytes()),
        Hir::class(Class::Unicode(lo)),
    ])
}

/// `h` in a group (a capture: the pattern is printed and parsed again, so its index is moot).
fn group(h: Hir) -> Hir {
    Hir::capture(hir::Capture {
        index: 1,
        name: None,
        sub: Box::new(h),
    })
}

fn transform(h: &Hir) -> R<Hir> {
    Ok(match h.kind() {
        HirKind::Empty => Hir::empty(),
        HirKind::Literal(hir::Literal(bytes)) => {
            let s = std::str::from_utf8(bytes)
                .map_err(|_| Fail::Unsupported("a `pattern` literal that is not UTF-8".into()))?;
            Hir::concat(
                s.chars()
                    .map(|c| json_char_hir(&ClassUnicode::new([ClassUnicodeRange::new(c, c)])))
                    .collect(),
            )
        }
        HirKind::Class(Class::Unicode(c)) => json_char_hir(c),
        HirKind::Class(Class::Bytes(_)) => return unsupported("a byte class in `pattern`"),
        HirKind::Look(_) => return unsupported("an anchor or boundary inside `pattern`"),
        HirKind::Repetition(r) => {
            let mut sub = transform(&r.sub)?;
            if matches!(sub.kind(), HirKind::Repetition(_)) {
                // The printer writes `x+` then `?` as `x+?` (lazy): group it.
                sub = group(sub);
            }
            Hir::repetition(hir::Repetition {
                min: r.min,
                max: r.max,
                greedy: r.greedy,
                sub: Box::new(sub),
            })
        }
        HirKind::Capture(c) => group(transform(&c.sub)?),
        HirKind::Concat(v) => Hir::concat(v.iter().map(transform).collect::<R<Vec<_>>>()?),
        HirKind::Alternation(v) => {
            Hir::alternation(v.iter().map(transform).collect::<R<Vec<_>>>()?)
        }
    })
}

/// An object's members both ways, for tests: the flat pattern, and the fragments' entry marker
/// with the fragments.
#[cfg(test)]
pub(crate) fn members_both_ways(
    items: &[(String, bool)],
    extra: Option<&str>,
    whitespace: Option<&str>,
) -> (String, String, Vec<(u32, String)>) {
    let root = Value::Null;
    let mut e = Emitter {
        root: &root,
        w: whitespace.map_or(String::new(), optional),
        rules: Vec::new(),
        ref_rules: HashMap::new(),
        ref_inline: HashMap::new(),
        pattern_texts: HashMap::new(),
        pattern_vms: HashMap::new(),
        expanding: Vec::new(),
        any_rule: None,
        string_rules: HashMap::new(),
        w_first: None,
        pattern_bytes: 0,
        depth: 0,
        fragments: Vec::new(),
        fragment_refs: Vec::new(),
        made: HashMap::new(),
        fragment_ids: HashMap::new(),
    };
    let w = e.w.clone();
    let (flat, _) = object_body(items, extra, &w);
    let entry = e.object_fragments(items, extra).unwrap_or_default();
    let frags = e
        .fragments
        .into_iter()
        .enumerate()
        .map(|(i, f)| (i as u32, f))
        .collect();
    (flat, entry, frags)
}
