//! [`Executor`]: the one interface through which anything changes the kernel's nftables
//! (applied atomically, all or nothing), and its implementations for the in-memory [`Fake`] and
//! for an executor shared with a test.

use crate::fake::{ApplyError, Fake};
use crate::objects::Table;
use crate::transaction::{Op, Transaction};

/// The operations of one transaction, handed one by one to a sink (each call hands the same
/// operations: a refusal is described by running it again).
pub type OpSource<'a> = dyn FnMut(&mut dyn FnMut(Op)) + 'a;

/// Applies transactions atomically and answers whether a table is intact.
pub trait Executor {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError>;
    /// Applies the transaction on `table` that `ops` hands out, atomically like [`apply`],
    /// without holding it as typed operations where the executor can (the kernel executor
    /// encodes each operation as it comes, into a buffer sized for about `size_hint` of
    /// them, so it is not copied as it grows); returns how many operations it held.
    ///
    /// [`apply`]: Executor::apply
    fn apply_stream(
        &mut self,
        table: &Table,
        size_hint: usize,
        ops: &mut OpSource<'_>,
    ) -> Result<usize, ApplyError> {
        let _ = size_hint;
        let mut tx = Transaction::new(table.clone());
        ops(&mut |op| tx.ops.push(op));
        self.apply(&tx).map(|()| tx.len())
    }
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
    fn apply_stream(
        &mut self,
        table: &Table,
        size_hint: usize,
        ops: &mut OpSource<'_>,
    ) -> Result<usize, ApplyError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply_stream(table, size_hint, ops)
    }
    fn table_intact(&mut self, table: &Table, canary: &str) -> Result<bool, ApplyError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .table_intact(table, canary)
    }
}
