//! The status page's chart: the last syncs' durations (bars) and network-programming
//! latencies (points) as inline SVG, two panels with their own scales.

use super::{escape, fmt_secs, short_time};
use crate::debug::SyncRecord;
use std::fmt::Write as _;

/// An inline SVG chart of the syncs' durations (bars) and network-programming latencies
/// (points), oldest left, in two panels with their own scales.
pub fn sync_chart(syncs: &[SyncRecord]) -> String {
    const W: f64 = 600.0;
    const LEFT: f64 = 62.0;
    const RIGHT: f64 = 12.0;
    const PANEL: f64 = 64.0;
    const TOP: f64 = 20.0;
    const GAP: f64 = 38.0;
    let height = TOP + PANEL + GAP + PANEL + 24.0;
    let mut s = String::with_capacity(24 * 1024);
    let _ = write!(
        s,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {height}\" width=\"{W}\" height=\"{height}\" role=\"img\" aria-label=\"Sync durations and network-programming latencies of the last {} syncs\">",
        syncs.len()
    );
    if syncs.is_empty() {
        let _ = write!(
            s,
            "<text x=\"{LEFT}\" y=\"{}\" class=\"axis\">no syncs yet</text></svg>",
            TOP + 20.0
        );
        return s;
    }
    let slots = syncs.len().max(30) as f64;
    let slot = (W - LEFT - RIGHT) / slots;
    let x = |i: usize| LEFT + slot * i as f64;
    let durations: Vec<f64> = syncs.iter().map(|r| r.duration_seconds).collect();
    let latencies: Vec<Option<f64>> = syncs
        .iter()
        .map(|r| r.programming_latency_seconds)
        .collect();
    // Panel 1: durations.
    let top1 = TOP;
    let max1 = nice_max(durations.iter().copied().fold(0.0, f64::max));
    axis(&mut s, "Sync duration", top1, PANEL, max1, LEFT, W - RIGHT);
    for (i, r) in syncs.iter().enumerate() {
        let h = (r.duration_seconds / max1 * PANEL)
            .clamp(0.0, PANEL)
            .max(1.0);
        let class = if r.result.starts_with("ok") {
            "bar"
        } else {
            "bar fail"
        };
        let _ = write!(
            s,
            "<rect class=\"{class}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\"><title>{} {}: {}, {} operations, {}</title></rect>",
            x(i) + slot * 0.15,
            top1 + PANEL - h,
            slot * 0.7,
            escape(&short_time(&r.time)),
            if r.full { "full" } else { "partial" },
            fmt_secs(r.duration_seconds),
            r.operations,
            escape(&r.result)
        );
    }
    // Panel 2: programming latencies.
    let top2 = TOP + PANEL + GAP;
    let max2 = nice_max(latencies.iter().flatten().copied().fold(0.0, f64::max));
    axis(
        &mut s,
        "Network-programming latency",
        top2,
        PANEL,
        max2,
        LEFT,
        W - RIGHT,
    );
    let points: Vec<(f64, f64, usize, f64)> = latencies
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            l.map(|l| {
                let y = top2 + PANEL - (l / max2 * PANEL).clamp(0.0, PANEL);
                (x(i) + slot / 2.0, y, i, l)
            })
        })
        .collect();
    if points.is_empty() {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" class=\"axis\">none yet (measured from EndpointSlice trigger times)</text>",
            LEFT + 8.0,
            top2 + PANEL / 2.0
        );
    } else {
        s.push_str("<polyline class=\"lat\" points=\"");
        for (px, py, _, _) in &points {
            let _ = write!(s, "{px:.1},{py:.1} ");
        }
        s.push_str("\"/>");
        for (px, py, i, l) in &points {
            let _ = write!(
                s,
                "<circle class=\"dot\" cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\"><title>{}: {}</title></circle>",
                escape(&short_time(&syncs[*i].time)),
                fmt_secs(*l)
            );
        }
    }
    // The time span under the second panel.
    let first = short_time(&syncs[0].time);
    let last = short_time(&syncs[syncs.len() - 1].time);
    let _ = write!(
        s,
        "<text class=\"axis\" x=\"{LEFT}\" y=\"{}\">{} syncs, {} to {} UTC, oldest left</text></svg>",
        top2 + PANEL + 16.0,
        syncs.len(),
        escape(&first),
        escape(last.get(11..).unwrap_or(&last))
    );
    s
}

/// A panel's title, frame, grid lines and scale.
fn axis(s: &mut String, title: &str, top: f64, height: f64, max: f64, left: f64, right: f64) {
    let _ = write!(
        s,
        "<text class=\"ptitle\" x=\"{left}\" y=\"{:.1}\">{title}</text>",
        top - 7.0
    );
    for k in 0..=2 {
        let v = max * f64::from(k) / 2.0;
        let y = top + height - height * f64::from(k) / 2.0;
        let _ = write!(
            s,
            "<line class=\"grid\" x1=\"{left}\" x2=\"{right}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/><text class=\"axis\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y + 4.0,
            fmt_secs(v)
        );
    }
}

/// The smallest 1, 2 or 5 × 10^k seconds at or above `v` (at least 1 ms).
pub(super) fn nice_max(v: f64) -> f64 {
    const STEPS: [f64; 22] = [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0,
        100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
    ];
    STEPS
        .iter()
        .copied()
        .find(|s| *s >= v)
        .unwrap_or_else(|| v.ceil())
}
