//! The model's lean objects as kube-rs resources: [`Watched`] pairs one with the little
//! metadata kube-rs's watcher reads (name, namespace, resourceVersion), and says where the
//! API serves its kind. Decoding it never fails on an object's shape (see
//! `kpr_model::objects`), so a list or watch event always decodes, with one exception: an
//! object whose `kind` names another kind (a ConfigMap in the EndpointSlice stream) is refused,
//! so the watch fails and the source relists, where reading it as an empty EndpointSlice of
//! that name would replace a real one (client-go's reflector refuses it too).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta as KubeMeta;
use kpr_model::objects::lenient::Lenient;
use kpr_model::objects::{ApiObject, EndpointSlice, Node, ObjectMeta, Service, ServiceCidr};
use serde::de::{
    self, DeserializeSeed, IgnoredAny, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

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

impl Served for ServiceCidr {
    const GROUP: &'static str = "networking.k8s.io";
    const VERSION: &'static str = "v1";
    const PLURAL: &'static str = "servicecidrs";
}

/// A kind served at its `v1beta1` version (ServiceCIDR before Kubernetes 1.33): the same
/// fields, another URL.
#[derive(Debug, Clone, Default)]
pub(crate) struct Beta<T>(pub(crate) T);

impl<T: ApiObject> ApiObject for Beta<T> {
    const API_VERSION: &'static str = T::API_VERSION;
    const KIND: &'static str = T::KIND;
    fn metadata(&self) -> &ObjectMeta {
        self.0.metadata()
    }
}

impl<T: Lenient> Lenient for Beta<T> {
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        Ok(T::from_map(map)?.map(Beta))
    }
}

impl Served for Beta<ServiceCidr> {
    const GROUP: &'static str = "networking.k8s.io";
    const VERSION: &'static str = "v1beta1";
    const PLURAL: &'static str = "servicecidrs";
}

/// Each watched resource's plural and kind.
pub(crate) const RESOURCES: [(&str, &str); 4] = [
    (Service::PLURAL, Service::KIND),
    (EndpointSlice::PLURAL, EndpointSlice::KIND),
    (Node::PLURAL, Node::KIND),
    (ServiceCidr::PLURAL, ServiceCidr::KIND),
];

/// A lean object with the metadata kube-rs needs.
#[derive(Debug, Clone)]
pub(crate) struct Watched<T> {
    pub(crate) object: T,
    meta: KubeMeta,
}

impl<'de, T: ApiObject + Lenient + Default> Deserialize<'de> for Watched<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let object = d.deserialize_any(OfKind::<T>(PhantomData))?;
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

/// Reads a `T` as `T::deserialize` does (anything that is not an object reads as an empty
/// one), except that an object whose `kind` is a string naming another kind is an error.
struct OfKind<T>(PhantomData<T>);

macro_rules! empty_on {
    ($($visit:ident($t:ty)),* $(,)?) => {
        $( fn $visit<E: de::Error>(self, _: $t) -> Result<T, E> { Ok(T::default()) } )*
    };
}

impl<'de, T: ApiObject + Lenient + Default> Visitor<'de> for OfKind<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {}", T::KIND)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        let checked = KindChecked {
            map,
            kind: PhantomData::<T>,
        };
        Ok(T::from_map(checked)?.unwrap_or_default())
    }
    empty_on!(
        visit_bool(bool),
        visit_i64(i64),
        visit_u64(u64),
        visit_f64(f64),
        visit_str(&str),
        visit_bytes(&[u8]),
    );
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(T::default())
    }
}

/// An object's entries without its `kind`, which is checked against `T`'s on the way.
struct KindChecked<A, T> {
    map: A,
    kind: PhantomData<T>,
}

impl<'de, A: MapAccess<'de>, T: ApiObject> MapAccess<'de> for KindChecked<A, T> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.map.next_key::<String>()? else {
                return Ok(None);
            };
            if key != "kind" {
                return seed.deserialize(key.into_deserializer()).map(Some);
            }
            if let Some(kind) = self.map.next_value_seed(KindSeed)?
                && kind != T::KIND
            {
                return Err(de::Error::custom(format!(
                    "a {kind} where a {} belongs",
                    T::KIND
                )));
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// A `kind` value: a string, or `None` for anything else.
struct KindSeed;

impl<'de> DeserializeSeed<'de> for KindSeed {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        <String as Lenient>::read(d)
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

    /// Issue 15: an object whose `kind` names another kind is refused (in a watch event and in
    /// a list), where reading it leniently would give an empty object of ours of that name; a
    /// `kind` that is absent (list items), ours, or not a string is no objection, and anything
    /// that is not an object still reads as an empty one.
    #[test]
    fn an_object_of_another_kind_is_refused() {
        let event = r#"{"type":"MODIFIED","object":{"kind":"ConfigMap","apiVersion":"v1",
            "metadata":{"name":"web-1","namespace":"ns","resourceVersion":"7"},"data":{}}}"#;
        let err = serde_json::from_str::<WatchEvent<Watched<EndpointSlice>>>(event).unwrap_err();
        assert!(
            err.to_string()
                .contains("a ConfigMap where a EndpointSlice belongs"),
            "{err}"
        );
        assert!(!err.is_eof(), "not an error kube-rs would skip");
        let list = r#"{"kind":"EndpointSliceList","metadata":{"resourceVersion":"7"},
            "items":[{"metadata":{"name":"a"}},{"kind":"Pod","metadata":{"name":"b"}}]}"#;
        assert!(serde_json::from_str::<ObjectList<Watched<EndpointSlice>>>(list).is_err());
        for ok in [
            r#"{"metadata":{"name":"a","resourceVersion":"1"},"addressType":"IPv4"}"#,
            r#"{"kind":"EndpointSlice","metadata":{"name":"a","resourceVersion":"1"},"addressType":"IPv4"}"#,
            r#"{"addressType":"IPv4","kind":null,"metadata":{"name":"a","resourceVersion":"1"}}"#,
            r#"{"kind":{"x":1},"metadata":{"name":"a","resourceVersion":"1"},"addressType":"IPv4"}"#,
        ] {
            let w: Watched<EndpointSlice> = serde_json::from_str(ok).unwrap();
            assert_eq!(w.object.metadata.name.as_deref(), Some("a"), "{ok}");
            assert_eq!(w.object.address_type, "IPv4", "{ok}");
            assert_eq!(w.meta.resource_version.as_deref(), Some("1"), "{ok}");
        }
        for odd in ["null", "3", "\"x\"", "[1,{}]", "true"] {
            let w: Watched<Service> = serde_json::from_str(odd).unwrap();
            assert_eq!(w.object, Service::default(), "{odd}");
        }
    }
}
