//! The one control interface of a running machine: a request, its response. The control
//! socket, the CLI's signal handling, tests and benches all go through [`Controller`].
//!
//! Requests and responses are JSON objects, one per line on the socket:
//!
//! | request | response (besides `"ok": true`) |
//! |---|---|
//! | `{"cmd":"status"}` | `state` (`running`, `paused`), `boot_kind` (`cold`, `resumed`, `restored`, or null before the guest said), `committed_generation`, `uptime_ms`, `workloads` (name to `progress`, `checksum`, `verified`), `image` (`intact`, `deleted`, `truncated`, `moved`; null when unwatched) and, unless intact, `warning` |
//! | `{"cmd":"checkpoint","timeout_ms":5000}` | `write_out`: the write-out's figures, once it is committed; `timeout_ms` is 1 to 60000 (default 10000) |
//! | `{"cmd":"shutdown"}` | nothing more (but a `warning` when the image is not intact); the VMM exits 0 once the guest has powered off |
//! | `{"cmd":"crash"}` | nothing more; the VMM then exits at once (a power failure) |
//! | `{"cmd":"pause"}`, `{"cmd":"resume"}` | `state` |
//! | `{"cmd":"metrics"}` | count, min, median, p99, max (ms) of write-outs, restores and lazy restores' ends (`restore_tails`); bytes copied; `persistence` (model, persist barriers and bytes made durable); `engine` (batches, copies, bytes, host time) |
//!
//! An error is `{"ok":false,"error":"..."}`.
//!
//! A request is checked whole before anything is done: a repeated key
//! (`{"cmd":"status","cmd":"crash"}`: serde would keep the last), an unknown field, or a
//! `timeout_ms` of 0 or over 60000 is refused and asks nothing of the guest. The last
//! request of a stream may end without its newline.
//!
//! Requests to the guest queue (a set of kinds, [`devices::requests`]): a shutdown asked is
//! never dropped; a checkpoint asked while another is pending joins it; a checkpoint asked
//! once a shutdown was asked (on the socket or by a signal) is refused with "the machine is
//! shutting down": the guest would never do it, and the shutdown's own write-out keeps the
//! state.
//!
//! The image file is watched ([`crate::image::ImageWatch`]). Deleted or truncated, it keeps
//! nothing the guest stores: `status` says so, a checkpoint is refused ("not kept") without
//! asking the guest (or after its commit, when the image went during the write-out), a
//! shutdown goes on but its reply carries the `warning`, and the VMM logs it once. Moved or
//! replaced, the memory is kept in the moved file: checkpoints and shutdowns succeed, with a
//! `warning`.
//!
//! The socket serves at most [`crate::control_socket::MAX_CLIENTS`] clients at once (fewer
//! under a low file-descriptor limit); the one over gets
//! `{"ok":false,"error":"too many clients ..."}` and is closed, and so is a client that sends
//! no complete line for [`crate::control_socket::IDLE_TIMEOUT`].
//!
//! Each reply is a typed struct ([`StatusReply`], [`CheckpointReply`], ...) and a
//! [`Response`] serializes as the reply's fields beside `ok`: `vmm ctl` reads the same types
//! back, so the two ends of the socket cannot drift apart.

mod parse;
mod replies;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use devices::control::{lock, MachineStatus, OperationRecord, StatusHandle};
use devices::engine::EngineStats;
use devices::requests::Asked;
use devices::{PersistenceDomain, PersistenceModel};
use nvram::control::{Operation, Request as GuestRequest};
use serde::{Deserialize, Serialize};

pub use parse::parse;
use replies::ms;
pub use replies::*;

use crate::image::{ImageFate, ImageWatch};
use crate::vcpu_state::VcpuHandle;

/// A request to the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Checkpoint {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    Shutdown,
    Crash,
    Pause,
    Resume,
    Metrics,
}

/// What the caller must do after answering (the socket server does it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterReply {
    Nothing,
    /// Stop the machine dead and exit the process.
    Crash,
}

