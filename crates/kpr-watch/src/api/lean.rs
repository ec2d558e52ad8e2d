//! The model's lean objects as kube-rs resources: [`Watched`] pairs one with the little
//! metadata kube-rs's watcher reads (name, namespace, resourceVersion), and says where the
//! API serves its kind. Decoding it never fails on an object's shape (see
//! `kpr_model::objects`), so a list or watch event always decodes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta as KubeMeta;
use kpr_model::objects::{ApiObject, EndpointSlice, Node, Service};
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;

/// Where the API serves a kind: group (empty for the core group), version, plural.
pub(crate) trait Served: ApiObject {
    const GROUP: &'static str;
    const VERSION: &'static str;
    const PLURAL: &'static str;
}

impl Served for Service {
    const GROUP: &'static str = "";
    const VERSION: &'static str = "v1";
    const PLURAL: &'static str = "services";
}

impl Served for EndpointSlice {
    const GROUP: &'static str = "discovery.k8s.io";
    const VERSION: &'static str = "v1";
    const PLURAL: &'static str = "endpointslices";
}

impl Served for Node {
    const GROUP: &'static str = "";
    const VERSION: &'static str = "v1";
    const PLURAL: &'static str = "nodes";
}

/// A lean object with the metadata kube-rs needs.
#[derive(Debug, Clone)]
pub(crate) struct Watched<T> {
    pub(crate) object: T,
    meta: KubeMeta,
}

impl<'de, T: ApiObject + Deserialize<'de>> Deserialize<'de> for Watched<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let object = T::deserialize(d)?;
        let m = object.metadata();
        let meta = KubeMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            resource_version: m.resource_version.clone(),
            ..KubeMeta::default()
        };
        Ok(Watched { object, meta })
    }
}

impl<T: Served> kube::Resource for Watched<T> {
    type DynamicType = ();
    type Scope = kube::core::DynamicResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(T::KIND)
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(T::GROUP)
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(T::VERSION)
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(T::PLURAL)
    }
    fn meta(&self) -> &KubeMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut KubeMeta {
        &mut self.meta
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kube::core::{ObjectList, WatchEvent};

    /// Issue 13: one odd object (a status condition without a timestamp, nulls, a newer
    /// field) does not fail the list around it, and its resourceVersion reaches kube-rs.
    #[test]
    fn a_list_with_an_odd_object_decodes_whole() {
        let text = r#"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"42"},
          "items":[
            {"metadata":{"name":"odd","namespace":"default","resourceVersion":"40",
               "creationTimestamp":null,"managedFields":[{"time":null}]},
             "spec":{"clusterIP":"172.30.0.9","ports":[{"port":80,"protocol":"TCP","targetPort":null}],
               "trafficDistribution":"PreferSameNode","newField":{"x":[1]}},
             "status":{"conditions":[{"type":"StatusUpdate","status":"True","lastTransitionTime":null}]}},
            {"metadata":{"name":"web","namespace":"default","resourceVersion":"41"},
             "spec":{"clusterIP":"172.30.0.10","ports":[{"port":80}]}}]}"#;
        let list: ObjectList<Watched<Service>> = serde_json::from_str(text).unwrap();
        assert_eq!(list.items.len(), 2);
        assert_eq!(list.items[0].meta.resource_version.as_deref(), Some("40"));
        assert_eq!(
            list.items[1].object.metadata.name.as_deref(),
            Some("web"),
            "the object after the odd one is there"
        );
        let event = r#"{"type":"MODIFIED","object":{"metadata":{"name":"odd","namespace":"default",
            "resourceVersion":"43"},"status":{"conditions":[{"lastTransitionTime":null}]}}}"#;
        let e: WatchEvent<Watched<Service>> = serde_json::from_str(event).unwrap();
        assert!(
            matches!(e, WatchEvent::Modified(w) if w.meta.resource_version.as_deref() == Some("43"))
        );
    }
}
