//! Creating `events.k8s.io/v1` Events (`POST .../namespaces/{ns}/events`), as a node's
//! kube-proxy does once at start (its `Starting` event about its Node), checked as the API
//! server checks a new event of that version (kubernetes/kubernetes
//! `pkg/apis/core/validation/events.go`, `ValidateEventCreate`): a 422 names every field
//! wrong, with the internal field names the API server uses (`message` for `note`,
//! `involvedObject` for `regarding`). The server can also refuse events or never answer them
//! ([`EventsAnswer`]), as an API server without the RBAC rule or a stuck one does.

use crate::{Kind, Shared, Target, reply, status};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

/// How the server answers a request to create an Event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EventsAnswer {
    /// Validate and store it: 201 with the stored object, 422 when invalid, 409 when its name
    /// is taken.
    #[default]
    Create,
    /// Refuse it with this HTTP status (403: the RBAC rule is missing; 500, 503, ...), a
    /// `Status` as the API server writes one; nothing is stored.
    Refuse(u16),
    /// Never answer (the request's connection stays open until the client gives up).
    Stall,
}

/// The Event API group.
const GROUP: &str = "events.k8s.io";

/// Answers `POST` at `t` with `body`.
pub(crate) async fn create(shared: &Shared, t: &Target, body: &[u8]) -> Response {
    let Some(namespace) = t.namespace.as_deref().filter(|_| t.kind == Kind::Event) else {
        return not_allowed();
    };
    if t.name.is_some() {
        return not_allowed();
    }
    let answer = shared.store().events_answer;
    match answer {
        EventsAnswer::Create => {}
        EventsAnswer::Stall => return std::future::pending().await,
        EventsAnswer::Refuse(code) => return refusal(code, namespace),
    }
    let mut event: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return reply(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", "the body is not a JSON object"),
            );
        }
    };
    let kind_ok = event.get("kind").is_none_or(|k| k == "Event");
    let version_ok = event
        .get("apiVersion")
        .is_none_or(|v| v == "events.k8s.io/v1");
    if !kind_ok || !version_ok {
        return reply(
            StatusCode::BAD_REQUEST,
            status(
                400,
                "BadRequest",
                &format!(
                    "the object is a {} {}, not an events.k8s.io/v1 Event",
                    event["apiVersion"], event["kind"]
                ),
            ),
        );
    }
    match event["metadata"]["namespace"].as_str() {
        None | Some("") => event["metadata"]["namespace"] = json!(namespace),
        Some(ns) if ns == namespace => {}
        Some(_) => {
            return reply(
                StatusCode::BAD_REQUEST,
                status(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                ),
            );
        }
    }
    let name = event["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let errors = validate(&event, namespace);
    if !errors.is_empty() {
        let listed = if errors.len() == 1 {
            errors[0].clone()
        } else {
            format!("[{}]", errors.join(", "))
        };
        let mut body = status(
            422,
            "Invalid",
            &format!("Event.{GROUP} \"{name}\" is invalid: {listed}"),
        );
        body["details"] = json!({"name": name, "group": GROUP, "kind": "Event"});
        return reply(StatusCode::UNPROCESSABLE_ENTITY, body);
    }
    event["kind"] = json!("Event");
    let meta = &mut event["metadata"];
    meta["uid"] = json!(format!("event-{}", shared.store().rv + 1));
    meta["creationTimestamp"] = json!(now_rfc3339());
    match shared.insert_new(Kind::Event, event) {
        Some(stored) => reply(StatusCode::CREATED, stored),
        None => {
            let mut body = status(
                409,
                "AlreadyExists",
                &format!("events.{GROUP} \"{name}\" already exists"),
            );
            body["details"] = json!({"name": name, "group": GROUP, "kind": "events"});
            reply(StatusCode::CONFLICT, body)
        }
    }
}

/// What the API server says to a create it refuses with `code`.
fn refusal(code: u16, namespace: &str) -> Response {
    let (reason, message) = match code {
        403 => (
            "Forbidden",
            format!(
                "events.{GROUP} is forbidden: User \"system:serviceaccount:kube-system:kube-proxy\" cannot create resource \"events\" in API group \"{GROUP}\" in the namespace \"{namespace}\""
            ),
        ),
        401 => ("Unauthorized", "Unauthorized".to_owned()),
        429 => ("TooManyRequests", "too many requests".to_owned()),
        503 => (
            "ServiceUnavailable",
            "the server is shutting down".to_owned(),
        ),
        _ => (
            "InternalError",
            "Internal error occurred: refused by the test API server".to_owned(),
        ),
    };
    let code_ok = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = status(code_ok.as_u16(), reason, &message);
    body["details"] = json!({"group": GROUP, "kind": "events"});
    reply(code_ok, body)
}

fn not_allowed() -> Response {
    reply(
        StatusCode::METHOD_NOT_ALLOWED,
        status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ),
    )
}

