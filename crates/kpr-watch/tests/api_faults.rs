//! The API source against a test API server that sends garbage (issue 15): for each fault, the
//! source keeps what it delivered last (it never ends a list it did not get whole, so nothing
//! is deleted on a partial list), reports the failure, relists, and converges to what the API
//! server really holds once the fault is cleared.
#![allow(clippy::unwrap_used)]

use kpr_apiserver::{ApiServer, Fault, Kind, Options};
use kpr_model::{Input, Update};
use kpr_testkit::{service, slice};
use kpr_watch::api::{self, Connect, Settings};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Short timeouts, so a silent watch or a stalled list fails within seconds.
const SETTINGS: Settings = Settings {
    watch_timeout: Duration::from_secs(2),
    list_timeout: Duration::from_secs(2),
    service_cidr_recheck: Duration::from_secs(300),
};

/// What the source reported of its watches: (resource, up).
#[derive(Debug, Default)]
struct Seen {
    watches: Mutex<Vec<(String, bool)>>,
}

impl Seen {
    fn watches(&self) -> Vec<(String, bool)> {
        self.watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl api::Observer for Seen {
    fn request(&self, _: &str, _: &str, _: Option<u16>, _: Duration) {}
    fn watch(&self, resource: &str, up: bool) {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        w.push((resource.into(), up));
    }
}

/// (kind, namespace, name) of a Service (`S`) or EndpointSlice (`E`).
type Key = (char, String, String);

/// The objects as the source has told them, by key, with their resourceVersion; and every
/// key a `Delete` or the end of a list ever removed.
#[derive(Debug, Default, Clone, PartialEq)]
struct Mirror {
    objects: BTreeMap<Key, String>,
    removed: BTreeSet<Key>,
    lists_ended: usize,
}

impl Mirror {
    fn fold(&mut self, input: Input) {
        fn key(k: char, m: &kpr_model::objects::ObjectMeta) -> Key {
            let ns = m.namespace.clone().unwrap_or_default();
            (k, ns, m.name.clone().unwrap_or_default())
        }
        let rv =
            |m: &kpr_model::objects::ObjectMeta| m.resource_version.clone().unwrap_or_default();
        match input {
            Input::Services(Update::Apply(s)) => {
                self.objects.insert(key('S', &s.metadata), rv(&s.metadata));
            }
            Input::Slices(Update::Apply(s)) => {
                self.objects.insert(key('E', &s.metadata), rv(&s.metadata));
            }
            Input::Services(Update::Delete(k)) => self.remove(('S', k.namespace, k.name)),
            Input::Slices(Update::Delete(k)) => self.remove(('E', k.namespace, k.name)),
            Input::Services(Update::Keep(keys)) => self.keep('S', keys),
            Input::Slices(Update::Keep(keys)) => self.keep('E', keys),
            Input::Services(Update::Replace(_)) | Input::Slices(Update::Replace(_)) => {
                panic!("the API source streams lists, it never sends Replace")
            }
            _ => {}
        }
    }

    fn remove(&mut self, key: Key) {
        self.objects.remove(&key);
        self.removed.insert(key);
    }

    fn keep(&mut self, kind: char, keys: Vec<kpr_model::ObjectKey>) {
        let keep: BTreeSet<Key> = keys
            .into_iter()
            .map(|k| (kind, k.namespace, k.name))
            .collect();
        let gone: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| k.0 == kind && !keep.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove(k);
        }
        self.lists_ended += 1;
    }
}

/// A test API server, the source following it, and what the source said.
struct Rig {
    server: ApiServer,
    seen: Arc<Seen>,
    rx: mpsc::Receiver<Input>,
    mirror: Mirror,
    stop: watch::Sender<bool>,
    source: tokio::task::JoinHandle<()>,
}

impl Rig {
    /// Serves what `setup` writes, starts the source and waits until it has listed it all.
    async fn start(setup: impl FnOnce(&ApiServer)) -> Rig {
        let server = ApiServer::start(Options::default()).await.unwrap();
        setup(&server);
        let seen = Arc::new(Seen::default());
        let client = api::client(
            &Connect {
                master: Some(server.url()),
                ..Connect::default()
            },
            seen.clone(),
        )
        .await
        .unwrap();
        let (tx, rx) = mpsc::channel(1024);
        let (stop, shutdown) = watch::channel(false);
        let source = tokio::spawn(api::run_with(
            client,
            "node-a".into(),
            tx,
            shutdown,
            seen.clone(),
            SETTINGS,
        ));
        let mut rig = Rig {
            server,
            seen,
            rx,
            mirror: Mirror::default(),
            stop,
            source,
        };
        rig.converge("the first lists", Duration::from_secs(20))
            .await;
        rig
    }

