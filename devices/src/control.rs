//! The machine-control device (`nvram::control`): the guest kernel reports its boot and its
//! workloads' heartbeats; the VMM keeps the latest values for whoever asks (the CLI, the
//! control socket, tests), and passes requests (checkpoint, shutdown) the other way.
//!
//! Everything the guest writes is checked: a message outside guest RAM, misaligned,
//! too long, or malformed is logged (the first few) and ignored.
//!
//! Whatever the guest sends, the device's memory and log stay bounded: it keeps the last
//! [`OPERATION_RING`] operation records plus running aggregates of all of them
//! ([`stats`]), at most [`MAX_WORKLOADS`] workloads, and a budget of log lines per kind of
//! message ([`limit`]).

pub mod barriers;
pub mod stats;

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::LogLimit;
pub use barriers::WriteOutBarriers;
pub use stats::{DurationSummary, OperationStats};

use nvram::control::{
    self, BootKind, DecodeError, Message, MetricsReport, Operation, Request, Verified, DEVICE_ID, MAX_MESSAGE,
    REG_DOORBELL, REG_REQUEST, REG_TSC_KHZ,
};
use tracing::{debug, info, warn, Level};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::BusDevice;

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
    /// At most [`MAX_WORKLOADS`], the first names reported since the boot.
    pub workloads: BTreeMap<String, WorkloadStatus>,
    /// Heartbeats of workloads not kept, the table being full.
    pub ignored_heartbeats: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Console messages printed (`nvram::control`'s kind 7; not among `accepted`).
    pub console_messages: u64,
    /// Runs of ring-3 kernel work up to the guest's boot report (`nvram::control::Booted`).
    pub boot_work_runs: u32,
    /// Accesses to COM1's registers (the UART), reads and writes.
    pub uart_accesses: u64,
    /// The requests waiting for the guest to read them (a set: none is lost to another).
    pub pending: crate::requests::PendingRequests,
    /// The last [`OPERATION_RING`] write-outs and restores reported, oldest first.
    pub operations: VecDeque<OperationRecord>,
    /// All write-outs reported, summed up.
    pub write_outs: OperationStats,
    /// All restores reported, summed up.
    pub restores: OperationStats,
    /// All lazy restores' ends reported (`Operation::RestoreTail`), summed up.
    pub restore_tails: OperationStats,
    /// The generation of a write-out under way (started, not yet committed).
    pub writing_out: Option<u64>,
    /// Where write-outs are among the persist barriers (when the device counts them).
    pub barriers: WriteOutBarriers,
    /// Write-outs started, by cause (`nvram::control::Cause` as index).
    pub write_out_causes: [u64; nvram::control::CAUSES],
    /// When the guest's boot report arrived (this boot).
    pub booted_at: Option<Instant>,
    /// The first process this boot entered, and when the VMM heard of it: after a restore,
    /// the end of "crash to running".
    pub running: Option<RunningEvent>,
    /// The programs the guest refused to start (the first [`MAX_REFUSED`]), and how many
    /// in all. The kernel refuses them before it reports its boot, so the boot report
    /// leaves them.
    pub refused: Vec<RefusedProgram>,
    pub refused_total: u64,
}

/// A user program the guest did not start ([`nvram::control::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedProgram {
    pub name: String,
    pub error: nvram::program::ProgramError,
}

/// How many refused programs the status keeps.
pub const MAX_REFUSED: usize = 32;

/// The guest's report that it entered its first process ([`nvram::control::Running`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningEvent {
    pub pid: u32,
    /// The generation committed then (after a restore: the one restored).
    pub generation: u64,
    pub at: Instant,
}

/// One write-out or restore, its times converted to durations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationRecord {
    pub report: MetricsReport,
    /// Duration of each phase (`nvram::control::PHASES`).
    pub phases: [std::time::Duration; 7],
    pub total: std::time::Duration,
    pub at: Instant,
}

/// How many operation records the status keeps (the newest).
pub const OPERATION_RING: usize = 1024;
/// How many workloads the status keeps; heartbeats of further names are counted only.
pub const MAX_WORKLOADS: usize = 64;

