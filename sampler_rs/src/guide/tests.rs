//! Guide tests on a shared toy vocabulary, with a brute-force mask oracle for regexes.

use std::collections::HashMap;

use proptest::prelude::*;
use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

use super::*;
use crate::guide::mask;

/// The toy vocabulary: 0 `<unk>`, 1 `<s>`, 2 `</s>` (EOS), 3 `<pad>` (special, given bytes that
/// would otherwise match), then every single byte (ids 4..260), then multi-byte tokens,
/// including ones that end or start inside a UTF-8 character and a duplicate.
pub(crate) fn toy_tokens() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        b"<unk>".to_vec(),
        b"<s>".to_vec(),
        b"</s>".to_vec(),
        b"a".to_vec(),
    ];
    v.extend((0..=255u8).map(|b| vec![b]));
    for w in [
        &b"ab"[..],
        b"abc",
        b"bc",
        b"{\"",
        b"\":",
        b"\"}",
        b"12",
        b"123",
        b" a",
        b"  ",
        b", ",
        b"true",
        b"false",
        b"null",
        "é".as_bytes(),
        b"\xc3",
        b"a\xc3",
        b"\xa9b",
        "€".as_bytes(),
        b"\xe2\x82",
        b"ab",
        b"aaaa",
        b"yes",
        b"no",
        b"\":\"",
        b"\"a\"",
        b"0.",
        b"-1",
        b"e+",
        // String content then a quote, an escape or a control character (the exits of the
        // content shortcuts), after ASCII and multi-byte characters; key-name prefixes.
        b"ab\"",
        "é\"".as_bytes(),
        "é\":".as_bytes(),
        "€\"".as_bytes(),
        b"x\n",
        b"ab\\",
        b"a\"}",
        b"a\",",
        b"na",
        b"name",
        b"name\":",
        b"\xe2",
        b"\xe2\x82\xac\xe2",
    ] {
        v.push(w.to_vec());
    }
    v
}

pub(crate) fn toy_vocab() -> Vocabulary {
    Vocabulary::new(&toy_tokens(), &[2], &[0, 1, 3]).unwrap()
}

/// Brute force: a fully built DFA (no byte classes, no pruning) and, per state, whether an
/// accepting position is reachable (a memoised search over all 256 bytes).
struct Oracle {
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
    live: HashMap<StateID, bool>,
}

impl Oracle {
    fn new(pattern: &str) -> Oracle {
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Anchored)
                    .byte_classes(false),
            )
            .build(pattern)
            .unwrap();
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .unwrap();
        Oracle {
            dfa,
            start,
            live: HashMap::new(),
        }
    }

    fn accepts_here(&self, s: StateID) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(s))
    }

    /// Whether some continuation from `s` is accepted (graph search, no memo shortcuts).
    fn is_live(&mut self, s: StateID) -> bool {
        if let Some(&l) = self.live.get(&s) {
            return l;
        }
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![s];
        let mut found = false;
        while let Some(x) = stack.pop() {
            if self.dfa.is_dead_state(x) || !seen.insert(x) {
                continue;
            }
            if self.accepts_here(x) {
                found = true;
                break;
            }
            for b in 0..=255u8 {
                stack.push(self.dfa.next_state(x, b));
            }
        }
        self.live.insert(s, found);
        found
    }

    fn run(&self, bytes: &[u8]) -> StateID {
        bytes
            .iter()
            .fold(self.start, |s, &b| self.dfa.next_state(s, b))
    }

    /// The mask at `prefix`: token `t` allowed iff `prefix · bytes(t)` is a viable prefix.
    fn mask(&mut self, tokens: &[Vec<u8>], specials: &[u32], eos: u32, prefix: &[u8]) -> Vec<u32> {
        let mut m = vec![0u32; mask::words_for(tokens.len())];
        for (t, bytes) in tokens.iter().enumerate() {
            if specials.contains(&(t as u32)) || t as u32 == eos || bytes.is_empty() {
                continue;
            }
            let mut p = prefix.to_vec();
            p.extend_from_slice(bytes);
            let s = self.run(&p);
            if self.is_live(s) {
                mask::set(&mut m, t as u32);
            }
        }
        let s = self.run(prefix);
        if self.accepts_here(s) {
            mask::set(&mut m, eos);
        }
        m
    }
}

