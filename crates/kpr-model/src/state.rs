//! The cluster as the proxy knows it, and the change trackers that feed partial syncs.
//!
//! [`Trackers`] folds [`Input`] events into a [`ClusterState`]. Between two syncs it remembers,
//! per Service, the state at the last checkout (<previous, current>, like upstream's
//! `ServiceChangeTracker` and `EndpointsChangeTracker`), drops changes that end where they
//! started, and hands out a [`SyncPlan`] naming what changed. Invariant: the state after a
//! sequence of events depends only on the final objects, not on the order they arrived in.

use crate::input::{Input, ObjectKey, Update};
use crate::intern::Interner;
use crate::names::{IpFamily, ServiceName, ServicePortName};
use crate::node::NodeFacts;
use crate::objects::{EndpointSlice, Service, ServiceCidr};
use crate::parse::{
    ParsedService, ParsedSlice, Skipped, parse_service, parse_service_cidr, parse_slice_with,
};
use imbl::OrdMap;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The slices of one Service, sorted by slice name. A Service has one slice or a few: a sorted
/// `Vec` costs 8 bytes a slice where a `BTreeMap` costs a ~400-byte node per Service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SliceSet(Vec<Arc<ParsedSlice>>);

impl SliceSet {
    /// The slice of this name.
    pub fn get(&self, name: &str) -> Option<&Arc<ParsedSlice>> {
        self.find(name).ok().map(|i| &self.0[i])
    }

    /// Adds a slice, replacing the one of the same name.
    pub fn insert(&mut self, slice: Arc<ParsedSlice>) {
        match self.find(&slice.key.name) {
            Ok(i) => self.0[i] = slice,
            Err(i) => self.0.insert(i, slice),
        }
    }

    /// Removes the slice of this name, if any.
    pub fn remove(&mut self, name: &str) {
        if let Ok(i) = self.find(name) {
            self.0.remove(i);
        }
    }

    /// The slices, in name order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<ParsedSlice>> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|s| s.key.name.as_str().cmp(name))
    }
}

/// Everything the model knows, as of the last recorded event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    // Persistent maps: a copy (a debug snapshot, the committed state) is O(1), and an update
    // after one copies only the path to the entry.
    services: OrdMap<ServiceName, Arc<ParsedService>>,
    slices: OrdMap<ServiceName, Arc<SliceSet>>,
    /// Which Service each slice (by its own key) currently belongs to.
    slice_owner: OrdMap<ObjectKey, ServiceName>,
    node: Option<NodeFacts>,
    /// The ranges of each ServiceCIDR, by name (§4.8).
    service_cidrs: BTreeMap<String, Vec<IpNet>>,
}

impl ClusterState {
    pub fn services(&self) -> impl Iterator<Item = &ParsedService> {
        self.services.values().map(Arc::as_ref)
    }

    /// Every ServiceCIDR range of one family, sorted, without repeats.
    pub fn service_cidrs(&self, family: IpFamily) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self
            .service_cidrs
            .values()
            .flatten()
            .filter(|n| IpFamily::of(&n.addr()) == family)
            .copied()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// How many ServiceCIDR objects are known.
    pub fn service_cidr_count(&self) -> usize {
        self.service_cidrs.len()
    }

    pub fn service(&self, name: &ServiceName) -> Option<&ParsedService> {
        self.services.get(name).map(Arc::as_ref)
    }

    /// The slices of a Service (empty when none).
    pub fn slices(&self, name: &ServiceName) -> impl Iterator<Item = &ParsedSlice> {
        self.slices
            .get(name)
            .into_iter()
            .flat_map(|s| s.values().map(Arc::as_ref))
    }

    /// Where a service port's endpoint addresses are: their zone and node, by IP.
    #[allow(clippy::type_complexity)]
    pub fn endpoint_places(
        &self,
        port: &ServicePortName,
        family: crate::names::IpFamily,
    ) -> (
        BTreeMap<std::net::IpAddr, Option<String>>,
        BTreeMap<std::net::IpAddr, Option<String>>,
    ) {
        let mut zones = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        for s in self.slices(&port.service).filter(|s| s.family == family) {
            for e in &s.endpoints {
                zones.insert(e.ip, e.zone().map(str::to_owned));
                nodes.insert(e.ip, e.node_name().map(str::to_owned));
            }
        }
        (zones, nodes)
    }

