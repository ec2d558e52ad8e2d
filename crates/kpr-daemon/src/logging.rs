//! Logging in klog's text format, so kube-proxy-rs lines look like kube-proxy's in operators'
//! log pipelines: `I1124 10:41:57.123456   12345 file.rs:42] "message" key="value"`.
//!
//! `-v N` maps to tracing levels: errors, warnings and `info` always print (klog V(0));
//! `debug` events need `-v 2` or more, `trace` events `-v 4` or more.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber for a klog verbosity.
pub fn init(verbosity: u32) {
    let level = match verbosity {
        0 | 1 => Level::INFO,
        2 | 3 => Level::DEBUG,
        _ => Level::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(Klog {
            pid: std::process::id(),
        })
        .try_init();
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