/// Default wait for a checkpoint to commit.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a checkpoint: a longer one would hold a client's thread (one of a
/// bounded few) polling for nothing.
pub const MAX_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request was refused: the `error` of an error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("bad request: unknown field `{0}`")]
    UnknownField(String),
    #[error("bad request: duplicate key `{0}` (a request names each field once)")]
    DuplicateKey(String),
    #[error("bad request: timeout_ms must be 1 to {max} (ms), not {0}", max = MAX_CHECKPOINT_TIMEOUT.as_millis())]
    BadTimeout(u64),
    #[error("request longer than {0} bytes; closing")]
    TooLong(usize),
    #[error("too many clients (at most {0} at once); closing: try again once others are done")]
    TooManyClients(usize),
    #[error("no complete request line within {0} s; closing")]
    Idle(u64),
    #[error("the machine is paused: resume it first")]
    Paused,
    #[error("the guest has not booted (or has no machine-control driver)")]
    NotBooted,
    #[error(
        "the machine is shutting down (a shutdown was asked): no checkpoint; the shutdown itself writes the state out"
    )]
    ShuttingDown,
    #[error("checkpoint refused, no state is kept: {0}")]
    ImageLost(String),
    #[error("no write-out committed within {0} ms (is the plate function off?)")]
    CheckpointTimeout(u128),
}

/// The checkpoint's wait `timeout_ms` asks for, checked before anything is asked of the guest.
pub fn checkpoint_timeout(timeout_ms: Option<u64>) -> Result<Duration, ApiError> {
    match timeout_ms {
        None => Ok(CHECKPOINT_TIMEOUT),
        Some(ms) if ms == 0 || u128::from(ms) > MAX_CHECKPOINT_TIMEOUT.as_millis() => Err(ApiError::BadTimeout(ms)),
        Some(ms) => Ok(Duration::from_millis(ms)),
    }
}

/// How often [`Controller::checkpoint`] looks for the commit.
const CHECKPOINT_POLL: Duration = Duration::from_micros(100);

/// The image watch and whether its trouble was logged yet: one per machine, shared by all
/// its controllers, so that the trouble is logged once whoever notices it.
#[derive(Debug)]
pub struct WatchedImage {
    watch: ImageWatch,
    logged: AtomicBool,
}

impl WatchedImage {
    pub fn new(watch: ImageWatch) -> Arc<Self> {
        Arc::new(Self { watch, logged: AtomicBool::new(false) })
    }
}

/// Answers requests for one running machine; the only holder of the guest's status outside
/// the devices.
#[derive(Clone)]
pub struct Controller {
    status: StatusHandle,
    vcpu: VcpuHandle,
    persistence: Option<Arc<Mutex<PersistenceDomain>>>,
    engine: Option<Arc<Mutex<EngineStats>>>,
    image: Option<Arc<WatchedImage>>,
    /// Raises the guest's request interrupt (`nvram::control::REQUEST_IRQ`): a request is
    /// served at once, not at the guest's next timer tick.
    request_irq: Option<Arc<EventFd>>,
    started: Instant,
}

impl Controller {
    pub fn new(status: StatusHandle, vcpu: VcpuHandle) -> Self {
        Self { status, vcpu, persistence: None, engine: None, image: None, request_irq: None, started: Instant::now() }
    }

    /// Also raises `irq` (an irqfd of the request interrupt) at each request queued.
    pub fn with_request_irq(mut self, irq: Arc<EventFd>) -> Self {
        self.request_irq = Some(irq);
        self
    }

    /// Tells the guest that a request is pending. Should the interrupt fail, the guest still
    /// finds the request at its next timer tick.
    fn raise_request_irq(&self) {
        if let Some(irq) = &self.request_irq {
            if let Err(e) = irq.write(1) {
                tracing::debug!("cannot raise the request interrupt ({e}): the guest's next tick serves it");
            }
            self.vcpu.nudge();
        }
    }

    /// Also reports what the machine's persistence domain did.
    pub fn with_persistence(mut self, domain: Arc<Mutex<PersistenceDomain>>) -> Self {
        self.persistence = Some(domain);
        self
    }

    /// Also reports what the copy engine did.
    pub fn with_engine(mut self, stats: Arc<Mutex<EngineStats>>) -> Self {
        self.engine = Some(stats);
        self
    }

    /// Also watches the image file: a deleted or truncated image shows in `status`, refuses
    /// checkpoints and warns at shutdown (see the module docs).
    pub fn with_image(mut self, image: Arc<WatchedImage>) -> Self {
        self.image = Some(image);
        self
    }

    /// Answers `request`; says what to do once the answer is sent.
    pub fn handle(&self, request: &Request) -> (Response, AfterReply) {
        let response = match request {
            Request::Status => Response::Status(self.status()),
            Request::Checkpoint { timeout_ms } => match self.checkpoint_reply(*timeout_ms) {
                Ok(reply) => Response::Checkpoint(reply),
                Err(e) => e.into(),
            },
            Request::Shutdown => {
                self.vcpu.resume();
                self.request_shutdown();
                Response::Shutdown(ShutdownReply { warning: self.image_fate().map(|(_, warning)| warning) })
            }
            Request::Crash => return (Response::Done(Empty {}), AfterReply::Crash),
            Request::Pause => {
                self.pause();
                Response::State(StateReply { state: RunState::Paused })
            }
            Request::Resume => {
                self.resume();
                Response::State(StateReply { state: RunState::Running })
            }
            Request::Metrics => Response::Metrics(Box::new(self.metrics())),
        };
        (response, AfterReply::Nothing)
    }

