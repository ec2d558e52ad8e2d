//! The only code here that talks to the kernel: loads `bpf/socklb.c`'s object with aya,
//! attaches its programs to a cgroup v2 directory, pins maps and links under a bpffs directory,
//! writes map entries, reads them back, and removes everything.
//!
//! Restart without a gap: the maps are pinned, so a new process loads its programs over the
//! same maps (unless their layout changed: then they are replaced). Its new links are attached
//! next to the old ones (cgroup links always run side by side), pinned under a temporary name and
//! renamed over the old pins, which detaches the old links: a socket always has one program or
//! two, and two are harmless (the second sees an endpoint address, not a Service, and leaves it).

use crate::Error;
use crate::plan::{self, Op, Programmed};
use aya::maps::{HashMap, Map, MapData, MapError, MapInfo, MapType};
use std::path::Path;

/// A map of the object: name, type, key size, value size, max entries (as `socklb.c` says).
struct MapSpec {
    name: &'static str,
    kind: MapType,
    key: u32,
    value: u32,
    max: u32,
}

const MAPS: [MapSpec; 5] = [
    MapSpec {
        name: "services",
        kind: MapType::Hash,
        key: plan::SVC_KEY_LEN as u32,
        value: plan::SVC_VAL_LEN as u32,
        max: 65536,
    },
    MapSpec {
        name: "backends",
        kind: MapType::Hash,
        key: plan::BE_KEY_LEN as u32,
        value: plan::ADDR_PORT_LEN as u32,
        max: 262_144,
    },
    MapSpec {
        name: "members",
        kind: MapType::Hash,
        key: plan::MEMBER_KEY_LEN as u32,
        value: plan::MEMBER_VAL_LEN as u32,
        max: 262_144,
    },
    MapSpec {
        name: "revnat",
        kind: MapType::LruHash,
        key: 32,
        value: plan::ADDR_PORT_LEN as u32,
        max: 65536,
    },
    MapSpec {
        name: "affinity",
        kind: MapType::LruHash,
        key: 32,
        value: 32,
        max: 65536,
    },
];

/// The programs (function names in `socklb.c`); each one's link is pinned as `link_<name>`.
pub(crate) const PROGRAMS: [&str; 8] = [
    "sock4_connect",
    "sock4_sendmsg",
    "sock4_recvmsg",
    "sock4_getpeername",
    "sock6_connect",
    "sock6_sendmsg",
    "sock6_recvmsg",
    "sock6_getpeername",
];

/// Where the daemon pins everything unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/kube-proxy-rs/socklb";

#[cfg(kpr_bpf)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socklb.o"));

/// Loads the programs over the maps pinned in `pin_dir` (created when absent) and attaches
/// them to `cgroup`, replacing the links a previous process pinned there.
#[cfg(kpr_bpf)]
pub(crate) fn attach(cgroup: &Path, pin_dir: &Path) -> Result<(), Error> {
    use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};

    let cg = std::fs::File::open(cgroup).map_err(|source| Error::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    prepare_pin_dir(pin_dir)?;
    drop_incompatible_maps(pin_dir)?;
    let mut loader = aya::EbpfLoader::new();
    let paths: Vec<(&str, std::path::PathBuf)> = MAPS
        .iter()
        .map(|m| (m.name, pin_dir.join(m.name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
    for name in PROGRAMS {
        let program_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Program {
            program: name,
            source: e,
        };
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| program_err("not in the object".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| program_err(e.into()))?;
        prog.load().map_err(|e| program_err(e.into()))?;
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| program_err(e.into()))?;
        let link = prog.take_link(id).map_err(|e| program_err(e.into()))?;
        // A kernel before 5.7 has no cgroup links (the attach is a plain prog_attach, which
        // cannot be pinned): refused here, so the daemon runs plain nftables.
        let link: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| {
                program_err(format!("no bpf_link for cgroup programs (Linux 5.7+): {e}").into())
            })?;
        let path = pin_dir.join(format!("link_{name}"));
        // (bpffs refuses names with a dot.)
        let tmp = pin_dir.join(format!("link_{name}_new"));
        let _ = std::fs::remove_file(&tmp);
        let pinned = link.pin(&tmp).map_err(|e| Error::Pin {
            path: tmp.clone(),
            source: std::io::Error::other(e),
        })?;
        // Atomically replaces the old pin, which detaches the old program.
        std::fs::rename(&tmp, &path).map_err(|source| Error::Pin {
            path: path.clone(),
            source,
        })?;
        drop(pinned);
    }
    Ok(())
}

/// Without the object there is nothing to attach.
#[cfg(not(kpr_bpf))]
pub(crate) fn attach(_cgroup: &Path, _pin_dir: &Path) -> Result<(), Error> {
    Err(Error::NotBuilt)
}

/// Detaches and deletes everything pinned in `pin_dir`: links first (the programs stop), then
/// the maps, then the directory. Nothing there is not an error. Returns whether anything was.
pub(crate) fn remove(pin_dir: &Path) -> Result<bool, Error> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    let mut names: Vec<String> = PROGRAMS
        .iter()
        .flat_map(|p| [format!("link_{p}"), format!("link_{p}_new")])
        .collect();
    names.extend(MAPS.iter().map(|m| m.name.to_owned()));
    let mut any = false;
    for name in names {
        let path = pin_dir.join(&name);
        match std::fs::remove_file(&path) {
            Ok(()) => any = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Pin { path, source }),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Pin {
                path: pin_dir.to_owned(),
                source,
            });
        }
    }
    Ok(any)
}

