//! The health model of `/healthz` and `/livez` (§7.1), as upstream's proxy health server
//! keeps it: per IP family a `lastUpdated` time (loop start, then every successful sync) and a
//! `queued` time (the first change after a success). A family is unhealthy when a change has
//! been queued for longer than the timeout (2 × syncPeriod), so an idle proxy stays healthy.
//! Pure: every call takes the time.

use crate::time::rfc3339_nano;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FamilyHealth {
    last_updated: SystemTime,
    queued: Option<SystemTime>,
}

/// Which endpoint is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/livez`: the proxy's health only.
    Livez,
    /// `/healthz`: the proxy's health and whether this node should get traffic.
    Healthz { node_eligible: bool },
}

/// Per-family health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthModel {
    families: BTreeMap<String, FamilyHealth>,
    timeout: Duration,
}

impl HealthModel {
    /// The loop starts at `now` with these families (`IPv4`, `IPv6`).
    pub fn new(families: &[&str], now: SystemTime, timeout: Duration) -> HealthModel {
        HealthModel {
            families: families
                .iter()
                .map(|f| {
                    let h = FamilyHealth {
                        last_updated: now,
                        queued: None,
                    };
                    ((*f).to_owned(), h)
                })
                .collect(),
            timeout,
        }
    }

    /// A change arrived that a sync has yet to apply.
    pub fn queued(&mut self, now: SystemTime) {
        for f in self.families.values_mut() {
            f.queued.get_or_insert(now);
        }
    }

    /// A sync of `family` succeeded.
    pub fn synced(&mut self, family: &str, now: SystemTime) {
        if let Some(f) = self.families.get_mut(family) {
            f.last_updated = now;
            f.queued = None;
        }
    }

    fn family_healthy(&self, f: &FamilyHealth, now: SystemTime) -> bool {
        f.queued
            .is_none_or(|q| now.duration_since(q).unwrap_or_default() <= self.timeout)
    }

    /// Every family is healthy.
    pub fn healthy(&self, now: SystemTime) -> bool {
        self.families.values().all(|f| self.family_healthy(f, now))
    }

    /// The status code and body upstream sends (compact JSON, keys in upstream's order).
    pub fn response(&self, probe: Probe, now: SystemTime) -> (u16, String) {
        let healthy = self.healthy(now);
        let ok = healthy
            && !matches!(
                probe,
                Probe::Healthz {
                    node_eligible: false
                }
            );
        let newest = self
            .families
            .values()
            .map(|f| f.last_updated)
            .max()
            .unwrap_or(now);
        let last = if ok { now } else { newest };
        let mut body = format!(
            r#"{{"lastUpdated":"{}","currentTime":"{}""#,
            rfc3339_nano(last),
            rfc3339_nano(now)
        );
        if let Probe::Healthz { node_eligible } = probe {
            body.push_str(&format!(r#","nodeEligible":{node_eligible}"#));
        }
        body.push_str(&format!(r#","healthy":{healthy}"#));
        if !self.families.is_empty() {
            let status: Vec<String> = self
                .families
                .iter()
                .map(|(name, f)| {
                    format!(
                        r#""{name}":{{"lastUpdated":"{}","healthy":{}}}"#,
                        rfc3339_nano(f.last_updated),
                        self.family_healthy(f, now)
                    )
                })
                .collect();
            body.push_str(&format!(r#","status":{{{}}}"#, status.join(",")));
        }
        body.push('}');
        (if ok { 200 } else { 503 }, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_746_093_600 + secs) // 2025-05-01T10:00:00Z
    }

    fn model() -> HealthModel {
        HealthModel::new(&["IPv4", "IPv6"], t(0), Duration::from_secs(60))
    }

    #[test]
    fn t7_1_1_an_idle_proxy_stays_healthy() {
        let m = model();
        assert!(m.healthy(t(600)));
        assert_eq!(m.response(Probe::Livez, t(600)).0, 200);
    }

    #[test]
    fn t7_1_2_a_change_stuck_past_the_timeout_is_unhealthy_until_a_sync() {
        let mut m = model();
        m.queued(t(10));
        m.queued(t(30)); // the first queued time counts
        assert!(m.healthy(t(70)));
        assert!(!m.healthy(t(71)));
        let (code, body) = m.response(
            Probe::Healthz {
                node_eligible: true,
            },
            t(71),
        );
        assert_eq!(code, 503);
        assert!(body.starts_with(r#"{"lastUpdated":"2025-05-01T10:00:00Z","currentTime":"2025-05-01T10:01:11Z","nodeEligible":true,"healthy":false"#), "{body}");
        m.synced("IPv4", t(72));
        assert!(!m.healthy(t(72)), "IPv6 is still behind");
        m.synced("IPv6", t(72));
        assert_eq!(m.response(Probe::Livez, t(73)).0, 200);
    }

    #[test]
    fn t7_1_3_an_ineligible_node_fails_healthz_only() {
        let m = model();
        let (code, body) = m.response(
            Probe::Healthz {
                node_eligible: false,
            },
            t(5),
        );
        assert_eq!(code, 503);
        assert!(
            body.contains(r#""nodeEligible":false,"healthy":true"#),
            "{body}"
        );
        assert_eq!(m.response(Probe::Livez, t(5)).0, 200);
    }

    #[test]
    fn bodies_have_upstreams_keys_in_order() {
        let mut m = model();
        m.synced("IPv4", t(5));
        let (code, body) = m.response(Probe::Livez, t(6));
        assert_eq!(code, 200);
        assert_eq!(
            body,
            r#"{"lastUpdated":"2025-05-01T10:00:06Z","currentTime":"2025-05-01T10:00:06Z","healthy":true,"status":{"IPv4":{"lastUpdated":"2025-05-01T10:00:05Z","healthy":true},"IPv6":{"lastUpdated":"2025-05-01T10:00:00Z","healthy":true}}}"#
        );
    }
}
