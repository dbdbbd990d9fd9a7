//! The machine-control device (`nvram::control`): the guest kernel reports its boot and its
//! workloads' heartbeats; the VMM keeps the latest values for whoever asks (the CLI, the
//! control socket, tests), and passes requests (checkpoint, shutdown) the other way.
//!
//! Everything the guest writes is checked: a message outside guest RAM, misaligned,
//! too long, or malformed is logged (the first few) and ignored.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use nvram::control::{
    self, BootKind, DecodeError, Message, MetricsReport, Operation, Request, Verified, DEVICE_ID, MAX_MESSAGE,
    REG_DOORBELL, REG_REQUEST, REG_TSC_KHZ,
};
use tracing::{debug, info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::PioDevice;

/// The latest report of one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadStatus {
    pub pid: u32,
    pub progress: u64,
    pub checksum: u64,
    pub verified: Verified,
    /// The last verification result that was not `Unknown`.
    pub last_check: Verified,
    pub heartbeats: u64,
    pub updated: Instant,
}

/// What the guest has reported so far.
#[derive(Debug, Clone, Default)]
pub struct MachineStatus {
    pub boot_kind: Option<BootKind>,
    pub boot_count: u64,
    /// Generation of the last committed write-out, as the guest reported it.
    pub committed_generation: u64,
    pub workloads: BTreeMap<String, WorkloadStatus>,
    pub accepted: u64,
    pub rejected: u64,
    /// The requests waiting for the guest to read them (a set: none is lost to another).
    pub pending: crate::requests::PendingRequests,
    /// Every write-out and restore reported, oldest first.
    pub operations: Vec<OperationRecord>,
    /// The generation of a write-out under way (started, not yet committed).
    pub writing_out: Option<u64>,
}

/// One write-out or restore, its times converted to durations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationRecord {
    pub report: MetricsReport,
    /// Duration of each phase (`nvram::control::PHASES`).
    pub phases: [std::time::Duration; 6],
    pub total: std::time::Duration,
    pub at: Instant,
}

impl MachineStatus {
    /// The records of one kind of operation.
    pub fn of(&self, operation: Operation) -> impl Iterator<Item = &OperationRecord> {
        self.operations.iter().filter(move |r| r.report.operation == operation)
    }
}

/// Shared view of the status.
pub type StatusHandle = Arc<Mutex<MachineStatus>>;

/// Locks a status handle, even if a panicking thread poisoned it.
pub fn lock(status: &StatusHandle) -> MutexGuard<'_, MachineStatus> {
    status.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many rejected messages are logged before the device goes quiet.
const REJECT_LOG_LIMIT: u64 = 16;

/// Why a doorbell was refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("message address {0:#x} is not 8-byte aligned")]
    Misaligned(u64),
    #[error("message at {addr:#x} is not inside guest RAM")]
    OutOfRam { addr: u64 },
    #[error("message at {addr:#x} claims {len} bytes, more than {MAX_MESSAGE}")]
    TooLong { addr: u64, len: u32 },
    #[error("message at {addr:#x}: {error}")]
    Malformed { addr: u64, error: DecodeError },
}

pub struct MachineControl {
    mem: GuestMemoryMmap<()>,
    tsc_khz: u32,
    status: StatusHandle,
}

