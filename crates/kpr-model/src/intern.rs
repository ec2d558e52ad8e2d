//! One shared copy of the short strings that many endpoints repeat (node and zone names).
//!
//! A cluster of 100,000 endpoints names a few hundred nodes and a handful of zones; keeping
//! one `Arc<str>` per distinct name instead of one `String` per endpoint saves an allocation
//! (32 bytes of heap, and 8 bytes of the endpoint itself) per endpoint. Names no object uses
//! any more are dropped once the table has doubled since it was last pruned, so churning node
//! names cannot grow it without bound. Lookups only: iteration order never reaches an output.

use std::collections::HashSet;
use std::sync::Arc;

/// Below this many names the table is never pruned.
const PRUNE_FLOOR: usize = 256;

/// The table of shared names.
#[derive(Debug, Clone, Default)]
pub struct Interner {
    names: HashSet<Arc<str>>,
    /// The table's size after the last prune.
    kept: usize,
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
