//! Where the host mounts cgroup v2 and bpffs, from `/proc/self/mountinfo` (parsing is pure).

use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`, the fields we read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The root of the mount within its filesystem (`/` for a whole cgroup hierarchy).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Parses mountinfo text; lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: fields 4 and 5 are the
/// root and mount point, the first field after ` - ` the filesystem type.
fn parse_line(line: &str) -> Option<Mount> {
    let (before, after) = line.split_once(" - ")?;
    let mut f = before.split(' ');
    let (_id, _parent, _dev) = (f.next()?, f.next()?, f.next()?);
    let root = unescape(f.next()?);
    let mount_point = unescape(f.next()?);
    let fs_type = after.split(' ').next()?.to_owned();
    Some(Mount {
        root: PathBuf::from(root),
        mount_point: PathBuf::from(mount_point),
        fs_type,
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The host's cgroup v2 hierarchy: a `cgroup2` mount of the whole hierarchy (root `/`),
/// `/sys/fs/cgroup` (pure v2) or `/sys/fs/cgroup/unified` (hybrid) preferred, else the first.
pub fn cgroup2_mount(mounts: &[Mount]) -> Option<PathBuf> {
    let v2: Vec<&Mount> = mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup2" && m.root == Path::new("/"))
        .collect();
    for preferred in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Some(m) = v2.iter().find(|m| m.mount_point == Path::new(preferred)) {
            return Some(m.mount_point.clone());
        }
    }
    v2.first().map(|m| m.mount_point.clone())
}

/// The filesystem type of the mount holding `path` (the longest mount point above it; the
/// last such mount when several stack on one point).
pub fn fs_type_at<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a str> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .map(|m| m.fs_type.as_str())
}

/// Reads `/proc/self/mountinfo`.
pub fn read_mounts() -> std::io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:25 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 26 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:27 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
31 22 0:30 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:14 - bpf bpf rw,mode=700
";

    const PURE_V2: &str = "\
24 1 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
28 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
99 28 0:26 /kubepods /var/lib/kubelet/x rw shared:9 - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_hosts_use_the_unified_mount() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 5);
        assert_eq!(
            cgroup2_mount(&m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn pure_v2_hosts_use_sys_fs_cgroup_and_skip_bind_mounts_of_a_subtree() {
        let m = parse_mountinfo(PURE_V2);
        assert_eq!(cgroup2_mount(&m), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn v1_only_hosts_have_none() {
        let text = "28 26 0:27 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(cgroup2_mount(&parse_mountinfo(text)), None);
    }

    #[test]
    fn another_mount_point_is_taken_when_it_is_the_only_one() {
        let text = "5 1 0:9 / /run/cg2 rw master:3 - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount(&parse_mountinfo(text)),
            Some(PathBuf::from("/run/cg2"))
        );
    }

    #[test]
    fn octal_escapes_and_optional_fields_parse() {
        let text =
            "5 1 0:9 / /mnt/with\\040space rw shared:1 master:2 - cgroup2 none rw\nnot a line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn the_filesystem_under_a_path_is_the_deepest_mount() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(
            fs_type_at(&m, Path::new("/sys/fs/bpf/kube-proxy-rs/socklb")),
            Some("bpf")
        );
        assert_eq!(fs_type_at(&m, Path::new("/sys/fs/bpfx")), Some("sysfs"));
        assert_eq!(fs_type_at(&m, Path::new("/sys/kernel")), Some("sysfs"));
    }
}
