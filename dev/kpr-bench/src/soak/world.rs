//! The soak's cluster and its churn, as API writes: N permanent Services whose EndpointSlices
//! change (endpoints moving, becoming not-ready or terminating, scaling, slices replaced, split
//! and merged) and temporary Services of every kind created and deleted, from a seeded PRNG;
//! `restore` brings the permanent ones back to their first state, so a run ends with the
//! cluster it started with.
//!
//! Permanent Service `i` is `bench/s<i>` (ClusterIP 172.16.0.0 + 1 + i, TCP 80 -> 8080; every
//! tenth also UDP 53 -> 5353, the traffic that exercises conntrack cleanup), endpoints
//! 10.64.0.0 + 16 i + an offset (as `cluster.rs`). Temporary Service `id` is `bench/t<id>`
//! (ClusterIP 172.16.0.0 + 1 + N + id) in one of five shapes, holding a slot (node ports,
//! health-check port, load-balancer and external IPs, endpoint addresses 10.128.0.0 + 16 slot)
//! while it lives.

use crate::cluster::{NAMESPACE, NODE, cluster_ip, name};
use kpr_apiserver::Kind;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Endpoints a permanent Service can scale to.
pub(crate) const MAX_E: u32 = 10;
/// Temporary Services alive at once, at most.
pub(crate) const POOL: u32 = 64;
pub(crate) const UDP_PORT: u16 = 53;
pub(crate) const UDP_TARGET: u16 = 5353;

/// One write to the test API server.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    Apply(Value),
    Delete(Kind, String),
}

/// An endpoint's conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cond {
    Ready,
    NotReady,
    TerminatingServing,
    TerminatingGone,
}

impl Cond {
    const ALL: [Cond; 4] = [
        Cond::Ready,
        Cond::NotReady,
        Cond::TerminatingServing,
        Cond::TerminatingGone,
    ];

    fn json(self) -> Value {
        let (ready, serving, terminating) = match self {
            Cond::Ready => (true, true, false),
            Cond::NotReady => (false, false, false),
            Cond::TerminatingServing => (false, true, true),
            Cond::TerminatingGone => (false, false, true),
        };
        json!({"ready": ready, "serving": serving, "terminating": terminating})
    }

    /// What conntrack cleanup keeps flows to (§6.2: the serving condition).
    fn serving(self) -> bool {
        matches!(self, Cond::Ready | Cond::TerminatingServing)
    }
}

/// A permanent Service's endpoints and slices.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Perm {
    /// Endpoint 0's address moves with it (`generation % 6`, as `cluster.rs`).
    generation: u32,
    count: u32,
    cond: [Cond; MAX_E as usize],
    /// One slice, or two (the endpoints split in halves).
    slices: Vec<String>,
}

impl Perm {
    fn first(i: u32, e: u32) -> Perm {
        Perm {
            generation: 0,
            count: e,
            cond: [Cond::Ready; MAX_E as usize],
            slices: vec![format!("{}-a", name(i))],
        }
    }
}

/// The cluster, as last written.
#[derive(Debug)]
pub(crate) struct World {
    n: u32,
    e: u32,
    perm: Vec<Perm>,
    /// Live temporary Services: id -> (slot, the batch that created it).
    temps: BTreeMap<u32, (u32, u64)>,
    free: Vec<u32>,
    next_temp: u32,
    next_slice: u32,
    batch: u64,
    rng: Rng,
}

impl World {
    pub(crate) fn new(n: u32, e: u32, seed: u64) -> World {
        assert!((1..=MAX_E).contains(&e), "1 <= E <= {MAX_E}");
        World {
            n,
            e,
            perm: (0..n).map(|i| Perm::first(i, e)).collect(),
            temps: BTreeMap::new(),
            free: (0..POOL).rev().collect(),
            next_temp: 0,
            next_slice: 0,
            batch: 0,
            rng: Rng(seed | 1),
        }
    }

    /// Every object of the first state: the permanent Services and their slices.
    pub(crate) fn initial(&self) -> Vec<Value> {
        (0..self.n)
            .flat_map(|i| {
                std::iter::once(perm_service(i))
                    .chain(self.slices_of(i).into_iter().map(|(_, v)| v))
            })
            .collect()
    }

