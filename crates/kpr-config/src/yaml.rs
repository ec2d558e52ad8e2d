//! Writing a `KubeProxyConfiguration` as YAML the way upstream's `--write-config-to` does:
//! every field, keys sorted by byte order (Go marshals the struct through JSON, whose object keys
//! come out sorted), block style, lists unindented under their key, durations Go-formatted, and
//! strings quoted only when a plain scalar would read back as something else.

use serde_json::Value;

use crate::types::KubeProxyConfiguration;

/// The v1alpha1 YAML document for `cfg` (ends with a newline). Decoding it gives `cfg` back.
pub fn to_yaml(cfg: &KubeProxyConfiguration) -> String {
    // Serializing plain data with string keys cannot fail.
    let value = serde_json::to_value(cfg).unwrap_or(Value::Null);
    let mut out = String::new();
    match &value {
        Value::Object(_) => write_block(&mut out, &value, 0),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

/// Writes the members of an object (or items of a list) at `indent`.
fn write_block(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(obj) => {
            let mut keys: Vec<&String> = obj.keys().collect();
            keys.sort();
            for key in keys {
                let v = &obj[key.as_str()];
                push_indent(out, indent);
                out.push_str(&string_scalar(key));
                out.push(':');
                write_value_after_key(out, v, indent);
            }
        }
        Value::Array(items) => {
            for item in items {
                push_indent(out, indent);
                out.push('-');
                match item {
                    Value::Object(obj) if !obj.is_empty() => {
                        // First member on the dash line, the rest aligned under it.
                        let mut nested = String::new();
                        write_block(&mut nested, item, indent + 2);
                        out.push(' ');
                        out.push_str(nested.trim_start());
                    }
                    Value::Array(inner) if !inner.is_empty() => {
                        out.push('\n');
                        write_block(out, item, indent + 2);
                    }
                    _ => {
                        out.push(' ');
                        out.push_str(&scalar(item));
                        out.push('\n');
                    }
                }
            }
        }
        other => {
            push_indent(out, indent);
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

fn write_value_after_key(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Object(obj) if !obj.is_empty() => {
            out.push('\n');
            write_block(out, v, indent + 2);
        }
        // go-yaml writes sequences at the same indentation as their key.
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_block(out, v, indent);
        }
        _ => {
            out.push(' ');
            out.push_str(&scalar(v));
            out.push('\n');
        }
    }
}

fn push_indent(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number(n),
        Value::String(s) => string_scalar(s),
        Value::Array(_) => "[]".to_string(),
        Value::Object(_) => "{}".to_string(),
    }
}

/// Integral floats print without a fraction (Go writes `qps: 5`).
fn number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 && f.abs() < 1e15 => {
            format!("{}", f as i64)
        }
        _ => n.to_string(),
    }
}

/// A plain scalar when it is unambiguous, else a double-quoted (JSON-escaped) one.
fn string_scalar(s: &str) -> String {
    if is_plain_safe(s) {
        s.to_string()
    } else {
        crate::error::quote(s)
    }
}

fn is_plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._/:-+@=,()*".contains(c);
    if !(first.is_ascii_alphanumeric() || first == '/' || first == '.')
        || !s.chars().all(allowed)
        || s.ends_with(':')
        || s.contains(": ")
    {
        return false;
    }
    // Words YAML 1.1 or 1.2 would read as booleans or null, and anything numeric-looking.
    const RESERVED: &[&str] = &[
        "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~",
    ];
    let lower = s.to_ascii_lowercase();
    if RESERVED.contains(&lower.as_str()) || lower.starts_with(".inf") || lower == ".nan" {
        return false;
    }
    if s.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '+' || c == '-')
        && !reads_back_as_string(s)
    {
        return false;
    }
    true
}

/// True when both our YAML reader and a YAML 1.1 reader (go-yaml) would see a string: not a
/// number, not `1_000`, not sexagesimal (`1:30`), not a timestamp (`2001-12-14`).
fn reads_back_as_string(s: &str) -> bool {
    let ours = serde_saphyr::from_str::<Value>(s).ok();
    if ours != Some(Value::String(s.to_string())) {
        return false;
    }
    let body = s.trim_start_matches(['+', '-']);
    let digits_or = |extra: &str| {
        body.chars()
            .all(|c| c.is_ascii_digit() || extra.contains(c))
    };
    if digits_or("_") {
        return false;
    }
    // YAML 1.1 sexagesimal: 190:20:30 or 190:20:30.15 (the first part has no dot).
    let mut parts = body.split(':');
    let first = parts.next().unwrap_or_default();
    let sexagesimal = body.contains(':')
        && !first.is_empty()
        && first.chars().all(|c| c.is_ascii_digit() || c == '_')
        && parts.all(|p| {
            let whole = p.split('.').next().unwrap_or_default();
            (1..=2).contains(&whole.len()) && digits_or("_:.")
        });
    let b = body.as_bytes();
    let timestamp = b.len() >= 10 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-';
    !(sexagesimal || timestamp)
}
