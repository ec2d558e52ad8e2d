//! UTC calendar arithmetic and RFC 3339, without a time crate: what klog headers, the health
//! bodies (Go's `RFC3339Nano`) and EndpointSlice trigger times need.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// UTC year, month, day, hour, minute, second of a Unix time (Howard Hinnant's
/// civil-from-days).
pub fn civil(secs: u64) -> (i64, u64, u64, u64, u64, u64) {
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
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Go's `time.RFC3339Nano` in UTC: `2025-05-01T10:00:05.1Z` (fraction without trailing zeros,
/// none when whole).
pub fn rfc3339_nano(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (y, mo, day, h, mi, s) = civil(d.as_secs());
    let mut out = format!("{y:04}-{mo:02}-{day:02}T{h:02}:{mi:02}:{s:02}");
    if d.subsec_nanos() > 0 {
        let frac = format!("{:09}", d.subsec_nanos());
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn civil_time_matches_known_dates() {
        // 2026-11-24T11:48:32Z
        assert_eq!(civil(1_795_520_912), (2026, 11, 24, 11, 48, 32));
        // 2024-02-29T00:00:00Z (leap day), 2000-01-01 (a January: the year rolls back).
        assert_eq!(civil(1_709_164_800), (2024, 2, 29, 0, 0, 0));
        assert_eq!(civil(946_684_800), (2000, 1, 1, 0, 0, 0));
    }

    #[test]
    fn rfc3339_nano_as_go_writes_it() {
        assert_eq!(rfc3339_nano(at(1_795_520_912, 0)), "2026-11-24T11:48:32Z");
        assert_eq!(
            rfc3339_nano(at(1_795_520_912, 100_000_000)),
            "2026-11-24T11:48:32.1Z"
        );
        assert_eq!(
            rfc3339_nano(at(946_684_800, 123_456_789)),
            "2000-01-01T00:00:00.123456789Z"
        );
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
        let t = at(1_795_520_912, 123_000_000);
        assert_eq!(parse_rfc3339(&rfc3339_nano(t)), Some(t));
    }
}
