//! component-base's `LoggingConfiguration` as it appears in the `logging:` block, including
//! `TimeOrMetaDuration` (`flushFrequency`: nanoseconds or a duration string, written back in the
//! form read) and resource quantities kept as written (`infoBufferSize: "0"`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::GoDuration;

/// component-base `LoggingConfiguration`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LoggingConfiguration {
    /// "text" or "json" (omitted when empty).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub format: String,
    /// Log flush interval: nanoseconds or a duration string.
    pub flush_frequency: FlushFrequency,
    /// klog verbosity (`-v`).
    pub verbosity: u32,
    /// Per-file verbosity (`--vmodule`), omitted when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vmodule: Vec<VModuleItem>,
    /// Format-specific options.
    pub options: FormatOptions,
}

/// component-base `TimeOrMetaDuration`: an integer of nanoseconds or a duration string, written
/// back in the form it was read (a defaulted value is written as a string).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushFrequency {
    /// The interval.
    pub duration: GoDuration,
    /// Whether it is serialized as "5s" (true) or as nanoseconds (false).
    pub serialize_as_string: bool,
}

impl Serialize for FlushFrequency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.serialize_as_string {
            self.duration.serialize(serializer)
        } else {
            serializer.serialize_i64(self.duration.as_nanos())
        }
    }
}

impl<'de> Deserialize<'de> for FlushFrequency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Nanos(i64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Nanos(n) => Ok(FlushFrequency {
                duration: GoDuration::from_nanos(n),
                serialize_as_string: false,
            }),
            Raw::Text(t) => Ok(FlushFrequency {
                duration: GoDuration::parse(&t).map_err(serde::de::Error::custom)?,
                serialize_as_string: true,
            }),
        }
    }
}

/// One `--vmodule` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VModuleItem {
    /// File name pattern (glob, without .go).
    pub file_pattern: String,
    /// Verbosity for matching files.
    pub verbosity: u32,
}

/// component-base `FormatOptions`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FormatOptions {
    /// Text format options.
    pub text: OutputRoutingOptions,
    /// JSON format options.
    pub json: OutputRoutingOptions,
}

/// component-base `OutputRoutingOptions` (inlined into `TextOptions` / `JSONOptions`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OutputRoutingOptions {
    /// Info messages to stdout, errors to stderr (omitted when false).
    #[serde(skip_serializing_if = "is_false")]
    pub split_stream: bool,
    /// A resource quantity ("0", "64Ki"); kept as written.
    #[serde(deserialize_with = "deserialize_quantity")]
    pub info_buffer_size: String,
}

/// A resource quantity is a string in files but Go also accepts a bare number.
fn deserialize_quantity<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Float(f64),
        Text(String),
    }
    Ok(match Raw::deserialize(deserializer)? {
        Raw::Int(i) => i.to_string(),
        Raw::Float(f) => f.to_string(),
        Raw::Text(t) => t,
    })
}

fn is_false(b: &bool) -> bool {
    !*b
}
