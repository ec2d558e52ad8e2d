//! Samples and their summaries: p50/p99 of a series of latencies, and sampling loops bounded by
//! a count and a time budget (a capped loop says so; it is never silent).

use std::time::{Duration, Instant};

/// p50 and p99 of `count` samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Quantiles {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) count: usize,
}

impl Quantiles {
    pub(crate) fn of(mut samples: Vec<Duration>) -> Option<Quantiles> {
        if samples.is_empty() {
            return None;
        }
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Some(Quantiles {
            p50: at(0.5),
            p99: at(0.99),
            count: samples.len(),
        })
    }
}

/// Runs `f(step)` for step 1..=`want` while under `budget` (at least `min` times); returns
/// the samples, and a note when the budget cut the series short.
pub(crate) fn bounded(
    what: &str,
    want: usize,
    min: usize,
    budget: Duration,
    mut f: impl FnMut(u32) -> Duration,
) -> (Vec<Duration>, Option<String>) {
    let start = Instant::now();
    let mut out = Vec::with_capacity(want);
    for step in 1..=want {
        if out.len() >= min && start.elapsed() > budget {
            let note = format!(
                "capped: {what}: {} of {want} samples (time budget {:?})",
                out.len(),
                budget
            );
            return (out, Some(note));
        }
        out.push(f(step as u32));
    }
    (out, None)
}

/// `1.23 s`, `45.6 ms`, `789 µs`.
pub(crate) fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.01 {
        format!("{:.0} ms", s * 1e3)
    } else if s >= 0.001 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

/// `12,345`.
pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_formats() {
        let q = Quantiles::of((1..=200).map(Duration::from_micros).collect()).expect("samples");
        assert_eq!(q.p50, Duration::from_micros(101));
        assert_eq!(q.p99, Duration::from_micros(198));
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(fmt_dur(Duration::from_micros(250)), "250 µs");
        assert_eq!(fmt_dur(Duration::from_millis(1500)), "1.50 s");
    }
}
