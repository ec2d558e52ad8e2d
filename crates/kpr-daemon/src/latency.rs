//! Network-programming latency (upstream's `network_programming_duration_seconds`): from an
//! EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` annotation (RFC 3339, set
//! by the EndpointSlice controller when the change began) to the sync that put it in the
//! kernel. Pure: the caller passes the time of the commit.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses `2026-12-01T07:00:00Z`, with optional fractional seconds and a `Z` or `±hh:mm`
/// offset. `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut at = 19;
    let mut nanos = 0u32;
    if b.get(at) == Some(&b'.') {
        let start = at + 1;
        at = start;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        let digits = s.get(start..at.min(start + 9))?;
        if digits.is_empty() {
            return None;
        }
        nanos = digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32);
    }
    let offset = match s.get(at..)? {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (num(at + 1..at + 3)? * 3600 + num(at + 4..at + 6)? * 60)
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The latency of each trigger time up to `committed`; unparsable or future times are
/// skipped (clock skew between the controller and this node), as upstream does.
pub fn network_programming(trigger_times: &[String], committed: SystemTime) -> Vec<Duration> {
    trigger_times
        .iter()
        .filter_map(|t| parse_rfc3339(t))
        .filter_map(|t| committed.duration_since(t).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn rfc3339_as_the_endpointslice_controller_writes_it() {
        assert_eq!(
            parse_rfc3339("2026-11-24T11:48:32Z"),
            Some(at(1_795_520_912, 0))
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z"),
            Some(at(1_709_164_800, 0))
        );
        assert_eq!(
            parse_rfc3339("2026-11-24T11:48:32.25Z"),
            Some(at(1_795_520_912, 250_000_000))
        );
        assert_eq!(
            parse_rfc3339("2026-11-24T12:48:32+01:00"),
            Some(at(1_795_520_912, 0))
        );
        for bad in [
            "",
            "2026-11-24",
            "2026-13-24T11:48:32Z",
            "2026-11-24T11:48:32",
            "x026-11-24T11:48:32Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn latencies_skip_future_and_broken_times() {
        let now = at(1_795_520_912, 500_000_000);
        let got = network_programming(
            &[
                "2026-11-24T11:48:30Z".into(),
                "garbage".into(),
                "2026-11-24T11:49:00Z".into(),
            ],
            now,
        );
        assert_eq!(got, [Duration::from_millis(2500)]);
    }
}
