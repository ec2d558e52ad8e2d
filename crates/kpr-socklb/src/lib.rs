//! Socket-level load balancing for ClusterIP traffic: cgroup eBPF programs choose a Service's
//! endpoint when an application calls `connect()` or `sendmsg()`, so its packets leave already
//! addressed to the endpoint (no DNAT, no conntrack NAT entry); their maps are rendered from the
//! same desired state as the nftables rules, which stay and handle everything else.
//!
//! * `bpf/socklb.c`: the programs (`connect4/6`, `sendmsg4/6`, `recvmsg4/6`,
//!   `getpeername4/6`), compiled by `build.rs` when clang and the libbpf headers are there.
//! * [`plan`]: pure: what the maps must hold, their byte layout, the operations in a safe order.
//! * [`mounts`]: pure mountinfo parsing: where cgroup v2 and bpffs are.
//! * [`trace`]: pure: where a connection goes, read from the maps' bytes as the programs read
//!   them (checked against the model's intent in `tests/trace.rs`).
//! * `loader`: the kernel side: load, attach, pin, map writes, removal.
//!
//! Semantics (as the nftables mode's, for ClusterIP TCP and UDP from processes in the cgroup):
//! the endpoint set and the REJECT/DROP decision come from the desired state ([`plan::entry`]);
//! no endpoints fails `connect()`/`sendmsg()` with ECONNREFUSED; a DROP port, SCTP, a port the
//! Service does not have and every other address are left to nftables. Differences: ClientIP
//! affinity is keyed by the client's network namespace (one per pod; the host's processes
//! count as one client), not its source address; an unconnected UDP socket keeps the endpoint
//! its first datagram went to while that endpoint stays in the list (a conntrack flow in the
//! nftables mode keeps it until the flow times out). A `connect()` that races a list change
//! (between the switch to the new list and the old list's delete) is left to nftables.
//!
//! ```no_run
//! # fn demo(fam: &kpr_model::desired::FamilyDesired) -> Result<(), kpr_socklb::Error> {
//! use std::path::Path;
//! let cgroup = kpr_socklb::default_cgroup().expect("cgroup v2 is mounted");
//! let mut lb = kpr_socklb::SocketLb::start(&cgroup, Path::new(kpr_socklb::DEFAULT_PIN_DIR))?;
//! lb.sync(fam, None)?; // full; later syncs pass Some(changed ports)
//! # Ok(()) }
//! ```

pub mod mounts;
pub mod plan;
pub mod trace;

mod loader;

pub use loader::DEFAULT_PIN_DIR;

use kpr_model::desired::FamilyDesired;
use kpr_model::names::{IpFamily, ServicePortName};
use plan::{Frontend, Op, Programmed};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why socket-lb could not start or sync. The daemon logs it once and runs plain nftables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this binary was built without BPF support for --socket-lb (build it with clang and \
         the libbpf headers installed; Debian: apt-get install clang libbpf-dev)"
    )]
    NotBuilt,
    #[error("cgroup v2 directory {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bpf filesystem for {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("loading the socket-lb BPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("BPF program {program} (the kernel may lack cgroup socket hooks): {source}")]
    Program {
        program: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: Box<aya::maps::MapError>,
    },
}

/// What one sync wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// A full sync of the family (asked for, or forced by the first sync or an earlier error).
    pub full: bool,
    pub services_written: usize,
    pub services_deleted: usize,
    pub backends_written: usize,
    /// Backends (and orphaned members) deleted.
    pub backends_deleted: usize,
}

/// The programs attached to a cgroup and their maps; one per process.
#[derive(Debug)]
pub struct SocketLb {
    pin_dir: PathBuf,
    maps: loader::Maps,
    programmed: Programmed,
    /// Per family, which frontend each service port owns (known after a full sync).
    owners: BTreeMap<IpFamily, BTreeMap<ServicePortName, Frontend>>,
    /// The maps may differ from `programmed` (a write failed): read them back first.
    stale: bool,
}

impl SocketLb {
    /// Attaches the programs to the cgroup v2 directory `cgroup` (every process below it is
    /// balanced) and pins maps and links in `pin_dir`, over what a previous process left there
    /// (replaced without a gap; the entries it wrote stay until the first sync). An error
    /// means plain nftables: no hooks in this kernel, no cgroup v2, not root, or
    /// [`Error::NotBuilt`].
    pub fn start(cgroup: &Path, pin_dir: &Path) -> Result<SocketLb, Error> {
        loader::attach(cgroup, pin_dir)?;
        let maps = loader::Maps::open(pin_dir)?;
        let programmed = maps.read()?;
        Ok(SocketLb {
            pin_dir: pin_dir.to_owned(),
            maps,
            programmed,
            owners: BTreeMap::new(),
            stale: false,
        })
    }

    /// Brings one family's entries up to date: `None` = every service port (the maps then hold
    /// exactly the family's desired entries), `Some(ports)` = only those (each present in
    /// `fam` or deleted). The first sync of a family, and every sync after an error, is full.
    pub fn sync(
        &mut self,
        fam: &FamilyDesired,
        changed: Option<&[ServicePortName]>,
    ) -> Result<Stats, Error> {
        if self.stale {
            self.programmed = self.maps.read()?;
            self.owners.clear();
            self.stale = false;
        }
        let family = fam.family;
        let (changes, full) = match (changed, self.owners.get_mut(&family)) {
            (Some(ports), Some(owners)) => (plan::changes(fam, owners, ports), false),
            _ => {
                let target = plan::target(fam);
                let changes = plan::full_changes(&self.programmed, &target, family);
                self.owners.insert(family, target.owners);
                (changes, true)
            }
        };
        let ops = plan::diff(&mut self.programmed, &changes, full);
        let mut stats = Stats {
            full,
            ..Stats::default()
        };
        for op in &ops {
            if let Err(e) = self.maps.apply(op) {
                self.stale = true;
                return Err(e);
            }
            match op {
                Op::PutBackend { .. } => stats.backends_written += 1,
                Op::PutService { .. } => stats.services_written += 1,
                Op::DeleteService { .. } => stats.services_deleted += 1,
                Op::DeleteBackend { .. } | Op::DeleteMember { .. } => stats.backends_deleted += 1,
            }
        }
        Ok(stats)
    }

    /// What the maps hold, as this process believes.
    pub fn programmed(&self) -> &Programmed {
        &self.programmed
    }

    /// Where the maps and links are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Detaches the programs and deletes the maps pinned in `pin_dir` (for `--cleanup` and
    /// when `--socket-lb` is turned off); a missing directory is fine. Returns whether there
    /// was anything. A running `SocketLb` on that directory stops balancing.
    pub fn remove(pin_dir: &Path) -> Result<bool, Error> {
        loader::remove(pin_dir)
    }
}

/// The host's cgroup v2 mount (`/sys/fs/cgroup` on pure-v2 hosts, `/sys/fs/cgroup/unified` on
/// hybrid ones), from `/proc/self/mountinfo`.
pub fn default_cgroup() -> Option<PathBuf> {
    mounts::read_mounts()
        .ok()
        .and_then(|m| mounts::cgroup2_mount(&m))
}

/// Whether this binary holds the BPF programs (clang and libbpf headers were there at build).
pub fn built_with_bpf() -> bool {
    cfg!(kpr_bpf)
}