    /// What the API server holds, as the mirror should.
    fn truth(&self) -> BTreeMap<Key, String> {
        let mut out = BTreeMap::new();
        for (k, kind) in [('S', Kind::Service), ('E', Kind::EndpointSlice)] {
            for o in self.server.objects(kind) {
                let m = &o["metadata"];
                let s = |f: &str| m[f].as_str().unwrap_or_default().to_owned();
                out.insert((k, s("namespace"), s("name")), s("resourceVersion"));
            }
        }
        out
    }

    /// Folds inputs until `done` holds (checked at least every 50 ms); panics after `limit`.
    async fn until(&mut self, what: &str, limit: Duration, done: impl Fn(&Rig) -> bool) {
        let end = Instant::now() + limit;
        while !done(self) {
            if Instant::now() >= end {
                let truth = self.truth();
                let differ: Vec<_> = truth
                    .iter()
                    .filter(|(k, v)| self.mirror.objects.get(*k) != Some(*v))
                    .chain(
                        self.mirror
                            .objects
                            .iter()
                            .filter(|(k, _)| !truth.contains_key(*k)),
                    )
                    .take(10)
                    .collect();
                panic!(
                    "{what}: not within {limit:?}; {} objects at the source, {} at the server, differing: {differ:?}; watches {:?}",
                    self.mirror.objects.len(),
                    truth.len(),
                    self.seen.watches()
                );
            }
            match tokio::time::timeout(Duration::from_millis(50), self.rx.recv()).await {
                Ok(Some(input)) => self.mirror.fold(input),
                Ok(None) => panic!("the source stopped while waiting for {what}"),
                Err(_) => {}
            }
        }
    }

    /// Folds inputs until the mirror equals the server's contents.
    async fn converge(&mut self, what: &str, limit: Duration) {
        self.until(what, limit, |r| {
            r.mirror.objects == r.truth() && r.mirror.lists_ended >= 2
        })
        .await;
    }

    /// Folds whatever arrives for `d`.
    async fn idle(&mut self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        while let Ok(Some(input)) = tokio::time::timeout_at(end, self.rx.recv()).await {
            self.mirror.fold(input);
        }
    }

    /// How many times the watch of `resource` went down.
    fn failures(&self, resource: &str) -> usize {
        self.seen
            .watches()
            .iter()
            .filter(|(r, up)| r == resource && !up)
            .count()
    }

    /// Makes the source list again, after `change`: the API server goes away, `change` is
    /// made and the history forgotten meanwhile, and it comes back, so every watch resumes
    /// from a resourceVersion too old (410 Gone).
    async fn relist_after(&mut self, change: impl FnOnce(&ApiServer)) {
        self.server.stop().await;
        change(&self.server);
        self.server.compact();
        self.server.restart().await.unwrap();
    }

    async fn finish(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(5), self.source)
            .await
            .unwrap()
            .unwrap();
    }
}

fn json<T: serde::Serialize>(o: &T) -> serde_json::Value {
    serde_json::to_value(o).unwrap()
}

fn svc(name: &str, ip: &str) -> serde_json::Value {
    json(
        &service("ns", name)
            .cluster_ip(ip)
            .port("p", 80, "TCP")
            .build(),
    )
}

fn eps(svc: &str, suffix: &str, ips: &[&str]) -> serde_json::Value {
    let mut b = slice("ns", svc, suffix).port("p", 8080, "TCP");
    for ip in ips {
        b = b.ready(ip, "node-a");
    }
    json(&b.build())
}

fn web(server: &ApiServer) {
    server.apply(svc("web", "172.30.0.10"));
    server.apply(svc("db", "172.30.0.11"));
    server.apply(eps("web", "1", &["10.0.0.1"]));
}

/// A watch event cut in the middle together with its connection (a server dying mid-write):
/// the watch resumes from its resourceVersion (no relist, no failure) and the change arrives
/// whole; nothing was removed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_event_cut_with_its_connection_loses_nothing() {
    let mut rig = Rig::start(web).await;
    rig.server.inject(Fault::TruncateWatchEvent(Kind::Service));
    rig.server.apply(svc("new", "172.30.0.12"));
    rig.converge("the cut event, resent", Duration::from_secs(20))
        .await;
    assert!(
        rig.server.faults().is_empty(),
        "the one-shot fault was sent"
    );
    // kube-rs takes a connection cut mid-event for the end of the watch and resumes from
    // the last resourceVersion it had: the cut event is sent again, whole. Nothing failed.
    assert_eq!(rig.failures("services"), 0);
    assert!(rig.mirror.removed.is_empty(), "{:?}", rig.mirror.removed);
    rig.finish().await;
}

