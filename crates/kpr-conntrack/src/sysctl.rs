//! The conntrack sysctls kube-proxy sets at startup (§6.1): what to write is pure
//! ([`plan`]); [`apply`] writes it. `nf_conntrack_max` and the conntrack hash size are global
//! to the machine, so they are only written from the host's own network namespace; the
//! timeouts and `tcp_be_liberal` belong to the namespace the proxy runs in.

use std::time::Duration;

/// What the configuration asks for (`None`: leave the kernel's value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

/// One write: a path under /proc/sys or /sys, and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub path: String,
    pub value: String,
    /// Global to the machine (only written from the host's network namespace).
    pub global: bool,
}

/// The writes for `s` on a machine with `cpus` CPUs whose conntrack hash size is `hashsize`.
pub fn plan(s: &Settings, cpus: u32, hashsize: Option<u64>) -> Vec<Write> {
    let mut out = Vec::new();
    if let Some(per_core) = s.max_per_core.filter(|n| *n > 0) {
        let max = u64::from(per_core) * u64::from(cpus.max(1));
        let max = max.max(u64::from(s.min.unwrap_or(0)));
        out.push(Write {
            path: "/proc/sys/net/netfilter/nf_conntrack_max".into(),
            value: max.to_string(),
            global: true,
        });
        if hashsize.is_some_and(|h| h < max / 4) {
            out.push(Write {
                path: "/sys/module/nf_conntrack/parameters/hashsize".into(),
                value: (max / 4).to_string(),
                global: true,
            });
        }
    }
    let secs = |d: &Option<Duration>| d.filter(|d| !d.is_zero()).map(|d| d.as_secs().to_string());
    for (name, value) in [
        (
            "nf_conntrack_tcp_timeout_established",
            secs(&s.tcp_established_timeout),
        ),
        (
            "nf_conntrack_tcp_timeout_close_wait",
            secs(&s.tcp_close_wait_timeout),
        ),
        (
            "nf_conntrack_tcp_be_liberal",
            s.tcp_be_liberal.then(|| "1".to_owned()),
        ),
        ("nf_conntrack_udp_timeout", secs(&s.udp_timeout)),
        (
            "nf_conntrack_udp_timeout_stream",
            secs(&s.udp_stream_timeout),
        ),
    ] {
        if let Some(value) = value {
            out.push(Write {
                path: format!("/proc/sys/net/netfilter/{name}"),
                value,
                global: false,
            });
        }
    }
    out
}

/// Whether this process runs in the machine's own network namespace (that of pid 1).
pub fn in_host_netns() -> bool {
    let ino = |p: &str| std::fs::read_link(p).ok();
    ino("/proc/self/ns/net").is_some() && ino("/proc/self/ns/net") == ino("/proc/1/ns/net")
}

/// CPUs from sysfs (`/sys/devices/system/cpu/online`, e.g. `0-3,6`), else the scheduler's view.
pub fn cpus() -> u32 {
    let count = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .map(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| match r.split_once('-') {
                    Some((a, b)) => Some(b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1),
                    None => r.parse::<u32>().ok().map(|_| 1),
                })
                .sum::<u32>()
        })
        .filter(|n| *n > 0);
    count.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    })
}

/// Writes the plan for `s`; each failure is logged as a warning (a read-only /sys is not an
/// error), and global values are left alone outside the host's network namespace.
pub fn apply(s: &Settings) -> Vec<(Write, Result<(), String>)> {
    let hashsize = std::fs::read_to_string("/sys/module/nf_conntrack/parameters/hashsize")
        .ok()
        .and_then(|v| v.trim().parse().ok());
    let host = in_host_netns();
    plan(s, cpus(), hashsize)
        .into_iter()
        .map(|w| {
            let r = if w.global && !host {
                Err("not the host's network namespace: left alone".to_owned())
            } else {
                std::fs::write(&w.path, &w.value).map_err(|e| e.to_string())
            };
            (w, r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t6_1_1_max_is_per_core_times_cpus_at_least_min_and_the_hash_follows() {
        let s = Settings {
            max_per_core: Some(32768),
            min: Some(131072),
            ..Settings::default()
        };
        let w = plan(&s, 2, Some(16384));
        assert_eq!(w[0].value, "131072");
        assert_eq!(w[1].path, "/sys/module/nf_conntrack/parameters/hashsize");
        assert_eq!(w[1].value, "32768");
        assert!(
            plan(&s, 2, Some(65536)).len() == 1,
            "a large enough hash stays"
        );
    }

    #[test]
    fn t6_1_2_zero_leaves_the_host_alone() {
        let s = Settings {
            max_per_core: Some(0),
            tcp_established_timeout: Some(Duration::ZERO),
            ..Settings::default()
        };
        assert!(plan(&s, 2, Some(1)).is_empty());
        let t = Settings {
            tcp_established_timeout: Some(Duration::from_secs(86400)),
            tcp_be_liberal: true,
            ..Settings::default()
        };
        let w = plan(&t, 2, None);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].value, "86400");
        assert!(!w[0].global && w[1].value == "1");
    }
}
