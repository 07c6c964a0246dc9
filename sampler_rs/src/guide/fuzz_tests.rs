//! Robustness fuzzing of every guide compiler (issue 4: "no panic, no hang"), with proptest.
//!
//! Each case compiles one generated [`GuideSpec`] on the toy vocabulary of `guide::tests`, on a
//! worker thread with a small (2 MiB) stack, and, if it compiles, walks the guide for up to
//! [`STEPS`] seeded random tokens. Properties:
//!
//! - **No panic.** Compiling and walking run under `catch_unwind`; a panic fails the case with
//!   the input (spec and walk seed) in the message.
//! - **No hang.** The test waits at most [`HANG_SECS`] for the worker; compiling must take
//!   under [`COMPILE_SECS`] and the walk under [`WALK_SECS`].
//! - **Clean rejection.** A compile returns `Ok` or `Err`; the empty `choice` list is an `Err`.
//! - **The walk keeps the mask conventions.** At every step `fill_mask` succeeds (an llguidance
//!   step may fail with an engine error, which ends the walk), bits past the vocabulary and of
//!   non-EOS special tokens are clear, EOS is allowed iff [`GuideState::is_accepting`],
//!   [`GuideState::is_finished`] implies only EOS is allowed (on the DFA engine also the
//!   converse, and a mask is never empty); disallowed tokens are refused and change nothing
//!   (the mask is the same afterwards); a clone has the same mask; the token picked from the
//!   mask is accepted (or, on llguidance only, the matcher hit one of its limits and now allows
//!   nothing); after EOS the state is ended, finished and allows nothing.
//! - **`choice` is exact.** Every choice is accepted byte by byte, a probe string iff it is one.
//!
//! Inputs: regexes from a grammar of regex syntax and arbitrary or mutated strings; choice
//! lists with empty strings, duplicates and prefixes; recursive JSON Schemas (every type,
//! bounds, patterns, enums, combinators, `$ref`s into `$defs`) and arbitrary JSON or text;
//! GBNF and Lark grammars, mutated grammars and arbitrary text; long chains of rules or
//! `$ref`s (llguidance's deepest recursion).
//!
//! Time bounds. On the 2-core development machine (release build, other jobs running) the
//! slowest compile seen in these tests was 2.8 s (a regex near the determinization budget; the
//! slowest known regex takes ~6 s, see `DfaLimits::determinize_bytes`) and the slowest walk
//! 0.2 s. The bounds are 15 s and 5 s, ×10 in debug builds, which also run a quarter of the
//! cases. The whole file takes ~6-14 s in release on that machine (~25 s in debug).

use std::panic::{self, AssertUnwindSafe};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Map, Value};

use super::tests::toy_vocab;
use super::*;
use crate::guide::mask;
use crate::sampling::Rng;

/// Most tokens walked per compiled guide.
const STEPS: usize = 20;
/// Bound on one compile, seconds (release build).
const COMPILE_SECS: u64 = 15;
/// Bound on one walk of [`STEPS`] steps, seconds (release build).
const WALK_SECS: u64 = 5;
/// How long the test waits for a case's worker before calling it a hang, seconds.
const HANG_SECS: u64 = 60;
/// Stack of a case's worker: small, as a caller's thread may have (llguidance's recursion must
/// not depend on the caller's stack).
const WORKER_STACK_BYTES: usize = 2 << 20;

fn bound(secs: u64) -> Duration {
    let slowdown = if cfg!(debug_assertions) { 10 } else { 1 };
    Duration::from_secs(secs * slowdown)
}

/// One toy vocabulary shared by every case (and thread), as a served model's is.
fn vocab() -> &'static Vocabulary {
    static VOCAB: OnceLock<Vocabulary> = OnceLock::new();
    VOCAB.get_or_init(toy_vocab)
}

