//! The crate's error types: one classified enum per failure family, never matched as strings.
//!
//! `FieldError` renders like Go's `field.Error` (`<path>: Invalid value: <value>: <detail>`), and
//! `ConfigError::Invalid` like `field.ErrorList.ToAggregate()` (one error bare, several in `[..]`).

use std::fmt;
use std::path::PathBuf;

/// Anything that stops a configuration from being loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("failed to read configuration file {path:?}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a decodable v1alpha1 `KubeProxyConfiguration` (fatal, §9.1).
    #[error("failed to decode: {0}")]
    Decode(#[from] DecodeError),
    /// Validation (§9.3) found one or more errors; all are listed.
    #[error("{}", render_list(.0))]
    Invalid(Vec<FieldError>),
    /// `--hostname-override` was given but is empty after trimming (§2.2).
    #[error("empty hostname-override is invalid")]
    EmptyHostnameOverride,
}

/// Why a configuration document failed to decode. Strict-decoding problems (unknown or duplicate
/// fields) are not errors: they become a lenient-decoding warning.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Neither YAML nor JSON.
    #[error("{message}")]
    Syntax {
        /// The parser's message (with line and column).
        message: String,
    },
    /// The document is YAML but not a mapping (a scalar or a list).
    #[error("the document is not a mapping (found {found})")]
    NotAnObject {
        /// What was found: "a string", "a list", ...
        found: &'static str,
    },
    /// `kind` is missing or empty.
    #[error("Object 'Kind' is missing")]
    MissingKind,
    /// `apiVersion` is missing or empty.
    #[error("Object 'apiVersion' is missing")]
    MissingApiVersion,
    /// `apiVersion` / `kind` name another type.
    #[error("no kind {kind:?} is registered for version {api_version:?}")]
    UnknownType {
        /// The document's apiVersion.
        api_version: String,
        /// The document's kind.
        kind: String,
    },
    /// A field has the wrong type or an unparsable value (e.g. `syncPeriod: 10`).
    #[error("{message}")]
    Value {
        /// serde's message.
        message: String,
    },
}

/// One validation error, naming the field by its JSON path under `KubeProxyConfiguration`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// e.g. `KubeProxyConfiguration.iptables.masqueradeBit`.
    pub field: String,
    /// What is wrong.
    pub kind: FieldErrorKind,
}

/// The classes of Go's `field.Error` that configuration validation uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldErrorKind {
    /// `Invalid value: <value>: <detail>`; `value` is already rendered (strings quoted).
    Invalid {
        /// The rendered value.
        value: String,
        /// Why it is invalid.
        detail: String,
    },
    /// `Unsupported value: "<value>": supported values: "a", "b"`.
    NotSupported {
        /// The value given.
        value: String,
        /// The accepted values.
        supported: Vec<String>,
        /// Extra explanation appended in parentheses.
        note: Option<String>,
    },
}

impl FieldError {
    /// `field.Invalid` with a value that is rendered as a quoted string.
    pub fn invalid_str(field: impl Into<String>, value: &str, detail: impl Into<String>) -> Self {
        Self::invalid_raw(field, quote(value), detail)
    }

    /// `field.Invalid` with a value rendered as given (numbers, lists).
    pub fn invalid_raw(
        field: impl Into<String>,
        value: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Invalid {
                value: value.into(),
                detail: detail.into(),
            },
        }
    }

    /// `field.NotSupported`.
    pub fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> Self {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::NotSupported {
                value: value.to_string(),
                supported: supported.iter().map(|s| s.to_string()).collect(),
                note: None,
            },
        }
    }

    /// Adds a parenthesised note to a `NotSupported` error (no-op for other kinds).
    pub fn with_note(mut self, text: impl Into<String>) -> Self {
        if let FieldErrorKind::NotSupported { note, .. } = &mut self.kind {
            *note = Some(text.into());
        }
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FieldErrorKind::Invalid { value, detail } => {
                write!(f, "{}: Invalid value: {value}: {detail}", self.field)
            }
            FieldErrorKind::NotSupported {
                value,
                supported,
                note,
            } => {
                let list: Vec<String> = supported.iter().map(|s| quote(s)).collect();
                write!(
                    f,
                    "{}: Unsupported value: {}: supported values: {}",
                    self.field,
                    quote(value),
                    list.join(", ")
                )?;
                if let Some(note) = note {
                    write!(f, " ({note})")?;
                }
                Ok(())
            }
        }
    }
}

/// Go's `%q` for the strings we meet (JSON escaping is close enough).
pub(crate) fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

fn render_list(errors: &[FieldError]) -> String {
    match errors {
        [one] => one.to_string(),
        many => {
            let parts: Vec<String> = many.iter().map(ToString::to_string).collect();
            format!("[{}]", parts.join(", "))
        }
    }
}
