//! Logging in kube-proxy's formats, so kube-proxy-rs lines look like kube-proxy's in operators'
//! log pipelines (`--logging-format`, or `logging.format` in the file):
//! - `text` (the default), klog's header:
//!   `I1124 10:41:57.123456   12345 file.rs:42] "message" key="value"`;
//! - `json`, component-base's JSON logger (kubernetes/kubernetes
//!   `staging/src/k8s.io/component-base/logs/json/json.go`, zap through zapr), one object a
//!   line: `{"ts":1765108800123.4568,"caller":"src/app.rs:146","msg":"Wrote configuration","v":0,"file":"out.yaml"}`.
//!   `ts` is milliseconds since the epoch as a float (`epochMillisTimeEncoder`), `caller` the
//!   source file's last directory and name with the line (zap's `ShortCallerEncoder`), `msg`
//!   the message; info lines then carry `v` (their verbosity, zapr's `LogInfoLevel("v")`),
//!   error lines none; then the event's key/value pairs in order, and an error value last
//!   under `err` (zapr's `ErrorKey("err")`). No level field: zap's encoder is not given one.
//!   Warnings are info lines at `v` 0, as klog's `Warning` reaches a logr logger.
//!
//! `-v N` maps to tracing levels: errors, warnings and `info` always print (klog V(0));
//! `debug` events need `-v 2` or more (their `v` is 2), `trace` events `-v 4` or more (4).
//! With the format's `splitStream` option, info lines go to stdout and error lines to stderr;
//! otherwise everything goes to stderr, as upstream.

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber in klog's text format for a klog verbosity (used before the
/// configuration is known, and by the debug subcommands).
pub fn init(verbosity: u32) {
    install(Format::Text, verbosity, false);
}

/// Installs the global subscriber the configuration asks for (format, verbosity, split
/// streams).
pub fn init_with(settings: &kpr_config::LogSettings) {
    let format = if settings.format == "json" {
        Format::Json
    } else {
        Format::Text
    };
    install(format, settings.verbosity, settings.split_stream);
}

/// The line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

fn install(format: Format, verbosity: u32, split_stream: bool) {
    let level = match verbosity {
        0 | 1 => Level::INFO,
        2 | 3 => Level::DEBUG,
        _ => Level::TRACE,
    };
    let writer = if split_stream {
        BoxMakeWriter::new(
            std::io::stderr
                .with_max_level(Level::ERROR)
                .or_else(std::io::stdout),
        )
    } else {
        BoxMakeWriter::new(std::io::stderr)
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(writer)
        .with_ansi(false);
    let _ = match format {
        Format::Text => builder
            .event_format(Klog {
                pid: std::process::id(),
            })
            .try_init(),
        Format::Json => builder.event_format(Json).try_init(),
    };
}

/// klog's header: severity, MMDD, wall time, pid, file:line.
#[derive(Debug)]
struct Klog {
    pid: u32,
}

impl<S, N> FormatEvent<S, N> for Klog
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let sev = match *meta.level() {
            Level::ERROR => 'E',
            Level::WARN => 'W',
            _ => 'I',
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let (_, mo, d, h, mi, s) = kpr_ops::time::civil(now.as_secs());
        let file = meta
            .file()
            .and_then(|f| f.rsplit('/').next())
            .unwrap_or("?");
        write!(
            w,
            "{sev}{mo:02}{d:02} {h:02}:{mi:02}:{s:02}.{:06} {:>7} {file}:{}] ",
            now.subsec_micros(),
            self.pid,
            meta.line().unwrap_or(0)
        )?;
        ctx.format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// component-base's JSON lines (see the module documentation).
#[derive(Debug)]
struct Json;

impl<S, N> FormatEvent<S, N> for Json
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let meta = event.metadata();
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let line = json_line(
            now,
            &caller(meta.file(), meta.line()),
            *meta.level(),
            &fields,
        );
        w.write_str(&line)
    }
}

/// One JSON line (with its newline): `ts`, `caller`, `msg`, `v` unless an error, the pairs, `err`.
fn json_line(now: std::time::Duration, caller: &str, level: Level, f: &JsonFields) -> String {
    // zap's float encoding: the shortest decimal that reads back, never an exponent here.
    let ts = now.as_nanos() as f64 / 1e6;
    let mut out = String::with_capacity(128);
    let _ = write!(
        out,
        "{{\"ts\":{ts},\"caller\":{},\"msg\":{}",
        quote(caller),
        quote(&f.message)
    );
    if level != Level::ERROR {
        let v = match level {
            Level::DEBUG => 2,
            Level::TRACE => 4,
            _ => 0,
        };
        let _ = write!(out, ",\"v\":{v}");
    }
    for (key, value) in &f.pairs {
        let _ = write!(out, ",{}:{value}", quote(key));
    }
    if let Some(err) = &f.err {
        let _ = write!(out, ",\"err\":{}", quote(err));
    }
    out.push_str("}\n");
    out
}

