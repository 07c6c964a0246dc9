//! `anyOf`/`oneOf` beside other validation keywords, rewritten before compiling:
//! `{S, anyOf: [B1, B2]}` means `S ∧ (B1 ∨ B2)` = `(S ∧ B1) ∨ (S ∧ B2)`, and where each `S ∧ Bi`
//! is one schema we can write down exactly (keywords on one side only, equal values, unions
//! of `required`, intersections of `type`, tighter bounds, disjoint `properties`) the node
//! becomes `{anyOf: [S ∧ B1, S ∧ B2]}`. Anything else is left alone (and the compiler then
//! passes the schema to llguidance, as before). The typical case is an object whose
//! `properties` sit beside `anyOf: [{required: [a]}, {required: [b]}]`.
//!
//! `allOf` is merged the same way into one schema. A branch that is only a `$ref` is replaced
//! by its target for the merge. Keys moved out of a node are not moved when a `$ref` points
//! into them.

use serde_json::{Map, Value};

/// Whether `k` is a validation keyword that may move into branches: one the compiler
/// implements, but for the combinators and `$ref` themselves, and `patternProperties` (which
/// judges the other side's properties too).
fn movable(k: &str) -> bool {
    super::emit::is_implemented(k)
        && !["anyOf", "oneOf", "allOf", "$ref", "patternProperties"].contains(&k)
}

/// Whether a `$ref` points at keyword `k` of the node at `ptr`, or into it.
fn referenced(refs: &[String], ptr: &str, k: &str) -> bool {
    let p = format!("{ptr}/{}", escape(k));
    refs.iter().any(|r| {
        *r == p
            || r.strip_prefix(p.as_str())
                .is_some_and(|t| t.starts_with('/'))
    })
}

/// Most nested rewrites of one node (a merged branch may itself need one).
const MAX_DEPTH: u32 = 4;

/// The schema with `anyOf`/`oneOf` siblings distributed into the branches, or `None` when
/// nothing changed.
pub(super) fn distribute(root: &Value) -> Option<Value> {
    if !needs(root) {
        return None;
    }
    let mut refs = Vec::new();
    collect_refs(root, &mut refs);
    let mut out = root.clone();
    let changed = walk(&mut out, root, String::new(), &refs);
    changed.then_some(out)
}

fn needs(v: &Value) -> bool {
    match v {
        Value::Object(m) => {
            m.contains_key("allOf")
                || (["anyOf", "oneOf"].iter().any(|k| m.contains_key(*k))
                    && m.keys().any(|k| movable(k)))
                || m.values().any(needs)
        }
        Value::Array(a) => a.iter().any(needs),
        _ => false,
    }
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                if let Some(p) = r.strip_prefix('#') {
                    out.push(p.to_string());
                }
            }
            m.values().for_each(|x| collect_refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

/// Rewrites below `v` (children first), then `v` itself; whether anything changed.
fn walk(v: &mut Value, root: &Value, ptr: String, refs: &[String]) -> bool {
    let mut changed = false;
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                changed |= walk(child, root, format!("{ptr}/{}", escape(k)), refs);
            }
            if let Some(n) = rewrite(m, root, &ptr, refs, 0) {
                *m = n;
                changed = true;
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter_mut().enumerate() {
                changed |= walk(child, root, format!("{ptr}/{i}"), refs);
            }
        }
        _ => {}
    }
    changed
}

