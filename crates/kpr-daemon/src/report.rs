//! The readable report `--dry-run` prints: per family, per service port, its frontends,
//! policies, chosen endpoints and where internal and external traffic goes.
//!
//! Pure and deterministic (it only formats the desired state), so it is snapshot-tested.

use kpr_model::DesiredState;
use kpr_model::desired::{
    Endpoint, ExternalAction, FamilyDesired, InternalAction, ServicePortDesired,
};
use kpr_model::node::LocalDetector;
use std::fmt::Write;

/// Formats the whole desired state.
pub fn render(desired: &DesiredState) -> String {
    let mut out = String::new();
    for fam in desired.families.values() {
        family(&mut out, fam);
    }
    out
}

fn family(out: &mut String, fam: &FamilyDesired) {
    let node_ip = fam
        .node_ip
        .map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    let detector = match &fam.detector {
        LocalDetector::None => "none".to_owned(),
        LocalDetector::Cidr(c) => format!("source in {c}"),
        LocalDetector::BridgeInterface(b) => format!("input interface {b}"),
        LocalDetector::InterfaceNamePrefix(p) => format!("input interface {p}*"),
    };
    let _ = writeln!(
        out,
        "{} — {} service ports; node IP {node_ip}; local pods: {detector}; masqueradeAll {}",
        fam.family,
        fam.ports.len(),
        fam.masquerade_all
    );
    for sp in fam.ports.values() {
        port(out, fam, sp);
    }
    let (internal, external) = fam.no_local_endpoints();
    let _ = writeln!(
        out,
        "  no local endpoints: internal {internal}, external {external}"
    );
    let cidrs = if fam.service_cidrs.is_empty() {
        "none known (nothing dropped)".to_owned()
    } else {
        let v: Vec<String> = fam.service_cidrs.iter().map(ToString::to_string).collect();
        format!(
            "{} (nftables mode: new connections to addresses no Service uses are dropped)",
            v.join(", ")
        )
    };
    let _ = writeln!(out, "  serviceCIDRs: {cidrs}\n");
}

fn port(out: &mut String, fam: &FamilyDesired, sp: &ServicePortDesired) {
    let _ = writeln!(out, "  {} {}", sp.name, sp.protocol);
    let mut frontends = vec![format!("clusterIP {}", sock(sp.cluster_ip, sp.port))];
    if let Some(np) = sp.node_port {
        frontends.push(format!("nodePort {np}"));
    }
    for ip in &sp.external_ips {
        frontends.push(format!("externalIP {}", sock(*ip, sp.port)));
    }
    for ip in &sp.load_balancer_ips {
        frontends.push(format!("loadBalancer {}", sock(*ip, sp.port)));
    }
    let _ = writeln!(out, "    frontends  {}", frontends.join(", "));
    if !sp.firewall_allow.is_empty() {
        let allow: Vec<String> = sp.firewall_allow.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "    firewall   load-balancer traffic only from {}",
            allow.join(", ")
        );
    }
    let mut policy = vec![
        format!(
            "internalTrafficPolicy={}",
            if sp.internal_policy_local {
                "Local"
            } else {
                "Cluster"
            }
        ),
        format!(
            "externalTrafficPolicy={}",
            if sp.external_policy_local {
                "Local"
            } else {
                "Cluster"
            }
        ),
    ];
    if let Some(t) = sp.affinity_timeout {
        policy.push(format!("sessionAffinity=ClientIP {t}s"));
    }
    if let Some(p) = sp.health_check_node_port {
        policy.push(format!("healthCheckNodePort={p}"));
    }
    let _ = writeln!(out, "    policy     {}", policy.join(", "));
    let _ = writeln!(out, "    endpoints  {}", list(&sp.endpoints, true));
    let masq_internal = if fam.masquerade_all {
        " (masquerade all)"
    } else if fam.detector.is_some() {
        " (masquerade unless from a local pod)"
    } else {
        ""
    };
    let internal = match sp.internal {
        InternalAction::Cluster => format!(
            "DNAT to {}{masq_internal}",
            list(&sp.cluster_endpoints, false)
        ),
        InternalAction::Local => format!(
            "DNAT to local {}{masq_internal}",
            list(&sp.local_endpoints, false)
        ),
        InternalAction::Drop => "DROP (internalTrafficPolicy=Local, no local endpoint)".to_owned(),
        InternalAction::Reject => "REJECT (no endpoints)".to_owned(),
    };
    let _ = writeln!(out, "    internal   {internal}");
    let Some(external) = sp.external else { return };
    let external = match external {
        ExternalAction::Cluster => format!(
            "DNAT to {} with masquerade",
            list(&sp.cluster_endpoints, false)
        ),
        ExternalAction::Reject => "REJECT (no endpoints)".to_owned(),
        ExternalAction::Local => {
            let ordinary = if sp.local_endpoints.is_empty() {
                "DROP (no local endpoint)".to_owned()
            } else {
                format!(
                    "DNAT to local {} keeping the client IP",
                    list(&sp.local_endpoints, false)
                )
            };
            let pods = if fam.detector.is_some() {
                "; local pods to the cluster set"
            } else {
                ""
            };
            format!(
                "{ordinary}{pods}; host sources masquerade to {}",
                list(&sp.cluster_endpoints, false)
            )
        }
    };
    let _ = writeln!(out, "    external   {external}");
}

fn sock(ip: std::net::IpAddr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip, port)
}

fn list(eps: &[Endpoint], detail: bool) -> String {
    if eps.is_empty() {
        return "[]".to_owned();
    }
    let items: Vec<String> = eps
        .iter()
        .map(|e| {
            let mut tags = Vec::new();
            if e.local {
                tags.push("local");
            }
            if !e.ready {
                tags.push("terminating");
            }
            if detail && !tags.is_empty() {
                format!("{} ({})", e.addr, tags.join(", "))
            } else {
                e.addr.to_string()
            }
        })
        .collect();
    format!("[{}]", items.join(", "))
}