    pub fn node(&self) -> Option<&NodeFacts> {
        self.node.as_ref()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn slice_count(&self) -> usize {
        self.slice_owner.len()
    }
}

/// What a sync must do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncPlan {
    /// Rebuild everything (first sync, Node label change, after a failure).
    pub full: bool,
    /// Services whose definition or endpoints changed since the last checkout.
    pub changed_services: BTreeSet<ServiceName>,
    /// Their ports, before and after the change.
    pub changed_ports: BTreeSet<ServicePortName>,
    /// The ServiceCIDRs changed (the ranges whose unallocated addresses are dropped, §4.8).
    pub service_cidrs: bool,
    /// The newest `last-change-trigger-time` annotations of the changed slices (for
    /// network-programming latency), verbatim.
    pub trigger_times: Vec<String>,
}

impl SyncPlan {
    /// A plan that rebuilds everything.
    pub fn full() -> SyncPlan {
        SyncPlan {
            full: true,
            ..SyncPlan::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.full && !self.service_cidrs && self.changed_services.is_empty()
    }
}

/// Records events and tracks what changed between syncs.
#[derive(Debug, Clone)]
pub struct Trackers {
    state: ClusterState,
    /// Per changed Service: its definition at the last checkout.
    prev_services: BTreeMap<ServiceName, Option<Arc<ParsedService>>>,
    /// Per Service whose slices changed: its slices at the last checkout.
    prev_slices: BTreeMap<ServiceName, Option<Arc<SliceSet>>>,
    full: bool,
    /// The ServiceCIDRs changed since the last checkout.
    service_cidrs_changed: bool,
    service_changes_total: u64,
    endpoint_changes_total: u64,
    /// The node and zone names the slices share.
    names: Interner,
}

impl Default for Trackers {
    fn default() -> Self {
        Trackers::new()
    }
}

impl Trackers {
    /// Empty trackers; the first checkout is a full sync.
    pub fn new() -> Trackers {
        Trackers {
            state: ClusterState::default(),
            prev_services: BTreeMap::new(),
            prev_slices: BTreeMap::new(),
            full: true,
            service_cidrs_changed: false,
            service_changes_total: 0,
            endpoint_changes_total: 0,
            names: Interner::default(),
        }
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Folds one event into the state. Returns what was skipped, for the caller to log.
    pub fn record(&mut self, input: Input) -> Vec<Skipped> {
        let mut notes = Vec::new();
        match input {
            Input::Services(Update::Apply(svc)) => self.apply_service(&svc, &mut notes),
            Input::Services(Update::Delete(key)) => {
                self.set_service(ServiceName::new(key.namespace, key.name), None)
            }
            Input::Services(Update::Replace(list)) => self.replace_services(&list, &mut notes),
            Input::Slices(Update::Apply(slice)) => self.apply_slice(&slice, &mut notes),
            Input::Slices(Update::Delete(key)) => self.remove_slice(&key),
            Input::Slices(Update::Replace(list)) => self.replace_slices(&list, &mut notes),
            Input::Services(Update::Keep(keys)) => self.keep_services(
                &keys
                    .into_iter()
                    .map(|k| ServiceName::new(k.namespace, k.name))
                    .collect(),
            ),
            Input::Slices(Update::Keep(keys)) => self.keep_slices(&keys.into_iter().collect()),
            Input::Node(node) => {
                let facts = node.as_deref().map(NodeFacts::from_node);
                if facts.as_ref().map(|f| &f.labels) != self.state.node.as_ref().map(|f| &f.labels)
                {
                    // §3.4: any Node label change forces a full resync.
                    self.full = true;
                }
                self.state.node = facts;
            }
            Input::ServiceCidrs(update) => self.record_service_cidrs(update, &mut notes),
        }
        notes
    }

    /// Whether a sync would do anything.
    pub fn has_pending(&self) -> bool {
        self.full
            || self.service_cidrs_changed
            || !self.prev_services.is_empty()
            || !self.prev_slices.is_empty()
    }

    /// Services with pending definition changes and with pending endpoint changes (upstream's
    /// `*_changes_pending` gauges).
    pub fn pending_counts(&self) -> (usize, usize) {
        (self.prev_services.len(), self.prev_slices.len())
    }

    /// Changes seen so far (upstream's `*_changes_total` counters): (services, endpoints).
    pub fn change_totals(&self) -> (u64, u64) {
        (self.service_changes_total, self.endpoint_changes_total)
    }

    /// Makes the next checkout a full sync (after a failed sync, or on request).
    pub fn request_full(&mut self) {
        self.full = true;
    }

    /// Hands out what changed since the last checkout and starts tracking afresh.
    pub fn checkout(&mut self) -> SyncPlan {
        let mut plan = SyncPlan {
            full: std::mem::take(&mut self.full),
            service_cidrs: std::mem::take(&mut self.service_cidrs_changed),
            ..SyncPlan::default()
        };
        let prev_services = std::mem::take(&mut self.prev_services);
        let prev_slices = std::mem::take(&mut self.prev_slices);
        for (name, prev) in &prev_services {
            plan.changed_services.insert(name.clone());
            let cur = self.state.services.get(name);
            for svc in prev.iter().chain(cur) {
                add_ports(&mut plan.changed_ports, svc);
            }
        }
        for name in prev_slices.keys() {
            if plan.changed_services.insert(name.clone())
                && let Some(svc) = self.state.services.get(name)
            {
                add_ports(&mut plan.changed_ports, svc);
            }
            let times = self
                .state
                .slices(name)
                .filter_map(|s| s.trigger_time.clone());
            plan.trigger_times.extend(times);
        }
        plan
    }

    fn record_service_cidrs(&mut self, update: Update<ServiceCidr>, notes: &mut Vec<Skipped>) {
        let before = self.state.service_cidrs.clone();
        let cidrs = &mut self.state.service_cidrs;
        let name = |o: &ServiceCidr| o.metadata.name.clone().unwrap_or_default();
        match update {
            Update::Apply(o) => {
                cidrs.insert(name(&o), parse_service_cidr(&o, notes));
            }
            Update::Delete(key) => {
                cidrs.remove(&key.name);
            }
            Update::Replace(list) => {
                *cidrs = list
                    .iter()
                    .map(|o| (name(o), parse_service_cidr(o, notes)))
                    .collect();
            }
            Update::Keep(keys) => {
                let keep: BTreeSet<String> = keys.into_iter().map(|k| k.name).collect();
                cidrs.retain(|n, _| keep.contains(n));
            }
        }
        let ranges = |m: &BTreeMap<String, Vec<IpNet>>| -> BTreeSet<IpNet> {
            m.values().flatten().copied().collect()
        };
        if ranges(&before) != ranges(&self.state.service_cidrs) {
            self.service_cidrs_changed = true;
        }
    }

    fn apply_service(&mut self, svc: &Service, notes: &mut Vec<Skipped>) {
        let key = ObjectKey::of(&svc.metadata);
        let name = ServiceName::new(key.namespace, key.name);
        match parse_service(svc, notes) {
            Ok(parsed) => self.set_service(name, parsed.map(Arc::new)),
            // An invalid version is ignored: the last valid one (if any) stays in force.
            Err(skip) => notes.push(skip),
        }
    }

    fn replace_services(&mut self, list: &[Service], notes: &mut Vec<Skipped>) {
        let mut fresh: BTreeMap<ServiceName, Option<Arc<ParsedService>>> = BTreeMap::new();
        for svc in list {
            let key = ObjectKey::of(&svc.metadata);
            let name = ServiceName::new(key.namespace, key.name);
            let value = match parse_service(svc, notes) {
                Ok(parsed) => parsed.map(Arc::new),
                Err(skip) => {
                    notes.push(skip);
                    self.state.services.get(&name).cloned()
                }
            };
            fresh.insert(name, value);
        }
        self.keep_services(&fresh.keys().cloned().collect());
        for (name, value) in fresh {
            self.set_service(name, value);
        }
    }

    /// Deletes every Service not in `keep` (the end of a full list).
    fn keep_services(&mut self, keep: &BTreeSet<ServiceName>) {
        let gone: Vec<ServiceName> = self
            .state
            .services
            .keys()
            .filter(|n| !keep.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.set_service(name, None);
        }
    }

    /// Deletes every EndpointSlice not in `keep` (the end of a full list).
    fn keep_slices(&mut self, keep: &BTreeSet<ObjectKey>) {
        let gone: Vec<ObjectKey> = self
            .state
            .slice_owner
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.remove_slice(&key);
        }
    }