/// The token of the single byte `b` in the toy vocabulary.
fn byte_token(b: u8) -> TokenId {
    4 + TokenId::from(b)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

type Check = Box<dyn FnOnce(&Guide) -> std::result::Result<(), String> + Send>;

/// What a case's worker sends back: compile time, walk time and the compile error if any; or
/// a panic or a violated property, described.
type WorkerResult = std::result::Result<(Duration, Duration, Option<GuideError>), String>;

/// Compiles `spec`, walks the guide with `seed`, runs `extra` on it; fails on a panic, a hang,
/// an over-time compile or walk, or a violated property. Returns the compile error, if any.
fn check_spec(
    spec: &GuideSpec,
    seed: u64,
    extra: Option<Check>,
) -> std::result::Result<Option<GuideError>, TestCaseError> {
    let (tx, rx) = mpsc::channel::<WorkerResult>();
    let worker_spec = spec.clone();
    std::thread::Builder::new()
        .name("guide-fuzz-case".into())
        .stack_size(WORKER_STACK_BYTES)
        .spawn(move || {
            let t0 = Instant::now();
            let compiled =
                panic::catch_unwind(AssertUnwindSafe(|| Guide::compile(vocab(), &worker_spec)));
            let compile_time = t0.elapsed();
            let result = match compiled {
                Err(p) => Err(format!("compile panicked: {}", panic_message(&*p))),
                Ok(Err(e)) => Ok((compile_time, Duration::ZERO, Some(e))),
                Ok(Ok(guide)) => {
                    let t1 = Instant::now();
                    let walked = panic::catch_unwind(AssertUnwindSafe(|| {
                        walk(&guide, seed)?;
                        extra.map_or(Ok(()), |f| f(&guide))
                    }));
                    match walked {
                        Err(p) => Err(format!("walk panicked: {}", panic_message(&*p))),
                        Ok(Err(v)) => Err(format!("property violated: {v}")),
                        Ok(Ok(())) => Ok((compile_time, t1.elapsed(), None)),
                    }
                }
            };
            let _ = tx.send(result);
        })
        .map_err(|e| TestCaseError::fail(format!("cannot spawn a worker: {e}")))?;
    let hang = bound(HANG_SECS);
    let (compile_time, walk_time, rejected) = match rx.recv_timeout(hang) {
        Ok(Ok(r)) => r,
        Ok(Err(msg)) => {
            return Err(TestCaseError::fail(format!(
                "{msg}\n  spec: {spec:?}\n  walk seed: {seed}"
            )))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // The worker is left running; the test fails.
            return Err(TestCaseError::fail(format!(
                "no result after {hang:?} (hang)\n  spec: {spec:?}\n  walk seed: {seed}"
            )));
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            return Err(TestCaseError::fail(format!(
                "the worker died without a result\n  spec: {spec:?}\n  walk seed: {seed}"
            )));
        }
    };
    if compile_time > bound(COMPILE_SECS) {
        return Err(TestCaseError::fail(format!(
            "compile took {compile_time:?} (bound {:?}), result {rejected:?}\n  spec: {spec:?}",
            bound(COMPILE_SECS)
        )));
    }
    if walk_time > bound(WALK_SECS) {
        return Err(TestCaseError::fail(format!(
            "walk took {walk_time:?} (bound {:?})\n  spec: {spec:?}\n  walk seed: {seed}",
            bound(WALK_SECS)
        )));
    }
    Ok(rejected)
}

/// A uniform draw from `0..n` (`n > 0`).
fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// Walks up to [`STEPS`] random allowed tokens through `guide`, checking the mask conventions
/// at every step (see the module docs).
fn walk(guide: &Guide, seed: u64) -> std::result::Result<(), String> {
    let vocab = vocab();
    let n = vocab.len();
    let words = mask::words_for(n);
    let eos = vocab.eos_token_ids();
    let is_dfa = matches!(guide.engine(), Engine::TokenwireDfa | Engine::TokenwireJson);
    let mut rng = Rng::seed_from_u64(seed);
    let mut state = GuideState::new(guide);
    // One word of logit-row padding past the vocabulary; buffers start dirty.
    let mut m = vec![u32::MAX; words + 1];
    let mut again = vec![u32::MAX; words + 1];
    let mut trace: Vec<TokenId> = Vec::new();
    for _ in 0..STEPS {
        let at = |what: String, trace: &[TokenId]| format!("{what} (after tokens {trace:?})");
        m.fill(u32::MAX);
        if let Err(e) = state.fill_mask(&mut m) {
            if is_dfa {
                return Err(at(format!("fill_mask failed on a DFA guide: {e}"), &trace));
            }
            // llguidance gave up on this step (a step budget or an internal error, reported as
            // `GuideError::Engine`): the state must stay usable, and refuse tokens.
            for t in 0..n as TokenId {
                if !vocab.is_special(t) && state.advance(t) {
                    return Err(at(format!("token {t} advanced after `{e}`"), &trace));
                }
            }
            let _ = (state.is_accepting(), state.is_finished());
            return Ok(());
        }
        if m[words..].iter().any(|&w| w != 0) || (n..words * 32).any(|t| mask::get(&m, t as u32)) {
            return Err(at("bits past the vocabulary are set".into(), &trace));
        }
        let allowed: Vec<TokenId> = (0..n as TokenId).filter(|&t| mask::get(&m, t)).collect();
        if let Some(t) = allowed
            .iter()
            .find(|&&t| vocab.is_special(t) && !eos.contains(&t))
        {
            return Err(at(format!("special token {t} allowed"), &trace));
        }
        let eos_allowed = eos.iter().any(|&e| mask::get(&m, e));
        let accepting = state.is_accepting();
        if eos_allowed != accepting {
            return Err(at(
                format!("EOS allowed = {eos_allowed} but is_accepting = {accepting}"),
                &trace,
            ));
        }
        let finished = state.is_finished();
        let only_eos = guide.allows_only_eos(&m[..words]);
        if finished && !only_eos {
            return Err(at("finished, yet more than EOS is allowed".into(), &trace));
        }
        // The toy vocabulary has every single byte, so a live DFA state always has a token.
        if is_dfa && only_eos && !finished {
            return Err(at("only EOS allowed, yet not finished".into(), &trace));
        }
        if allowed.is_empty() {
            if is_dfa {
                return Err(at("empty mask in a live DFA state".into(), &trace));
            }
            // llguidance reached a dead end the toy vocabulary cannot leave (e.g. a grammar that
            // wants a special token next): nothing may advance.
            for t in 0..n as TokenId {
                if state.advance(t) {
                    return Err(at(format!("token {t} advanced on an empty mask"), &trace));
                }
            }
            return Ok(());
        }
        // Disallowed tokens are refused and change nothing: all of them on the DFA (cheap), a
        // few random ones on llguidance.
        let refused: Vec<TokenId> = if is_dfa {
            (0..n as TokenId).filter(|&t| !mask::get(&m, t)).collect()
        } else {
            (0..4)
                .map(|_| below(&mut rng, n) as TokenId)
                .filter(|&t| !mask::get(&m, t))
                .collect()
        };
        for &t in &refused {
            if state.advance(t) {
                return Err(at(format!("disallowed token {t} advanced"), &trace));
            }
        }
        if !refused.is_empty() {
            again.fill(u32::MAX);
            state
                .fill_mask(&mut again)
                .map_err(|e| at(format!("fill_mask failed after a refusal: {e}"), &trace))?;
            if again != m {
                return Err(at(format!("refusing {refused:?} changed the mask"), &trace));
            }
        }
        // A clone is at the same position.
        if below(&mut rng, 4) == 0 {
            let mut c = state.clone();
            again.fill(u32::MAX);
            c.fill_mask(&mut again)
                .map_err(|e| at(format!("fill_mask failed on a clone: {e}"), &trace))?;
            if again != m {
                return Err(at("a clone has another mask".into(), &trace));
            }
        }
        // Pick EOS a quarter of the time it is allowed, else a uniform allowed token.
        let t = match eos.iter().find(|&&e| mask::get(&m, e)) {
            Some(&e) if below(&mut rng, 4) == 0 => e,
            _ => allowed[below(&mut rng, allowed.len())],
        };
        if !state.advance(t) {
            // llguidance may hit a limit consuming a token its mask allowed (a row of more than
            // 2,000 Earley items: a chain of 2,000 `anyOf`/`$ref`s). The matcher is then in its
            // error state for good and the sampler reports the refusal; anything else is a bug.
            if let Some(e) = llg_error(&state) {
                m.fill(u32::MAX);
                state.fill_mask(&mut m).map_err(|e| {
                    at(
                        format!("fill_mask failed after an engine error: {e}"),
                        &trace,
                    )
                })?;
                if m.iter().any(|&w| w != 0) || state.advance(t) {
                    return Err(at(
                        format!("tokens allowed after the engine error `{e}`"),
                        &trace,
                    ));
                }
                return Ok(());
            }
            return Err(at(format!("allowed token {t} was refused"), &trace));
        }
        trace.push(t);
        if eos.contains(&t) {
            if !(state.ended() && state.is_finished() && state.is_accepting()) {
                return Err(at("EOS did not end the state".into(), &trace));
            }
            m.fill(u32::MAX);
            state
                .fill_mask(&mut m)
                .map_err(|e| at(format!("fill_mask failed after EOS: {e}"), &trace))?;
            if m.iter().any(|&w| w != 0) {
                return Err(at("tokens allowed after EOS".into(), &trace));
            }
            let t = below(&mut rng, n) as TokenId;
            if state.advance(t) {
                return Err(at(format!("token {t} advanced after EOS"), &trace));
            }
            return Ok(());
        }
    }
    Ok(())
}

/// The error of an llguidance state's matcher, if it is in its error state.
fn llg_error(state: &GuideState) -> Option<String> {
    match &state.kind {
        StateKind::Llg(m) => m.lock().unwrap_or_else(|p| p.into_inner()).get_error(),
        StateKind::Dfa(_) | StateKind::Json(_) => None,
    }
}

/// Whether `text`, fed as single-byte tokens, is accepted by `guide`.
fn accepts(guide: &Guide, text: &[u8]) -> bool {
    let mut s = GuideState::new(guide);
    text.iter().all(|&b| s.advance(byte_token(b))) && s.is_accepting()
}

// ---------------------------------------------------------------------------------------------
// Generators.

/// Regexes from a grammar of regex syntax: literals (multi-byte UTF-8 included), escapes,
/// classes, anchors and look-arounds, groups with flags, alternation, and repetitions with small
/// and large counts. Most are valid; a few pieces are not (`[z-a]`, `{3,1}`, `\\q`, ...) or are
/// valid but not runnable by a DFA (Unicode word boundaries).
fn arb_regex() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        8 => select(vec!["a", "b", "z", "0", "7", " ", "\"", "-", "é", "€", "🙂", "日", "ab"]),
        3 => select(vec![
            "\\.", "\\*", "\\+", "\\?", "\\(", "\\)", "\\[", "\\]", "\\{", "\\}", "\\|", "\\\\",
            "\\^", "\\$", "\\n", "\\t", "\\x41", "\\x{1F642}", "\\u00e9", "\\/", "\\-",
        ]),
        6 => select(vec![
            "[a-z]", "[^a]", "[0-9a-fA-F]", "[é€🙂]", "[a-z&&[^aeiou]]", "[\\w--\\d]",
            "[[:alpha:]]", "[^\\x00-\\x7f]", "[\\x00-\\x{10FFFF}]", "\\d", "\\D", "\\w", "\\W",
            "\\s", "\\S", ".", "(?s:.)", "\\p{L}", "\\P{Greek}", "\\pN",
            "[^\\s\\S]",
        ]),
        2 => select(vec!["^", "$", "\\A", "\\z", "(?m:^)", "(?m:$)", "(?-u:\\b)", "(?-u:\\B)"]),
        1 => select(vec!["", "()", "(?:)", "|"]),
        1 => select(vec![
            "\\q", "\\0", "[z-a]", "[]", "\\b", "\\<", "\\b{end}", "(?P<n>a)", "(", ")",
            "(?-u:.)",
        ]),
    ]
    .prop_map(String::from);
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            3 => prop::collection::vec(inner.clone(), 1..5).prop_map(|v| v.concat()),
            2 => (prop::collection::vec(inner.clone(), 2..4), 0u8..3).prop_map(|(v, k)| {
                let alt = v.join("|");
                match k {
                    0 => format!("({alt})"),
                    1 => format!("(?:{alt})"),
                    _ => alt,
                }
            }),
            3 => (
                inner.clone(),
                prop_oneof![
                    12 => select(vec!["*", "+", "?", "*?", "+?", "{2}", "{0,3}", "{1,}", "{2,2}"]),
                    3 => select(vec!["{1000}", "{0,1000}", "{200,300}", "{100000}"]),
                    1 => select(vec!["{3,1}", "{,2}", "**", "{99999999999}"]),
                ],
            )
                .prop_map(|(r, rep)| format!("(?:{r}){rep}")),
            1 => (inner, select(vec!["(", "(?i:", "(?x:", "(?U:", "(?-u:", "(?i-s:"]))
                .prop_map(|(r, open)| format!("{open}{r})")),
        ]
    })
    .boxed()
}

