//! The manifest-directory source (`--manifests DIR`): reads every `.yaml`, `.yml` and `.json`
//! file under DIR and follows changes by polling.
//!
//! Polling (not inotify) is deliberate: it is deterministic, works on ConfigMap-mounted
//! directories (symlink swaps) and any filesystem, and is testable with paused time. A poll
//! compares each file's path, size, mtime and content hash; on any difference the directory is
//! reloaded and a full list (`Update::Replace`) is sent for each kind whose objects changed.
//! The first send of both lists is the source's "ready" point: the sync loop programs nothing
//! before it. A directory that vanishes keeps the last good snapshot in force.

use crate::decode::{Problem, Snapshot};
use kpr_model::{Input, Update};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};

/// How often the directory is checked for changes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Larger files are skipped: no real manifest is this big.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Deeper directory trees are not followed.
const MAX_DEPTH: usize = 8;

/// Errors that stop the source.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("manifest directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest directory {0} is not a directory")]
    NotADir(PathBuf),
}

/// What a poll compares: per file, (size, mtime, content hash).
type Fingerprint = BTreeMap<PathBuf, (u64, Option<SystemTime>, u64)>;

/// Reads the directory once (what `--dry-run` uses). Per-file problems are returned, not fatal.
pub fn load_dir(dir: &Path) -> Result<(Snapshot, Vec<Problem>), WatchError> {
    let (snapshot, problems, _) = scan(dir)?;
    Ok((snapshot, problems))
}

/// Follows the directory until `shutdown` turns true (or the receiver of `tx` is gone): sends
/// the initial lists, then the lists of every kind that changes. Problems are logged once per
/// distinct problem. Fails only when the directory is unusable at start.
pub async fn run(
    dir: PathBuf,
    tx: mpsc::Sender<Input>,
    mut shutdown: watch::Receiver<bool>,
    poll: Duration,
) -> Result<(), WatchError> {
    let (mut current, problems, mut fingerprint) = scan(&dir)?;
    let mut logged = log_new(&problems, &[]);
    for input in current.clone().into_inputs() {
        if tx.send(input).await.is_err() {
            return Ok(());
        }
    }
    let mut missing_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = tokio::time::sleep(poll) => {}
        }
        let fresh = match fingerprint_dir(&dir) {
            Ok(f) => f,
            Err(e) => {
                if !missing_logged {
                    tracing::warn!("{e}; keeping the last objects read");
                    missing_logged = true;
                }
                continue;
            }
        };
        missing_logged = false;
        if fresh == fingerprint {
            continue;
        }
        let Ok((next, problems, f)) = scan(&dir) else {
            continue;
        };
        fingerprint = f;
        logged = log_new(&problems, &logged);
        for input in diff(&current, &next) {
            if tx.send(input).await.is_err() {
                return Ok(());
            }
        }
        current = next;
    }
}

/// The events that turn `old` into `new`: a full list per kind that changed.
fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Input> {
    let mut out = Vec::new();
    if old.services != new.services {
        out.push(Input::Services(Update::Replace(
            new.services.values().cloned().collect(),
        )));
    }
    if old.slices != new.slices {
        out.push(Input::Slices(Update::Replace(
            new.slices.values().cloned().collect(),
        )));
    }
    if old.node != new.node {
        out.push(Input::Node(new.node.clone().map(Box::new)));
    }
    if old.service_cidrs != new.service_cidrs {
        out.push(Input::ServiceCidrs(Update::Replace(
            new.service_cidrs.values().cloned().collect(),
        )));
    }
    out
}

/// Logs problems not logged last time (so a broken file is reported once, not every poll).
fn log_new(problems: &[Problem], already: &[Problem]) -> Vec<Problem> {
    for p in problems.iter().filter(|p| !already.contains(p)) {
        tracing::warn!("{p}");
    }
    problems.to_vec()
}

fn scan(dir: &Path) -> Result<(Snapshot, Vec<Problem>, Fingerprint), WatchError> {
    let files = list_files(dir)?;
    let mut snapshot = Snapshot::default();
    let mut problems = Vec::new();
    let mut fingerprint = Fingerprint::new();
    for path in files {
        match read_file(&path) {
            Ok((text, meta)) => {
                fingerprint.insert(path.clone(), (meta.0, meta.1, hash(&text)));
                snapshot.add_text(&path, &text, &mut problems);
            }
            Err(reason) => problems.push(Problem {
                file: path,
                document: None,
                object: None,
                reason,
            }),
        }
    }
    Ok((snapshot, problems, fingerprint))
}

fn fingerprint_dir(dir: &Path) -> Result<Fingerprint, WatchError> {
    let mut out = Fingerprint::new();
    for path in list_files(dir)? {
        if let Ok((text, meta)) = read_file(&path) {
            out.insert(path, (meta.0, meta.1, hash(&text)));
        }
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<(String, (u64, Option<SystemTime>)), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} bytes is over the {MAX_FILE_BYTES}-byte limit",
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    Ok((text, (meta.len(), meta.modified().ok())))
}

fn hash(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Manifest files under `dir`, sorted; hidden entries (like ConfigMap mounts' `..data`
/// internals) are skipped, symlinks to files are followed.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>, WatchError> {
    let meta = std::fs::metadata(dir).map_err(|source| WatchError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(WatchError::NotADir(dir.to_owned()));
    }
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_owned(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| WatchError::Dir {
            path: d.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() && depth < MAX_DEPTH => stack.push((path, depth + 1)),
                Ok(m) if m.is_file() && is_manifest(&path) => out.push(path),
                _ => {}
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}
