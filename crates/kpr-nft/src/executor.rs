//! [`Executor`]: the one interface through which anything changes the kernel's nftables
//! (applied atomically, all or nothing), and its implementations for the in-memory [`Fake`] and
//! for an executor shared with a test.

use crate::fake::{ApplyError, Fake};
use crate::objects::Table;
use crate::transaction::Transaction;

/// Applies transactions atomically and answers whether a table is intact.
pub trait Executor {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError>;
    /// The table exists and `canary` (a chain that always has rules) still has them: neither
    /// deleted nor flushed by someone else.
    fn table_intact(&mut self, table: &Table, canary: &str) -> Result<bool, ApplyError>;
}

impl Executor for Fake {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        Fake::apply(self, tx)
    }
    fn table_intact(&mut self, table: &Table, canary: &str) -> Result<bool, ApplyError> {
        Ok(!self.rules(table.family, &table.name, canary).is_empty())
    }
}

/// An executor shared with the test that inspects it (a [`Fake`] the code under test applies
/// to while the test reads its state).
impl<E: Executor + ?Sized> Executor for std::sync::Arc<std::sync::Mutex<E>> {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        self.lock().unwrap_or_else(|e| e.into_inner()).apply(tx)
    }
    fn table_intact(&mut self, table: &Table, canary: &str) -> Result<bool, ApplyError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .table_intact(table, canary)
    }
}