/// Walks `steps` random allowed tokens through a regex guide, comparing every mask with the
/// oracle's; `seed` picks the tokens.
fn check_against_oracle(pattern: &str, seed: u64, steps: usize) {
    let vocab = toy_vocab();
    let tokens = toy_tokens();
    let guide = match Guide::compile(&vocab, &GuideSpec::Regex(pattern.to_string())) {
        Ok(g) => g,
        Err(GuideError::Empty) => return,
        Err(e) => panic!("{pattern}: {e}"),
    };
    let mut oracle = Oracle::new(pattern);
    let mut state = GuideState::new(&guide);
    let mut prefix: Vec<u8> = Vec::new();
    let mut rng = crate::sampling::Rng::seed_from_u64(seed);
    let mut out = vec![0u32; mask::words_for(tokens.len()) + 2];
    for _ in 0..steps {
        state.fill_mask(&mut out).unwrap();
        let want = oracle.mask(&tokens, &[0, 1, 3], 2, &prefix);
        assert_eq!(&out[..want.len()], &want[..], "{pattern:?} at {prefix:?}");
        assert!(
            out[want.len()..].iter().all(|&w| w == 0),
            "padding bits set"
        );
        assert_eq!(
            state.is_accepting(),
            mask::get(&want, 2),
            "{pattern:?} at {prefix:?}"
        );
        let allowed: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&t| mask::get(&want, t))
            .collect();
        // Every disallowed token is refused and changes nothing.
        for t in 0..tokens.len() as u32 {
            if !mask::get(&want, t) {
                assert!(
                    !state.advance(t),
                    "{pattern:?}: token {t} advanced at {prefix:?}"
                );
            }
        }
        if allowed.is_empty() {
            break;
        }
        let t = allowed[(rng.next_f64() * allowed.len() as f64) as usize % allowed.len()];
        assert!(state.advance(t));
        if t == 2 {
            assert!(state.is_finished());
            break;
        }
        prefix.extend_from_slice(&tokens[t as usize]);
    }
}

const PATTERNS: &[&str] = &[
    "abc",
    "a*",
    "(ab|abc)+",
    "[0-9]{1,3}(\\.[0-9]+)?",
    "-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?",
    "(true|false|null)",
    "é+€?",
    "[^\"]{0,5}",
    "\\{\"a\":\"[a-z]*\"\\}",
    "(a|b)*abb",
    "[\\u0400-\\u04FF]{2}",
    ".{2,4}",
    "yes|no",
    "( a|  )*",
    "\\w+",
    "(?s:.)*x",
];

#[test]
fn regex_masks_match_the_oracle() {
    for (i, p) in PATTERNS.iter().enumerate() {
        for seed in 0..4 {
            check_against_oracle(p, seed * 31 + i as u64, 12);
        }
    }
}

#[test]
fn eos_only_when_accepting_and_finished_at_the_end() {
    let vocab = toy_vocab();
    let g = vocab.compile(&GuideSpec::Regex("ab".into())).unwrap();
    assert_eq!(g.engine(), Engine::TokenwireDfa);
    let mut s = GuideState::new(&g);
    assert!(!s.is_accepting());
    assert!(!s.advance(2), "EOS before a match");
    let ab = (0..vocab.len() as u32)
        .find(|&t| vocab.token_bytes(t) == b"ab" && !vocab.is_special(t))
        .unwrap();
    assert!(s.advance(ab));
    assert!(s.is_accepting());
    assert!(s.is_finished());
    let mut m = vec![0u32; mask::words_for(vocab.len())];
    s.fill_mask(&mut m).unwrap();
    let set: Vec<u32> = (0..vocab.len() as u32)
        .filter(|&t| mask::get(&m, t))
        .collect();
    assert_eq!(set, vec![2]);
    assert!(s.advance(2));
    assert!(s.ended());
    s.fill_mask(&mut m).unwrap();
    assert!(m.iter().all(|&w| w == 0));
}