    pub(crate) fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Starts a new batch (a temporary Service is never deleted in the batch that made it, so
    /// every batch changes what the daemon programs).
    pub(crate) fn next_batch(&mut self) {
        self.batch += 1;
    }

    pub(crate) fn live_temps(&self) -> usize {
        self.temps.len()
    }

    /// Whether a temporary Service can be created / deleted now.
    pub(crate) fn can_create(&self) -> bool {
        !self.free.is_empty()
    }

    pub(crate) fn can_delete(&self) -> bool {
        self.temps.values().any(|&(_, b)| b < self.batch)
    }

    /// One EndpointSlice change of a random permanent Service: 1 to 3 writes.
    pub(crate) fn change(&mut self) -> Vec<Write> {
        let i = self.rng.below(self.n);
        let before = self.slices_of(i);
        let roll = self.rng.below(100);
        let p = &mut self.perm[i as usize];
        match roll {
            // An endpoint moves (a pod replaced on another address).
            0..40 => {
                p.generation += 1;
                if p.count == 0 {
                    p.count = 1;
                }
            }
            // An endpoint becomes not ready, terminating (serving or not) or ready again.
            40..65 => {
                if p.count == 0 {
                    p.count = 1;
                } else {
                    let k = self.rng.below(p.count) as usize;
                    let now = p.cond[k];
                    let others: Vec<Cond> = Cond::ALL.into_iter().filter(|c| *c != now).collect();
                    p.cond[k] = others[self.rng.below(others.len() as u32) as usize];
                }
            }
            // Scale (to zero sometimes: the Service's traffic is rejected).
            65..75 => {
                let to = (self.rng.below(MAX_E) + 1 + p.count) % (MAX_E + 1);
                for k in p.count..to {
                    p.cond[k as usize] = Cond::Ready;
                }
                p.count = to;
            }
            // A slice replaced by one of another name.
            75..90 => {
                let at = self.rng.below(p.slices.len() as u32) as usize;
                self.next_slice += 1;
                p.slices[at] = format!("{}-r{}", name(i), self.next_slice);
            }
            // Split into two slices, or merged back into one.
            _ => {
                if p.slices.len() == 1 {
                    self.next_slice += 1;
                    p.slices.push(format!("{}-r{}", name(i), self.next_slice));
                } else {
                    p.slices.truncate(1);
                }
            }
        }
        let after = self.slices_of(i);
        self.diff(&before, after)
    }

    /// A change that always changes what the daemon programs: endpoint 0 of a random
    /// permanent Service moves, ready. One or two writes.
    pub(crate) fn moved(&mut self) -> Vec<Write> {
        let i = self.rng.below(self.n);
        let before = self.slices_of(i);
        let p = &mut self.perm[i as usize];
        p.generation += 1;
        p.count = p.count.max(1);
        p.cond[0] = Cond::Ready;
        let after = self.slices_of(i);
        self.diff(&before, after)
    }

    /// Creates a temporary Service and its slice (in either order).
    pub(crate) fn create(&mut self) -> Vec<Write> {
        let slot = self.free.pop().expect("a free slot (check can_create)");
        let id = self.next_temp;
        self.next_temp += 1;
        assert!(
            self.n + id < 60_000,
            "temporary ClusterIPs stay in 172.16.0.0/16"
        );
        self.temps.insert(id, (slot, self.batch));
        let endpoints = self.rng.below(4);
        let mut w = vec![
            Write::Apply(temp_service(id, self.n, slot)),
            Write::Apply(temp_slice(id, slot, endpoints)),
        ];
        if self.rng.coin() {
            w.reverse();
        }
        w
    }

    /// Deletes a random temporary Service not created in this batch, and its slice.
    pub(crate) fn delete(&mut self) -> Vec<Write> {
        let old: Vec<u32> = self
            .temps
            .iter()
            .filter(|(_, (_, b))| *b < self.batch)
            .map(|(id, _)| *id)
            .collect();
        let id = old[self.rng.below(old.len() as u32) as usize];
        let (slot, _) = self.temps.remove(&id).expect("live");
        self.free.push(slot);
        let mut w = vec![
            Write::Delete(Kind::Service, temp_name(id)),
            Write::Delete(Kind::EndpointSlice, format!("{}-a", temp_name(id))),
        ];
        if self.rng.coin() {
            w.reverse();
        }
        w
    }

    /// The writes that bring every permanent Service back to its first state.
    pub(crate) fn restore(&mut self) -> Vec<Write> {
        let mut out = Vec::new();
        for i in 0..self.n {
            let first = Perm::first(i, self.e);
            if self.perm[i as usize] != first {
                let before = self.slices_of(i);
                self.perm[i as usize] = first;
                let after = self.slices_of(i);
                out.extend(self.diff(&before, after));
            }
        }
        out
    }

    /// The UDP frontends of the permanent Services, for traffic.
    pub(crate) fn udp_frontends(&self) -> Vec<Ipv4Addr> {
        (0..self.n).filter(|i| udp(*i)).map(cluster_ip).collect()
    }

    /// Per UDP frontend with at least one serving endpoint, the serving endpoints: a flow to
    /// the frontend DNATed anywhere else is one conntrack cleanup should have deleted.
    pub(crate) fn udp_serving(&self) -> BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>> {
        (0..self.n)
            .filter(|i| udp(*i))
            .filter_map(|i| {
                let p = &self.perm[i as usize];
                let serving: BTreeSet<Ipv4Addr> = (0..p.count)
                    .filter(|k| p.cond[*k as usize].serving())
                    .map(|k| perm_endpoint(i, k, p.generation))
                    .collect();
                (!serving.is_empty()).then(|| (cluster_ip(i), serving))
            })
            .collect()
    }

    /// The slices of permanent Service `i` as they are now: (name, object).
    fn slices_of(&self, i: u32) -> Vec<(String, Value)> {
        let p = &self.perm[i as usize];
        let endpoints: Vec<Value> = (0..p.count)
            .map(|k| {
                json!({
                    "addresses": [perm_endpoint(i, k, p.generation).to_string()],
                    "nodeName": if k % 2 == 0 { NODE } else { "node-b" },
                    "conditions": p.cond[k as usize].json(),
                })
            })
            .collect();
        let ports = perm_ports(i);
        if p.slices.len() == 1 {
            return vec![(
                p.slices[0].clone(),
                slice(&name(i), &p.slices[0], &ports, endpoints),
            )];
        }
        let half = endpoints.len() / 2;
        let (a, b) = endpoints.split_at(half);
        vec![
            (
                p.slices[0].clone(),
                slice(&name(i), &p.slices[0], &ports, a.to_vec()),
            ),
            (
                p.slices[1].clone(),
                slice(&name(i), &p.slices[1], &ports, b.to_vec()),
            ),
        ]
    }

    /// Applies of what changed, deletes of what went, in a random order of the two groups.
    fn diff(&mut self, before: &[(String, Value)], after: Vec<(String, Value)>) -> Vec<Write> {
        let gone: Vec<Write> = before
            .iter()
            .filter(|(n, _)| !after.iter().any(|(m, _)| m == n))
            .map(|(n, _)| Write::Delete(Kind::EndpointSlice, n.clone()))
            .collect();
        let applied: Vec<Write> = after
            .into_iter()
            .filter(|(n, v)| !before.iter().any(|(m, w)| m == n && w == v))
            .map(|(_, v)| Write::Apply(v))
            .collect();
        if self.rng.coin() {
            gone.into_iter().chain(applied).collect()
        } else {
            applied.into_iter().chain(gone).collect()
        }
    }
}

/// Every tenth permanent Service also serves UDP.
fn udp(i: u32) -> bool {
    i.is_multiple_of(10)
}

fn perm_endpoint(i: u32, k: u32, generation: u32) -> Ipv4Addr {
    let offset = if k == 0 { generation % 6 } else { 5 + k };
    Ipv4Addr::from(0x0A40_0000u32 + i * 16 + offset)
}

/// (name, port, protocol, target port).
type Port = (&'static str, u16, &'static str, u16);

fn perm_ports(i: u32) -> Vec<Port> {
    let mut p = vec![("p", 80, "TCP", 8080)];
    if udp(i) {
        p.push(("dns", UDP_PORT, "UDP", UDP_TARGET));
    }
    p
}

fn perm_service(i: u32) -> Value {
    let ip = cluster_ip(i).to_string();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name(i), "namespace": NAMESPACE},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": ports_json(&perm_ports(i), None)},
    })
}

