//! A transaction: an ordered list of operations applied atomically by an executor.

use crate::objects::{Chain, Element, Map, Rule, Set, Table};

/// One operation. `Add` of an existing table, chain, set or map is a no-op (nft `add`), as is
/// the kernel's behaviour; `Add` of an existing element is an error (nft `add element` of a
/// duplicate key in a map with a different value fails; we never rely on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddTable(Table),
    DeleteTable,
    AddChain(Chain),
    /// Removes every rule of the chain.
    FlushChain(String),
    DeleteChain(String),
    AddRule(Rule),
    AddSet(Set),
    AddMap(Map),
    /// Removes every element of a set (its `nft -f` text, `flush set`, would not name a map;
    /// the netlink executor flushes either).
    FlushSet(String),
    DeleteSet(String),
    AddElement(Element),
    DeleteElement(Element),
}

/// Operations on one table, applied all or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub table: Table,
    pub ops: Vec<Op>,
}

impl Transaction {
    pub fn new(table: Table) -> Transaction {
        Transaction {
            table,
            ops: Vec::new(),
        }
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}