#[test]
fn special_tokens_never_match_text() {
    let vocab = toy_vocab();
    // Token 3 is special with bytes `a`: never allowed even where `a` is.
    let g = vocab.compile(&GuideSpec::Regex("a+".into())).unwrap();
    let mut s = GuideState::new(&g);
    let mut m = vec![0u32; mask::words_for(vocab.len())];
    s.fill_mask(&mut m).unwrap();
    assert!(!mask::get(&m, 3));
    assert!(mask::get(&m, 4 + u32::from(b'a')));
    assert!(!s.advance(3));
    assert!(!s.advance(1));
}

#[test]
fn duplicate_token_bytes_are_all_allowed() {
    let vocab = toy_vocab();
    let g = vocab.compile(&GuideSpec::Regex("ab".into())).unwrap();
    let mut s = GuideState::new(&g);
    let mut m = vec![0u32; mask::words_for(vocab.len())];
    s.fill_mask(&mut m).unwrap();
    let abs: Vec<u32> = (0..vocab.len() as u32)
        .filter(|&t| vocab.token_bytes(t) == b"ab")
        .collect();
    assert_eq!(abs.len(), 2);
    assert!(abs.iter().all(|&t| mask::get(&m, t)));
}

#[test]
fn choice_is_exactly_one_of_the_strings() {
    let vocab = toy_vocab();
    let g = vocab
        .compile(&GuideSpec::Choice(vec![
            "a.b".into(),
            "yes".into(),
            "(no)".into(),
        ]))
        .unwrap();
    for (text, ok) in [
        ("a.b", true),
        ("axb", false),
        ("yes", true),
        ("(no)", true),
        ("no", false),
        ("", false),
    ] {
        let mut s = GuideState::new(&g);
        let walked = text.bytes().all(|b| s.advance(4 + u32::from(b)));
        assert_eq!(walked && s.is_accepting(), ok, "{text}");
    }
    assert!(matches!(
        vocab.compile(&GuideSpec::Choice(vec![])),
        Err(GuideError::Invalid(_))
    ));
}

#[test]
fn compile_errors_are_clear() {
    let vocab = toy_vocab();
    let e = vocab.compile(&GuideSpec::Regex("(ab".into())).unwrap_err();
    assert!(e.to_string().starts_with("invalid regex"), "{e}");
    let e = vocab
        .compile(&GuideSpec::Regex("[^\\s\\S]".into()))
        .unwrap_err();
    assert_eq!(e, GuideError::Empty);
    let e = vocab
        .compile(&GuideSpec::Regex("\\w{1000}\\w{1000}".into()))
        .unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
    let e = vocab
        .compile(&GuideSpec::JsonSchema {
            schema: r#"{"type":"array","patternPropertiesX":1,"uniqueItems":true}"#.into(),
            whitespace_pattern: None,
        })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported JSON Schema keyword `uniqueItems`"
    );
    let e = vocab
        .compile(&GuideSpec::JsonSchema {
            schema: "{".into(),
            whitespace_pattern: None,
        })
        .unwrap_err();
    assert!(e.to_string().starts_with("invalid JSON Schema"), "{e}");
}

#[test]
fn compiles_are_cached() {
    let vocab = toy_vocab();
    let a = vocab.compile(&GuideSpec::Regex("abc".into())).unwrap();
    let b = vocab.compile(&GuideSpec::Regex("abc".into())).unwrap();
    assert!(Arc::ptr_eq(&a.inner, &b.inner));
    assert_eq!(vocab.cached_guides(), 1);
}

fn walk_bytes(g: &Guide, text: &[u8]) -> (bool, bool) {
    let mut s = GuideState::new(g);
    let ok = text.iter().all(|&b| s.advance(4 + u32::from(b)));
    (ok, ok && s.is_accepting())
}