/// `ValidateEventCreate` for `events.k8s.io/v1`: one `path: problem` per error, in upstream's
/// order.
pub(crate) fn validate(event: &Value, namespace: &str) -> Vec<String> {
    let mut e = Vec::new();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let name = text(&event["metadata"]["name"]);
    let event_time = text(&event["eventTime"]);
    // legacyValidateEvent: the namespaces agree; a "new" event (with eventTime) has its
    // reporter, action and reason.
    let regarding_ns = text(&event["regarding"]["namespace"]);
    let mismatch = format!(
        "involvedObject.namespace: Invalid value: \"{regarding_ns}\": does not match event.namespace"
    );
    if event_time.is_empty() {
        let agrees = if regarding_ns.is_empty() {
            namespace.is_empty() || namespace == "default"
        } else {
            namespace == regarding_ns
        };
        if !agrees {
            e.push(mismatch);
        }
    } else {
        if regarding_ns.is_empty() && namespace != "default" && namespace != "kube-system" {
            e.push(mismatch);
        }
        let controller = text(&event["reportingController"]);
        if controller.is_empty() {
            e.push("reportingController: Required value".to_owned());
        } else if !is_qualified_name(&controller) {
            e.push(format!(
                "reportingController: Invalid value: \"{controller}\": must be a qualified name"
            ));
        }
        for field in ["reportingInstance", "action", "reason"] {
            let v = text(&event[field]);
            if v.is_empty() {
                e.push(format!("{field}: Required value"));
            } else if v.len() > 128 {
                e.push(format!(
                    "{field}: Invalid value: \"\": can have at most 128 characters"
                ));
            }
        }
        if text(&event["note"]).len() > 1024 {
            e.push("message: Invalid value: \"\": can have at most 1024 characters".to_owned());
        }
    }
    if !is_dns_subdomain(namespace) {
        e.push(format!(
            "namespace: Invalid value: \"{namespace}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ));
    }
    // Strict validation of events.k8s.io/v1.
    if name.is_empty() {
        e.push("metadata.name: Required value: name or generateName is required".to_owned());
    } else if !is_dns_subdomain(&name) {
        e.push(format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ));
    }
    if let Some(series) = event.get("series").filter(|s| !s.is_null()) {
        if series["count"].as_i64().unwrap_or(0) < 2 {
            e.push("series.count: Invalid value: \"\": should be at least 2".to_owned());
        }
        if text(&series["lastObservedTime"]).is_empty() {
            e.push("series.lastObservedTime: Required value".to_owned());
        }
    }
    if event_time.is_empty() {
        e.push("eventTime: Required value".to_owned());
    }
    let kind = text(&event["type"]);
    if kind != "Normal" && kind != "Warning" {
        e.push(format!(
            "type: Invalid value: \"\": has invalid value: {kind}"
        ));
    }
    let set = |f: &str| !event[f].is_null() && event[f] != json!("");
    if set("deprecatedFirstTimestamp") {
        e.push("firstTimestamp: Invalid value: \"\": needs to be unset".to_owned());
    }
    if set("deprecatedLastTimestamp") {
        e.push("lastTimestamp: Invalid value: \"\": needs to be unset".to_owned());
    }
    if event["deprecatedCount"].as_i64().unwrap_or(0) != 0 {
        e.push("count: Invalid value: \"\": needs to be unset".to_owned());
    }
    let source = &event["deprecatedSource"];
    if !text(&source["component"]).is_empty() || !text(&source["host"]).is_empty() {
        e.push("source: Invalid value: \"\": needs to be unset".to_owned());
    }
    e
}

/// RFC 1123 subdomain: at most 253 characters of `[a-z0-9.-]`, alphanumeric at both ends.
fn is_dns_subdomain(s: &str) -> bool {
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    s.len() <= 253
        && ends(s.chars().next())
        && ends(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// Kubernetes' qualified name: an optional DNS-subdomain prefix and `/`, then at most 63
/// characters of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    prefix.is_none_or(|p| !p.is_empty() && is_dns_subdomain(p))
        && !name.is_empty()
        && name.len() <= 63
        && ends(name.chars().next())
        && ends(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Now as the API server writes `creationTimestamp`.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event upstream kube-proxy posts at start (client-go's events recorder).
    fn starting() -> Value {
        json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "node-a.187f2c3a1b2c3d4e", "namespace": "default"},
            "eventTime": "2026-12-07T12:00:00.123456Z",
            "reportingController": "kube-proxy", "reportingInstance": "kube-proxy-host1",
            "action": "StartKubeProxy", "reason": "Starting", "type": "Normal",
            "regarding": {"kind": "Node", "name": "node-a", "uid": "node-a"},
        })
    }

    #[test]
    fn upstreams_starting_event_is_valid() {
        assert_eq!(validate(&starting(), "default"), Vec::<String>::new());
    }

    #[test]
    fn every_wrong_field_is_named() {
        let mut e = starting();
        for f in [
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
        ] {
            e.as_object_mut().unwrap().remove(f);
        }
        e["type"] = json!("Odd");
        e["deprecatedCount"] = json!(3);
        e["note"] = json!("x".repeat(1025));
        let errors = validate(&e, "default");
        assert_eq!(
            errors,
            [
                "reportingController: Required value",
                "reportingInstance: Required value",
                "action: Required value",
                "reason: Required value",
                "message: Invalid value: \"\": can have at most 1024 characters",
                "type: Invalid value: \"\": has invalid value: Odd",
                "count: Invalid value: \"\": needs to be unset",
            ]
        );
        let mut e = starting();
        e.as_object_mut().unwrap().remove("eventTime");
        e["metadata"]["name"] = json!("Node_A");
        assert_eq!(
            validate(&e, "default").len(),
            2,
            "{:?}",
            validate(&e, "default")
        );
        assert_eq!(validate(&starting(), "kube-node-lease").len(), 1);
        assert!(validate(&starting(), "kube-system").is_empty());
    }

    #[test]
    fn names() {
        assert!(is_qualified_name("kube-proxy"));
        assert!(is_qualified_name("kubernetes.io/kubelet"));
        assert!(!is_qualified_name("-x"));
        assert!(!is_qualified_name("a/"));
        assert!(is_dns_subdomain("node-a.187f2c3a1b2c3d4e"));
        assert!(!is_dns_subdomain("Node"));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_428), (2025, 12, 6));
    }
}