    /// What became of the image, with its sentence, unless it is intact or unwatched; logged
    /// the first time.
    pub fn image_fate(&self) -> Option<(ImageFate, String)> {
        let image = self.image.as_ref()?;
        let fate = image.watch.fate();
        if fate == ImageFate::Intact {
            return None;
        }
        let text = image.watch.describe(fate);
        if !image.logged.swap(true, Ordering::SeqCst) {
            if fate.is_kept() {
                tracing::warn!("{text}");
            } else {
                tracing::error!("{text}");
            }
        }
        Some((fate, text))
    }

    /// A checkpoint, refused before the guest is asked when it could not be kept.
    fn checkpoint_reply(&self, timeout_ms: Option<u64>) -> Result<CheckpointReply, ApiError> {
        let timeout = checkpoint_timeout(timeout_ms)?;
        let kept = || match self.image_fate() {
            Some((fate, text)) if !fate.is_kept() => Err(ApiError::ImageLost(text)),
            other => Ok(other.map(|(_, text)| text)),
        };
        kept()?;
        let record = self.checkpoint(timeout)?;
        // The image may have gone during the write-out.
        let warning = kept()?;
        Ok(CheckpointReply { write_out: (&record).into(), warning })
    }

    /// A copy of what the guest has reported so far.
    pub fn snapshot(&self) -> MachineStatus {
        lock(&self.status).clone()
    }

    /// Looks at the device's status in place (a snapshot copies up to a thousand records).
    pub fn with_status<R>(&self, f: impl FnOnce(&MachineStatus) -> R) -> R {
        f(&lock(&self.status))
    }

    /// Whether the guest has said how it booted (so that it can shut down on request).
    pub fn has_booted(&self) -> bool {
        lock(&self.status).boot_kind.is_some()
    }

    /// Where the machine is in the write-out under way, among its persist barriers: `None`
    /// when no write-out is under way. Read after [`Controller::crash`], it places the crash.
    pub fn write_out_point(&self) -> Option<WriteOutPoint> {
        let (announced, now) = match &self.persistence {
            Some(domain) => {
                let domain = domain.lock().unwrap_or_else(|e| e.into_inner());
                (domain.wants_barriers(), domain.stats().barriers)
            }
            None => (false, 0),
        };
        let status = lock(&self.status);
        let generation = status.writing_out?;
        Some(WriteOutPoint {
            generation,
            barriers_passed: announced.then(|| now.saturating_sub(status.barriers.at_start)),
            last_write_out_barriers: status.barriers.last.filter(|_| announced),
        })
    }

    /// The write-out recorded for `vmm explore` ([`crate::Machine::record_write_out`]),
    /// once it has reported.
    pub fn write_out_record(&self) -> Option<devices::record::WriteOutRecord> {
        let domain = self.persistence.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        domain.write_out_record().cloned()
    }

    /// Stops the vCPU dead: nothing of the guest runs after this returns.
    pub fn crash(&self) {
        self.vcpu.stop();
    }

    /// Stops running guest code until [`Controller::resume`].
    pub fn pause(&self) {
        self.vcpu.pause();
    }

    pub fn resume(&self) {
        self.vcpu.resume();
    }

    /// Asks the guest for a graceful shutdown, as `shutdown` does, except that a paused
    /// machine stays paused (the guest shuts down once resumed). Never lost: later requests
    /// queue beside it.
    pub fn request_shutdown(&self) {
        lock(&self.status).pending.ask(GuestRequest::Shutdown);
        self.raise_request_irq();
    }

    pub fn status(&self) -> StatusReply {
        let (image, warning) = match (&self.image, self.image_fate()) {
            (None, _) => (None, None),
            (Some(_), None) => (Some(ImageState::Intact), None),
            (Some(_), Some((fate, text))) => (Some(fate.into()), Some(text)),
        };
        let status = lock(&self.status);
        let workloads = status
            .workloads
            .iter()
            .map(|(name, w)| {
                let reply = WorkloadReply {
                    pid: w.pid,
                    progress: w.progress,
                    checksum: format!("{:#018x}", w.checksum),
                    verified: w.last_check.into(),
                    heartbeats: w.heartbeats,
                };
                (name.clone(), reply)
            })
            .collect();
        StatusReply {
            state: if self.vcpu.is_paused() { RunState::Paused } else { RunState::Running },
            boot_kind: status.boot_kind.map(|k| <&str>::from(k).into()),
            boot_count: status.boot_count,
            committed_generation: status.committed_generation,
            rolled_back: status.of(Operation::Restore).last().map_or(0, |r| r.report.rolled_back),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            workloads,
            refused: status
                .refused
                .iter()
                .map(|r| RefusedReply { program: r.name.clone(), reason: r.error.to_string() })
                .collect(),
            image,
            warning,
        }
    }

