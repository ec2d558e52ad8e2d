//! Issue 15 item 7: the `--config` decoder, validation and the flag parser never panic, whatever
//! bytes or arguments they are given: they return a value or an error with a message.
//!
//! Fed: arbitrary bytes and YAML-alphabet text; valid configurations (the repository's examples,
//! a JSON document, a full `--write-config-to` document) mutated byte by byte (flips,
//! insertions, deletions, truncations) and line by line (duplicated, deleted, swapped lines,
//! a value replaced by an odd scalar); nesting far past any parser's depth limit and an alias
//! bomb; arbitrary command lines through `Flags::try_parse_args` and `resolve_with`, the entry
//! the binary uses; Go duration strings.
#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::CommandFactory;
use kpr_config::{Flags, GoDuration, ProxyConfig, decode, load, resolve_with, to_yaml, validate};
use kpr_testkit::mutate::{Mutation, mutate, mutations};
use proptest::prelude::*;

const HEADER: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

/// Valid configurations to mutate.
fn seeds() -> Vec<String> {
    let full = {
        let decoded = load(HEADER).unwrap();
        to_yaml(&decoded.config)
    };
    vec![
        include_str!("../../../examples/kubeadm/config.conf").to_owned(),
        include_str!("../../../deploy/systemd/kube-proxy-config.yaml").to_owned(),
        full,
        r#"{"apiVersion":"kubeproxy.config.k8s.io/v1alpha1","kind":"KubeProxyConfiguration",
            "mode":"nftables","clusterCIDR":"10.0.0.0/8,fd00::/64","nodePortAddresses":["primary"],
            "featureGates":{"NFTablesProxyMode":true},"conntrack":{"maxPerCore":32768,"min":null},
            "nftables":{"syncPeriod":"30s","minSyncPeriod":"1s","masqueradeBit":14},
            "logging":{"flushFrequency":5000000000,"verbosity":2,
                       "vmodule":[{"filePattern":"sync*","verbosity":4}]}}"#
            .to_owned(),
    ]
}

/// Decodes `text` the ways the daemon does (`decode`, `load`, `resolve_with`) and checks the
/// outcome: an error says something; a resolved configuration writes out (`--write-config-to`)
/// as a document that decodes back to itself.
fn check_config_text(text: &str) -> Result<(), TestCaseError> {
    match decode(text) {
        Err(e) => prop_assert!(!e.to_string().trim().is_empty(), "empty decode error"),
        Ok(decoded) => {
            let mut cfg = decoded.config;
            kpr_config::set_defaults(&mut cfg);
            for e in validate(&cfg) {
                prop_assert!(!e.to_string().trim().is_empty(), "empty field error");
            }
            let _ = ProxyConfig::from_config(&cfg);
        }
    }
    let _ = load(text);
    match resolve_with(&config_flags(), Some(text)) {
        Err(e) => prop_assert!(!e.to_string().trim().is_empty(), "empty resolve error"),
        // Known and left alone: a non-finite `qps` (`.inf`, `.nan`, or `1e39`, past f32) is
        // accepted and then written as `qps: null` (JSON has no infinity), so it does not
        // survive the round trip. Upstream's decoder refuses such values.
        Ok(resolved) if !resolved.file_config.client_connection.qps.is_finite() => {}
        Ok(resolved) => {
            let written = to_yaml(&resolved.file_config);
            let again = resolve_with(&config_flags(), Some(&written));
            prop_assert!(again.is_ok(), "{again:?}\n{written}");
            prop_assert_eq!(
                again.unwrap().file_config,
                resolved.file_config,
                "{}",
                written
            );
        }
    }
    Ok(())
}

/// The command line `--config FILE`.
fn config_flags() -> Flags {
    Flags::try_parse_args(["kube-proxy-rs", "--config", "/etc/kube-proxy/config.yaml"]).unwrap()
}