#[test]
fn json_schema_masks_and_whitespace() {
    let vocab = toy_vocab();
    let schema = r#"{"type":"object","properties":{"a":{"type":"integer","minimum":0},"b":{"enum":["x","y"]}},"required":["a"],"additionalProperties":false}"#;
    let g = vocab
        .compile(&GuideSpec::JsonSchema {
            schema: schema.into(),
            whitespace_pattern: None,
        })
        .unwrap();
    assert_eq!(g.engine(), Engine::TokenwireJson);
    assert_eq!(walk_bytes(&g, br#"{"a":12,"b":"y"}"#), (true, true));
    assert_eq!(walk_bytes(&g, br#"{"a":12}"#), (true, true));
    assert!(!walk_bytes(&g, br#"{"a":-1}"#).1);
    assert!(!walk_bytes(&g, br#"{"b":"x"}"#).1);
    assert!(
        !walk_bytes(&g, br#"{"a": 1}"#).0,
        "no whitespace by default"
    );
    let spaced = vocab
        .compile(&GuideSpec::JsonSchema {
            schema: schema.into(),
            whitespace_pattern: Some(" ".into()),
        })
        .unwrap();
    assert_eq!(walk_bytes(&spaced, br#"{"a": 1, "b": "x"}"#), (true, true));
    // Masks: special tokens cleared, EOS iff accepting, multi-byte tokens allowed.
    let mut s = GuideState::new(&g);
    let mut m = vec![0u32; mask::words_for(vocab.len()) + 1];
    s.fill_mask(&mut m).unwrap();
    assert!(mask::get(&m, 4 + u32::from(b'{')));
    assert!(!mask::get(&m, 2) && !mask::get(&m, 3));
    assert_eq!(m[m.len() - 1], 0);
    for &b in br#"{"a":1}"# {
        assert!(s.advance(4 + u32::from(b)));
    }
    s.fill_mask(&mut m).unwrap();
    assert!(mask::get(&m, 2));
    assert!(s.is_finished());
    assert!(s.advance(2));
}

#[test]
fn json_object_and_grammars() {
    let vocab = toy_vocab();
    let g = vocab
        .compile(&GuideSpec::JsonObject {
            whitespace_pattern: None,
        })
        .unwrap();
    assert_eq!(walk_bytes(&g, br#"{"x":[1,{"y":null}]}"#), (true, true));
    assert!(!walk_bytes(&g, b"[1]").0);
    let lark = vocab
        .compile(&GuideSpec::Grammar(
            "start: \"a\" b+\nb: \"b\" | \"c\"".into(),
        ))
        .unwrap();
    assert_eq!(walk_bytes(&lark, b"abcb"), (true, true));
    assert!(!walk_bytes(&lark, b"a").1);
    let gbnf = vocab
        .compile(&GuideSpec::Grammar(
            "root ::= \"a\" b+\nb ::= \"b\" | \"c\"".into(),
        ))
        .unwrap();
    assert_eq!(walk_bytes(&gbnf, b"acc"), (true, true));
    let e = vocab
        .compile(&GuideSpec::Grammar("start: (".into()))
        .unwrap_err();
    assert!(e.to_string().starts_with("invalid grammar"), "{e}");
}

/// Random regexes from a small grammar of literals, classes, groups, alternations and bounded
/// repetitions (including multi-byte characters).
fn arb_regex() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("é".to_string()),
        Just("€".to_string()),
        Just("[a-c]".to_string()),
        Just("[^a]".to_string()),
        Just("\\d".to_string()),
        Just(" ".to_string()),
        Just("\"".to_string()),
        Just(".".to_string()),
    ];
    leaf.prop_recursive(4, 24, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(|v| v.concat()),
            prop::collection::vec(inner.clone(), 2..4).prop_map(|v| format!("({})", v.join("|"))),
            (inner.clone(), 0u8..5).prop_map(|(r, k)| match k {
                0 => format!("({r})*"),
                1 => format!("({r})+"),
                2 => format!("({r})?"),
                3 => format!("({r}){{1,3}}"),
                _ => format!("({r}){{2}}"),
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn random_regexes_match_the_oracle(pattern in arb_regex(), seed in 0u64..1000) {
        check_against_oracle(&pattern, seed, 8);
    }

    #[test]
    fn regex_compiler_never_panics(pattern in "\\PC{0,24}") {
        let vocab = toy_vocab();
        let _ = vocab.compile(&GuideSpec::Regex(pattern));
    }

    #[test]
    fn schema_compiler_never_panics(schema in "[\\[\\]{}\":,a-z0-9 ]{0,40}") {
        let vocab = toy_vocab();
        let _ = vocab.compile(&GuideSpec::JsonSchema { schema, whitespace_pattern: None });
    }
}