/// Applies a few random edits (delete, insert, replace a char) to `s`: near-valid inputs.
fn mutate(s: String, edits: Vec<(usize, u8, char)>) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    for (pos, op, c) in edits {
        let i = pos % (chars.len() + 1);
        match op % 3 {
            0 if i < chars.len() => {
                chars.remove(i);
            }
            1 if i < chars.len() => chars[i] = c,
            _ => chars.insert(i, c),
        }
    }
    chars.into_iter().collect()
}

/// Edits for [`mutate`], with characters that matter to regexes, JSON and grammars.
fn arb_edits() -> impl Strategy<Value = Vec<(usize, u8, char)>> {
    let c = prop_oneof![
        3 => select(vec![
            '(', ')', '[', ']', '{', '}', '|', '*', '+', '?', '\\', '"', ':', ',', '=', '/', '.',
            '-', '^', '$', '#', '\n', ' ', '0', '9', 'a', 'é',
        ]),
        1 => any::<char>(),
    ];
    prop::collection::vec((any::<usize>(), any::<u8>(), c), 1..4)
}

/// Completely arbitrary text: printable, any chars, or a regex/grammar-heavy alphabet.
fn arb_text() -> BoxedStrategy<String> {
    prop_oneof![
        "\\PC{0,30}",
        prop::collection::vec(any::<char>(), 0..30).prop_map(|v| v.into_iter().collect()),
        "[\\\\\\[\\](){}|*+?.^$a-c0-9,:=<>!#&~/\"' \\-\\n]{0,40}",
        prop::collection::vec(any::<u8>(), 0..30)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
    .boxed()
}

/// Strings for `choice`: empty, short, multi-byte, regex metacharacters, arbitrary.
fn arb_choice_string() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        4 => "[ab ]{1,4}",
        2 => "\\PC{1,8}",
        1 => select(vec!["é", "€", "🙂", "a.b", "(no)", "\\d", "[x]", "^$", "a|b", "\"", "\n"])
            .prop_map(String::from),
        1 => prop::collection::vec(any::<char>(), 1..6).prop_map(|v| v.into_iter().collect()),
        1 => "[a-z]{40,120}",
    ]
}