/// Bytes that mean something to YAML or JSON.
#[rustfmt::skip]
const TOKENS: &[&str] = &[
    ":", ": ", "- ", "{", "}", "[", "]", ",", "\"", "'", "&a ", "*a", "!!str ", "!!binary ", "!x ",
    "\t", "\n  ", "\n", "---\n", "...\n", "\0", "\u{feff}", "#", "|", ">", "%YAML 1.2\n", "? ",
    "<<: *a", "\\", "\r", "é", "\u{10ffff}",
];

/// Scalars at the edges of every field type.
#[rustfmt::skip]
const ODD_VALUES: &[&str] = &[
    "", "~", "null", "-1", "0", "-0", "2147483648", "-2147483649", "4294967296",
    "18446744073709551616", "-9223372036854775809", "1e400", "-1e400", "1e39", ".nan", ".inf",
    "-.inf", "0x1F", "0o17", "1_000", "9223372036854775807h", "9223372036854775808ns",
    "-9223372036854775808ns", "2562047h47m16.854775807s", "2562047h47m16.854775808s", "1.5.5s",
    "1µs", "-1s", ".5s", "5", "[]", "{}", "[a, b]", "{a: 1}", "true", "yes", "10.0.0.0/33", "::/0",
    "10.0.0.0/8,fd00::/64,1.2.3.0/24", "[::1]:65536", "0.0.0.0:-1", "1.2.3.4:0x10", "primary",
    "999.999.999.999", "\"\\u0000\"", "!!binary aGVsbG8=", "*undefined", "&a x", "'unterminated",
    "\"unterminated", "|", ">-", "? x", "- - -",
];

fn any_mutation() -> BoxedStrategy<Mutation> {
    mutations(TOKENS, ODD_VALUES)
}

/// A seed with 1-4 mutations applied, as text (a file that is not UTF-8 fails to read before
/// it reaches the decoder, so invalid sequences are replaced).
fn mutated_seed() -> impl Strategy<Value = (usize, Vec<Mutation>)> {
    (
        0..seeds().len(),
        prop::collection::vec(any_mutation(), 1..5),
    )
}

fn apply(seed: usize, mutations: &[Mutation]) -> String {
    let mut doc = seeds()[seed].clone().into_bytes();
    for m in mutations {
        mutate(&mut doc, m);
    }
    String::from_utf8_lossy(&doc).into_owned()
}

/// Text made of YAML's and JSON's structural characters, so the parsers get past the first byte.
fn yamlish() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 :,{}\\[\\]\\-\\n\"'&*!|>#%?@`~.\\t\\\\]{0,200}"
}

/// The long flag names of the command line.
fn long_flags() -> Vec<String> {
    Flags::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .chain(["help".to_owned(), "no-such-flag".to_owned()])
        .collect()
}

/// Flag values at the edges: numbers out of range, bad CIDRs, durations that overflow.
#[rustfmt::skip]
const FLAG_VALUES: &[&str] = &[
    "", "0", "-1", "1", "true", "false", "maybe", "2147483648", "-2147483649", "4294967296",
    "1e400", "NaN", "inf", "-inf", "1h", "-1s", "0s", "9223372036854775807ns",
    "9223372036854775808ns", "2562048h", "1.5.5s", "5", "10.0.0.0/8", "10.0.0.0/8,fd00::/64",
    "10.0.0.0/8,10.1.0.0/16", "fd00::/129", "::", "1.2.3.4", "[::1]:99999", ":10256", "1.2.3.4:",
    "primary", "primary,10.0.0.0/8", ",", ",,", "a=b", "Foo=true,Bar=nope", "=", "x=1,y", "é",
    "\u{0}", "iptables", "nftables", "ipvs", "kernelspace", "ClusterCIDR", "BridgeInterface",
    "InterfaceNamePrefix", "NodeCIDR", "json", "text", "64Ki", "-", "--", "=true",
];