    fn set_service(&mut self, name: ServiceName, value: Option<Arc<ParsedService>>) {
        let cur = self.state.services.get(&name).cloned();
        if cur == value {
            return;
        }
        self.service_changes_total += 1;
        let prev = self
            .prev_services
            .entry(name.clone())
            .or_insert_with(|| cur.clone())
            .clone();
        match value {
            Some(v) => self.state.services.insert(name.clone(), v),
            None => self.state.services.remove(&name),
        };
        if prev == self.state.services.get(&name).cloned() {
            self.prev_services.remove(&name);
        }
    }

    fn apply_slice(&mut self, slice: &EndpointSlice, notes: &mut Vec<Skipped>) {
        let key = ObjectKey::of(&slice.metadata);
        match parse_slice_with(slice, notes, &mut self.names) {
            Ok(Some(parsed)) => self.put_slice(key, Arc::new(parsed)),
            Ok(None) => self.remove_slice(&key),
            Err(skip) => notes.push(skip),
        }
    }

    fn replace_slices(&mut self, list: &[EndpointSlice], notes: &mut Vec<Skipped>) {
        let mut keep = BTreeSet::new();
        let mut parsed = Vec::new();
        for slice in list {
            let key = ObjectKey::of(&slice.metadata);
            match parse_slice_with(slice, notes, &mut self.names) {
                Ok(Some(p)) => {
                    keep.insert(key.clone());
                    parsed.push((key, Arc::new(p)));
                }
                Ok(None) => {}
                Err(skip) => {
                    notes.push(skip);
                    keep.insert(key);
                }
            }
        }
        self.keep_slices(&keep);
        for (key, p) in parsed {
            self.put_slice(key, p);
        }
    }

