//! The one closed event type every source produces and the sync loop consumes.
//!
//! API-server watchers and the manifest-directory source both speak [`Input`], so the model does
//! not know where objects come from.

use crate::objects::{EndpointSlice, Node, ObjectMeta, Service, ServiceCidr};
use std::fmt;

/// The namespace and name of an object (namespace empty for cluster-scoped objects).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a Kubernetes object from its metadata (missing fields become empty strings).
    pub fn of(meta: &ObjectMeta) -> Self {
        ObjectKey::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// A change to one kind of object.
#[derive(Debug, Clone)]
pub enum Update<T> {
    /// The object was created or changed.
    Apply(T),
    /// The object was deleted.
    Delete(ObjectKey),
    /// A full list: these are all the objects of this kind; anything absent is deleted.
    Replace(Vec<T>),
    /// The end of a full list whose objects came one by one as `Apply` just before (so a
    /// large list never sits in memory whole): these are all the objects of this kind;
    /// anything not named is deleted.
    Keep(Vec<ObjectKey>),
}

/// Everything that can change the model.
// Events are moved once, into the sync loop's channel; boxing the large variant would only add an
// allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Input {
    Services(Update<Service>),
    Slices(Update<EndpointSlice>),
    /// This node's own Node object; `None` when it does not exist (or was deleted).
    Node(Option<Box<Node>>),
    /// The cluster's ServiceCIDRs (§4.8): the ranges ClusterIPs come from.
    ServiceCidrs(Update<ServiceCidr>),
}
