//! The few per-Service facts the work after a sync reads, kept up to date from each sync's
//! plan, so a partial sync costs O(changed Services) there too, never O(Services).
//!
//! Two things after a sync looked at every service port: the `no_local_endpoints` gauges
//! (Services with a Local policy and no local endpoint) and the healthCheckNodePort servers
//! (LoadBalancer Services with ETP=Local). At 10,000 Services those two walks were about 40% of
//! the daemon's CPU per endpoint change. [`AfterIndex`] holds their inputs per family; a full
//! sync rebuilds it from the desired state, a partial one re-reads only the changed Services.
//! Invariant: after [`AfterIndex::update`], it equals [`AfterIndex::build`] of the same desired
//! state (tested below).

use kpr_model::desired::{FamilyDesired, ServicePortDesired};
use kpr_model::{DesiredState, IpFamily, Protocol, ServiceName, ServicePortName, SyncPlan};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Per family, what the after-sync work needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct AfterIndex {
    families: BTreeMap<IpFamily, FamilyIndex>,
    /// Built at least once (a partial update before that would miss the unchanged Services).
    built: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FamilyIndex {
    /// Services with a port of internal traffic policy Local and no local endpoint (while it
    /// has endpoints elsewhere).
    no_local_internal: BTreeSet<ServiceName>,
    /// The same for external traffic policy Local, among ports with an external frontend.
    no_local_external: BTreeSet<ServiceName>,
    /// Service ports with a healthCheckNodePort and ETP=Local: the port, and the addresses of
    /// their ready local endpoints.
    health_checks: BTreeMap<ServicePortName, (u16, BTreeSet<IpAddr>)>,
}

impl AfterIndex {
    /// The index of a whole desired state.
    pub(super) fn build(desired: &DesiredState) -> AfterIndex {
        let families = desired
            .families
            .iter()
            .map(|(family, fam)| {
                let mut index = FamilyIndex::default();
                for sp in fam.ports.values() {
                    index.add(sp);
                }
                (*family, index)
            })
            .collect();
        AfterIndex {
            families,
            built: true,
        }
    }

    /// Brings the index up to date with `desired` after a sync of `plan`: a full plan rebuilds
    /// it, a partial one re-reads only the Services it names.
    pub(super) fn update(&mut self, desired: &DesiredState, plan: &SyncPlan) {
        let same_families = self.families.keys().eq(desired.families.keys());
        if plan.full || !self.built || !same_families {
            *self = AfterIndex::build(desired);
            return;
        }
        for (family, fam) in &desired.families {
            let index = self.families.entry(*family).or_default();
            for name in &plan.changed_services {
                index.remove(name);
                for sp in ports_of(fam, name) {
                    index.add(sp);
                }
            }
        }
    }

    /// Services of `family` with no local endpoint for a Local policy: (internal, external).
    pub(super) fn no_local_endpoints(&self, family: IpFamily) -> (usize, usize) {
        self.families.get(&family).map_or((0, 0), |f| {
            (f.no_local_internal.len(), f.no_local_external.len())
        })
    }

    /// The service ports of `family` with a healthCheckNodePort and ETP=Local, in port-name
    /// order: (name, healthCheckNodePort, addresses of their ready local endpoints).
    pub(super) fn health_checks(
        &self,
        family: IpFamily,
    ) -> impl Iterator<Item = (&ServicePortName, u16, &BTreeSet<IpAddr>)> {
        self.families
            .get(&family)
            .into_iter()
            .flat_map(|f| f.health_checks.iter().map(|(n, (p, ips))| (n, *p, ips)))
    }
}

impl FamilyIndex {
    fn add(&mut self, sp: &ServicePortDesired) {
        let no_local = sp.local_endpoints.is_empty() && sp.has_any_endpoints;
        if no_local && sp.internal_policy_local {
            self.no_local_internal.insert(sp.name.service.clone());
        }
        if no_local && sp.external_policy_local && sp.external.is_some() {
            self.no_local_external.insert(sp.name.service.clone());
        }
        if let Some(port) = sp
            .health_check_node_port
            .filter(|_| sp.external_policy_local)
        {
            let ips = sp
                .endpoints
                .iter()
                .filter(|e| e.local && e.ready)
                .map(|e| e.addr.ip())
                .collect();
            self.health_checks.insert(sp.name.clone(), (port, ips));
        }
    }

    fn remove(&mut self, name: &ServiceName) {
        self.no_local_internal.remove(name);
        self.no_local_external.remove(name);
        let first = ServicePortName::new(name.clone(), "", Protocol::Tcp);
        let doomed: Vec<ServicePortName> = self
            .health_checks
            .range(first..)
            .take_while(|(k, _)| k.service == *name)
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.health_checks.remove(&k);
        }
    }
}