    /// Asks the guest for a write-out and waits until it is committed (at most
    /// [`MAX_CHECKPOINT_TIMEOUT`]). A checkpoint pending already is joined; once a shutdown
    /// was asked, none is.
    pub fn checkpoint(&self, timeout: Duration) -> Result<OperationRecord, ApiError> {
        let timeout = timeout.min(MAX_CHECKPOINT_TIMEOUT);
        if self.vcpu.is_paused() {
            return Err(ApiError::Paused);
        }
        let before = {
            let mut status = lock(&self.status);
            if status.boot_kind.is_none() {
                return Err(ApiError::NotBooted);
            }
            if status.pending.ask(GuestRequest::Checkpoint) == Asked::ShuttingDown {
                return Err(ApiError::ShuttingDown);
            }
            status.count(Operation::WriteOut)
        };
        self.raise_request_irq();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(record) = lock(&self.status).nth_of(Operation::WriteOut, before) {
                return Ok(record.clone());
            }
            if Instant::now() > deadline {
                return Err(ApiError::CheckpointTimeout(timeout.as_millis()));
            }
            // Short: a write-out takes about a millisecond, and this wait is in every
            // `vmm ctl checkpoint`'s round trip.
            std::thread::sleep(CHECKPOINT_POLL);
        }
    }

    fn engine(&self) -> Option<EngineReply> {
        let stats = *self.engine.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        Some(EngineReply {
            batches: stats.batches,
            copies: stats.copies,
            bytes: stats.bytes,
            summed_only: stats.summed_only,
            rejected: stats.rejected,
            busy_ms: ms(stats.busy),
        })
    }

    fn persistence(&self) -> Option<PersistenceReply> {
        let domain = self.persistence.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        let stats = domain.stats();
        let model = match domain.model() {
            PersistenceModel::Eadr => "eadr",
            PersistenceModel::Adr => "adr",
        };
        Some(PersistenceReply {
            model: model.into(),
            barriers: stats.barriers,
            ranges: stats.ranges,
            bytes_made_durable: stats.bytes,
            write_back_alls: stats.write_back_alls,
            rejected: stats.rejected,
        })
    }

    pub fn metrics(&self) -> MetricsReply {
        let (persistence, engine) = (self.persistence(), self.engine());
        let status = lock(&self.status);
        let of = |op| status.summary(op).map_or_else(Distribution::default, Distribution::from);
        MetricsReply {
            write_outs: of(Operation::WriteOut),
            restores: of(Operation::Restore),
            restore_tails: of(Operation::RestoreTail),
            bytes_copied: status.bytes_copied(),
            last_write_out: status.of(Operation::WriteOut).last().map(Into::into),
            last_restore: status.of(Operation::Restore).last().map(Into::into),
            last_restore_tail: status.of(Operation::RestoreTail).last().map(Into::into),
            persistence,
            engine,
        }
    }
}

/// A moment inside a write-out, placed among its persist barriers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutPoint {
    /// The generation the write-out is to commit.
    pub generation: u64,
    /// The barriers of this write-out already run; `None` when the guest does not announce
    /// its barriers (eADR without sync: its stores need none).
    pub barriers_passed: Option<u64>,
    /// How many barriers the last committed write-out ran, start to report.
    pub last_write_out_barriers: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_checked_before_acting() {
        assert_eq!(checkpoint_timeout(None), Ok(CHECKPOINT_TIMEOUT));
        assert_eq!(checkpoint_timeout(Some(1)), Ok(Duration::from_millis(1)));
        assert_eq!(checkpoint_timeout(Some(60_000)), Ok(MAX_CHECKPOINT_TIMEOUT));
        assert_eq!(checkpoint_timeout(Some(0)), Err(ApiError::BadTimeout(0)));
        assert_eq!(checkpoint_timeout(Some(60_001)), Err(ApiError::BadTimeout(60_001)));
        assert_eq!(checkpoint_timeout(Some(u64::MAX)), Err(ApiError::BadTimeout(u64::MAX)));
        assert!(ApiError::BadTimeout(0).to_string().contains("timeout_ms must be 1 to 60000"));
    }
}
