//! The Node event kube-proxy records once it has started (reason `Starting`, action
//! `StartKubeProxy`), as upstream's `birthCry` does (kubernetes/kubernetes
//! `cmd/kube-proxy/app/server.go`) through client-go's `events.k8s.io/v1` recorder
//! (`staging/src/k8s.io/client-go/tools/events/event_recorder.go`, `event_broadcaster.go`):
//! regarding `{kind: Node, name: <node>, uid: <node>}`, in namespace `default` (the Node has
//! none), named `<node>.<UnixNano in hex>`, reported by controller `kube-proxy` and instance
//! `kube-proxy-<OS hostname>`, with no note. `kubectl get events` lists it.
//!
//! It is sent off the start-up path and never waited for. As client-go does: a refusal by the
//! server (any error status: RBAC, validation) is logged and not retried; a request that got
//! no answer is logged and tried again, up to [`MAX_TRIES`] times, [`RETRY_SLEEP`] (plus up to
//! a quarter) apart.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `reportingController` of every kube-proxy event (upstream's `kubeProxy`).
pub const REPORTING_CONTROLLER: &str = "kube-proxy";
/// The namespace of events about an object without one, a Node (`metav1.NamespaceDefault`).
pub const NAMESPACE: &str = "default";
/// client-go's `maxTriesPerEvent`.
pub const MAX_TRIES: u32 = 12;
/// client-go's `defaultSleepDuration` between tries (jittered by up to 25 %).
pub const RETRY_SLEEP: Duration = Duration::from_secs(10);

/// The `Starting` event about Node `node`, reported by this host (`hostname`, the OS's, as
/// Go's `os.Hostname`) at `now`.
pub fn starting(node: &str, hostname: &str, now: SystemTime) -> Event {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let micros = i64::try_from(since.as_micros()).unwrap_or(i64::MAX);
    let event_time = Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH);
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{node}.{:x}", since.as_nanos())),
            namespace: Some(NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(event_time)),
        reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(format!("{REPORTING_CONTROLLER}-{hostname}")),
        action: Some("StartKubeProxy".to_owned()),
        reason: Some("Starting".to_owned()),
        type_: Some("Normal".to_owned()),
        regarding: Some(ObjectReference {
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            uid: Some(node.to_owned()),
            ..ObjectReference::default()
        }),
        ..Event::default()
    }
}

/// What became of one attempt to create an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Created.
    Recorded,
    /// The server answered with an error status: not tried again.
    Rejected,
    /// No answer (connection refused or cut, timeout): worth another try.
    Unanswered,
}

/// Classifies a client error as client-go's `recordEvent` does.
pub fn outcome(result: &Result<Event, kube::Error>) -> Outcome {
    match result {
        Ok(_) => Outcome::Recorded,
        Err(kube::Error::Api(_)) => Outcome::Rejected,
        Err(kube::Error::HyperError(_) | kube::Error::Service(_)) => Outcome::Unanswered,
        // A request that cannot be built, or an answer that is not an event: the same again
        // would fare no better.
        Err(_) => Outcome::Rejected,
    }
}

/// Creates `event` through `client`, trying again while the server does not answer; logs the
/// outcome with client-go's messages. Spawn it: it may take minutes to give up.
pub async fn record(client: kube::Client, event: Event) {
    let namespace = event
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| NAMESPACE.to_owned());
    let name = event.metadata.name.clone().unwrap_or_default();
    let reason = event.reason.clone().unwrap_or_default();
    let api: kube::Api<Event> = kube::Api::namespaced(client, &namespace);
    for attempt in 1..=MAX_TRIES {
        let result = api.create(&kube::api::PostParams::default(), &event).await;
        match (outcome(&result), result) {
            (Outcome::Recorded, _) => {
                tracing::debug!(event = %format!("{namespace}/{name}"), reason = %reason, "Recorded event");
                return;
            }
            (_, Err(kube::Error::Api(status))) if status.code == 409 => {
                tracing::trace!(event = %format!("{namespace}/{name}"), err = %status.message, "Server rejected event (will not retry!)");
                return;
            }
            (Outcome::Rejected, Err(e)) => {
                tracing::error!(event = %format!("{namespace}/{name}"), reason = %reason, err = %e, "Server rejected event (will not retry!)");
                return;
            }
            (_, Err(e)) => {
                tracing::error!(err = %e, "Unable to write event (may retry after sleeping)");
            }
            (_, Ok(_)) => return,
        }
        if attempt == MAX_TRIES {
            tracing::error!(event = %format!("{namespace}/{name}"), reason = %reason, "Unable to write event (retry limit exceeded!)");
            return;
        }
        tokio::time::sleep(jittered(RETRY_SLEEP)).await;
    }
}

/// `wait.Jitter(d, 0.25)`: `d` plus up to a quarter of it.
fn jittered(d: Duration) -> Duration {
    let noise = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos()
        % 1000;
    d + d.mul_f64(0.25 * f64::from(noise) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn starting_is_upstreams_event() {
        let now = UNIX_EPOCH + Duration::new(1_765_108_800, 123_456_789);
        let e = serde_json::to_value(starting("node-a", "Host-1", now)).unwrap();
        assert_eq!(
            e,
            json!({
                "apiVersion": "events.k8s.io/v1",
                "kind": "Event",
                "metadata": {"name": "node-a.187eed1a0d464d15", "namespace": "default"},
                "eventTime": "2025-12-07T12:00:00.123456Z",
                "reportingController": "kube-proxy",
                "reportingInstance": "kube-proxy-Host-1",
                "action": "StartKubeProxy",
                "reason": "Starting",
                "type": "Normal",
                "regarding": {"kind": "Node", "name": "node-a", "uid": "node-a"},
            })
        );
        assert_eq!(
            format!("{:x}", 1_765_108_800_123_456_789_u128),
            "187eed1a0d464d15"
        );
    }

    #[test]
    fn refusals_are_final_and_silence_is_retried() {
        let refused = kube::Error::Api(Box::new(kube::core::Status::failure("no", "Forbidden")));
        assert_eq!(outcome(&Err(refused)), Outcome::Rejected);
        assert_eq!(outcome(&Ok(Event::default())), Outcome::Recorded);
        let cut = kube::Error::Service("connection refused".into());
        assert_eq!(outcome(&Err(cut)), Outcome::Unanswered);
        for _ in 0..20 {
            let d = jittered(RETRY_SLEEP);
            assert!(d >= RETRY_SLEEP && d <= RETRY_SLEEP.mul_f64(1.25), "{d:?}");
        }
    }
}
