//! Network-programming latency (upstream's `network_programming_duration_seconds`): from an
//! EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` annotation (RFC 3339, set
//! by the EndpointSlice controller when the change began) to the sync that put it in the
//! kernel. Pure: the caller passes the time of the commit.

use kpr_ops::time::parse_rfc3339;
use std::time::{Duration, SystemTime};

/// The latency of each trigger time up to `committed`; unparsable or future times are
/// skipped (clock skew between the controller and this node), and so are times not after
/// `since`, when this process began tracking changes (a restart's first list carries the
/// trigger times of changes made before it: not its latency), as upstream does.
pub fn network_programming(
    trigger_times: &[String],
    since: SystemTime,
    committed: SystemTime,
) -> Vec<Duration> {
    trigger_times
        .iter()
        .filter_map(|t| parse_rfc3339(t))
        .filter(|t| *t > since)
        .filter_map(|t| committed.duration_since(t).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
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
            at(0, 0),
            now,
        );
        assert_eq!(got, [Duration::from_millis(2500)]);
    }

    #[test]
    fn changes_made_before_the_process_began_tracking_are_not_its_latency() {
        let now = at(1_795_520_912, 500_000_000);
        let times = ["2026-11-24T11:40:00Z".into(), "2026-11-24T11:48:30Z".into()];
        let started = at(1_795_520_400, 0);
        assert_eq!(
            network_programming(&times, started, now),
            [Duration::from_millis(2500)]
        );
    }
}
