//! The one control interface of a running machine: a request, its response. The control
//! socket, the CLI's signal handling, tests and benches all go through [`Controller`].
//!
//! Requests and responses are JSON objects, one per line on the socket:
//!
//! | request | response (besides `"ok": true`) |
//! |---|---|
//! | `{"cmd":"status"}` | `state` (`running`, `paused`), `boot_kind` (`cold`, `resumed`, `restored`, or null before the guest said), `committed_generation`, `uptime_ms`, `workloads` (name to `progress`, `checksum`, `verified`) |
//! | `{"cmd":"checkpoint","timeout_ms":5000}` | the write-out's figures, once it is committed |
//! | `{"cmd":"shutdown"}` | `{}`; the VMM exits 0 once the guest has powered off |
//! | `{"cmd":"crash"}` | `{}`; the VMM then exits at once (a power failure) |
//! | `{"cmd":"pause"}`, `{"cmd":"resume"}` | `state` |
//! | `{"cmd":"metrics"}` | count, min, median, p99, max (ms) of write-outs and restores; bytes copied; `persistence` (model, persist barriers and bytes made durable); `engine` (batches, copies, bytes, host time) |
//!
//! An error is `{"ok":false,"error":"..."}`.
//!
//! Each reply is a typed struct ([`StatusReply`], [`CheckpointReply`], ...) and a
//! [`Response`] serializes as the reply's fields beside `ok`: `vmm ctl` reads the same types
//! back, so the two ends of the socket cannot drift apart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::control::{lock, MachineStatus, OperationRecord, StatusHandle};
use devices::engine::EngineStats;
use devices::{PersistenceDomain, PersistenceModel};
use nvram::control::{Operation, Request as GuestRequest, Verified};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::quantile::Summary;
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

/// Why a request was refused: the `error` of an error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("bad request: unknown field `{0}`")]
    UnknownField(String),
    #[error("request longer than {0} bytes; closing")]
    TooLong(usize),
    #[error("the machine is paused: resume it first")]
    Paused,
    #[error("the guest has not booted (or has no machine-control driver)")]
    NotBooted,
    #[error("no write-out committed within {0} ms (is the plate function off?)")]
    CheckpointTimeout(u128),
}

/// Whether the vCPU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

/// The result of a workload's last whole verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifiedReply {
    Unknown,
    Passed,
    Failed,
}

impl From<Verified> for VerifiedReply {
    fn from(v: Verified) -> Self {
        match v {
            Verified::Unknown => Self::Unknown,
            Verified::Passed => Self::Passed,
            Verified::Failed => Self::Failed,
        }
    }
}

/// A workload's last report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadReply {
    pub pid: u32,
    pub progress: u64,
    /// `0x` and 16 hex digits.
    pub checksum: String,
    pub verified: VerifiedReply,
    pub heartbeats: u64,
}

/// The reply to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub state: RunState,
    /// `cold`, `resumed`, `restored`, or none before the guest said.
    pub boot_kind: Option<String>,
    pub boot_count: u64,
    pub committed_generation: u64,
    pub uptime_ms: u64,
    pub workloads: BTreeMap<String, WorkloadReply>,
}

/// One write-out or restore, as the guest measured it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationReply {
    pub generation: u64,
    pub plates: u64,
    pub plated_bytes: u64,
    pub copied_bytes: u64,
    pub copier: String,
    pub total_ms: f64,
    pub phases_ms: BTreeMap<String, f64>,
}

impl From<&OperationRecord> for OperationReply {
    fn from(r: &OperationRecord) -> Self {
        Self {
            generation: r.report.generation,
            plates: u64::from(r.report.plates),
            plated_bytes: r.report.plated_bytes,
            copied_bytes: r.report.copied_bytes,
            copier: <&str>::from(r.report.copier).into(),
            total_ms: ms(r.total),
            phases_ms: nvram::control::PHASES.iter().zip(r.phases).map(|(name, d)| (name.to_string(), ms(d))).collect(),
        }
    }
}

/// The reply to `checkpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointReply {
    pub write_out: OperationReply,
}

/// The reply to `pause` and `resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateReply {
    pub state: RunState,
}

/// Count and quantiles of durations, in ms; only the count when there are none.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Distribution {
    pub count: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub median_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<f64>,
}