/// A watch line cut short but ended (corruption on the way): kube-rs alone would skip it and
/// the change would be lost for good; the source fails the watch, relists, and has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_watch_line_fails_the_watch_and_the_relist_has_the_change() {
    let mut rig = Rig::start(web).await;
    rig.server
        .inject(Fault::CorruptWatchEvent(Kind::EndpointSlice));
    rig.server.apply(eps("web", "1", &["10.0.0.1", "10.0.0.2"]));
    rig.converge(
        "the corrupted change, from the relist",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(rig.failures("endpointslices"), 1);
    assert!(rig.mirror.removed.is_empty(), "{:?}", rig.mirror.removed);
    rig.finish().await;
}

/// A line that is not JSON at all (an HTML error page) before an event: the watch fails, the
/// source relists; the deletion that followed the garbage is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_a_watch_fails_it_and_nothing_is_lost() {
    let mut rig = Rig::start(web).await;
    rig.server.inject(Fault::GarbageLine(Kind::Service));
    rig.server.delete(Kind::Service, "ns", "db");
    rig.converge("db deleted, after the garbage", Duration::from_secs(20))
        .await;
    assert_eq!(rig.failures("services"), 1);
    rig.finish().await;
}

/// An event that never ends (bytes without a newline, endlessly): the source gives up at
/// `MAX_EVENT_BYTES` instead of buffering until memory runs out, and relists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_watch_line_is_cut_at_the_limit() {
    let mut rig = Rig::start(web).await;
    let rss = || kpr_rss_kib().unwrap_or_default();
    let before = rss();
    rig.server.inject(Fault::EndlessLine(Kind::Service));
    rig.server.apply(svc("new", "172.30.0.12"));
    rig.converge("the change after the endless line", Duration::from_secs(30))
        .await;
    assert_eq!(rig.failures("services"), 1);
    eprintln!(
        "endless line: cut at {} MiB; RSS {} MiB before, {} MiB after",
        api::MAX_EVENT_BYTES >> 20,
        before >> 10,
        rss() >> 10
    );
    rig.finish().await;
}

/// Issue 15's central case: a list cut in its last page, after the pages before it were
/// delivered. The source has applied those pages' objects (the API server's own, current
/// ones) but never ends the list, so nothing is deleted: what the proxy had stays, even the
/// object deleted meanwhile, until a whole list says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_cut_in_its_last_page_never_deletes_anything() {
    // 600 slices: kube-rs lists in pages of 500.
    let mut rig = Rig::start(|s| {
        web(s);
        for i in 0..600 {
            s.apply(eps("many", &format!("{i:03}"), &["10.1.0.1"]));
        }
    })
    .await;
    assert_eq!(rig.mirror.objects.len(), 603);
    let before = rig.mirror.clone();
    rig.server.inject(Fault::TruncateLists(Kind::EndpointSlice));
    rig.relist_after(|s| {
        s.delete(Kind::EndpointSlice, "ns", "many-000");
    })
    .await;
    let base = rig.failures("endpointslices");
    rig.until(
        "two failed relists of the slices",
        Duration::from_secs(20),
        |r| r.failures("endpointslices") >= base + 2,
    )
    .await;
    assert_eq!(
        rig.mirror.objects, before.objects,
        "the last good state, objects deleted meanwhile included"
    );
    assert!(rig.mirror.removed.is_empty(), "{:?}", rig.mirror.removed);
    rig.server.clear(Fault::TruncateLists(Kind::EndpointSlice));
    rig.converge("the whole list", Duration::from_secs(30))
        .await;
    assert!(
        !rig.mirror
            .objects
            .contains_key(&('E', "ns".into(), "many-000".into()))
    );
    rig.finish().await;
}

/// A list whose last page stops coming: after `list_timeout` the list has failed and is
/// retried; the state stays until a list completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_list_times_out_and_is_retried() {
    let mut rig = Rig::start(web).await;
    let before = rig.mirror.clone();
    rig.server.inject(Fault::StallLists(Kind::Service));
    let start = Instant::now();
    rig.relist_after(|s| {
        s.delete(Kind::Service, "ns", "db");
    })
    .await;
    rig.until("two timed-out lists", Duration::from_secs(20), |r| {
        r.failures("services") >= 2
    })
    .await;
    let took = start.elapsed();
    assert!(took >= SETTINGS.list_timeout, "{took:?}");
    assert_eq!(rig.mirror.objects, before.objects);
    rig.server.clear(Fault::StallLists(Kind::Service));
    rig.converge("db gone after a whole list", Duration::from_secs(30))
        .await;
    rig.finish().await;
}

