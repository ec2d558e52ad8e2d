//! Lenient decoding: read a field from any JSON or YAML value without ever failing on its shape.
//!
//! A value of the expected type is taken; anything else (null, another type, a map where a
//! string was expected) is skipped whole and reads as absent. Unknown keys are skipped, a
//! repeated key keeps its last value. The only errors that get through are the underlying
//! deserializer's own (text that is not JSON or YAML at all), so one odd object can never fail
//! the list or watch stream around it.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

/// A type read leniently: each hook returns `None` for a value of the wrong kind. Only the
/// hooks of the kinds a type accepts are written; the rest skip the value.
pub trait Lenient: Sized {
    fn from_str(_: &str) -> Option<Self> {
        None
    }
    fn from_string(s: String) -> Option<Self> {
        Self::from_str(&s)
    }
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    /// Reads one value: `None` when it is null or of another kind.
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Self>, D::Error> {
        d.deserialize_any(Probe::<Self>(PhantomData))
    }
}

/// A field of a lenient struct: how it is read and when it is left out of the output.
pub trait Field: Sized {
    fn read_field<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
    fn is_absent(&self) -> bool;
}

impl<T: Lenient> Field for Option<T> {
    fn read_field<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::read(d)
    }
    fn is_absent(&self) -> bool {
        self.is_none()
    }
}

impl Field for String {
    fn read_field<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(String::read(d)?.unwrap_or_default())
    }
    fn is_absent(&self) -> bool {
        self.is_empty()
    }
}

impl<T: Lenient> Field for Vec<T> {
    fn read_field<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::read(d)?.unwrap_or_default())
    }
    fn is_absent(&self) -> bool {
        self.is_empty()
    }
}

impl Lenient for String {
    fn from_str(s: &str) -> Option<Self> {
        Some(s.to_owned())
    }
    fn from_string(s: String) -> Option<Self> {
        Some(s)
    }
}

/// Integers are read as `i64`; a larger unsigned value saturates, so a range check downstream
/// still sees it as out of range. Fractions and numbers in strings are not integers.
impl Lenient for i64 {
    fn from_i64(v: i64) -> Option<Self> {
        Some(v)
    }
}

impl Lenient for bool {
    fn from_bool(v: bool) -> Option<Self> {
        Some(v)
    }
}

/// A list keeps the elements of the right kind and drops the others.
impl<T: Lenient> Lenient for Vec<T> {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(Seed::<T>(PhantomData))? {
            out.extend(item);
        }
        Ok(Some(out))
    }
}

/// A string map (labels, annotations) keeps the entries whose value is a string.
impl Lenient for BTreeMap<String, String> {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key_seed(Seed::<String>(PhantomData))? {
            let value = map.next_value_seed(Seed::<String>(PhantomData))?;
            if let (Some(k), Some(v)) = (key, value) {
                out.insert(k, v);
            }
        }
        Ok(Some(out))
    }
}

/// Reads a map's keys as strings (a key of another kind reads as `None`, and its value should
/// then be skipped with [`skip_value`]).
pub fn next_key<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<Option<String>>, A::Error> {
    map.next_key_seed(Seed::<String>(PhantomData))
}

/// Reads the current entry's value as a field.
pub fn next_field<'de, A: MapAccess<'de>, F: Field>(map: &mut A) -> Result<F, A::Error> {
    map.next_value_seed(FieldSeed::<F>(PhantomData))
}

/// Skips the current entry's value.
pub fn skip_value<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>().map(|_| ())
}

struct Seed<T>(PhantomData<T>);

impl<'de, T: Lenient> DeserializeSeed<'de> for Seed<T> {
    type Value = Option<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        T::read(d)
    }
}

struct FieldSeed<F>(PhantomData<F>);

impl<'de, F: Field> DeserializeSeed<'de> for FieldSeed<F> {
    type Value = F;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<F, D::Error> {
        F::read_field(d)
    }
}

/// The one visitor: every kind of value goes to the matching hook of `T`.
struct Probe<T>(PhantomData<T>);

impl<'de, T: Lenient> Visitor<'de> for Probe<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(T::from_bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(T::from_i64(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(T::from_i64(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        let clamped = v.clamp(i128::from(i64::MIN), i128::from(i64::MAX));
        Ok(T::from_i64(i64::try_from(clamped).unwrap_or(i64::MAX)))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        Ok(T::from_i64(i64::try_from(v).unwrap_or(i64::MAX)))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(T::from_str(v))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(T::from_string(v))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        T::from_seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::from_map(map)
    }
}

/// Declares a struct read leniently from a JSON/YAML object: each field with its key, read
/// with [`Field`]; unknown keys are skipped. It also serializes back to the same keys, leaving
/// absent fields out (a top-level object, declared with `api = ("v1", "Service");`, leads with
/// its `apiVersion` and `kind`), so tests can hand these objects to an API server.
macro_rules! lenient_struct {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $( $(#[$fattr:meta])* $key:literal => $field:ident : $ty:ty, )*
        }
    ) => {
        $crate::objects::lenient::lenient_struct!(@with [] $(#[$attr])* pub struct $name {
            $( $(#[$fattr])* $key => $field: $ty, )*
        });
    };
    (
        api = ($api:literal, $kind:literal);
        $(#[$attr:meta])*
        pub struct $name:ident {
            $( $(#[$fattr:meta])* $key:literal => $field:ident : $ty:ty, )*
        }
    ) => {
        $crate::objects::lenient::lenient_struct!(@with [("apiVersion", $api), ("kind", $kind)]
            $(#[$attr])* pub struct $name {
            $( $(#[$fattr])* $key => $field: $ty, )*
        });
        impl $crate::objects::ApiObject for $name {
            const API_VERSION: &'static str = $api;
            const KIND: &'static str = $kind;
            fn metadata(&self) -> &$crate::objects::ObjectMeta {
                &self.metadata
            }
        }
        /// Never fails: a value that is not an object decodes as an empty object.
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(<$name as $crate::objects::lenient::Lenient>::read(d)?.unwrap_or_default())
            }
        }
    };
    (
        @with [$( ($hkey:literal, $hval:literal) ),*]
        $(#[$attr:meta])*
        pub struct $name:ident {
            $( $(#[$fattr:meta])* $key:literal => $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name {
            $(
                $(#[$fattr])*
                pub $field: $ty,
            )*
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(None)?;
                $( m.serialize_entry($hkey, $hval)?; )*
                $(
                    if !$crate::objects::lenient::Field::is_absent(&self.$field) {
                        m.serialize_entry($key, &self.$field)?;
                    }
                )*
                m.end()
            }
        }

        impl $crate::objects::lenient::Lenient for $name {
            fn from_map<'de, A: serde::de::MapAccess<'de>>(
                mut map: A,
            ) -> Result<Option<Self>, A::Error> {
                let mut out = $name::default();
                while let Some(key) = $crate::objects::lenient::next_key(&mut map)? {
                    match key.as_deref() {
                        $( Some($key) => {
                            out.$field = $crate::objects::lenient::next_field(&mut map)?;
                        } )*
                        _ => $crate::objects::lenient::skip_value(&mut map)?,
                    }
                }
                Ok(Some(out))
            }
        }

        impl $crate::objects::lenient::Field for $name {
            fn read_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(<$name as $crate::objects::lenient::Lenient>::read(d)?.unwrap_or_default())
            }
            fn is_absent(&self) -> bool {
                *self == $name::default()
            }
        }
    };
}

pub(crate) use lenient_struct;