fn ports_json(ports: &[Port], node_port: Option<u16>) -> Vec<Value> {
    ports
        .iter()
        .enumerate()
        .map(|(j, (n, port, proto, target))| {
            let mut v = json!({"name": n, "port": port, "protocol": proto, "targetPort": target});
            if let Some(np) = node_port {
                v["nodePort"] = json!(np + j as u16);
            }
            v
        })
        .collect()
}

fn slice(service: &str, name: &str, ports: &[Port], endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": ports.iter().map(|(n, _, proto, target)| json!({"name": n, "port": target, "protocol": proto})).collect::<Vec<_>>(),
        "endpoints": endpoints,
    })
}

fn temp_name(id: u32) -> String {
    format!("t{id:06}")
}

/// The five shapes, by `id % 5`: ClusterIP; NodePort TCP + UDP; LoadBalancer with
/// externalTrafficPolicy Local (a health-check server), source ranges and an ingress IP;
/// ClientIP affinity with an external IP and internalTrafficPolicy Local; two ports.
fn temp_ports(id: u32) -> Vec<Port> {
    match id % 5 {
        1 => vec![("p", 80, "TCP", 8080), ("u", 53, "UDP", 5353)],
        4 => vec![("p", 80, "TCP", 8080), ("q", 443, "TCP", 8443)],
        _ => vec![("p", 80, "TCP", 8080)],
    }
}

