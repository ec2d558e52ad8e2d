//! Endpoint-map slots of the service ports that keep a chain of their own: a function of the
//! set of their names only, so partial renders agree with full ones.

use super::{Rendered, plain};
use crate::nftables::naming;
use kpr_model::ServicePortName;
use kpr_model::desired::{FamilyDesired, ServicePortDesired};
use kpr_nft::BUCKETS;
use std::collections::{BTreeMap, BTreeSet};

/// Slots in the endpoint maps: a port in slot `s` draws its cluster endpoints from buckets
/// `s * 2B .. s * 2B + B` and its local endpoints from the next `B` (B = [`BUCKETS`]). The top
/// slot is left out so every range ends below 2^32.
pub const SLOTS: u32 = u32::MAX / (2 * BUCKETS);

/// Whether a port draws from the sharded endpoint maps through a chain of its own, and so
/// needs a slot: every port but the plain ones (which share the pick chains).
pub(super) fn slotted(sp: &ServicePortDesired) -> bool {
    !plain(sp)
}

/// Each slotted port's slot among `slots`: its home slot is a hash of its name; ports are
/// placed in name order, each in the first free slot from its home on (linear probing); once
/// all are taken, the rest get none.
pub(super) fn assign_slots(fam: &FamilyDesired, slots: u32) -> BTreeMap<ServicePortName, u32> {
    let mut taken = Taken::new(slots);
    let mut out = BTreeMap::new();
    for (name, _) in fam.ports.iter().filter(|(_, sp)| slotted(sp)) {
        let Some(slot) = taken.claim(home(name)) else {
            break;
        };
        out.insert(name.clone(), slot);
    }
    out
}

/// A port's home slot before probing, before `% slots`: a hash of its name.
pub(super) fn home(name: &ServicePortName) -> u32 {
    naming::hash32(&naming::service_base(name))
}

/// What a port's record keeps of [`home`]: the hash for a slotted port, nothing (0) for a
/// plain one, which needs no slot (and a new plain Service no hash).
pub(super) fn kept_home(name: &ServicePortName, sp: &ServicePortDesired) -> u32 {
    if slotted(sp) { home(name) } else { 0 }
}

/// The slots taken so far by linear probing (a bit per slot).
struct Taken {
    bits: Vec<u64>,
    slots: u32,
    count: u32,
}

impl Taken {
    fn new(slots: u32) -> Taken {
        let slots = slots.min(SLOTS);
        Taken {
            bits: vec![0; (slots as usize).div_ceil(64)],
            slots,
            count: 0,
        }
    }

    /// The first free slot from `home % slots` on, now taken; `None` once all are taken.
    fn claim(&mut self, home: u32) -> Option<u32> {
        if self.count >= self.slots {
            return None;
        }
        let mut slot = home % self.slots;
        while self.bits[slot as usize / 64] & (1 << (slot % 64)) != 0 {
            slot = (slot + 1) % self.slots;
        }
        self.bits[slot as usize / 64] |= 1 << (slot % 64);
        self.count += 1;
        Some(slot)
    }
}

/// Whether the plan changes which ports are slotted (one added, removed, or turned plain or
/// not): only then are slots worked out again.
pub(super) fn changes_slotted(
    fam: &FamilyDesired,
    next: &Rendered,
    changed: &BTreeSet<ServicePortName>,
) -> bool {
    changed.iter().any(|n| {
        fam.ports.get(n).is_some_and(|sp| slotted(sp))
            != next.ports.get(n).is_some_and(|r| slotted(&r.sp))
    })
}

/// [`assign_slots`] again after slotted ports were added or removed, updating `next.slots` in
/// place and adding every port whose slot moved to `todo`: one pass over the names in order
/// beside the committed records, whose homes are kept, so only the new ports' names are hashed.
pub(super) fn reassign_slots(
    fam: &FamilyDesired,
    slots: u32,
    next: &mut Rendered,
    changed: &BTreeSet<ServicePortName>,
    todo: &mut BTreeSet<ServicePortName>,
) {
    let mut taken = Taken::new(slots);
    let mut records = next.ports.iter().peekable();
    let mut assigned = Vec::new();
    for (name, _) in fam.ports.iter().filter(|(_, sp)| slotted(sp)) {
        while records.next_if(|(n, _)| *n < name).is_some() {}
        let h = match records.peek() {
            Some((n, r)) if *n == name && slotted(&r.sp) => r.home,
            _ => home(name),
        };
        let Some(slot) = taken.claim(h) else {
            break;
        };
        if next.slots.get(name) != Some(&slot) {
            assigned.push((name.clone(), slot));
        }
    }
    let full = taken.count >= taken.slots;
    for (name, slot) in assigned {
        todo.insert(name.clone());
        next.slots.insert(name, slot);
    }
    // Ports no longer slotted (every one is in the plan), and (only when every slot is taken)
    // ports left without one.
    for gone in changed
        .iter()
        .filter(|n| !fam.ports.get(*n).is_some_and(|sp| slotted(sp)))
    {
        next.slots.remove(gone);
    }
    if full {
        let kept = assign_slots(fam, slots);
        todo.extend(
            next.slots
                .keys()
                .filter(|n| !kept.contains_key(*n))
                .cloned(),
        );
        next.slots = kept;
    }
}
