//! One shared copy of the short strings that many endpoints repeat (node and zone names), and
//! of each node and zone pair ([`Place`]).
//!
//! A cluster of 100,000 endpoints names a few hundred nodes and a handful of zones; keeping
//! one `Arc<str>` per distinct name instead of one `String` per endpoint saves an allocation
//! (32 bytes of heap) per endpoint, and one shared place per pair keeps an endpoint to one
//! pointer for both. Names and places no object uses any more are dropped once the table has
//! doubled since it was last pruned, so churning node names cannot grow it without bound.
//! Lookups only: iteration order never reaches an output.

use std::collections::HashSet;
use std::sync::Arc;

/// Below this many names the table is never pruned.
const PRUNE_FLOOR: usize = 256;

/// Where an endpoint is: its node and its zone (either may be unknown).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Place {
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
}

/// The table of shared names and places.
#[derive(Debug, Clone, Default)]
pub struct Interner {
    names: HashSet<Arc<str>>,
    /// The table's size after the last prune.
    kept: usize,
    places: HashSet<Arc<Place>>,
    /// The places table's size after its last prune.
    kept_places: usize,
}

impl Interner {
    /// The shared copy of `name` (made on first use).
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        if self.names.len() >= PRUNE_FLOOR.max(2 * self.kept) {
            // Only the table holds these: no object names them any more.
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.kept = self.names.len();
        }
        let shared: Arc<str> = Arc::from(name);
        self.names.insert(shared.clone());
        shared
    }

    /// The shared place of `node` and `zone`; `None` when neither is known.
    pub fn place(&mut self, node: Option<&str>, zone: Option<&str>) -> Option<Arc<Place>> {
        if node.is_none() && zone.is_none() {
            return None;
        }
        let place = Place {
            node: node.map(|n| self.intern(n)),
            zone: zone.map(|z| self.intern(z)),
        };
        if let Some(shared) = self.places.get(&place) {
            return Some(shared.clone());
        }
        if self.places.len() >= PRUNE_FLOOR.max(2 * self.kept_places) {
            // Only the table holds these (their names are pruned with the next names' prune).
            self.places.retain(|p| Arc::strong_count(p) > 1);
            self.kept_places = self.places.len();
        }
        let shared = Arc::new(place);
        self.places.insert(shared.clone());
        Some(shared)
    }

    /// How many distinct names the table holds (some possibly unused since the last prune).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_names_share_one_copy() {
        let mut t = Interner::default();
        let a = t.intern("node-a");
        let b = t.intern(&String::from("node-a"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*t.intern("node-b"), "node-b");
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn equal_places_share_one_copy_and_unused_ones_are_pruned() {
        let mut t = Interner::default();
        assert_eq!(t.place(None, None), None);
        let a = t.place(Some("node-a"), Some("z1")).unwrap();
        assert!(Arc::ptr_eq(
            &a,
            &t.place(Some("node-a"), Some("z1")).unwrap()
        ));
        assert!(!Arc::ptr_eq(&a, &t.place(Some("node-a"), None).unwrap()));
        assert_eq!(a.node.as_deref(), Some("node-a"));
        assert_eq!(a.zone.as_deref(), Some("z1"));
        for i in 0..10 * PRUNE_FLOOR {
            t.place(Some(&format!("node-{i}")), Some("z1"));
        }
        assert!(
            t.places.len() <= 2 * PRUNE_FLOOR,
            "{} places",
            t.places.len()
        );
        assert!(Arc::ptr_eq(
            &a,
            &t.place(Some("node-a"), Some("z1")).unwrap()
        ));
    }

    #[test]
    fn unused_names_are_pruned_as_the_table_grows() {
        let mut t = Interner::default();
        let kept = t.intern("kept");
        for i in 0..10 * PRUNE_FLOOR {
            t.intern(&format!("node-{i}"));
        }
        assert!(t.len() <= 2 * PRUNE_FLOOR, "{} names", t.len());
        assert!(Arc::ptr_eq(&kept, &t.intern("kept")));
    }
}