    fn put_slice(&mut self, key: ObjectKey, slice: Arc<ParsedSlice>) {
        if let Some(owner) = self.state.slice_owner.get(&key)
            && *owner != slice.service
        {
            self.remove_slice(&key);
        }
        let service = slice.service.clone();
        if self
            .state
            .slices
            .get(&service)
            .and_then(|s| s.get(&key.name))
            == Some(&slice)
        {
            return;
        }
        self.edit_slices(&service, |set| set.insert(slice));
        self.state.slice_owner.insert(key, service);
    }

    fn remove_slice(&mut self, key: &ObjectKey) {
        let Some(service) = self.state.slice_owner.remove(key) else {
            return;
        };
        self.edit_slices(&service, |set| {
            set.remove(&key.name);
        });
    }

    /// Changes one Service's slice set, remembering the set at the last checkout.
    fn edit_slices(&mut self, service: &ServiceName, edit: impl FnOnce(&mut SliceSet)) {
        self.endpoint_changes_total += 1;
        let cur = self.state.slices.get(service).cloned();
        let prev = self
            .prev_slices
            .entry(service.clone())
            .or_insert(cur)
            .clone();
        let mut set = self.state.slices.remove(service).unwrap_or_default();
        edit(Arc::make_mut(&mut set));
        if !set.is_empty() {
            self.state.slices.insert(service.clone(), set);
        }
        let now = self.state.slices.get(service);
        if prev.as_ref() == now {
            self.prev_slices.remove(service);
        }
    }
}

fn add_ports(out: &mut BTreeSet<ServicePortName>, svc: &ParsedService) {
    for p in &svc.ports {
        out.insert(ServicePortName::new(
            svc.name.clone(),
            p.name.clone(),
            p.protocol,
        ));
    }
}