/// Choice lists with duplicates and prefixes of each other, and sometimes no choice at all.
fn arb_choices() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        1 => Just(Vec::new()),
        8 => (
            prop::collection::vec(arb_choice_string(), 1..6),
            prop::collection::vec((any::<usize>(), any::<usize>()), 0..6),
        )
            .prop_map(|(mut base, picks)| {
                // Each pick copies a prefix (possibly all, possibly empty) of a base string.
                let n = base.len();
                for (i, len) in picks {
                    let s = &base[i % n];
                    let k = len % (s.chars().count() + 1);
                    base.push(s.chars().take(k).collect());
                }
                base
            }),
    ]
}

const KEYS: &[&str] = &[
    "a", "b", "id", "é", "a b", "\"q\"", "", "$ref", "0", "🙂", "x\ny",
];

fn arb_key() -> impl Strategy<Value = String> {
    select(KEYS).prop_map(String::from)
}

fn arb_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (-5i64..6).prop_map(|n| json!(n)),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => Just(json!(u64::MAX)),
        2 => select(vec![0.5, -2.25, 1e300, -1e-300, 1e20, 0.1, -0.0]).prop_map(|x| json!(x)),
    ]
}

fn arb_len() -> impl Strategy<Value = Value> {
    prop_oneof![
        16 => (0u64..6).prop_map(|n| json!(n)),
        2 => select(vec![1000u64, 100_000, u64::MAX]).prop_map(|n| json!(n)),
        1 => select(vec![json!(-1), json!(2.5), json!("3")]),
    ]
}

/// Arbitrary JSON, with keys mostly drawn from JSON Schema's keywords.
fn arb_json() -> BoxedStrategy<Value> {
    const WORDS: &[&str] = &[
        "type",
        "properties",
        "items",
        "required",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "$ref",
        "$defs",
        "definitions",
        "additionalProperties",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "pattern",
        "format",
        "minItems",
        "maxItems",
        "prefixItems",
        "if",
        "then",
        "else",
        "$schema",
        "$id",
        "x-guidance",
        "description",
        "default",
        "object",
        "array",
        "string",
        "integer",
        "number",
        "boolean",
        "null",
        "a",
        "#/$defs/a",
        "#",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        arb_number(),
        select(WORDS).prop_map(|s| json!(s)),
        "\\PC{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![4 => select(WORDS).prop_map(String::from), 1 => arb_key()],
                    inner
                ),
                0..5,
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Inserts `key: value` into `m` when `value` is `Some`.
fn put(m: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        m.insert(key.to_string(), v);
    }
}