impl MachineControl {
    /// A device reading messages from `mem`, reporting `tsc_khz` as the guest's TSC rate.
    pub fn new(mem: GuestMemoryMmap<()>, tsc_khz: u32) -> Self {
        Self { mem, tsc_khz, status: StatusHandle::default() }
    }

    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    fn doorbell(&mut self, addr: u64) -> Result<(), Refused> {
        if !addr.is_multiple_of(8) {
            return Err(Refused::Misaligned(addr));
        }
        let mut head = [0u8; 8];
        self.mem.read_slice(&mut head, GuestAddress(addr)).map_err(|_| Refused::OutOfRam { addr })?;
        let header = control::peek_header(&head).map_err(|error| Refused::Malformed { addr, error })?;
        if header.len > MAX_MESSAGE || (header.len as usize) < head.len() {
            return Err(Refused::TooLong { addr, len: header.len });
        }
        let mut bytes = vec![0u8; header.len as usize];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).map_err(|_| Refused::OutOfRam { addr })?;
        let message = control::decode(&bytes).map_err(|error| Refused::Malformed { addr, error })?;
        self.apply(message);
        Ok(())
    }

    fn apply(&mut self, message: Message) {
        let mut status = lock(&self.status);
        status.accepted += 1;
        match message {
            Message::Booted { boot_kind, boot_count, generation } => {
                info!(kind = <&str>::from(boot_kind), boot_count, generation, "guest booted");
                status.boot_kind = Some(boot_kind);
                status.boot_count = boot_count;
                status.committed_generation = generation;
                status.workloads.clear();
            }
            Message::Started { generation } => {
                debug!(generation, "write-out started");
                status.writing_out = Some(generation);
            }
            Message::Metrics(report) => {
                if report.operation == Operation::WriteOut {
                    status.writing_out = None;
                }
                let to_duration = |ticks: u64| {
                    let khz = u64::from(self.tsc_khz.max(1));
                    std::time::Duration::from_nanos((u128::from(ticks) * 1_000_000 / u128::from(khz)) as u64)
                };
                let record = OperationRecord {
                    report,
                    phases: report.phases.map(to_duration),
                    total: to_duration(report.total),
                    at: Instant::now(),
                };
                let what = match report.operation {
                    Operation::WriteOut => "write-out committed",
                    Operation::Restore => "restore done",
                };
                let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
                info!(
                    generation = report.generation,
                    plates = report.plates,
                    plated_kib = report.plated_bytes >> 10,
                    copied_kib = report.copied_bytes >> 10,
                    copier = <&str>::from(report.copier),
                    ms = ms(record.total),
                    plateify_ms = ms(record.phases[0]),
                    scan_ms = ms(record.phases[1]),
                    copy_ms = ms(record.phases[2]),
                    commit_ms = ms(record.phases[3]),
                    flush_ms = ms(record.phases[4]),
                    free_ms = ms(record.phases[5]),
                    "{what}"
                );
                status.committed_generation = report.generation;
                status.operations.push(record);
            }
            Message::Heartbeat { name, pid, progress, checksum, verified } => {
                let name = name.as_str().to_string();
                let now = Instant::now();
                if verified == Verified::Failed {
                    warn!(workload = %name, pid, progress, "workload verification FAILED");
                }
                match status.workloads.get_mut(&name) {
                    Some(w) => {
                        debug!(workload = %name, pid, progress, checksum, "heartbeat");
                        w.pid = pid;
                        w.progress = progress;
                        w.checksum = checksum;
                        w.verified = verified;
                        if verified != Verified::Unknown {
                            w.last_check = verified;
                        }
                        w.heartbeats += 1;
                        w.updated = now;
                    }
                    None => {
                        info!(workload = %name, pid, progress, "first heartbeat");
                        let w = WorkloadStatus {
                            pid,
                            progress,
                            checksum,
                            verified,
                            last_check: verified,
                            heartbeats: 1,
                            updated: now,
                        };
                        status.workloads.insert(name, w);
                    }
                }
            }
        }
    }

    fn reject(&mut self, why: &dyn std::fmt::Display) {
        let mut status = lock(&self.status);
        status.rejected += 1;
        if status.rejected <= REJECT_LOG_LIMIT {
            warn!("machine-control device: {why}; ignored");
            if status.rejected == REJECT_LOG_LIMIT {
                warn!("machine-control device: further rejected messages are not logged");
            }
        }
    }
}

