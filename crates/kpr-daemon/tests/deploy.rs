//! The deployment files (issue 8): every document of `deploy/kubernetes` parses into its typed
//! Kubernetes object; the RBAC rules are exactly upstream's system:node-proxier's; the
//! DaemonSet runs as upstream's does (host network, NODE_NAME from the downward API, the
//! xtables lock and /lib/modules, /livez liveness, system-node-critical, every toleration,
//! rolling updates); its command line and the ConfigMap's configuration pass our own flag
//! parser and configuration decoder without a warning. The systemd unit and its example
//! config likewise.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kpr_config::{Flags, resolve_with};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The YAML documents of a file, as JSON values.
fn documents(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    text.split("\n---")
        .map(|d| d.trim())
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect()
}

fn typed<T: serde::de::DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"));
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// Our flag parser and configuration decoder on a command line and a config file's text.
fn resolves(args: &[String], config: &str) -> kpr_config::Resolved {
    let flags = Flags::try_parse_args(
        std::iter::once("kube-proxy-rs".to_owned()).chain(args.iter().cloned()),
    )
    .unwrap();
    let r = resolve_with(&flags, Some(config)).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    r
}

#[test]
fn the_daemonset_and_its_rbac_and_config_are_upstreams_shape() {
    let docs = documents("deploy/kubernetes/kube-proxy-rs.yaml");
    let sa: ServiceAccount = typed(&docs, "ServiceAccount");
    assert_eq!(sa.metadata.namespace.as_deref(), Some("kube-system"));

    let role: ClusterRole = typed(&docs, "ClusterRole");
    let mut rules = BTreeSet::new();
    for r in role.rules.unwrap() {
        for g in r.api_groups.unwrap_or_default() {
            for res in r.resources.clone().unwrap_or_default() {
                for v in &r.verbs {
                    rules.insert(format!("{g}/{res}:{v}"));
                }
            }
        }
    }
    let want: BTreeSet<String> = [
        "/services:list",
        "/services:watch",
        "/endpoints:list",
        "/endpoints:watch",
        "/nodes:get",
        "/nodes:list",
        "/nodes:watch",
        "/events:create",
        "/events:patch",
        "/events:update",
        "events.k8s.io/events:create",
        "events.k8s.io/events:patch",
        "events.k8s.io/events:update",
        "discovery.k8s.io/endpointslices:list",
        "discovery.k8s.io/endpointslices:watch",
        // Upstream's system:node-proxier since ServiceCIDRs (§4.8).
        "networking.k8s.io/servicecidrs:list",
        "networking.k8s.io/servicecidrs:watch",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(
        rules, want,
        "system:node-proxier's permissions, nothing more"
    );

    let binding: ClusterRoleBinding = typed(&docs, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", "kube-proxy-rs")
    );

    let cm: ConfigMap = typed(&docs, "ConfigMap");
    let config = cm.data.unwrap()["config.conf"].clone();

    let ds: DaemonSet = typed(&docs, "DaemonSet");
    let spec = ds.spec.unwrap();
    assert_eq!(
        spec.update_strategy.unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.service_account_name.as_deref(),
        sa.metadata.name.as_deref()
    );
    assert!(
        pod.tolerations
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    let c = &pod.containers[0];
    let env = &c.env.clone().unwrap()[0];
    assert_eq!(env.name, "NODE_NAME");
    assert_eq!(
        env.value_from
            .clone()
            .unwrap()
            .field_ref
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let caps = c
        .security_context
        .clone()
        .unwrap()
        .capabilities
        .unwrap()
        .add
        .unwrap();
    assert!(caps.contains(&"NET_ADMIN".to_owned()));
    let probe = c.liveness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(probe.path.as_deref(), Some("/livez"));
    let mounts: BTreeSet<String> = c
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_path)
        .collect();
    for m in ["/var/lib/kube-proxy", "/run/xtables.lock", "/lib/modules"] {
        assert!(mounts.contains(m), "{m}");
    }
    // The command line, with the downward API's value, through our flag parser; the config
    // file it names is the ConfigMap's key in the mounted volume.
    let command = c.command.clone().unwrap();
    assert_eq!(command[0], "/usr/local/bin/kube-proxy-rs");
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| a.replace("$(NODE_NAME)", "node-a"))
        .collect();
    assert!(args.contains(&"--config=/var/lib/kube-proxy/config.conf".to_owned()));
    let r = resolves(&args, &config);
    assert_eq!(r.proxy.mode.as_str(), "nftables");
    assert_eq!(r.proxy.hostname_override.as_deref(), Some("node-a"));
    assert_eq!(r.proxy.healthz_bind_address.map(|a| a.port()), Some(10256));
    assert!(
        r.proxy.client.kubeconfig.is_none(),
        "in-cluster service account"
    );
}

#[test]
fn the_systemd_unit_starts_the_binary_with_its_config() {
    let unit =
        std::fs::read_to_string(repo().join("deploy/systemd/kube-proxy-rs.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert!(unit.contains("Restart=on-failure") && unit.contains("RestartSec=5"));
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/kube-proxy-rs"));
    let args: Vec<String> = words.map(str::to_owned).collect();
    assert_eq!(
        args,
        ["--config=/var/lib/kube-proxy/kube-proxy-config.yaml"]
    );
    let config =
        std::fs::read_to_string(repo().join("deploy/systemd/kube-proxy-config.yaml")).unwrap();
    let r = resolves(&args, &config);
    assert_eq!(r.proxy.mode.as_str(), "nftables");
    assert!(r.proxy.client.kubeconfig.is_some());
}
