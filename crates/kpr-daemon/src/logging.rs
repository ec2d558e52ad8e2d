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
        let (mo, d, h, mi, s) = civil(now.as_secs());
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

/// UTC month, day, hour, minute, second of a Unix time (Howard Hinnant's civil-from-days).
fn civil(secs: u64) -> (u64, u64, u64, u64, u64) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    (m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::civil;

    #[test]
    fn civil_time_matches_known_dates() {
        // 2026-11-24T11:48:32Z
        assert_eq!(civil(1_795_520_912), (11, 24, 11, 48, 32));
        // 2024-02-29T00:00:00Z (leap day)
        assert_eq!(civil(1_709_164_800), (2, 29, 0, 0, 0));
    }
}