impl MachineStatus {
    /// The records kept of one kind of operation (the newest of them), oldest first.
    pub fn of(&self, operation: Operation) -> impl Iterator<Item = &OperationRecord> {
        self.operations.iter().filter(move |r| r.report.operation == operation)
    }

    /// The aggregates of all operations of a kind reported since the device started.
    pub fn stats(&self, operation: Operation) -> &OperationStats {
        match operation {
            Operation::WriteOut => &self.write_outs,
            Operation::Restore => &self.restores,
            Operation::RestoreTail => &self.restore_tails,
        }
    }

    fn stats_mut(&mut self, operation: Operation) -> &mut OperationStats {
        match operation {
            Operation::WriteOut => &mut self.write_outs,
            Operation::Restore => &mut self.restores,
            Operation::RestoreTail => &mut self.restore_tails,
        }
    }

    /// How many operations of a kind were reported since the device started.
    pub fn count(&self, operation: Operation) -> u64 {
        self.stats(operation).count
    }

    /// The `n`-th (from 0) operation of a kind reported since the device started; if the
    /// ring no longer holds it, the oldest one kept after it. `None` until it is reported.
    pub fn nth_of(&self, operation: Operation, n: u64) -> Option<&OperationRecord> {
        let total = self.count(operation);
        if n >= total {
            return None;
        }
        let kept = self.of(operation).count() as u64;
        let first_kept = total - kept;
        self.of(operation).nth(n.saturating_sub(first_kept) as usize)
    }

    /// Count, extremes and quantiles (by [`crate::quantile`]'s rule) of the durations of
    /// all operations of a kind: exact while the ring holds them all, from the histogram
    /// after.
    pub fn summary(&self, operation: Operation) -> Option<DurationSummary> {
        let stats = self.stats(operation);
        // Exact while the ring holds every record of the kind; no copy of it otherwise.
        if self.of(operation).count() as u64 == stats.count {
            return DurationSummary::of(self.of(operation).map(|r| r.total).collect());
        }
        Some(DurationSummary {
            count: stats.count,
            min: stats.min?,
            median: stats.quantile(0.5)?,
            p99: stats.quantile(0.99)?,
            max: stats.max?,
        })
    }

    /// Whether this boot's restore left pages in their save areas (a lazy one) and has not
    /// reported its end (every page back) yet.
    pub fn left_pages_unrestored(&self) -> bool {
        let left = self.of(Operation::Restore).any(|r| r.report.copied_bytes < r.report.plated_bytes);
        left && self.of(Operation::RestoreTail).next().is_none()
    }

    /// The bytes all operations copied.
    pub fn bytes_copied(&self) -> u64 {
        self.write_outs
            .copied_bytes
            .saturating_add(self.restores.copied_bytes)
            .saturating_add(self.restore_tails.copied_bytes)
    }
}

/// Shared view of the status.
pub type StatusHandle = Arc<Mutex<MachineStatus>>;

/// Locks a status handle, even if a panicking thread poisoned it.
pub fn lock(status: &StatusHandle) -> MutexGuard<'_, MachineStatus> {
    status.lock().unwrap_or_else(|e| e.into_inner())
}

/// The log lines a guest can cause, per kind: a second's budget each.
#[derive(Debug)]
struct LogLimits {
    rejected: LogLimit,
    booted: LogLimit,
    operations: LogLimit,
    started: LogLimit,
    workloads: LogLimit,
    heartbeats: LogLimit,
    failed: LogLimit,
    refused: LogLimit,
    /// Whether the full workload table was reported (once).
    table_full: bool,
}

