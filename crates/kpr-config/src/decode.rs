//! Decoding a `--config` document (§9.1): YAML or JSON, strict first, lenient on a strict error.
//!
//! A strict error is an unknown field or a duplicate key. Upstream then decodes again ignoring
//! unknown fields (duplicates: last wins) and logs "Using lenient decoding as strict decoding
//! failed"; we return that line as a warning. Everything else (not YAML/JSON, not a mapping,
//! wrong `apiVersion`/`kind`, a value of the wrong type) is a fatal [`DecodeError`].

use serde_json::{Map, Value};
use serde_saphyr::options::DuplicateKeyPolicy;

use crate::error::DecodeError;
use crate::logging::VModuleItem;
use crate::types::{API_VERSION, KIND, KubeProxyConfiguration};

/// The prefix of the warning emitted when strict decoding fails and lenient decoding succeeds.
pub const LENIENT_DECODING_WARNING: &str = "Using lenient decoding as strict decoding failed";

/// A decoded (not yet defaulted) configuration and the warnings decoding produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    /// The document as written (zero values not yet defaulted).
    pub config: KubeProxyConfiguration,
    /// At most one line: the lenient-decoding warning naming the offending fields.
    pub warnings: Vec<String>,
}

/// Decodes a v1alpha1 `KubeProxyConfiguration` from YAML or JSON text.
pub fn decode(text: &str) -> Result<Decoded, DecodeError> {
    let (mut value, duplicate) = parse_tree(text)?;
    check_type_meta(&value)?;
    strip_nulls(&mut value);

    let mut strict_errors = Vec::new();
    unknown_fields(&value, &schema(), "", &mut strict_errors);
    if let Some(duplicate) = duplicate {
        strict_errors.push(duplicate);
    }

    let config: KubeProxyConfiguration = match serde_json::from_value(value.clone()) {
        Ok(config) => config,
        Err(e) => {
            let message = match locate_value_error(&value, &[]) {
                Some(field) => format!("{field}: {e}"),
                None => e.to_string(),
            };
            return Err(DecodeError::Value { message });
        }
    };
    let warnings = if strict_errors.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "{LENIENT_DECODING_WARNING}: strict decoding error: {}",
            strict_errors.join(", ")
        )]
    };
    Ok(Decoded { config, warnings })
}

/// Parses the text into a JSON tree. Returns the duplicate-key message when only the lenient
/// parse (last key wins) succeeded.
fn parse_tree(text: &str) -> Result<(Value, Option<String>), DecodeError> {
    let strict_err = match serde_saphyr::from_str_with_options::<Value>(text, yaml_options(true)) {
        Ok(v) => return Ok((v, None)),
        Err(e) => e,
    };
    if let Ok(v) = serde_saphyr::from_str_with_options::<Value>(text, yaml_options(false)) {
        return Ok((v, Some(duplicate_message(&strict_err))));
    }
    // JSON that the YAML parser rejects (e.g. tabs in odd places) still is valid input.
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return Ok((v, None));
    }
    Err(DecodeError::Syntax {
        message: strict_err.to_string(),
    })
}

/// Go's wording for a repeated key, with the line of the repetition.
fn duplicate_message(err: &serde_saphyr::Error) -> String {
    match err {
        serde_saphyr::Error::DuplicateMappingKey {
            key: Some(key),
            location,
        } => format!(
            "key {} already set in map (line {})",
            crate::error::quote(key),
            location.line()
        ),
        other => other.to_string(),
    }
}

fn yaml_options(strict: bool) -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = if strict {
        DuplicateKeyPolicy::Error
    } else {
        DuplicateKeyPolicy::LastWins
    };
    options.with_snippet = false;
    options
}

fn check_type_meta(value: &Value) -> Result<(), DecodeError> {
    let obj = match value {
        Value::Object(obj) => obj,
        Value::Null => return Err(DecodeError::MissingKind),
        Value::Array(_) => return Err(DecodeError::NotAnObject { found: "a list" }),
        Value::String(_) => return Err(DecodeError::NotAnObject { found: "a string" }),
        Value::Number(_) => return Err(DecodeError::NotAnObject { found: "a number" }),
        Value::Bool(_) => return Err(DecodeError::NotAnObject { found: "a boolean" }),
    };
    let field = |name: &str| match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Ok(String::new()),
        Some(other) => Err(DecodeError::Value {
            message: format!("{name}: expected a string, found {other}"),
        }),
    };
    let (kind, api_version) = (field("kind")?, field("apiVersion")?);
    if kind.is_empty() {
        return Err(DecodeError::MissingKind);
    }
    if api_version.is_empty() {
        return Err(DecodeError::MissingApiVersion);
    }
    if kind != KIND || api_version != API_VERSION {
        return Err(DecodeError::UnknownType { api_version, kind });
    }
    Ok(())
}

/// Go's decoder leaves a field at its zero value for `null`; removing `null` members gives the
/// same result through `#[serde(default)]` (and `None` for pointers).
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(obj) => {
            obj.retain(|_, v| !v.is_null());
            obj.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// The shape of every field: a document with all optional parts present, serialized.
/// Maps with free-form keys are listed in [`FREE_FORM_MAPS`].
fn schema() -> Value {
    let mut probe = KubeProxyConfiguration::default();
    crate::defaults::set_defaults(&mut probe);
    probe.feature_gates.insert("Probe".to_string(), true);
    probe.windows_run_as_service = true;
    probe.logging.vmodule = vec![VModuleItem::default()];
    probe.logging.options.text.split_stream = true;
    probe.logging.options.json.split_stream = true;
    probe.node_port_addresses = Some(vec![String::new()]);
    probe.ipvs.exclude_cidrs = Some(vec![String::new()]);
    serde_json::to_value(&probe).unwrap_or(Value::Null)
}

const FREE_FORM_MAPS: &[&str] = &["featureGates"];

fn unknown_fields(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    match (value, schema) {
        (Value::Object(obj), Value::Object(known)) => {
            if FREE_FORM_MAPS.contains(&path) {
                return;
            }
            check_members(obj, known, path, out);
        }
        (Value::Array(items), Value::Array(known)) => {
            if let Some(first) = known.first() {
                for (i, item) in items.iter().enumerate() {
                    unknown_fields(item, first, &format!("{path}[{i}]"), out);
                }
            }
        }
        // Type mismatches are reported by the typed decode.
        _ => {}
    }
}

fn check_members(
    obj: &Map<String, Value>,
    known: &Map<String, Value>,
    path: &str,
    out: &mut Vec<String>,
) {
    for (key, v) in obj {
        let child = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match known.get(key) {
            Some(s) => unknown_fields(v, s, &child, out),
            None => out.push(format!("unknown field {}", crate::error::quote(&child))),
        }
    }
}

/// Finds the path of the member that fails to decode, by decoding documents that contain only
/// one member at a time (the error path only; serde_json's errors carry no path).
fn locate_value_error(value: &Value, prefix: &[String]) -> Option<String> {
    let Value::Object(obj) = value else {
        return None;
    };
    for (key, child) in obj {
        let mut path = prefix.to_vec();
        path.push(key.clone());
        if serde_json::from_value::<KubeProxyConfiguration>(nest(&path, child.clone())).is_ok() {
            continue;
        }
        return locate_value_error(child, &path).or_else(|| Some(path.join(".")));
    }
    None
}

/// `{"a": {"b": leaf}}` for the path `[a, b]`.
fn nest(path: &[String], leaf: Value) -> Value {
    path.iter().rev().fold(leaf, |inner, key| {
        let mut obj = Map::new();
        obj.insert(key.clone(), inner);
        Value::Object(obj)
    })
}