/// zap's `ShortCallerEncoder`: the last directory and the file name, and the line.
fn caller(file: Option<&str>, line: Option<u32>) -> String {
    let file = file.unwrap_or("?");
    let mut parts = file.rsplitn(3, '/');
    let name = parts.next().unwrap_or("?");
    let short = match parts.next() {
        Some(dir) => format!("{dir}/{name}"),
        None => name.to_owned(),
    };
    format!("{short}:{}", line.unwrap_or(0))
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// An event's fields: the message, the other pairs as JSON values in order, and an error.
#[derive(Debug, Default)]
struct JsonFields {
    message: String,
    pairs: Vec<(String, String)>,
    err: Option<String>,
}

impl JsonFields {
    fn push(&mut self, field: &Field, json: String) {
        self.pairs.push((field.name().to_owned(), json));
    }
}

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        match field.name() {
            "message" => self.message = text,
            "err" | "error" => self.err = Some(text),
            _ => self.push(field, quote(&text)),
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "err" | "error" => self.err = Some(value.to_owned()),
            _ => self.push(field, quote(value)),
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        match field.name() {
            "message" => self.message = value.to_string(),
            _ => self.err = Some(value.to_string()),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, value.to_string());
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.push(field, value.to_string());
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.push(field, value.to_string());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, value.to_string());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        let json = if value.is_finite() {
            format!("{value}")
        } else {
            // zap writes NaN and the infinities as strings.
            quote(&value.to_string())
        };
        self.push(field, json);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fields(message: &str, pairs: &[(&str, &str)], err: Option<&str>) -> JsonFields {
        JsonFields {
            message: message.to_owned(),
            pairs: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            err: err.map(str::to_owned),
        }
    }

    #[test]
    fn lines_have_upstreams_keys_in_upstreams_order() {
        let now = Duration::new(1_765_108_800, 123_456_789);
        let info = json_line(
            now,
            "src/app.rs:146",
            Level::INFO,
            &fields("Wrote configuration", &[("file", "\"out.yaml\"")], None),
        );
        assert_eq!(
            info,
            "{\"ts\":1765108800123.4568,\"caller\":\"src/app.rs:146\",\"msg\":\"Wrote configuration\",\"v\":0,\"file\":\"out.yaml\"}\n"
        );
        let debug = json_line(
            now,
            "x.rs:1",
            Level::DEBUG,
            &fields("m", &[("n", "3")], None),
        );
        assert!(debug.contains(",\"v\":2,\"n\":3}"), "{debug}");
        let trace = json_line(now, "x.rs:1", Level::TRACE, &fields("m", &[], None));
        assert!(trace.contains(",\"v\":4}"), "{trace}");
        // An error: no v, the error last under err (zapr).
        let error = json_line(
            now,
            "api/event.rs:9",
            Level::ERROR,
            &fields(
                "Server rejected event (will not retry!)",
                &[("event", "\"default/n.1\"")],
                Some("403 \"Forbidden\""),
            ),
        );
        assert_eq!(
            error,
            "{\"ts\":1765108800123.4568,\"caller\":\"api/event.rs:9\",\"msg\":\"Server rejected event (will not retry!)\",\"event\":\"default/n.1\",\"err\":\"403 \\\"Forbidden\\\"\"}\n"
        );
        let v: serde_json::Value = serde_json::from_str(&error).unwrap();
        assert!(v.get("v").is_none());
        let warn = json_line(now, "x.rs:1", Level::WARN, &fields("w", &[], None));
        assert!(warn.contains(",\"v\":0}"), "{warn}");
    }

    #[test]
    fn caller_is_the_last_directory_and_file() {
        assert_eq!(
            caller(Some("crates/kpr-daemon/src/sync/after.rs"), Some(12)),
            "sync/after.rs:12"
        );
        assert_eq!(caller(Some("src/app.rs"), Some(3)), "src/app.rs:3");
        assert_eq!(caller(Some("main.rs"), Some(3)), "main.rs:3");
        assert_eq!(caller(None, None), "?:0");
    }

    #[test]
    fn fields_are_typed_json_values() {
        // Through tracing itself: a subscriber local to this thread.
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_writer(move || out.clone())
            .event_format(Json)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let e = std::io::Error::other("boom");
            tracing::info!(n = 3_u64, neg = -2_i64, ok = true, ratio = 0.5, name = %"web", list = ?["a"], "Synced \"x\"");
            tracing::error!(err = %e, "Failed");
            tracing::warn!(error = &e as &(dyn std::error::Error + 'static), "Careful");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        let l = &lines[0];
        assert_eq!(l["msg"], "Synced \"x\"");
        assert_eq!(l["v"], 0);
        assert_eq!(l["n"], 3);
        assert_eq!(l["neg"], -2);
        assert_eq!(l["ok"], true);
        assert_eq!(l["ratio"], 0.5);
        assert_eq!(l["name"], "web");
        assert_eq!(l["list"], "[\"a\"]");
        assert!(l["ts"].as_f64().unwrap() > 1.7e12, "milliseconds: {l}");
        assert!(
            l["caller"].as_str().unwrap().starts_with("src/logging.rs:"),
            "{l}"
        );
        assert_eq!(lines[1]["err"], "boom");
        assert!(lines[1].get("v").is_none());
        assert_eq!(lines[2]["err"], "boom");
        assert_eq!(lines[2]["v"], 0);
        assert!(text.lines().all(|l| l.starts_with("{\"ts\":")), "{text}");
    }
}