impl Distribution {
    pub fn of(durations: Vec<Duration>) -> Self {
        match Summary::of(durations) {
            None => Self::default(),
            Some(s) => Self {
                count: s.count,
                min_ms: Some(ms(s.min)),
                median_ms: Some(ms(s.median)),
                p99_ms: Some(ms(s.p99)),
                max_ms: Some(ms(s.max)),
            },
        }
    }
}

/// The device's running aggregates (`devices::control::stats`), not a sort of the history.
impl From<devices::control::DurationSummary> for Distribution {
    fn from(s: devices::control::DurationSummary) -> Self {
        Self {
            count: s.count as usize,
            min_ms: Some(ms(s.min)),
            median_ms: Some(ms(s.median)),
            p99_ms: Some(ms(s.p99)),
            max_ms: Some(ms(s.max)),
        }
    }
}

/// What the persistence domain did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistenceReply {
    /// `eadr` or `adr`.
    pub model: String,
    pub barriers: u64,
    pub ranges: u64,
    pub bytes_made_durable: u64,
    pub write_back_alls: u64,
    pub rejected: u64,
}

/// What the copy engine did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineReply {
    pub batches: u64,
    pub copies: u64,
    pub bytes: u64,
    pub rejected: u64,
    pub busy_ms: f64,
}

/// The reply to `metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReply {
    pub write_outs: Distribution,
    pub restores: Distribution,
    pub bytes_copied: u64,
    pub last_write_out: Option<OperationReply>,
    pub last_restore: Option<OperationReply>,
    pub persistence: Option<PersistenceReply>,
    pub engine: Option<EngineReply>,
}

/// The reply to `shutdown` and `crash`: nothing but `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Empty {}

/// A response: on the wire, the reply's fields and `"ok": true`, or `"ok": false` and
/// `error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Status(StatusReply),
    Checkpoint(CheckpointReply),
    Done(Empty),
    State(StateReply),
    Metrics(Box<MetricsReply>),
    Error(String),
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Self {
        Self::Error(e.to_string())
    }
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Ok<'a, T> {
            ok: bool,
            #[serde(flatten)]
            reply: &'a T,
        }
        #[derive(Serialize)]
        struct Refused<'a> {
            ok: bool,
            error: &'a str,
        }
        match self {
            Self::Status(reply) => Ok { ok: true, reply }.serialize(serializer),
            Self::Checkpoint(reply) => Ok { ok: true, reply }.serialize(serializer),
            Self::Done(reply) => Ok { ok: true, reply }.serialize(serializer),
            Self::State(reply) => Ok { ok: true, reply }.serialize(serializer),
            Self::Metrics(reply) => Ok { ok: true, reply }.serialize(serializer),
            Self::Error(error) => Refused { ok: false, error }.serialize(serializer),
        }
    }
}

impl Response {
    pub fn is_ok(&self) -> bool {
        !matches!(self, Self::Error(_))
    }