/// ConfigMaps in place of EndpointSlices, in a watch event and then in the lists: refused
/// both times (read leniently, each would be an empty slice of a real slice's name, and the
/// list's end would delete every real one); the last good slices stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_another_kind_are_refused_in_watches_and_lists() {
    let mut rig = Rig::start(web).await;
    let before = rig.mirror.clone();
    rig.server.inject(Fault::WrongKind(Kind::EndpointSlice));
    rig.server.apply(eps("web", "1", &["10.0.0.1", "10.0.0.3"]));
    rig.until(
        "a refused event and a refused list",
        Duration::from_secs(20),
        |r| r.failures("endpointslices") >= 2,
    )
    .await;
    assert_eq!(rig.mirror.objects, before.objects);
    assert!(rig.mirror.removed.is_empty(), "{:?}", rig.mirror.removed);
    rig.server.clear(Fault::WrongKind(Kind::EndpointSlice));
    rig.converge("the real slice change", Duration::from_secs(30))
        .await;
    rig.finish().await;
}

/// A watch that goes silent (no events, no bookmarks, no end): it fails once it has been
/// silent for its timeout plus `WATCH_SILENCE_GRACE`, and the relist brings what it never
/// sent. While the fault lasts each new watch goes silent too, and each relist catches up;
/// when it is cleared, changes flow through the watch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_watch_fails_after_its_timeout_and_the_relist_catches_up() {
    let mut rig = Rig::start(web).await;
    rig.server.inject(Fault::SilentWatch(Kind::Service));
    let start = Instant::now();
    rig.server.apply(svc("new", "172.30.0.12"));
    rig.converge(
        "the change the silent watch held back",
        Duration::from_secs(20),
    )
    .await;
    let took = start.elapsed();
    let limit = SETTINGS.watch_timeout + api::WATCH_SILENCE_GRACE;
    assert!(took >= limit - Duration::from_millis(500), "{took:?}");
    assert!(rig.failures("services") >= 1);
    assert!(rig.mirror.removed.is_empty(), "{:?}", rig.mirror.removed);
    eprintln!("silent watch: caught up after {took:?} (limit {limit:?})");
    rig.server.clear(Fault::SilentWatch(Kind::Service));
    rig.server.apply(svc("later", "172.30.0.13"));
    rig.converge("a change after the fault", Duration::from_secs(40))
        .await;
    // The watch now lives: a change arrives without a relist.
    let failures = rig.failures("services");
    rig.idle(Duration::from_secs(1)).await;
    let start = Instant::now();
    rig.server.apply(svc("live", "172.30.0.14"));
    rig.until("a live change", Duration::from_secs(5), |r| {
        r.mirror.objects.keys().any(|k| k.2 == "live")
    })
    .await;
    eprintln!("after the fault: a change arrived in {:?}", start.elapsed());
    assert_eq!(rig.failures("services"), failures, "no failure since");
    rig.finish().await;
}

/// An absurdly large object within the watch limit (a slice of 20,000 endpoints, 1.3 MB;
/// a Service with a 4 MB annotation): decoded and delivered like any other; the model skips
/// the slice (over 1,000 endpoints) and keeps its last good version, and the Service is
/// used. The source does not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enormous_objects_are_delivered_and_the_model_keeps_the_last_good_slice() {
    let mut rig = Rig::start(web).await;
    let mut trackers = kpr_model::Trackers::new();
    let ips: Vec<String> = (0..20_000)
        .map(|i| format!("10.2.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let mut big = svc("db", "172.30.0.11");
    big["metadata"]["annotations"] = serde_json::json!({"huge": "x".repeat(4 << 20)});
    // The model holds the good slice (as after the first list).
    let good = slice("ns", "web", "1")
        .port("p", 8080, "TCP")
        .ready("10.0.0.1", "node-a")
        .build();
    assert!(
        trackers
            .record(Input::Slices(Update::Apply(good)))
            .is_empty()
    );
    rig.server.apply(big);
    rig.server.apply(eps("web", "1", &ips));
    let mut skipped = Vec::new();
    let mut seen = 0;
    while seen < 2 {
        let input = tokio::time::timeout(Duration::from_secs(20), rig.rx.recv())
            .await
            .unwrap()
            .unwrap();
        if let Input::Services(Update::Apply(s)) = &input {
            assert_eq!(
                s.metadata.annotations.as_ref().unwrap()["huge"].len(),
                4 << 20
            );
            seen += 1;
        }
        if let Input::Slices(Update::Apply(s)) = &input {
            assert_eq!(s.endpoints.len(), 20_000);
            seen += 1;
        }
        rig.mirror.fold(input.clone());
        skipped.extend(trackers.record(input));
    }
    assert_eq!(rig.failures("services") + rig.failures("endpointslices"), 0);
    assert!(
        skipped.iter().any(|s| s.object.name == "web-1" && s.whole),
        "{skipped:?}"
    );
    let web = kpr_model::ServiceName::new("ns", "web");
    let kept: Vec<usize> = trackers
        .state()
        .slices(&web)
        .map(|s| s.endpoints.len())
        .collect();
    assert_eq!(kept, [1], "the last good version of the slice");
    rig.finish().await;
}

/// This process's resident set size, in KiB.
fn kpr_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