fn any_arg(longs: Vec<String>) -> impl Strategy<Value = OsString> {
    let long = prop::sample::select(longs);
    let value = prop_oneof![
        3 => prop::sample::select(FLAG_VALUES).prop_map(str::to_owned),
        1 => "[-0-9a-z.:/,=\\[\\]]{0,16}",
        1 => any::<String>(),
    ];
    prop_oneof![
        3 => (long.clone(), value.clone()).prop_map(|(f, v)| OsString::from(format!("--{f}={v}"))),
        2 => long.prop_map(|f| OsString::from(format!("--{f}"))),
        2 => value.prop_map(OsString::from),
        1 => "-[a-zA-Z]{1,3}".prop_map(OsString::from),
        1 => prop::sample::select(vec!["-v", "--", "-", "-v=", "--v", "-h"]).prop_map(OsString::from),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(OsString::from_vec),
    ]
}

/// Parses `args` as the binary does and resolves the result (the `--config` file, when named,
/// is the first seed). A clap error renders its message; it never exits the process.
fn check_command_line(args: Vec<OsString>) -> Result<(), TestCaseError> {
    let argv = std::iter::once(OsString::from("kube-proxy-rs")).chain(args);
    match Flags::try_parse_args(argv) {
        Err(e) => {
            let _ = e.use_stderr();
            prop_assert!(
                !e.render().to_string().trim().is_empty(),
                "empty clap error"
            );
        }
        Ok(flags) => {
            let config = flags.config.as_ref().map(|_| seeds().swap_remove(0));
            match resolve_with(&flags, config.as_deref()) {
                Err(e) => prop_assert!(!e.to_string().trim().is_empty(), "empty error"),
                Ok(resolved) => {
                    let _ = to_yaml(&resolved.file_config);
                }
            }
        }
    }
    Ok(())
}