impl Default for LogLimits {
    fn default() -> Self {
        let second = Duration::from_secs(1);
        Self {
            rejected: LogLimit::new("machine-control rejected message", Level::WARN, 16, second),
            booted: LogLimit::new("machine-control boot", Level::INFO, 16, second),
            // A write-out each 10 ms is still logged in full.
            operations: LogLimit::new("machine-control write-out and restore", Level::INFO, 128, second),
            started: LogLimit::new("machine-control write-out started", Level::DEBUG, 128, second),
            workloads: LogLimit::new("machine-control first heartbeat", Level::INFO, 16, second),
            heartbeats: LogLimit::new("machine-control heartbeat", Level::DEBUG, 128, second),
            failed: LogLimit::new("machine-control verification failed", Level::WARN, 16, second),
            refused: LogLimit::new("machine-control program refused", Level::WARN, 16, second),
            table_full: false,
        }
    }
}

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
    logs: LogLimits,
    barriers: Option<crate::persistence::BarrierCounter>,
    /// Told when write-outs start and report, for the one it may record.
    domain: Option<Arc<Mutex<crate::PersistenceDomain>>>,
    /// Told when a write-out starts: the copy engine's second thread wakes for its batch.
    batch_ahead: Option<crate::engine::BatchAhead>,
    /// Where console text goes (dropped without one).
    console: Option<crate::SharedConsole>,
}

impl MachineControl {
    /// A device reading messages from `mem`, reporting `tsc_khz` as the guest's TSC rate.
    pub fn new(mem: GuestMemoryMmap<()>, tsc_khz: u32) -> Self {
        Self {
            mem,
            tsc_khz,
            status: StatusHandle::default(),
            logs: LogLimits::default(),
            barriers: None,
            domain: None,
            batch_ahead: None,
            console: None,
        }
    }

    /// Tells `domain` when write-outs start and report (so it can record one).
    pub fn with_domain(mut self, domain: Arc<Mutex<crate::PersistenceDomain>>) -> Self {
        self.domain = Some(domain);
        self
    }

    /// Prints the guest's console text on `console`, the UART's output.
    /// Tells the copy engine when a write-out starts (`CopyEngine::batch_ahead`).
    pub fn with_batch_ahead(mut self, ahead: Option<crate::engine::BatchAhead>) -> Self {
        self.batch_ahead = ahead;
        self
    }

    pub fn with_console(mut self, console: crate::SharedConsole) -> Self {
        self.console = Some(console);
        self
    }

    /// Notes the persistence domain's barrier count as each write-out starts and ends.
    pub fn with_barrier_counter(mut self, counter: crate::persistence::BarrierCounter) -> Self {
        self.barriers = Some(counter);
        self
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
        if let Message::Console { len } = message {
            // Text, not a report: not counted among the accepted messages.
            let text = bytes.get(head.len()..head.len() + len).unwrap_or_default();
            if let Some(console) = &mut self.console {
                // A lost console drops its bytes (`ConsoleOut`): no error to give.
                let _ = console.write_all(text);
            }
            lock(&self.status).console_messages += 1;
            return Ok(());
        }
        self.apply(message);
        Ok(())
    }

