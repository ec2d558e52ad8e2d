//! A throwaway cgroup v2 directory for a test (socket-lb attaches its programs there, never
//! to the machine's own root cgroup): a unique name, always removed, its processes moved back
//! to the root first.
//!
//! The hierarchy is mounted again under the temporary directory: `ip netns exec` mounts a new
//! sysfs over `/sys`, so `/sys/fs/cgroup` is not visible to what a test runs in its
//! namespaces, while a mount elsewhere is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A cgroup v2 directory owned by one test, and the mount it is reached through.
#[derive(Debug)]
pub struct TestCgroup {
    mount: PathBuf,
    path: PathBuf,
}

impl TestCgroup {
    /// Mounts the cgroup v2 hierarchy at a new temporary directory and creates
    /// `kpr-<test>-<pid>-<n>` in it.
    pub fn new(test: &str) -> std::io::Result<TestCgroup> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("kpr-{test}-{}-{n}", std::process::id());
        let mount = std::env::temp_dir().join(format!("{name}-cgroup2"));
        std::fs::create_dir_all(&mount)?;
        mount_fs("cgroup2", &mount)?;
        let path = mount.join(&name);
        let cg = TestCgroup { mount, path };
        std::fs::create_dir(&cg.path)?;
        Ok(cg)
    }

    /// The test's cgroup directory (write a process id to its `cgroup.procs` to move it in).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Mounts a filesystem of type `fstype` (no device) at `dir`.
pub fn mount_fs(fstype: &str, dir: &Path) -> std::io::Result<()> {
    let out = Command::new("mount")
        .args(["-t", fstype, fstype])
        .arg(dir)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "mount -t {fstype} {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Unmounts `dir` (lazily, so a straggler cannot keep it) and removes it.
pub fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg("-l").arg(dir).output();
    let _ = std::fs::remove_dir(dir);
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Processes still inside (a client the test left) go back to the root, then the
        // directory goes (rmdir fails while any process is inside; exiting ones take a moment).
        let root = self.mount.join("cgroup.procs");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = std::fs::write(&root, pid);
                }
            }
            match std::fs::remove_dir(&self.path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() > deadline => {
                    eprintln!(
                        "could not remove the test cgroup {}: {e}",
                        self.path.display()
                    );
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        unmount(&self.mount);
    }
}
