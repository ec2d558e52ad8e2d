//! `Faulty`: an executor wrapper that refuses chosen transactions with a chosen errno, as the kernel would.
//!
//! For tests of what happens when the kernel says no. A refused transaction never reaches the
//! wrapped executor, so nothing of it is applied (the kernel's all-or-nothing commit), and the
//! error is the one the netlink executor gives: [`ApplyError::Refused`] with the errno and the
//! `nft` line of the refused operation. It wraps the strict [`crate::Fake`] in unit tests and
//! the real [`crate::Netlink`] in kernel tests. The test keeps a [`Faults`] handle (shared,
//! cheap to clone) to choose faults while the executor is owned by the code under test.

use crate::executor::Executor;
use crate::fake::ApplyError;
use crate::objects::Table;
use crate::refusal::Errno;
use crate::transaction::{Op, Transaction};
use std::sync::{Arc, Mutex, MutexGuard};

/// An executor that refuses what its [`Faults`] say and passes everything else on.
#[derive(Debug)]
pub struct Faulty<E> {
    inner: E,
    faults: Faults,
}

impl<E: Executor> Faulty<E> {
    /// Wraps `inner`; no fault is set.
    pub fn new(inner: E) -> Faulty<E> {
        Faulty {
            inner,
            faults: Faults::default(),
        }
    }

    /// The handle that sets faults and reads what happened.
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }
}

/// Which transactions to refuse, shared between a test and its [`Faulty`] executor.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    state: Arc<Mutex<State>>,
}

type OpMatch = Arc<dyn Fn(&Op) -> bool + Send + Sync>;

#[derive(Default)]
struct State {
    fault: Option<Fault>,
    refused: Vec<ApplyError>,
    passed: usize,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("fault", &self.fault.as_ref().map(|x| x.errno))
            .field("refused", &self.refused.len())
            .field("passed", &self.passed)
            .finish()
    }
}

struct Fault {
    errno: Errno,
    /// Transactions still let through before refusing.
    skip: usize,
    /// Refusals left (`None`: until cleared).
    times: Option<usize>,
    /// Refuse only transactions with a matching operation (which the error names).
    when: Option<OpMatch>,
}

impl Faults {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, fault: Fault) {
        self.lock().fault = Some(fault);
    }

    /// Refuses every transaction until [`Faults::clear`].
    pub fn refuse_all(&self, errno: Errno) {
        self.set(Fault {
            errno,
            skip: 0,
            times: None,
            when: None,
        });
    }

    /// Refuses the next `n` transactions.
    pub fn refuse_next(&self, errno: Errno, n: usize) {
        self.set(Fault {
            errno,
            skip: 0,
            times: Some(n),
            when: None,
        });
    }

    /// Lets `skip` transactions through, then refuses one (a failure in the middle of a
    /// sequence, such as a chunked cold start).
    pub fn refuse_after(&self, errno: Errno, skip: usize) {
        self.set(Fault {
            errno,
            skip,
            times: Some(1),
            when: None,
        });
    }

    /// Refuses, until [`Faults::clear`], every transaction with an operation that `when`
    /// matches, naming that operation.
    pub fn refuse_op(&self, errno: Errno, when: impl Fn(&Op) -> bool + Send + Sync + 'static) {
        self.set(Fault {
            errno,
            skip: 0,
            times: None,
            when: Some(Arc::new(when)),
        });
    }

    /// No more faults.
    pub fn clear(&self) {
        self.lock().fault = None;
    }

    /// Transactions refused so far.
    pub fn refused(&self) -> usize {
        self.lock().refused.len()
    }

    /// The errors of the refused transactions, in order.
    pub fn refusals(&self) -> Vec<ApplyError> {
        self.lock().refused.clone()
    }

    /// Transactions passed on to the wrapped executor (applied or refused by it).
    pub fn passed(&self) -> usize {
        self.lock().passed
    }

    /// The refusal for `tx`, if the current fault wants one (counting it down).
    fn check(&self, tx: &Transaction) -> Option<ApplyError> {
        let mut state = self.lock();
        let fault = state.fault.as_mut()?;
        let op = match &fault.when {
            Some(when) => tx.ops.iter().position(|op| when(op))?,
            // A refusal of the whole transaction names its first operation, as the kernel
            // names the first message it refused.
            None => 0,
        };
        if fault.skip > 0 {
            fault.skip -= 1;
            return None;
        }
        let err = ApplyError::Refused {
            errno: fault.errno.raw_os_error(),
            op: tx.describe(op),
        };
        if let Some(n) = &mut fault.times {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.fault = None;
            }
        }
        state.refused.push(err.clone());
        Some(err)
    }
}

impl<E: Executor> Executor for Faulty<E> {
    fn apply(&mut self, tx: &Transaction) -> Result<(), ApplyError> {
        if tx.is_empty() {
            return Ok(());
        }
        if let Some(err) = self.faults.check(tx) {
            return Err(err);
        }
        self.faults.lock().passed += 1;
        self.inner.apply(tx)
    }

    fn table_intact(&mut self, table: &Table, canary: &str) -> Result<bool, ApplyError> {
        self.inner.table_intact(table, canary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Fake;
    use crate::objects::{Chain, Family};

    fn tx(chain: &str) -> Transaction {
        let table = Table {
            family: Family::Ip,
            name: "t".into(),
            comment: None,
        };
        let mut tx = Transaction::new(table.clone());
        tx.push(Op::AddTable(table));
        tx.push(Op::AddChain(Chain {
            name: chain.into(),
            base: None,
            comment: None,
        }));
        tx
    }

    #[test]
    fn refused_transactions_change_nothing_and_name_an_operation() {
        let shared = Arc::new(Mutex::new(Fake::default()));
        let mut exec = Faulty::new(shared.clone());
        let faults = exec.faults();
        faults.refuse_after(Errno::NOSPC, 1);
        exec.apply(&tx("a")).unwrap();
        let before = shared.lock().unwrap().dump();
        let err = exec.apply(&tx("b")).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::NOSPC.raw_os_error()));
        assert_eq!(
            err.to_string(),
            "the kernel refused `add table ip t`: a set or map is full (it reached its size limit), or the kernel ran out of room for the object (ENOSPC: No space left on device)"
        );
        assert_eq!(shared.lock().unwrap().dump(), before, "nothing applied");
        exec.apply(&tx("b")).unwrap();
        assert_eq!((faults.refused(), faults.passed()), (1, 2));

        faults.refuse_op(
            Errno::BUSY,
            |op| matches!(op, Op::AddChain(c) if c.name == "c"),
        );
        exec.apply(&tx("d")).unwrap();
        let err = exec.apply(&tx("c")).unwrap_err();
        assert!(err.to_string().contains("`add chain ip t c`"), "{err}");
        assert!(exec.apply(&tx("c")).is_err(), "until cleared");
        faults.clear();
        exec.apply(&tx("c")).unwrap();
        assert_eq!(faults.refused(), 3);
    }
}