/// Makes sure `pin_dir` is on a bpffs: mounts one at `/sys/fs/bpf` when that is not bpffs
/// and `pin_dir` is under it, then creates the directory.
#[cfg_attr(not(kpr_bpf), allow(dead_code))]
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), Error> {
    let bpffs_err = |reason: String| Error::Bpffs {
        path: pin_dir.to_owned(),
        reason,
    };
    let mounts = crate::mounts::read_mounts().map_err(|e| bpffs_err(e.to_string()))?;
    if crate::mounts::fs_type_at(&mounts, pin_dir) != Some("bpf") {
        let root = Path::new("/sys/fs/bpf");
        if !pin_dir.starts_with(root) {
            return Err(bpffs_err("not on a bpf filesystem".into()));
        }
        std::fs::create_dir_all(root).map_err(|e| bpffs_err(e.to_string()))?;
        rustix::mount::mount(
            "bpf",
            root,
            "bpf",
            rustix::mount::MountFlags::empty(),
            None::<&std::ffi::CStr>,
        )
        .map_err(|e| bpffs_err(format!("mounting bpffs at {}: {e}", root.display())))?;
    }
    std::fs::create_dir_all(pin_dir).map_err(|e| bpffs_err(e.to_string()))
}

/// Unpins maps whose type or sizes differ from this object's (a proxy of another layout left
/// them): the new programs get new maps. The old programs keep theirs until their links go.
#[cfg_attr(not(kpr_bpf), allow(dead_code))]
fn drop_incompatible_maps(pin_dir: &Path) -> Result<(), Error> {
    for spec in &MAPS {
        let path = pin_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let same = MapInfo::from_pin(&path).is_ok_and(|info| {
            info.map_type().is_ok_and(|t| t == spec.kind)
                && info.key_size() == spec.key
                && info.value_size() == spec.value
                && info.max_entries() == spec.max
        });
        if !same {
            std::fs::remove_file(&path).map_err(|source| Error::Pin { path, source })?;
        }
    }
    Ok(())
}

type Services = HashMap<MapData, [u8; plan::SVC_KEY_LEN], [u8; plan::SVC_VAL_LEN]>;
type Backends = HashMap<MapData, [u8; plan::BE_KEY_LEN], [u8; plan::ADDR_PORT_LEN]>;
type Members = HashMap<MapData, [u8; plan::MEMBER_KEY_LEN], [u8; plan::MEMBER_VAL_LEN]>;

/// The maps userspace writes, opened from their pins.
#[derive(Debug)]
pub(crate) struct Maps {
    services: Services,
    backends: Backends,
    members: Members,
}

impl Maps {
    pub(crate) fn open(pin_dir: &Path) -> Result<Maps, Error> {
        Ok(Maps {
            services: open_hash(pin_dir, "services")?,
            backends: open_hash(pin_dir, "backends")?,
            members: open_hash(pin_dir, "members")?,
        })
    }

    /// What the maps hold.
    pub(crate) fn read(&self) -> Result<Programmed, Error> {
        let services = collect(&self.services, "services")?;
        let backends = collect(&self.backends, "backends")?;
        let members = collect(&self.members, "members")?;
        Ok(Programmed::from_maps(&services, &backends, &members))
    }

    /// Applies one operation; deleting what is not there is not an error.
    pub(crate) fn apply(&mut self, op: &Op) -> Result<(), Error> {
        match *op {
            Op::PutBackend { id, slot, addr } => {
                self.members
                    .insert(plan::member_key(id, addr), plan::member_val(slot), 0)
                    .map_err(map_err("members"))?;
                self.backends
                    .insert(plan::be_key(id, slot), plan::addr_port(addr), 0)
                    .map_err(map_err("backends"))
            }
            Op::PutService {
                frontend,
                id,
                count,
                affinity,
                flags,
            } => {
                let val = plan::SvcVal {
                    id,
                    count,
                    affinity,
                    flags,
                };
                self.services
                    .insert(plan::svc_key(&frontend), plan::svc_val(&val), 0)
                    .map_err(map_err("services"))
            }
            Op::DeleteService { frontend } => {
                absent_ok(self.services.remove(&plan::svc_key(&frontend)), "services")
            }
            Op::DeleteBackend { id, slot, addr } => {
                absent_ok(self.backends.remove(&plan::be_key(id, slot)), "backends")?;
                absent_ok(self.members.remove(&plan::member_key(id, addr)), "members")
            }
            Op::DeleteMember { id, addr } => {
                absent_ok(self.members.remove(&plan::member_key(id, addr)), "members")
            }
        }
    }
}

fn open_hash<const K: usize, const V: usize>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, [u8; K], [u8; V]>, Error> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    HashMap::try_from(Map::HashMap(data)).map_err(map_err(name))
}

/// A map's entries as raw bytes.
type Entries<const K: usize, const V: usize> = Vec<([u8; K], [u8; V])>;

fn collect<const K: usize, const V: usize>(
    map: &HashMap<MapData, [u8; K], [u8; V]>,
    name: &'static str,
) -> Result<Entries<K, V>, Error> {
    let mut out = Vec::new();
    for item in map.iter() {
        match item {
            Ok(kv) => out.push(kv),
            // An entry deleted while we iterate.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(out)
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> Error {
    move |e| Error::Map {
        map,
        source: Box::new(e),
    }
}

fn absent_ok(r: Result<(), MapError>, map: &'static str) -> Result<(), Error> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(2) => Ok(()),
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        other => other.map_err(map_err(map)),
    }
}