    /// The response as one line of JSON.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
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
    started: Instant,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Controller {
    pub fn new(status: StatusHandle, vcpu: VcpuHandle) -> Self {
        Self { status, vcpu, persistence: None, engine: None, started: Instant::now() }
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

    /// Answers `request`; says what to do once the answer is sent.
    pub fn handle(&self, request: &Request) -> (Response, AfterReply) {
        let response = match request {
            Request::Status => Response::Status(self.status()),
            Request::Checkpoint { timeout_ms } => {
                let timeout = timeout_ms.map_or(CHECKPOINT_TIMEOUT, Duration::from_millis);
                match self.checkpoint(timeout) {
                    Ok(record) => Response::Checkpoint(CheckpointReply { write_out: (&record).into() }),
                    Err(e) => e.into(),
                }
            }
            Request::Shutdown => {
                self.vcpu.resume();
                self.request_shutdown();
                Response::Done(Empty {})
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

    /// A copy of what the guest has reported so far.
    pub fn snapshot(&self) -> MachineStatus {
        lock(&self.status).clone()
    }

    /// Whether the guest has said how it booted (so that it can shut down on request).
    pub fn has_booted(&self) -> bool {
        lock(&self.status).boot_kind.is_some()
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
    /// machine stays paused (the guest shuts down once resumed).
    pub fn request_shutdown(&self) {
        lock(&self.status).pending = Some(GuestRequest::Shutdown);
    }

    pub fn status(&self) -> StatusReply {
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
            uptime_ms: self.started.elapsed().as_millis() as u64,
            workloads,
        }
    }

    /// Asks the guest for a write-out and waits until it is committed.
    pub fn checkpoint(&self, timeout: Duration) -> Result<OperationRecord, ApiError> {
        if self.vcpu.is_paused() {
            return Err(ApiError::Paused);
        }
        let before = {
            let mut status = lock(&self.status);
            if status.boot_kind.is_none() {
                return Err(ApiError::NotBooted);
            }
            status.pending = Some(GuestRequest::Checkpoint);
            status.count(Operation::WriteOut)
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(record) = lock(&self.status).nth_of(Operation::WriteOut, before) {
                return Ok(record.clone());
            }
            if Instant::now() > deadline {
                return Err(ApiError::CheckpointTimeout(timeout.as_millis()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn engine(&self) -> Option<EngineReply> {
        let stats = *self.engine.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        Some(EngineReply {
            batches: stats.batches,
            copies: stats.copies,
            bytes: stats.bytes,
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
            bytes_copied: status.bytes_copied(),
            last_write_out: status.of(Operation::WriteOut).last().map(Into::into),
            last_restore: status.of(Operation::Restore).last().map(Into::into),
            persistence,
            engine,
        }
    }
}

/// Parses one request line; the error says what is wrong, for the error reply.
pub fn parse(line: &str) -> Result<Request, ApiError> {
    let bad = |e: serde_json::Error| ApiError::BadRequest(e.to_string());
    let value: Value = serde_json::from_str(line).map_err(bad)?;
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::BadRequest("a request is a JSON object, as {\"cmd\":\"status\"}".into()))?;
    // serde does not reject unknown fields of an internally tagged enum: check them here.
    let is_checkpoint = object.get("cmd").and_then(Value::as_str) == Some("checkpoint");
    if let Some(key) = object.keys().find(|k| *k != "cmd" && !(is_checkpoint && *k == "timeout_ms")) {
        return Err(ApiError::UnknownField(key.clone()));
    }
    serde_json::from_value(value).map_err(bad)
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(parse(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(parse(r#"{"cmd":"checkpoint"}"#), Ok(Request::Checkpoint { timeout_ms: None }));
        assert_eq!(parse(r#"{"cmd":"checkpoint","timeout_ms":50}"#), Ok(Request::Checkpoint { timeout_ms: Some(50) }));
        for bad in
            ["", "{", "null", "[]", r#"{"cmd":"fly"}"#, r#"{"cmd":"status","x":1}"#, r#"{"cmd":7}"#, "\u{0}\u{ff}"]
        {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serialized_requests_parse_back() {
        for request in
            [Request::Status, Request::Checkpoint { timeout_ms: Some(7) }, Request::Checkpoint { timeout_ms: None }]
        {
            let line = serde_json::to_string(&request).unwrap();
            assert_eq!(parse(&line), Ok(request), "{line}");
        }
        assert_eq!(serde_json::to_string(&Request::Pause).unwrap(), r#"{"cmd":"pause"}"#);
    }

    #[test]
    fn random_input_never_panics_the_parser() {
        let mut rng = SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let alphabet = br#"{}[]":,cmdstatuheckpoin0123456789 \u"#;
        for _ in 0..50_000 {
            let len = rng.random_range(0..40);
            let line: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())] as char).collect();
            let _ = parse(&line);
        }
    }

    #[test]
    fn distributions_have_the_quantiles() {
        let d = Distribution::of((1..=100).map(Duration::from_millis).collect());
        let d = serde_json::to_value(d).unwrap();
        assert_eq!(d["count"], 100);
        assert_eq!(d["min_ms"], 1.0);
        assert_eq!(d["median_ms"], 51.0);
        assert_eq!(d["p99_ms"], 99.0);
        assert_eq!(d["max_ms"], 100.0);
        assert_eq!(serde_json::to_value(Distribution::of(Vec::new())).unwrap(), serde_json::json!({ "count": 0 }));
    }

    #[test]
    fn responses_carry_ok_beside_their_fields() {
        let state = Response::State(StateReply { state: RunState::Paused });
        assert_eq!(serde_json::to_value(&state).unwrap(), serde_json::json!({ "ok": true, "state": "paused" }));
        assert_eq!(serde_json::to_value(Response::Done(Empty {})).unwrap(), serde_json::json!({ "ok": true }));
        let refused = Response::from(ApiError::Paused);
        assert!(!refused.is_ok());
        assert_eq!(
            serde_json::to_value(&refused).unwrap(),
            serde_json::json!({ "ok": false, "error": "the machine is paused: resume it first" })
        );
    }
}