/// `m` with its movable keywords merged into its `anyOf`/`oneOf` branches, if every merge is
/// exact.
fn rewrite(
    m: &Map<String, Value>,
    root: &Value,
    ptr: &str,
    refs: &[String],
    depth: u32,
) -> Option<Map<String, Value>> {
    if depth > MAX_DEPTH || m.contains_key("$ref") {
        return None;
    }
    if m.contains_key("allOf") {
        return all_of(m, root, ptr, refs, depth);
    }
    let key = match (m.contains_key("anyOf"), m.contains_key("oneOf")) {
        (true, false) => "anyOf",
        (false, true) => "oneOf",
        _ => return None,
    };
    let moved: Map<String, Value> = m
        .iter()
        .filter(|(k, _)| movable(k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if moved.is_empty() {
        return None;
    }
    // A `$ref` into a moved keyword would no longer resolve.
    for k in moved.keys() {
        if referenced(refs, ptr, k) {
            return None;
        }
    }
    let mut branches = Vec::new();
    for (i, b) in m.get(key)?.as_array()?.iter().enumerate() {
        let (b, at) = match b {
            Value::Bool(true) => (Map::new(), String::new()),
            Value::Bool(false) => continue,
            Value::Object(b) => deref(b, root, format!("{ptr}/{key}/{i}"))?,
            _ => return None,
        };
        let Some(mut merged) = merge(&moved, &b)? else {
            // `S ∧ Bi` matches nothing: the branch goes.
            continue;
        };
        if merged.contains_key("anyOf") || merged.contains_key("oneOf") {
            merged = rewrite(&merged, root, &at, refs, depth + 1)?;
        }
        branches.push(Value::Object(merged));
    }
    if branches.is_empty() {
        return None;
    }
    let mut out: Map<String, Value> = m
        .iter()
        .filter(|(k, _)| !movable(k.as_str()) && *k != key)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert(key.to_string(), Value::Array(branches));
    Some(out)
}

/// `{S, allOf: [B1, B2]}` as one schema `S ∧ B1 ∧ B2` (then distributed further if it has an
/// `anyOf`/`oneOf`), if every merge is exact and the result matches something.
fn all_of(
    m: &Map<String, Value>,
    root: &Value,
    ptr: &str,
    refs: &[String],
    depth: u32,
) -> Option<Map<String, Value>> {
    let moving = |k: &str| movable(k) || k == "allOf";
    for k in m.keys().filter(|k| moving(k)) {
        if referenced(refs, ptr, k) {
            return None;
        }
    }
    let mut acc: Map<String, Value> = m
        .iter()
        .filter(|(k, _)| movable(k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut combinator = m.contains_key("anyOf") || m.contains_key("oneOf");
    for (i, b) in m.get("allOf")?.as_array()?.iter().enumerate() {
        let b = match b {
            Value::Bool(true) => continue,
            Value::Object(b) => deref(b, root, format!("{ptr}/allOf/{i}"))?.0,
            _ => return None,
        };
        // Two combinators would need a product of branches: not here.
        let has = b.contains_key("anyOf") || b.contains_key("oneOf");
        if (has && combinator) || b.contains_key("allOf") {
            return None;
        }
        combinator |= has;
        let (moved, rest): (Map<String, Value>, Map<String, Value>) =
            b.into_iter().partition(|(k, _)| movable(k));
        acc = merge(&acc, &moved)??;
        for (k, v) in rest {
            if ["anyOf", "oneOf"].contains(&k.as_str()) {
                acc.insert(k, v);
            }
            // Annotations and unknown keywords of a branch are dropped; keywords we do not
            // implement make the merge inexact.
            else if super::emit::is_validation_keyword(&k) {
                return None;
            }
        }
    }
    let mut out: Map<String, Value> = m
        .iter()
        .filter(|(k, _)| !moving(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.extend(acc);
    if out.contains_key("anyOf") || out.contains_key("oneOf") {
        if let Some(d) = rewrite(&out, root, "\u{0}", refs, depth + 1) {
            return Some(d);
        }
    }
    Some(out)
}

/// A branch (at pointer `at`) that is only a `$ref` (and annotations): its target, if that is
/// a schema object without a `$ref` of its own; with the pointer of what is returned.
fn deref(b: &Map<String, Value>, root: &Value, at: String) -> Option<(Map<String, Value>, String)> {
    let Some(r) = b.get("$ref") else {
        return Some((b.clone(), at));
    };
    if b.keys().any(|k| k != "$ref" && movable(k)) {
        return None;
    }
    let p = r.as_str()?.strip_prefix('#')?;
    if !p.is_empty() && !p.starts_with('/') || p.contains('%') {
        return None;
    }
    match root.pointer(p)? {
        Value::Object(t) if !t.contains_key("$ref") => Some((t.clone(), p.to_string())),
        Value::Bool(true) => Some((Map::new(), p.to_string())),
        _ => None,
    }
}

/// `a ∧ b` as one schema: `None` when not exact, `Some(None)` when it matches nothing.
#[allow(clippy::option_option)]
fn merge(a: &Map<String, Value>, b: &Map<String, Value>) -> Option<Option<Map<String, Value>>> {
    // `additionalProperties` on one side judges the other side's properties too.
    for (x, y) in [(a, b), (b, a)] {
        let closed = x
            .get("additionalProperties")
            .is_some_and(|v| *v != Value::Bool(true));
        if closed {
            let declared = x.get("properties").and_then(Value::as_object);
            let extra = y
                .get("properties")
                .and_then(Value::as_object)
                .is_some_and(|p| {
                    p.keys()
                        .any(|k| !declared.is_some_and(|d| d.contains_key(k)))
                });
            if extra || y.contains_key("patternProperties") {
                return None;
            }
        }
    }
    let mut out = b.clone();
    for (k, av) in a {
        let Some(bv) = out.get(k) else {
            out.insert(k.clone(), av.clone());
            continue;
        };
        if bv == av {
            continue;
        }
        let merged = match k.as_str() {
            "required" => {
                let mut r: Vec<Value> = av.as_array()?.clone();
                for x in bv.as_array()? {
                    if !r.contains(x) {
                        r.push(x.clone());
                    }
                }
                Value::Array(r)
            }
            "type" => {
                let (ta, tb) = (types(av)?, types(bv)?);
                let mut t: Vec<&str> = Vec::new();
                for x in &ta {
                    for y in &tb {
                        let both = match (*x, *y) {
                            (x, y) if x == y => Some(x),
                            ("integer", "number") | ("number", "integer") => Some("integer"),
                            _ => None,
                        };
                        if let Some(z) = both.filter(|z| !t.contains(z)) {
                            t.push(z);
                        }
                    }
                }
                if t.is_empty() {
                    return Some(None);
                }
                Value::Array(t.into_iter().map(|x| Value::String(x.into())).collect())
            }
            "properties" => {
                // In order: `a`'s (the earlier schema's) first.
                let mut p = av.as_object()?.clone();
                for (name, s) in bv.as_object()? {
                    match p.get(name) {
                        None => {
                            p.insert(name.clone(), s.clone());
                        }
                        Some(t) if t == s => {}
                        Some(_) => return None,
                    }
                }
                Value::Object(p)
            }
            "minLength" | "minItems" | "minProperties" => {
                Value::from(av.as_u64()?.max(bv.as_u64()?))
            }
            "maxLength" | "maxItems" | "maxProperties" => {
                Value::from(av.as_u64()?.min(bv.as_u64()?))
            }
            _ => return None,
        };
        out.insert(k.clone(), merged);
    }
    Some(Some(out))
}

fn types(v: &Value) -> Option<Vec<&str>> {
    match v {
        Value::String(s) => Some(vec![s.as_str()]),
        Value::Array(a) => a.iter().map(Value::as_str).collect(),
        _ => None,
    }
}