/// JSON Schemas, recursively: every type, string/number/array bounds (valid and not), patterns
/// from [`arb_regex`], enums, consts, combinators, objects and `$ref`s into `$defs` (including
/// recursive, dangling and foreign ones).
fn arb_schema() -> BoxedStrategy<Value> {
    let string = (
        proptest::option::of(arb_len()),
        proptest::option::of(arb_len()),
        proptest::option::weighted(0.4, arb_regex()),
        proptest::option::weighted(
            0.2,
            select(vec!["date-time", "date", "email", "uuid", "uri", "unknown"]),
        ),
    )
        .prop_map(|(min, max, pattern, format)| {
            let mut m = Map::new();
            m.insert("type".into(), json!("string"));
            put(&mut m, "minLength", min);
            put(&mut m, "maxLength", max);
            put(&mut m, "pattern", pattern.map(Value::String));
            put(&mut m, "format", format.map(|f| json!(f)));
            Value::Object(m)
        });
    let numeric = (
        select(vec!["integer", "number"]),
        proptest::option::of(arb_number()),
        proptest::option::of(arb_number()),
        proptest::option::weighted(0.2, arb_number()),
        proptest::option::weighted(0.2, arb_number()),
        proptest::option::weighted(0.1, arb_number()),
    )
        .prop_map(|(ty, min, max, xmin, xmax, multiple)| {
            let mut m = Map::new();
            m.insert("type".into(), json!(ty));
            put(&mut m, "minimum", min);
            put(&mut m, "maximum", max);
            put(&mut m, "exclusiveMinimum", xmin);
            put(&mut m, "exclusiveMaximum", xmax);
            put(&mut m, "multipleOf", multiple);
            Value::Object(m)
        });
    let leaf = prop_oneof![
        2 => select(vec![
            json!(true),
            json!(false),
            json!({}),
            json!({"type": "boolean"}),
            json!({"type": "null"}),
            json!({"type": ["string", "null"]}),
            json!({"type": "frobnicate"}),
            json!({"type": []}),
        ]),
        3 => string,
        3 => numeric,
        1 => prop::collection::vec(arb_json(), 0..4).prop_map(|v| json!({ "enum": v })),
        1 => arb_json().prop_map(|v| json!({ "const": v })),
        1 => select(vec![
            "#/$defs/a", "#/$defs/b", "#", "#/$defs/missing", "#/properties/a", "other.json#",
            "#/$defs/a/properties/b",
        ])
        .prop_map(|r| json!({ "$ref": r })),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            3 => (
                prop::collection::vec((arb_key(), inner.clone()), 0..4),
                proptest::option::of(prop::collection::vec(arb_key(), 0..3)),
                proptest::option::of(prop_oneof![
                    any::<bool>().prop_map(Value::Bool),
                    inner.clone(),
                ]),
            )
                .prop_map(|(props, required, additional)| {
                    let mut m = Map::new();
                    m.insert("type".into(), json!("object"));
                    let props: Map<String, Value> = props.into_iter().collect();
                    m.insert("properties".into(), Value::Object(props));
                    put(&mut m, "required", required.map(|r| json!(r)));
                    put(&mut m, "additionalProperties", additional);
                    Value::Object(m)
                }),
            2 => (
                proptest::option::of(inner.clone()),
                proptest::option::of(arb_len()),
                proptest::option::of(arb_len()),
                proptest::option::weighted(0.2, prop::collection::vec(inner.clone(), 0..3)),
            )
                .prop_map(|(items, min, max, prefix)| {
                    let mut m = Map::new();
                    m.insert("type".into(), json!("array"));
                    put(&mut m, "items", items);
                    put(&mut m, "minItems", min);
                    put(&mut m, "maxItems", max);
                    put(&mut m, "prefixItems", prefix.map(Value::Array));
                    Value::Object(m)
                }),
            2 => (
                select(vec!["anyOf", "oneOf", "allOf"]),
                prop::collection::vec(inner.clone(), 0..4),
            )
                .prop_map(|(k, v)| json!({ k: v })),
            1 => (inner, 0u8..8).prop_map(|(s, k)| match k {
                // `not` (beyond `{}` and types, unsupported): refused, never ignored.
                0 => json!({ "not": s }),
                _ => s,
            }),
        ]
    })
    .boxed()
}

/// A schema whose root carries `$defs` `a` and `b` (which may refer to each other or the
/// root), or a bare generated schema.
fn arb_root_schema() -> BoxedStrategy<Value> {
    prop_oneof![
        2 => arb_schema(),
        1 => (arb_schema(), arb_schema(), arb_schema()).prop_map(|(root, a, b)| {
            let defs = json!({ "a": a, "b": b });
            match root {
                Value::Object(mut m) => {
                    m.insert("$defs".into(), defs);
                    Value::Object(m)
                }
                other => json!({ "allOf": [other], "$defs": defs }),
            }
        }),
    ]
    .boxed()
}

fn arb_whitespace() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        4 => Just(None),
        3 => select(vec![" ", "[ \\t\\n]*", "\\s{0,4}", "", " ?", "(", "a*", "\\n+"])
            .prop_map(|s| Some(s.to_string())),
        1 => arb_regex().prop_map(Some),
    ]
    .boxed()
}

