//! Go duration parsing (`time.ParseDuration`) and formatting (`Duration.String()`).

use proptest::prelude::*;

use crate::{DurationError, GoDuration};

const NS: i64 = 1;
const US: i64 = 1_000;
const MS: i64 = 1_000_000;
const S: i64 = 1_000_000_000;
const M: i64 = 60 * S;
const H: i64 = 60 * M;

#[test]
fn go_duration_parses_go_syntax() {
    let cases: &[(&str, i64)] = &[
        ("0", 0),
        ("0s", 0),
        ("-0", 0),
        ("+0", 0),
        ("5s", 5 * S),
        ("30s", 30 * S),
        ("1478s", 1478 * S),
        ("-5s", -5 * S),
        ("+5s", 5 * S),
        ("-0s", 0),
        ("5.0s", 5 * S),
        ("5.6s", 5 * S + 600 * MS),
        ("5.s", 5 * S),
        (".5s", 500 * MS),
        ("1.0s", S),
        ("1.004s", S + 4 * MS),
        ("100.00100s", 100 * S + MS),
        ("10ns", 10 * NS),
        ("11us", 11 * US),
        ("12\u{b5}s", 12 * US),
        ("12\u{3bc}s", 12 * US),
        ("13ms", 13 * MS),
        ("300ms", 300 * MS),
        ("14s", 14 * S),
        ("15m", 15 * M),
        ("16h", 16 * H),
        ("1h0m0s", H),
        ("24h0m0s", 24 * H),
        ("3h30m", 3 * H + 30 * M),
        ("2h45m", 2 * H + 45 * M),
        ("10.5s4m", 4 * M + 10 * S + 500 * MS),
        ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
        (
            "1h2m3s4ms5us6ns",
            H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS,
        ),
        ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
        ("1.5h", H + 30 * M),
        ("0.3333333333333333333h", 20 * M),
        ("9223372036854775807ns", i64::MAX),
        ("-9223372036854775808ns", i64::MIN),
        ("9223372036s854ms775us807ns", i64::MAX),
        ("1us", US),
    ];
    for (text, nanos) in cases {
        assert_eq!(
            GoDuration::parse(text),
            Ok(GoDuration::from_nanos(*nanos)),
            "parse {text:?}"
        );
    }
}

#[test]
fn go_duration_rejects_what_go_rejects() {
    for text in [
        "",
        "3",
        "-",
        "s",
        ".",
        "-.",
        ".s",
        "+.s",
        "ns",
        "1d",
        "1.5x",
        "\u{2212}1s",
        "9223372036854775808ns",
        "9223372036854775810ns",
        "-9223372036854775809ns",
        "1h 2m",
        " 1s",
    ] {
        assert!(
            GoDuration::parse(text).is_err(),
            "{text:?} should not parse"
        );
    }
}

#[test]
fn go_duration_errors_are_classified() {
    assert_eq!(
        GoDuration::parse("10"),
        Err(DurationError::MissingUnit("10".into()))
    );
    assert_eq!(
        GoDuration::parse("10d"),
        Err(DurationError::UnknownUnit {
            unit: "d".into(),
            text: "10d".into()
        })
    );
    assert_eq!(
        GoDuration::parse("x"),
        Err(DurationError::Invalid("x".into()))
    );
    assert_eq!(
        GoDuration::parse("10d").map_err(|e| e.to_string()),
        Err("time: unknown unit \"d\" in duration \"10d\"".to_string())
    );
}

#[test]
fn go_duration_formats_like_go() {
    let cases: &[(i64, &str)] = &[
        (0, "0s"),
        (1, "1ns"),
        (1100, "1.1\u{b5}s"),
        (US, "1\u{b5}s"),
        (2200 * US, "2.2ms"),
        (300 * MS, "300ms"),
        (S, "1s"),
        (1500 * MS, "1.5s"),
        (5 * S, "5s"),
        (30 * S, "30s"),
        (90 * S, "1m30s"),
        (15 * M, "15m0s"),
        (H, "1h0m0s"),
        (24 * H, "24h0m0s"),
        (3 * H + 30 * M, "3h30m0s"),
        (4 * M + 5 * S + MS, "4m5.001s"),
        (5 * H + 6 * M + 7 * S + MS, "5h6m7.001s"),
        (8 * M + 1, "8m0.000000001s"),
        (-S, "-1s"),
        (-1, "-1ns"),
        (i64::MAX, "2562047h47m16.854775807s"),
        (i64::MIN, "-2562047h47m16.854775808s"),
    ];
    for (nanos, text) in cases {
        assert_eq!(
            GoDuration::from_nanos(*nanos).to_string(),
            *text,
            "format {nanos}"
        );
    }
}

#[test]
fn go_duration_serde_is_a_string() {
    let d: GoDuration = serde_json::from_str("\"15m\"").unwrap();
    assert_eq!(serde_json::to_string(&d).unwrap(), "\"15m0s\"");
    // metav1.Duration does not accept numbers.
    assert!(serde_json::from_str::<GoDuration>("10").is_err());
}

#[test]
fn go_duration_to_std() {
    assert_eq!(
        GoDuration::from_secs(3).to_std(),
        Some(std::time::Duration::from_secs(3))
    );
    assert_eq!(GoDuration::from_secs(-3).to_std(), None);
    assert_eq!(
        GoDuration::from(std::time::Duration::from_millis(1500)).to_string(),
        "1.5s"
    );
}

proptest! {
    #[test]
    fn go_duration_format_then_parse_round_trips(nanos in any::<i64>()) {
        let d = GoDuration::from_nanos(nanos);
        prop_assert_eq!(GoDuration::parse(&d.to_string()), Ok(d));
    }

    #[test]
    fn go_duration_parse_of_components_matches_arithmetic(
        h in 0i64..10_000, m in 0i64..60, s in 0i64..60, ms in 0i64..1000,
    ) {
        let text = format!("{h}h{m}m{s}s{ms}ms");
        let expected = h * H + m * M + s * S + ms * MS;
        prop_assert_eq!(GoDuration::parse(&text), Ok(GoDuration::from_nanos(expected)));
    }
}
