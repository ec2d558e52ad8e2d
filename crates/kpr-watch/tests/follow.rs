//! The manifest source as the daemon uses it: load the examples, then follow a directory with
//! paused time, sending only the kinds that changed and never deleting on a vanished directory.
#![allow(clippy::unwrap_used)]

use kpr_model::{Input, Update};
use kpr_watch::{load_dir, run};
use std::path::Path;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 172.30.0.1, ports: [{port: 80}]}\n";
const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, namespace: ns, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n";
const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n";

#[test]
fn the_examples_load_and_the_broken_object_is_reported() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/manifests");
    let (snap, problems) = load_dir(&dir).unwrap();
    assert!(
        problems.is_empty(),
        "decoding problems: {problems:?} (the broken Service decodes; the model skips it)"
    );
    assert_eq!(snap.services.len(), 13);
    assert_eq!(snap.slices.len(), 11);
    assert!(snap.node.is_some());
    assert_eq!(snap.service_cidrs.len(), 1);
}

#[test]
fn a_missing_directory_is_an_error() {
    let err = load_dir(Path::new("/nonexistent/kpr")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kpr"));
}

fn kind(i: &Input) -> &'static str {
    match i {
        Input::Services(Update::Replace(_)) => "services",
        Input::Slices(Update::Replace(_)) => "slices",
        Input::Node(Some(_)) => "node",
        Input::Node(None) => "no-node",
        Input::ServiceCidrs(Update::Replace(_)) => "service-cidrs",
        _ => "other",
    }
}

async fn next(rx: &mut mpsc::Receiver<Input>) -> Option<&'static str> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .ok()
        .flatten()
        .map(|i| kind(&i))
}

#[tokio::test(start_paused = true)]
async fn follows_changes_kind_by_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
    std::fs::write(dir.join("slice.yaml"), SLICE).unwrap();
    std::fs::write(dir.join("node.yaml"), NODE).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(run(dir.clone(), tx, shutdown, Duration::from_secs(1)));

    assert_eq!(next(&mut rx).await, Some("services"));
    assert_eq!(next(&mut rx).await, Some("slices"));
    assert_eq!(next(&mut rx).await, Some("node"));

    // Only the slice changes: only slices are sent.
    std::fs::write(
        dir.join("slice.yaml"),
        SLICE.replace("10.0.0.1", "10.0.0.2"),
    )
    .unwrap();
    assert_eq!(next(&mut rx).await, Some("slices"));
    // Same content rewritten, and a non-manifest file changed: nothing is sent.
    std::fs::write(dir.join("svc.yaml"), SVC).unwrap();
    std::fs::write(dir.join("notes.txt"), "changed").unwrap();
    assert_eq!(next(&mut rx).await, None);
    // The Node file goes away: the Node is gone.
    std::fs::remove_file(dir.join("node.yaml")).unwrap();
    assert_eq!(next(&mut rx).await, Some("no-node"));
    // A ServiceCIDR appears, and goes: the whole list each time.
    std::fs::write(
        dir.join("cidr.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [172.30.0.0/16]}\n",
    )
    .unwrap();
    assert_eq!(next(&mut rx).await, Some("service-cidrs"));
    std::fs::remove_file(dir.join("cidr.yaml")).unwrap();
    assert_eq!(next(&mut rx).await, Some("service-cidrs"));
    // A Service file deleted: a Replace without it.
    std::fs::remove_file(dir.join("svc.yaml")).unwrap();
    let Some(Input::Services(Update::Replace(list))) =
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
    else {
        panic!("expected a Services Replace");
    };
    assert!(list.is_empty());
    // The directory vanishes: nothing is deleted; it comes back changed: the change is sent.
    std::fs::rename(&dir, tmp.path().join("gone")).unwrap();
    assert_eq!(next(&mut rx).await, None);
    std::fs::rename(tmp.path().join("gone"), &dir).unwrap();
    std::fs::write(dir.join("svc2.yaml"), SVC.replace("name: a,", "name: b,")).unwrap();
    assert_eq!(next(&mut rx).await, Some("services"));

    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}