    fn apply(&mut self, message: Message) {
        if let (Message::Started { .. }, Some(ahead)) = (&message, &self.batch_ahead) {
            // Not told before the engine's first batch for two threads: nothing to wake.
            let _ = ahead.write_out_started();
        }
        // The domain first, its lock apart from the status's.
        if let Some(domain) = &self.domain {
            match &message {
                Message::Started { generation, .. } => barriers::lock_domain(domain).write_out_started(*generation),
                Message::Metrics(r) if r.operation == Operation::WriteOut => {
                    barriers::lock_domain(domain).write_out_reported()
                }
                _ => {}
            }
        }
        let mut guard = lock(&self.status);
        let status = &mut *guard;
        let logs = &mut self.logs;
        let now = Instant::now();
        let barriers = self.barriers.as_ref().map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
        status.accepted += 1;
        match message {
            // Printed at the doorbell, which holds its bytes.
            Message::Console { .. } => {}
            Message::Booted { boot_kind, boot_count, generation, work_runs } => {
                if logs.booted.allow(now) {
                    info!(kind = <&str>::from(boot_kind), boot_count, generation, work_runs, "guest booted");
                }
                status.boot_kind = Some(boot_kind);
                status.boot_work_runs = work_runs;
                status.boot_count = boot_count;
                status.committed_generation = generation;
                status.workloads.clear();
                status.booted_at = Some(now);
                status.running = None;
            }
            Message::Running { pid, generation } => {
                if logs.booted.allow(now) {
                    debug!(pid, generation, "first process entered");
                }
                status.running = Some(RunningEvent { pid, generation, at: now });
            }
            Message::Refused { name, error } => {
                if logs.refused.allow(now) {
                    warn!(program = name.as_str(), "the guest refused to start program {}: {error}", name.as_str());
                }
                status.refused_total += 1;
                if status.refused.len() < MAX_REFUSED {
                    status.refused.push(RefusedProgram { name: name.as_str().to_string(), error });
                }
            }
            Message::Started { generation, cause } => {
                if logs.started.allow(now) {
                    debug!(generation, cause = <&str>::from(cause), "write-out started");
                }
                status.write_out_causes[cause as usize] += 1;
                status.writing_out = Some(generation);
                status.barriers.at_start = barriers.unwrap_or(0);
            }
            Message::Metrics(report) => {
                if report.operation == Operation::WriteOut {
                    status.writing_out = None;
                    status.barriers.last = barriers.map(|b| b.saturating_sub(status.barriers.at_start));
                }
                let to_duration = |ticks: u64| {
                    let khz = u64::from(self.tsc_khz.max(1));
                    std::time::Duration::from_nanos((u128::from(ticks) * 1_000_000 / u128::from(khz)) as u64)
                };
                let record = OperationRecord {
                    report,
                    phases: report.phases.map(to_duration),
                    total: to_duration(report.total),
                    at: now,
                };
                let what = match report.operation {
                    Operation::WriteOut => "write-out committed",
                    Operation::Restore => "restore done",
                    Operation::RestoreTail => "lazy restore finished: every page is back",
                };
                let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
                if report.rolled_back != 0 {
                    // Never rate-bounded: at most once a boot, and it is news.
                    warn!(
                        generation = report.generation,
                        rolled_back = report.rolled_back,
                        "the restore rolled back: the newest commit was found damaged and generation {} was \
                         restored instead ({} generation(s) lost; the guest's console says why)",
                        report.generation,
                        report.rolled_back
                    );
                }
                if logs.operations.allow(now) {
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
                        io_ms = ms(record.phases[6]),
                        "{what}"
                    );
                }
                status.committed_generation = report.generation;
                status.stats_mut(report.operation).record(record.total, report.copied_bytes);
                if status.operations.len() == OPERATION_RING {
                    status.operations.pop_front();
                }
                status.operations.push_back(record);
            }
            Message::Heartbeat { name, pid, progress, checksum, verified } => {
                let name = name.as_str();
                if verified == Verified::Failed && logs.failed.allow(now) {
                    warn!(workload = %name, pid, progress, "workload verification FAILED");
                }
                if !status.workloads.contains_key(name) && status.workloads.len() >= MAX_WORKLOADS {
                    status.ignored_heartbeats += 1;
                    if !logs.table_full {
                        logs.table_full = true;
                        warn!(
                            workload = %name,
                            "machine-control device: more than {MAX_WORKLOADS} workloads; \
                             the heartbeats of further ones are counted, not kept"
                        );
                    }
                    return;
                }
                match status.workloads.get_mut(name) {
                    Some(w) => {
                        if logs.heartbeats.allow(now) {
                            debug!(workload = %name, pid, progress, checksum, "heartbeat");
                        }
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
                        if logs.workloads.allow(now) {
                            info!(workload = %name, pid, progress, "first heartbeat");
                        }
                        let w = WorkloadStatus {
                            pid,
                            progress,
                            checksum,
                            verified,
                            last_check: verified,
                            heartbeats: 1,
                            updated: now,
                        };
                        status.workloads.insert(name.to_string(), w);
                    }
                }
            }
        }
    }

    fn reject(&mut self, why: &dyn std::fmt::Display) {
        let mut status = lock(&self.status);
        status.rejected += 1;
        if self.logs.rejected.allow(Instant::now()) {
            warn!("machine-control device: {why}; ignored");
        }
    }
}

impl BusDevice<u16> for MachineControl {
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
mod tests;
