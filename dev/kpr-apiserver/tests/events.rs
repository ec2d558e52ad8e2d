//! Events through the real kube-rs client: created at `events.k8s.io/v1` as kube-proxy's
//! recorder creates them, then read back as `kubectl get events` reads them (a list, a get by
//! name, a watch); invalid events are refused with the API server's 422, a taken name with
//! 409, and the server refuses (403) or never answers when told to. Loopback only.
#![allow(clippy::unwrap_used)]

use futures_util::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kpr_apiserver::{ApiServer, EventsAnswer, Options};
use kube::api::{ListParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde_json::json;
use std::time::Duration;

fn client(server: &ApiServer) -> Client {
    Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap()
}

/// The event upstream kube-proxy's recorder creates at start.
fn starting(name: &str) -> Event {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "eventTime": "2026-12-07T12:00:00.123456Z",
        "reportingController": "kube-proxy", "reportingInstance": "kube-proxy-host1",
        "action": "StartKubeProxy", "reason": "Starting", "type": "Normal",
        "regarding": {"kind": "Node", "name": "node-a", "uid": "node-a"},
    }))
    .unwrap()
}

fn status_of(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_created_validated_listed_and_watched() {
    let server = ApiServer::start(Options::default()).await.unwrap();
    let api: Api<Event> = Api::namespaced(client(&server), "default");
    let mut watch = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();

    let created = api
        .create(&PostParams::default(), &starting("node-a.1"))
        .await
        .unwrap();
    assert_eq!(created.reason.as_deref(), Some("Starting"));
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    let last = server.requests().last().cloned().unwrap();
    assert!(
        last.starts_with("POST /apis/events.k8s.io/v1/namespaces/default/events"),
        "{last}"
    );

    let listed = api.list(&ListParams::default()).await.unwrap();
    let names: Vec<_> = listed
        .items
        .iter()
        .map(|e| e.metadata.name.clone())
        .collect();
    assert_eq!(names, [Some("node-a.1".to_owned())]);
    let all: Api<Event> = Api::all(client(&server));
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert_eq!(
        api.get("node-a.1").await.unwrap().action.as_deref(),
        Some("StartKubeProxy")
    );
    let added = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&added, WatchEvent::Added(e) if e.metadata.name.as_deref() == Some("node-a.1")),
        "{added:?}"
    );
    assert_eq!(server.events().len(), 1);
    assert_eq!(server.events()[0]["apiVersion"], "events.k8s.io/v1");

    // The same name again: 409, nothing changed.
    let (code, reason, _) = status_of(
        api.create(&PostParams::default(), &starting("node-a.1"))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    // What the API server refuses in a new events.k8s.io/v1 event.
    let mut bad = starting("node-a.2");
    bad.reporting_controller = None;
    bad.action = None;
    let (code, reason, message) =
        status_of(api.create(&PostParams::default(), &bad).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(
        message,
        "Event.events.k8s.io \"node-a.2\" is invalid: [reportingController: Required value, action: Required value]"
    );
    let mut bad = starting("node-a.3");
    bad.event_time = None;
    let (code, _, message) = status_of(api.create(&PostParams::default(), &bad).await.unwrap_err());
    assert_eq!(code, 422);
    assert!(message.ends_with("eventTime: Required value"), "{message}");
    assert_eq!(server.events().len(), 1, "nothing invalid was stored");

    // In another namespace, an event about a cluster-scoped object is refused.
    let other: Api<Event> = Api::namespaced(client(&server), "web");
    let mut elsewhere = starting("node-a.4");
    elsewhere.metadata.namespace = Some("web".into());
    let (code, _, message) = status_of(
        other
            .create(&PostParams::default(), &elsewhere)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(
        message.contains("does not match event.namespace"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_can_be_refused_or_left_unanswered() {
    let server = ApiServer::start(Options::default()).await.unwrap();
    let api: Api<Event> = Api::namespaced(client(&server), "default");
    server.answer_events(EventsAnswer::Refuse(403));
    let (code, reason, message) = status_of(
        api.create(&PostParams::default(), &starting("node-a.1"))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert!(
        message.contains("cannot create resource \"events\" in API group \"events.k8s.io\""),
        "{message}"
    );
    server.answer_events(EventsAnswer::Refuse(500));
    let (code, _, _) = status_of(
        api.create(&PostParams::default(), &starting("node-a.1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 500);

    server.answer_events(EventsAnswer::Stall);
    let stalled = tokio::time::timeout(
        Duration::from_secs(1),
        api.create(&PostParams::default(), &starting("node-a.1")),
    )
    .await;
    assert!(stalled.is_err(), "no answer: {stalled:?}");
    assert!(server.events().is_empty());

    server.answer_events(EventsAnswer::Create);
    api.create(&PostParams::default(), &starting("node-a.1"))
        .await
        .unwrap();
    assert_eq!(server.events().len(), 1);
}