/// GBNF grammars: rules `root`, `r1`, `x-y` and `A2` (each defined once, in any order) over
/// literals (with escapes), classes, `.`, rule references (left recursion included), groups,
/// alternations and repetitions; a few pieces are invalid (`"\\xZZ"`, `[z-a]`, `{,}`, an
/// undefined rule).
fn arb_gbnf() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        8 => select(vec![
            "\"a\"", "\"abc\"", "\"é\"", "\"🙂\"", "\"\\n\"", "\"\\x41\"", "\"\\u00e9\"",
            "\"\\U0001F642\"", "\"\\\"\"", "\"\"", "\"a b\"", "[a-z]", "[^\"\\\\]", "[0-9]", "[é-ü]",
            ".", "[\\x00-\\x7f]", "[-]", "[a-]",
        ]),
        4 => select(vec!["root", "r1", "x-y", "A2"]),
        1 => select(vec!["\"\\xZZ\"", "[z-a]", "[]", "[^]", "undefined-rule", "\"\\", "[a"]),
    ]
    .prop_map(String::from);
    let expr = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            3 => prop::collection::vec(inner.clone(), 1..4).prop_map(|v| v.join(" ")),
            2 => prop::collection::vec(inner.clone(), 2..4).prop_map(|v| v.join(" | ")),
            1 => inner.clone().prop_map(|r| format!("( {r} )")),
            2 => (
                inner,
                prop_oneof![
                    8 => select(vec!["*", "+", "?", "{2}", "{0,3}", "{1,}", "{1000}"]),
                    1 => select(vec!["{,}", "{3,1}", "{a}", "{"]),
                ],
            )
                .prop_map(|(r, rep)| format!("({r}){rep}")),
        ]
    });
    (
        prop::collection::vec(
            (
                expr,
                select(vec!["\n", "\n\n", "  # a comment\n", "\n    "]),
            ),
            4,
        ),
        Just(vec!["root", "r1", "x-y", "A2"]).prop_shuffle(),
    )
        .prop_map(|(bodies, names)| {
            names
                .into_iter()
                .zip(bodies)
                .map(|(name, (body, sep))| format!("{name} ::= {body}{sep}"))
                .collect()
        })
        .boxed()
}

/// Lark grammars as llguidance reads them: rules `start`, `r1`, `r2` and terminals `A`, `B`
/// over literals, `/regex/`s from [`arb_regex`], ranges, optional `[..]`, repetitions, `~`, and
/// llguidance's extensions (`%json`, special-token references, `%ignore`); a few pieces are
/// invalid.
fn arb_lark() -> BoxedStrategy<String> {
    let terminal = prop_oneof![
        4 => select(vec![
            "\"a\"", "\"abc\"", "\"é\"", "\"\\n\"", "\"\"", "/[a-z]+/", "\"a\"..\"z\"", "/(?i)ab/",
        ])
        .prop_map(String::from),
        1 => arb_regex().prop_map(|r| format!("/{}/", r.replace('/', "\\/").replace('\n', "\\n"))),
    ];
    let leaf = prop_oneof![
        6 => terminal.clone(),
        3 => select(vec!["start", "r1", "r2", "A", "B"]).prop_map(String::from),
        1 => select(vec![
            "%json {\"type\":\"integer\"}",
            "%json {\"type\":\"string\",\"maxLength\":3}",
            "<[2]>",
        ])
        .prop_map(String::from),
        1 => select(vec!["undefined", "%json {", "<[1]>", "<[999]>", "\"a\"..\"zz\""])
            .prop_map(String::from),
    ];
    let expr = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            3 => prop::collection::vec(inner.clone(), 1..4).prop_map(|v| v.join(" ")),
            2 => prop::collection::vec(inner.clone(), 2..4).prop_map(|v| v.join(" | ")),
            1 => inner.clone().prop_map(|r| format!("[{r}]")),
            2 => (
                inner,
                prop_oneof![
                    8 => select(vec!["*", "+", "?", " ~ 2", " ~ 0..3", " ~ 1000"]),
                    1 => select(vec![" ~ 3..1", "{2,3}", " ~ -1"]),
                ],
            )
                .prop_map(|(r, rep)| format!("({r}){rep}")),
        ]
    });
    let term_expr = prop::collection::vec(terminal, 1..3).prop_map(|v| v.join(" | "));
    (
        prop::collection::vec(expr, 3),
        prop::collection::vec(term_expr, 2),
        proptest::option::weighted(
            0.2,
            select(vec![
                "%ignore \" \"",
                "%ignore /[ \\t]+/",
                "%import common.WS",
            ]),
        ),
    )
        .prop_map(|(rules, terms, extra)| {
            let mut g = String::new();
            for (name, body) in ["start", "r1", "r2"].iter().zip(rules) {
                g.push_str(&format!("{name}: {body}\n"));
            }
            for (name, body) in ["A", "B"].iter().zip(terms) {
                g.push_str(&format!("{name}: {body}\n"));
            }
            if let Some(x) = extra {
                g.push_str(x);
                g.push('\n');
            }
            g
        })
        .boxed()
}