fn temp_service(id: u32, n: u32, slot: u32) -> Value {
    let ip = cluster_ip(n + id).to_string();
    let node_port = 30_000 + 2 * slot as u16;
    let mut spec = json!({"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip]});
    let mut status = json!({});
    match id % 5 {
        1 => {
            spec["type"] = json!("NodePort");
            spec["ports"] = json!(ports_json(&temp_ports(id), Some(node_port)));
        }
        2 => {
            spec["type"] = json!("LoadBalancer");
            spec["ports"] = json!(ports_json(&temp_ports(id), Some(node_port)));
            spec["externalTrafficPolicy"] = json!("Local");
            spec["healthCheckNodePort"] = json!(32_000 + slot);
            spec["loadBalancerSourceRanges"] = json!(["203.0.113.0/25"]);
            status =
                json!({"loadBalancer": {"ingress": [{"ip": format!("198.51.100.{}", slot + 1)}]}});
        }
        3 => {
            spec["ports"] = json!(ports_json(&temp_ports(id), None));
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 600}});
            spec["externalIPs"] = json!([format!("192.168.99.{}", slot + 1)]);
            spec["internalTrafficPolicy"] = json!("Local");
        }
        _ => spec["ports"] = json!(ports_json(&temp_ports(id), None)),
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": temp_name(id), "namespace": NAMESPACE},
        "spec": spec,
        "status": status,
    })
}

fn temp_slice(id: u32, slot: u32, endpoints: u32) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|k| {
            json!({
                "addresses": [Ipv4Addr::from(0x0A80_0000u32 + slot * 16 + k).to_string()],
                "nodeName": if k % 2 == 0 { NODE } else { "node-b" },
                "conditions": Cond::Ready.json(),
            })
        })
        .collect();
    slice(
        &temp_name(id),
        &format!("{}-a", temp_name(id)),
        &temp_ports(id),
        eps,
    )
}

/// xorshift64*: deterministic, seeded, no dependency.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }

    pub(crate) fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(w: &Write) -> String {
        match w {
            Write::Apply(v) => format!("apply {}", v["metadata"]["name"]),
            Write::Delete(k, n) => format!("delete {k:?} {n}"),
        }
    }

    #[test]
    fn restore_returns_to_the_first_state() {
        let mut w = World::new(20, 3, 7);
        let first: Vec<Perm> = w.perm.clone();
        for b in 0..500 {
            w.next_batch();
            let writes = if b % 7 == 0 && w.can_create() {
                w.create()
            } else if b % 11 == 0 && w.can_delete() {
                w.delete()
            } else {
                w.change()
            };
            assert!(
                writes.len() <= 3,
                "{:?}",
                writes.iter().map(key).collect::<Vec<_>>()
            );
        }
        assert_ne!(w.perm, first);
        let _ = w.restore();
        assert_eq!(w.perm, first);
        assert!(w.restore().is_empty());
    }

    #[test]
    fn a_move_always_writes_and_serving_follows_conditions() {
        let mut w = World::new(10, 2, 3);
        for _ in 0..50 {
            assert!(!w.moved().is_empty());
        }
        let serving = w.udp_serving();
        assert_eq!(serving.len(), 1, "Service 0 serves UDP");
        assert!(serving.values().all(|s| !s.is_empty()));
    }
}
