//! Faults the test API server can inject: what a broken API server, proxy or network sends a
//! client (issue 15), and a flood of changes faster than a client can follow.
//!
//! A fault names the resource it breaks; [`ApiServer::inject`](crate::ApiServer::inject) turns
//! it on and [`ApiServer::clear`](crate::ApiServer::clear) off. The one-shot faults (the ones
//! about "the next event") clear themselves once a watch has sent them.

use crate::{Kind, Shared};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What goes wrong, and for which resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// One-shot: the next watch event of the resource is cut in the middle of its JSON and
    /// the connection is cut there, as when an API server dies mid-write. A client resuming
    /// from its last resourceVersion loses nothing.
    TruncateWatchEvent(Kind),
    /// One-shot: the next watch event of the resource is cut in the middle of its JSON, the
    /// line ends there and the watch goes on (a stream corrupted on the way). The cut line is
    /// no event at all: a client that skips what it cannot decode has silently lost the
    /// change (kube-rs skips a line that ends early).
    CorruptWatchEvent(Kind),
    /// One-shot: a line that is not JSON (an HTML error page) comes before the next watch
    /// event of the resource; the watch goes on.
    GarbageLine(Kind),
    /// One-shot: in place of the next watch event of the resource, bytes without a newline,
    /// endlessly, until the client hangs up (an event of absurd size). A client that buffers
    /// lines without a limit runs out of memory.
    EndlessLine(Kind),
    /// Until cleared: the last page of each list of the resource (the only one, unless the
    /// client asks for pages) is a well-framed body holding only the first half of its JSON.
    /// The pages before it are whole: a client that acts on pages as they come has seen part
    /// of the list, and must not take it for all of it.
    TruncateLists(Kind),
    /// Until cleared: the last page of each list of the resource sends its headers and the
    /// first half of its JSON, then nothing, until the client gives up.
    StallLists(Kind),
    /// Until cleared: lists of the resource answer a `ConfigMapList` (its items, as an API
    /// server writes list items, without `kind`) holding a ConfigMap of the same name for
    /// each object; watches send each event's object as such a ConfigMap (with its `kind`).
    WrongKind(Kind),
    /// Watches of the resource, open or new, send nothing from now on: no events, no
    /// bookmarks, no end at their timeoutSeconds. Clearing it makes new watches work again;
    /// a watch that went silent stays silent (a stuck connection does not come back), until
    /// the client hangs up or [`ApiServer::drop_watches`](crate::ApiServer::drop_watches).
    SilentWatch(Kind),
}

impl Fault {
    /// The resource it breaks.
    pub fn kind(self) -> Kind {
        match self {
            Fault::TruncateWatchEvent(k)
            | Fault::CorruptWatchEvent(k)
            | Fault::GarbageLine(k)
            | Fault::EndlessLine(k)
            | Fault::TruncateLists(k)
            | Fault::StallLists(k)
            | Fault::WrongKind(k)
            | Fault::SilentWatch(k) => k,
        }
    }

    /// Cleared by the first watch that sends it.
    pub(crate) fn one_shot(self) -> bool {
        matches!(
            self,
            Fault::TruncateWatchEvent(_)
                | Fault::CorruptWatchEvent(_)
                | Fault::GarbageLine(_)
                | Fault::EndlessLine(_)
        )
    }
}

/// A ConfigMap standing where an object of another kind was (same name, namespace and
/// resourceVersion); `with_kind` as in a watch event, without as in a list item.
pub(crate) fn config_map(meta: &Value, with_kind: bool) -> Value {
    let mut meta = meta.clone();
    if let Some(m) = meta.as_object_mut() {
        m.retain(|k, _| matches!(k.as_str(), "name" | "namespace" | "resourceVersion"));
    }
    let mut cm = serde_json::json!({
        "metadata": meta,
        "data": {"injected-by": "kpr-apiserver", "fault": "WrongKind"},
    });
    if with_kind {
        cm["kind"] = "ConfigMap".into();
        cm["apiVersion"] = "v1".into();
    }
    cm
}

/// A line no JSON decoder accepts, as a proxy in front of an API server may send.
pub(crate) const GARBAGE_LINE: &[u8] =
    b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n";

/// The chunk an endless line repeats (no newline in it).
pub(crate) const ENDLESS_CHUNK: usize = 64 * 1024;

/// Changes written as fast as one thread can, until stopped: see
/// [`ApiServer::flood`](crate::ApiServer::flood).
#[derive(Debug)]
pub struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Flood {
    pub(crate) fn start(shared: Arc<Shared>, objects: Vec<Value>) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut written = 0;
            if objects.is_empty() {
                return 0;
            }
            for object in objects.iter().cycle() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                shared.apply(object.clone());
                written += 1;
            }
            written
        });
        Flood {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the flood; returns how many changes it wrote. When it returns, every change is
    /// in the store (each object's last write is its current state).
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map_or(0, |t| t.join().unwrap_or_default())
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.halt();
    }
}