/// The desired ports of one Service (the port map is ordered by Service first).
fn ports_of<'a>(
    fam: &'a FamilyDesired,
    name: &'a ServiceName,
) -> impl Iterator<Item = &'a ServicePortDesired> + 'a {
    let first = ServicePortName::new(name.clone(), "", Protocol::Tcp);
    fam.ports
        .range(first..)
        .take_while(move |(k, _)| k.service == *name)
        .map(|(_, sp)| sp.as_ref())
}

#[cfg(test)]
mod tests {
    use super::AfterIndex;
    use kpr_model::node::{DetectLocalMode, NodeContext, ProxyPolicy};
    use kpr_model::{Input, Trackers, Update, update_desired};
    use kpr_testkit::{NODE, service, slice};

    /// A LoadBalancer Service with ETP=Local and a healthCheckNodePort (some shared), a
    /// ClusterIP one with ITP=Local, or a plain one, by `i`; its endpoint is on this node or
    /// not, ready or not, by `variant`.
    fn objects(i: u32, variant: u32) -> (kpr_model::Service, kpr_model::EndpointSlice) {
        let name = format!("s{i}");
        let ip = format!("172.30.0.{}", i + 1);
        let n = i as i32;
        let svc = match i % 3 {
            0 => service("ns", &name)
                .cluster_ip(&ip)
                .type_("LoadBalancer")
                .node_port("p", 80, "TCP", 30_000 + n)
                .node_port("q", 81, "UDP", 31_000 + n)
                .lb("1.2.3.4", None)
                .etp_local()
                .health_check_node_port(32_000 + n % 4)
                .build(),
            1 => service("ns", &name)
                .cluster_ip(&ip)
                .port("p", 80, "TCP")
                .itp_local()
                .build(),
            _ => service("ns", &name)
                .cluster_ip(&ip)
                .port("p", 80, "TCP")
                .build(),
        };
        let node = if variant.is_multiple_of(2) {
            NODE
        } else {
            "other"
        };
        let ready = !variant.is_multiple_of(3);
        let slice = slice("ns", &name, "a")
            .port("p", 80, "TCP")
            .port("q", 81, "UDP")
            .endpoint(
                &format!("10.0.{i}.{}", variant % 5 + 1),
                node,
                Some(ready),
                Some(true),
                Some(!ready),
            )
            .build();
        (svc, slice)
    }

    #[test]
    fn partial_updates_equal_a_fresh_build() {
        let mut trackers = Trackers::new();
        let ctx = NodeContext::new(NODE, None);
        let policy = ProxyPolicy::new(false, &DetectLocalMode::ClusterCidr(vec![]), None);
        let mut desired = kpr_model::DesiredState::default();
        let mut index = AfterIndex::default();
        let mut sync = |trackers: &mut Trackers, index: &mut AfterIndex| {
            let plan = trackers.checkout();
            update_desired(&mut desired, trackers.state(), &ctx, &policy, &plan);
            index.update(&desired, &plan);
            assert_eq!(*index, AfterIndex::build(&desired), "after {plan:?}");
        };
        for i in 0..12 {
            let (svc, slice) = objects(i, 0);
            trackers.record(Input::Services(Update::Apply(svc)));
            trackers.record(Input::Slices(Update::Apply(slice)));
        }
        sync(&mut trackers, &mut index);
        let mut seed = 7u32;
        for step in 0..200u32 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let i = (seed >> 8) % 12;
            let (svc, slice) = objects(i, seed >> 16);
            match step % 5 {
                0 => {
                    trackers.record(Input::Services(Update::Delete(kpr_model::ObjectKey {
                        namespace: "ns".into(),
                        name: format!("s{i}"),
                    })));
                }
                1 | 2 => {
                    trackers.record(Input::Slices(Update::Apply(slice)));
                }
                _ => {
                    trackers.record(Input::Services(Update::Apply(svc)));
                    trackers.record(Input::Slices(Update::Apply(slice)));
                }
            }
            if step.is_multiple_of(3) {
                sync(&mut trackers, &mut index);
            }
        }
        sync(&mut trackers, &mut index);
        let counted: usize = [kpr_model::IpFamily::V4]
            .iter()
            .map(|f| index.no_local_endpoints(*f).0 + index.no_local_endpoints(*f).1)
            .sum();
        let hc = index.health_checks(kpr_model::IpFamily::V4).count();
        assert!(counted > 0 && hc > 0, "the test exercises both parts");
    }
}