/// Long chains, where llguidance's compile recursion is deepest: `n` Lark rules (or terminals,
/// or GBNF rules) each naming the next inside `nest` groups, or `n` `$defs` each referring to
/// the next (directly, through `items`, or through `anyOf`).
fn arb_chain() -> BoxedStrategy<GuideSpec> {
    // Unoptimized builds have ~5-7x larger frames: shorter chains keep their stack use modest.
    let max_len = if cfg!(debug_assertions) { 800 } else { 4000 };
    (0u8..6, 1usize..max_len, 0usize..28)
        .prop_map(|(shape, n, nest)| {
            let wrap = |inner: String| format!("{}{inner}{}", "(".repeat(nest), ")".repeat(nest));
            let def = |i: usize| -> String {
                let r = format!("{{\"$ref\":\"#/$defs/d{}\"}}", i + 1);
                match shape {
                    3 => r,
                    4 => format!("{{\"type\":\"array\",\"items\":{r}}}"),
                    _ => format!("{{\"anyOf\":[{r},{{\"type\":\"null\"}}]}}"),
                }
            };
            match shape {
                0 => GuideSpec::Grammar(
                    (0..n)
                        .map(|i| format!("r{i}: {}\n", wrap(format!("r{} \"a\"", i + 1))))
                        .collect::<String>()
                        .replacen("r0:", "start:", 1)
                        + &format!("r{n}: \"b\"\n"),
                ),
                1 => GuideSpec::Grammar(
                    "start: T0\n".to_string()
                        + &(0..n)
                            .map(|i| format!("T{i}: {}\n", wrap(format!("T{} \"a\"", i + 1))))
                            .collect::<String>()
                        + &format!("T{n}: \"b\"\n"),
                ),
                2 => GuideSpec::Grammar(
                    (0..n)
                        .map(|i| format!("r{i} ::= {}\n", wrap(format!("r{} \"a\"", i + 1))))
                        .collect::<String>()
                        .replacen("r0 ::=", "root ::=", 1)
                        + &format!("r{n} ::= \"b\"\n"),
                ),
                _ => {
                    let defs: Vec<String> =
                        (0..n).map(|i| format!("\"d{i}\":{}", def(i))).collect();
                    GuideSpec::JsonSchema {
                        schema: format!(
                            "{{\"$ref\":\"#/$defs/d0\",\"$defs\":{{{},\"d{n}\":{{\"type\":\"integer\"}}}}}}",
                            defs.join(",")
                        ),
                        whitespace_pattern: None,
                    }
                }
            }
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Properties.

/// `cases` per test in release builds (what CI runs), a quarter of them in debug builds.
fn config(cases: u32) -> ProptestConfig {
    let cases = if cfg!(debug_assertions) {
        cases / 4
    } else {
        cases
    };
    ProptestConfig {
        cases: cases.max(1),
        max_shrink_iters: 256,
        // A hang costs up to `HANG_SECS` per shrink step: cap the time spent shrinking.
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(768))]

    #[test]
    fn fuzz_regex_from_grammar(pattern in arb_regex(), seed in any::<u64>()) {
        check_spec(&GuideSpec::Regex(pattern), seed, None)?;
    }

    #[test]
    fn fuzz_regex_arbitrary_or_mutated(
        pattern in prop_oneof![
            2 => arb_text(),
            1 => (arb_regex(), arb_edits()).prop_map(|(r, e)| mutate(r, e)),
        ],
        seed in any::<u64>(),
    ) {
        check_spec(&GuideSpec::Regex(pattern), seed, None)?;
    }
}

proptest! {
    #![proptest_config(config(384))]

    /// The JSON Schema compiler's lazily determinized DFA agrees with the eager tables of
    /// `regex-automata`'s determinizer (a product walk of both), on generated regexes and on
    /// the rule patterns of generated schemas.
    #[test]
    fn lazy_dfa_agrees_with_eager_dfa(pattern in arb_regex(), schema in arb_root_schema()) {
        // (About a third of the generated regexes use anchors or do not compile: skipped.)
        lazy::agrees_with_eager(&pattern, 20_000).map_err(TestCaseError::fail)?;
        for p in json::rule_patterns(&schema) {
            lazy::agrees_with_eager(&p, 20_000).map_err(TestCaseError::fail)?;
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn fuzz_choice(choices in arb_choices(), probe in "[ab ]{0,4}", seed in any::<u64>()) {
        let spec = GuideSpec::Choice(choices.clone());
        let check: Check = Box::new(move |g: &Guide| {
            for c in &choices {
                if !accepts(g, c.as_bytes()) {
                    return Err(format!("choice {c:?} is not accepted"));
                }
            }
            if accepts(g, probe.as_bytes()) != choices.contains(&probe) {
                return Err(format!("probe {probe:?}: accepted iff it is a choice, wrongly"));
            }
            Ok(())
        });
        let rejected = check_spec(&spec, seed, Some(check))?;
        if let GuideSpec::Choice(choices) = &spec {
            prop_assert_eq!(choices.is_empty(), rejected.is_some(), "{:?}", rejected);
        }
    }
}

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn fuzz_json_schema_generated(
        schema in arb_root_schema(),
        whitespace_pattern in arb_whitespace(),
        seed in any::<u64>(),
    ) {
        let spec = GuideSpec::JsonSchema { schema: schema.to_string(), whitespace_pattern };
        check_spec(&spec, seed, None)?;
    }

    #[test]
    fn fuzz_json_schema_arbitrary(
        schema in prop_oneof![
            3 => arb_json().prop_map(|v| v.to_string()),
            1 => arb_text(),
            1 => (arb_schema(), arb_edits()).prop_map(|(s, e)| mutate(s.to_string(), e)),
        ],
        whitespace_pattern in arb_whitespace(),
        seed in any::<u64>(),
    ) {
        check_spec(&GuideSpec::JsonSchema { schema, whitespace_pattern }, seed, None)?;
    }


    #[test]
    fn fuzz_gbnf(
        grammar in prop_oneof![
            3 => arb_gbnf(),
            1 => (arb_gbnf(), arb_edits()).prop_map(|(g, e)| mutate(g, e)),
            1 => arb_text().prop_map(|t| format!("root ::= {t}")),
        ],
        seed in any::<u64>(),
    ) {
        check_spec(&GuideSpec::Grammar(grammar), seed, None)?;
    }

    #[test]
    fn fuzz_lark(
        grammar in prop_oneof![
            3 => arb_lark(),
            1 => (arb_lark(), arb_edits()).prop_map(|(g, e)| mutate(g, e)),
            1 => arb_text(),
            1 => arb_text().prop_map(|t| format!("start: {t}")),
        ],
        seed in any::<u64>(),
    ) {
        check_spec(&GuideSpec::Grammar(grammar), seed, None)?;
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn fuzz_json_object(whitespace_pattern in arb_whitespace(), seed in any::<u64>()) {
        check_spec(&GuideSpec::JsonObject { whitespace_pattern }, seed, None)?;
    }
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn fuzz_long_chains(spec in arb_chain(), seed in any::<u64>()) {
        check_spec(&spec, seed, None)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: what the fuzzing found.

/// Compiles `spec` on a thread with a 2 MiB stack and walks it; `Err` if it does not compile.
fn compile_on_small_stack(spec: GuideSpec) -> Result<()> {
    std::thread::Builder::new()
        .stack_size(WORKER_STACK_BYTES)
        .spawn(move || {
            let g = Guide::compile(vocab(), &spec)?;
            walk(&g, 7).unwrap_or_else(|e| panic!("{e}"));
            Ok(())
        })
        .unwrap()
        .join()
        .unwrap()
}

/// llguidance recursed once per rule or `$ref` followed and overflowed the caller's stack,
/// aborting the process: a Lark grammar of 1,000 rules each naming the next, or a schema of
/// 1,000 `$defs` each referring to the next, on a 2 MiB thread (3,000 on an 8 MiB thread).
#[test]
fn long_rule_and_ref_chains_do_not_overflow_the_stack() {
    let n = 3000;
    let chain = |first: &str, sep: &str| -> String {
        (0..n)
            .map(|i| format!("r{i}{sep} r{} \"a\"\n", i + 1))
            .collect::<String>()
            .replacen(&format!("r0{sep}"), &format!("{first}{sep}"), 1)
            + &format!("r{n}{sep} \"b\"\n")
    };
    compile_on_small_stack(GuideSpec::Grammar(chain("start", ":"))).unwrap();
    compile_on_small_stack(GuideSpec::Grammar(chain("root", " ::="))).unwrap();
    // Each rule also nests 27 groups: ~40 KiB of stack per rule (200 overflowed 8 MiB).
    let nested = (0..300)
        .map(|i| {
            format!(
                "r{i}: {}r{} \"a\"{}\n",
                "(".repeat(27),
                i + 1,
                ")".repeat(27)
            )
        })
        .collect::<String>()
        .replacen("r0:", "start:", 1)
        + "r300: \"b\"\n";
    compile_on_small_stack(GuideSpec::Grammar(nested)).unwrap();
    let defs: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "\"d{i}\":{{\"type\":\"array\",\"items\":{{\"$ref\":\"#/$defs/d{}\"}}}}",
                i + 1
            )
        })
        .collect();
    let schema = format!(
        "{{\"$ref\":\"#/$defs/d0\",\"$defs\":{{{},\"d{n}\":{{\"type\":\"integer\"}}}}}}",
        defs.join(",")
    );
    compile_on_small_stack(GuideSpec::JsonSchema {
        schema,
        whitespace_pattern: None,
    })
    .unwrap();
}

/// Inputs too large to be sure the compile thread's stack suffices are refused, not compiled.
#[test]
fn oversized_grammars_and_schemas_are_refused() {
    let big = format!(
        "start: \"a\"\n{}",
        "// comment\n".repeat(llg::MAX_GRAMMAR_BYTES / 11)
    );
    assert!(matches!(
        compile_on_small_stack(GuideSpec::Grammar(big)),
        Err(GuideError::TooLarge(_))
    ));
    let props: Vec<String> = (0..llg::MAX_SCHEMA_OBJECTS)
        .map(|i| format!("\"p{i}\":{{}}"))
        .collect();
    let schema = format!(
        "{{\"type\":\"object\",\"properties\":{{{}}}}}",
        props.join(",")
    );
    let e = compile_on_small_stack(GuideSpec::JsonSchema {
        schema,
        whitespace_pattern: None,
    })
    .unwrap_err();
    assert!(e.to_string().contains("JSON objects"), "{e}");
}

/// Many optional copies of a large class: determinization work grew with its 64 MiB memory
/// budget (12.8 s to fail here); the 16 MiB budget fails it in about a second.
#[test]
fn regex_determinization_budget_bounds_compile_time() {
    let t = Instant::now();
    let e = Guide::compile(vocab(), &GuideSpec::Regex("(?:\\S?){2500}".into())).unwrap_err();
    assert!(matches!(e, GuideError::TooLarge(_)), "{e}");
    assert!(t.elapsed() < bound(COMPILE_SECS), "{:?}", t.elapsed());
}

/// Large counted repetitions: determinization time grew with the square of the count while
/// its memory stayed within budget (`(?:\\*|\\z){100000}`, found by `fuzz_regex_from_grammar`,
/// compiled in 40 s; `a{0,100000}` in 16 s). Past 10,000 copies they are refused at once.
#[test]
fn large_counted_repetitions_are_refused() {
    for pattern in [
        "(?:\\*|\\z){100000}",
        "a{0,100000}",
        "(?:a{0,1000}){0,100}",
        "x(?:(?:a|b){20}c){1000}",
        "a{10001,}",
    ] {
        let t = Instant::now();
        let e = Guide::compile(vocab(), &GuideSpec::Regex(pattern.into())).unwrap_err();
        assert!(
            e.to_string().contains("counted repetition makes"),
            "{pattern}: {e}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{pattern}: {:?}",
            t.elapsed()
        );
    }
    let g = Guide::compile(vocab(), &GuideSpec::Regex("a{0,10000}".into())).unwrap();
    assert_eq!(g.dfa_states(), Some(10_001));
}
