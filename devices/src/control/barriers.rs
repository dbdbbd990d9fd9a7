//! Where write-outs stand among the persistence domain's barriers: what the machine-control
//! device notes as each write-out starts and reports, so that a crash can be placed among
//! the barriers of the write-out it interrupted (torture's coverage).

use std::sync::{Mutex, MutexGuard};

/// The persist barriers of write-outs, from the domain's count: a crash inside a write-out
/// falls after `count now - at_start` of its barriers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutBarriers {
    /// The domain's count when the write-out under way (or the last one) started.
    pub at_start: u64,
    /// How many barriers the last committed write-out ran, start to report.
    pub last: Option<u64>,
}

/// Locks the persistence domain, even if a panicking thread poisoned it.
pub(super) fn lock_domain(d: &Mutex<crate::PersistenceDomain>) -> MutexGuard<'_, crate::PersistenceDomain> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use nvram::control::{Cause, Metrics, Operation, Started, REG_DOORBELL};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use zerocopy::IntoBytes;

    use crate::persistence::BarrierCounter;
    use crate::{BusDevice, MachineControl};

    #[test]
    fn a_write_out_is_placed_among_the_barriers_counted() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let counter = BarrierCounter::default();
        let mut dev = MachineControl::new(mem.clone(), 1_000_000).with_barrier_counter(counter.clone());
        let send = |dev: &mut MachineControl, bytes: &[u8]| {
            mem.write_slice(bytes, GuestAddress(0x1000)).unwrap();
            dev.write(REG_DOORBELL, &0x1000u32.to_le_bytes());
        };
        counter.store(10, Ordering::Relaxed);
        send(&mut dev, Started::new(4, Cause::Call).as_bytes());
        let status = dev.status();
        assert_eq!(status.lock().unwrap().barriers.at_start, 10, "the count as the write-out started");
        counter.store(14, Ordering::Relaxed);
        let mut report = Metrics::new(Operation::WriteOut);
        report.generation = 4;
        send(&mut dev, report.as_bytes());
        let barriers = status.lock().unwrap().barriers;
        assert_eq!(barriers.last, Some(4), "the write-out ran 4 barriers: {barriers:?}");
        // A restore's report leaves the write-outs' count alone.
        counter.store(20, Ordering::Relaxed);
        send(&mut dev, Metrics::new(Operation::Restore).as_bytes());
        assert_eq!(status.lock().unwrap().barriers.last, Some(4));
    }
}