/// Duration-shaped text: signed runs of `<digits>[.<digits>]<unit>`, with large numbers.
fn duration_text() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        "[0-9]{1,3}",
        "[0-9]{0,20}\\.[0-9]{0,25}",
        prop::sample::select(vec![
            "9223372036854775807",
            "9223372036854775808",
            "18446744073709551615",
            "2562047",
            "153722867",
            "0",
        ])
        .prop_map(str::to_owned),
    ];
    let unit = prop::sample::select(vec!["ns", "us", "µs", "μs", "ms", "s", "m", "h", "", "d"]);
    // Components at the limit, so sums of two pass it.
    let edge = prop::sample::select(vec![
        "9223372036854775808ns",
        "9223372036854775807ns",
        "2562047h",
        "2562048h",
        "47m16.854775808s",
    ]);
    let part = prop_oneof![
        (number, unit).prop_map(|(n, u)| format!("{n}{u}")),
        edge.prop_map(str::to_owned)
    ];
    ("[-+]?", prop::collection::vec(part, 1..4))
        .prop_map(|(sign, parts)| format!("{sign}{}", parts.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_bytes_decode_or_fail_with_a_message(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_config_text(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn yaml_alphabet_text_decodes_or_fails_with_a_message(text in yamlish()) {
        check_config_text(&text)?;
        check_config_text(&format!("{HEADER}{text}"))?;
    }

    #[test]
    fn mutated_configurations_decode_or_fail_with_a_message((seed, ms) in mutated_seed()) {
        check_config_text(&apply(seed, &ms))?;
    }

    #[test]
    fn command_lines_parse_or_fail_with_a_message(
        args in prop::collection::vec(any_arg(long_flags()), 0..8)
    ) {
        check_command_line(args)?;
    }

    #[test]
    fn flag_value_pairs_parse_and_resolve_or_fail_with_a_message(
        pairs in prop::collection::vec(
            (prop::sample::select(long_flags()), prop::sample::select(FLAG_VALUES)),
            1..6,
        )
    ) {
        let args = pairs
            .into_iter()
            .filter(|(f, _)| f != "help")
            .map(|(f, v)| OsString::from(format!("--{f}={v}")))
            .collect();
        check_command_line(args)?;
    }

    #[test]
    fn go_durations_parse_or_fail_and_format_back(text in duration_text(), nanos in any::<i64>()) {
        if let Err(e) = GoDuration::parse(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
        let d = GoDuration::from_nanos(nanos);
        prop_assert_eq!(GoDuration::parse(&d.to_string()), Ok(d));
    }
}

/// Text nested `depth` levels in the forms YAML and JSON allow.
fn nestings(depth: usize) -> Vec<(&'static str, String)> {
    let block_depth = depth.min(2_000); // block nesting needs n^2 bytes of indentation
    vec![
        ("flow sequence", "[".repeat(depth) + &"]".repeat(depth)),
        ("unclosed flow sequence", "[".repeat(depth)),
        (
            "flow mapping",
            "{a: ".repeat(depth) + "1" + &"}".repeat(depth),
        ),
        (
            "json object",
            "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth),
        ),
        ("compact block sequence", "- ".repeat(depth) + "1"),
        (
            "block mapping",
            (0..block_depth)
                .map(|i| format!("{}a:\n", " ".repeat(i)))
                .collect(),
        ),
    ]
}

/// Deep nesting is refused by the parsers' depth limits (serde-saphyr's budget: 64; serde_json's
/// recursion limit: 128) before the recursive parts of decoding (null stripping, the unknown-field
/// walk) see it: an error, not a stack overflow, at the top level and under a field.
#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [65, 129, 10_000, 100_000] {
        for (form, text) in nestings(depth) {
            for doc in [
                text.clone(),
                format!("{HEADER}featureGates: {text}\n"),
                format!("{HEADER}clientConnection:\n  {text}\n"),
                format!("{HEADER}nodePortAddresses: {text}\n"),
            ] {
                let result = decode(&doc);
                if depth > 128 {
                    assert!(result.is_err(), "{form} at depth {depth} decoded");
                }
                let _ = resolve_with(&config_flags(), Some(&doc));
            }
        }
    }
}

/// An alias bomb (a billion laughs) is refused by the YAML budget, not expanded.
#[test]
fn an_alias_bomb_is_refused() {
    let mut doc = format!("{HEADER}a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        doc.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    doc.push_str("featureGates: *a9\n");
    let err = decode(&doc).unwrap_err();
    assert!(!err.to_string().is_empty());
}

/// Numbers past every integer and float type, in every numeric field.
#[test]
fn huge_and_odd_numbers_are_errors_or_values() {
    let fields = [
        "clientConnection:\n  qps",
        "clientConnection:\n  burst",
        "conntrack:\n  min",
        "conntrack:\n  maxPerCore",
        "iptables:\n  masqueradeBit",
        "nftables:\n  masqueradeBit",
        "oomScoreAdj",
        "logging:\n  verbosity",
        "logging:\n  flushFrequency",
        "logging:\n  options:\n    json:\n      infoBufferSize",
        "configSyncPeriod",
        "nftables:\n  syncPeriod",
    ];
    for field in fields {
        for value in ODD_VALUES {
            let doc = format!("{HEADER}{field}: {value}\n");
            check_config_text(&doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
        }
    }
}

/// Regression: two components that each reach 2^63 ns overflowed the running total (a panic in
/// debug builds, 0 in release). Found by `go_durations_parse_or_fail_and_format_back`.
#[test]
fn a_duration_whose_sum_passes_two_to_the_63_is_invalid() {
    for text in [
        "9223372036854775808ns9223372036854775808ns",
        "-9223372036854775808ns9223372036854775808ns",
        "2562047h47m16.854775808s2562047h47m16.854775808s",
    ] {
        assert!(GoDuration::parse(text).is_err(), "{text}");
    }
    assert_eq!(
        GoDuration::parse("-9223372036854775808ns").map(GoDuration::as_nanos),
        Ok(i64::MIN)
    );
}
