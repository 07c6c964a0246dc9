//! GBNF (llama.cpp's grammar format) → llguidance's Lark dialect, so both formats run on one
//! engine. Each GBNF rule becomes one Lark rule; literals, character classes and `.` become
//! `/regex/` terminals; `root` is the start symbol.

use std::collections::HashMap;

use super::error::{GuideError, Result};

/// Whether `grammar` is GBNF: some line defines a rule with `::=`.
pub(crate) fn is_gbnf(grammar: &str) -> bool {
    grammar.lines().any(|l| {
        let l = l.trim_start();
        let name_end = l
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(l.len());
        name_end > 0 && l[name_end..].trim_start().starts_with("::=")
    })
}

fn err(msg: impl Into<String>) -> GuideError {
    GuideError::InvalidGrammar(format!("GBNF: {}", msg.into()))
}

/// One character of a literal or class, after GBNF escapes.
fn parse_char(chars: &[char], i: &mut usize) -> Result<char> {
    let c = *chars
        .get(*i)
        .ok_or_else(|| err("unexpected end of input"))?;
    *i += 1;
    if c != '\\' {
        return Ok(c);
    }
    let e = *chars.get(*i).ok_or_else(|| err("dangling `\\`"))?;
    *i += 1;
    let hex = |i: &mut usize, n: usize| -> Result<char> {
        let s: String = chars
            .get(*i..*i + n)
            .ok_or_else(|| err("short escape"))?
            .iter()
            .collect();
        *i += n;
        u32::from_str_radix(&s, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| err(format!("bad escape `{s}`")))
    };
    Ok(match e {
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        'x' => hex(i, 2)?,
        'u' => hex(i, 4)?,
        'U' => hex(i, 8)?,
        other => other,
    })
}

fn rx_char(c: char) -> String {
    format!("\\x{{{:x}}}", c as u32)
}

/// Converts GBNF to Lark.
pub(crate) fn to_lark(grammar: &str) -> Result<String> {
    let chars: Vec<char> = grammar.chars().collect();
    let mut i = 0;
    // Tokens: `Rule(name)` starts a rule; everything else is Lark text for the current rule.
    enum Tok {
        Rule(String),
        Name(String),
        Text(String),
    }
    let mut toks: Vec<Tok> = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            let s = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '-' || chars[i] == '_')
            {
                i += 1;
            }
            let name: String = chars[s..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            if chars.get(j..j + 3) == Some(&[':', ':', '=']) {
                toks.push(Tok::Rule(name));
                i = j + 3;
            } else {
                toks.push(Tok::Name(name));
            }
        } else if c == '"' {
            i += 1;
            let mut rx = String::new();
            loop {
                match chars.get(i) {
                    None => return Err(err("unterminated string")),
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    _ => rx.push_str(&rx_char(parse_char(&chars, &mut i)?)),
                }
            }
            toks.push(Tok::Text(if rx.is_empty() {
                "\"\"".into()
            } else {
                format!("/{rx}/")
            }));
        } else if c == '[' {
            i += 1;
            let mut rx = String::from("[");
            if chars.get(i) == Some(&'^') {
                rx.push('^');
                i += 1;
            }
            loop {
                match chars.get(i) {
                    None => return Err(err("unterminated character class")),
                    Some(']') => {
                        i += 1;
                        break;
                    }
                    _ => {
                        let a = parse_char(&chars, &mut i)?;
                        rx.push_str(&rx_char(a));
                        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']')
                        {
                            i += 1;
                            let b = parse_char(&chars, &mut i)?;
                            rx.push('-');
                            rx.push_str(&rx_char(b));
                        }
                    }
                }
            }
            rx.push(']');
            toks.push(Tok::Text(format!("/{rx}/")));
        } else if c == '.' {
            i += 1;
            toks.push(Tok::Text("/(?s:.)/".into()));
        } else if c == '{' {
            let s = i;
            while i < chars.len() && chars[i] != '}' {
                i += 1;
            }
            i += 1;
            let body: String = chars[s..i.min(chars.len())].iter().collect();
            if !body.ends_with('}')
                || !body[1..body.len() - 1]
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == ',' || c == ' ')
            {
                return Err(err(format!("bad repetition `{body}`")));
            }
            toks.push(Tok::Text(body.replace(' ', "")));
        } else if "()|*+?".contains(c) {
            i += 1;
            toks.push(Tok::Text(c.to_string()));
        } else {
            return Err(err(format!("unexpected `{c}`")));
        }
    }
    // Lark rule names: lowercase, digits, underscores, starting with a letter.
    let mut names: HashMap<String, String> = HashMap::new();
    let mut lark_name = |n: &str| -> String {
        let k = names.len();
        names
            .entry(n.to_string())
            .or_insert_with(|| {
                let clean: String = n
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("r{k}_{clean}")
            })
            .clone()
    };
    let mut out = String::new();
    let mut defined = Vec::new();
    for t in &toks {
        match t {
            Tok::Rule(n) => {
                if !out.is_empty() {
                    out.push('\n');
                }
                let l = lark_name(n);
                defined.push(n.clone());
                out.push_str(&l);
                out.push(':');
            }
            Tok::Name(n) => {
                if defined.is_empty() {
                    return Err(err(format!("`{n}` outside a rule")));
                }
                out.push(' ');
                out.push_str(&lark_name(n));
            }
            Tok::Text(s) => {
                if defined.is_empty() {
                    return Err(err(format!("`{s}` outside a rule")));
                }
                out.push(' ');
                out.push_str(s);
            }
        }
    }
    if !defined.iter().any(|n| n == "root") {
        return Err(err("no `root` rule"));
    }
    let root = lark_name("root");
    let used: Vec<String> = names.keys().cloned().collect();
    for n in used {
        if !defined.contains(&n) {
            return Err(err(format!("rule `{n}` is used but not defined")));
        }
    }
    Ok(format!("start: {root}\n{out}\n"))
}