impl PioDevice for MachineControl {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (REG_DOORBELL, 4) => DEVICE_ID,
            (REG_TSC_KHZ, 4) => self.tsc_khz,
            (REG_REQUEST, 4) => lock(&self.status).pending.take().map_or(0, |r: Request| r as u32),
            _ => {
                data.fill(0xff);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        match (offset, data) {
            (REG_DOORBELL, &[a, b, c, d]) => {
                let addr = u64::from(u32::from_le_bytes([a, b, c, d]));
                if let Err(why) = self.doorbell(addr) {
                    self.reject(&why);
                }
            }
            _ => self.reject(&format_args!("write of {} bytes at offset {offset}", data.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvram::control::{Booted, Heartbeat};
    use zerocopy::{Immutable, IntoBytes};

    fn device() -> MachineControl {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        MachineControl::new(mem, 2_600_000)
    }

    fn put<T: IntoBytes + Immutable>(dev: &MachineControl, addr: u64, message: &T) {
        dev.mem.write_slice(message.as_bytes(), GuestAddress(addr)).unwrap();
    }

    fn ring(dev: &mut MachineControl, addr: u32) {
        dev.write(REG_DOORBELL, &addr.to_le_bytes());
    }

    #[test]
    fn identifies_itself_and_reports_the_tsc_rate() {
        let mut dev = device();
        let mut data = [0u8; 4];
        dev.read(REG_DOORBELL, &mut data);
        assert_eq!(u32::from_le_bytes(data), DEVICE_ID);
        dev.read(REG_TSC_KHZ, &mut data);
        assert_eq!(u32::from_le_bytes(data), 2_600_000);
        let mut byte = [0u8; 1];
        dev.read(REG_DOORBELL, &mut byte);
        assert_eq!(byte, [0xff]);
    }

    #[test]
    fn good_messages_update_the_status() {
        let mut dev = device();
        put(&dev, 0x1000, &Booted::new(BootKind::Restored, 3, 9));
        ring(&mut dev, 0x1000);
        put(&dev, 0x2000, &Heartbeat::new("kv", 1, 500, 0xfeed, Verified::Passed));
        ring(&mut dev, 0x2000);
        put(&dev, 0x2000, &Heartbeat::new("kv", 1, 900, 0xbeef, Verified::Unknown));
        ring(&mut dev, 0x2000);
        let status = lock(&dev.status);
        assert_eq!(status.boot_kind, Some(BootKind::Restored));
        assert_eq!((status.boot_count, status.committed_generation), (3, 9));
        let kv = &status.workloads["kv"];
        assert_eq!((kv.progress, kv.checksum, kv.heartbeats), (900, 0xbeef, 2));
        assert_eq!((kv.verified, kv.last_check), (Verified::Unknown, Verified::Passed));
        assert_eq!((status.accepted, status.rejected), (3, 0));
    }

    #[test]
    fn requests_are_read_once() {
        let mut dev = device();
        lock(&dev.status).pending.ask(Request::Checkpoint);
        let mut data = [0u8; 4];
        dev.read(REG_REQUEST, &mut data);
        assert_eq!(u32::from_le_bytes(data), Request::Checkpoint as u32);
        dev.read(REG_REQUEST, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0);
    }

    #[test]
    fn bad_doorbells_are_ignored_and_counted() {
        let mut dev = device();
        put(&dev, 0x1000, &Heartbeat::new("kv", 1, 5, 5, Verified::Passed));
        ring(&mut dev, 0x1004); // misaligned
        ring(&mut dev, (1 << 20) - 8); // header fits, body runs past RAM
        ring(&mut dev, 1 << 20); // past the end of RAM
        ring(&mut dev, 0xffff_fff8);
        dev.mem.write_slice(&[2, 0, 0, 0, 0xff, 0xff, 0, 0], GuestAddress(0x3000)).unwrap();
        ring(&mut dev, 0x3000); // over-long
        dev.mem.write_slice(&[77, 0, 0, 0, 48, 0, 0, 0], GuestAddress(0x4000)).unwrap();
        ring(&mut dev, 0x4000); // unknown kind
        dev.write(REG_DOORBELL, &[1, 2]); // wrong width
        dev.write(REG_TSC_KHZ, &[0, 0, 0, 0]); // read-only register
        let status = lock(&dev.status);
        assert_eq!(status.accepted, 0);
        assert_eq!(status.rejected, 8);
        assert!(status.workloads.is_empty());
    }
}
