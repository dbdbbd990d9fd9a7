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

use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use devices::control::{lock, OperationRecord, StatusHandle};
use devices::engine::EngineStats;
use devices::{PersistenceDomain, PersistenceModel};
use nvram::control::{Operation, Request as GuestRequest, Verified};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::machine::VcpuHandle;

/// A request to the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Checkpoint {
        #[serde(default)]
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

/// Answers requests for one running machine.
#[derive(Clone)]
pub struct Controller {
    status: StatusHandle,
    vcpu: VcpuHandle,
    persistence: Option<Arc<Mutex<PersistenceDomain>>>,
    engine: Option<Arc<Mutex<EngineStats>>>,
    started: Instant,
}

fn ok(mut fields: Value) -> Value {
    if let Value::Object(map) = &mut fields {
        map.insert("ok".into(), Value::Bool(true));
    }
    fields
}

/// An error response.
pub fn error(message: impl Into<String>) -> Value {
    json!({ "ok": false, "error": message.into() })
}

fn verified_name(v: Verified) -> &'static str {
    match v {
        Verified::Unknown => "unknown",
        Verified::Passed => "passed",
        Verified::Failed => "failed",
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn record_json(r: &OperationRecord) -> Value {
    let phases: serde_json::Map<String, Value> =
        nvram::control::PHASES.iter().zip(r.phases).map(|(name, d)| (name.to_string(), json!(ms(d)))).collect();
    json!({
        "generation": r.report.generation,
        "plates": r.report.plates,
        "plated_bytes": r.report.plated_bytes,
        "copied_bytes": r.report.copied_bytes,
        "copier": <&str>::from(r.report.copier),
        "total_ms": ms(r.total),
        "phases_ms": phases,
    })
}

/// min, median, p99, max of durations, in ms.
fn distribution(mut durations: Vec<Duration>) -> Value {
    if durations.is_empty() {
        return json!({ "count": 0 });
    }
    durations.sort();
    let at = |q: f64| durations[((durations.len() - 1) as f64 * q).round() as usize];
    json!({
        "count": durations.len(),
        "min_ms": ms(durations[0]),
        "median_ms": ms(at(0.5)),
        "p99_ms": ms(at(0.99)),
        "max_ms": ms(durations[durations.len() - 1]),
    })
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

    fn engine_json(&self) -> Value {
        let Some(stats) = &self.engine else { return Value::Null };
        let stats = *stats.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "batches": stats.batches,
            "copies": stats.copies,
            "bytes": stats.bytes,
            "rejected": stats.rejected,
            "busy_ms": ms(stats.busy),
        })
    }

    fn persistence_json(&self) -> Value {
        let Some(domain) = &self.persistence else { return Value::Null };
        let domain = domain.lock().unwrap_or_else(|e| e.into_inner());
        let stats = domain.stats();
        json!({
            "model": match domain.model() { PersistenceModel::Eadr => "eadr", PersistenceModel::Adr => "adr" },
            "barriers": stats.barriers,
            "ranges": stats.ranges,
            "bytes_made_durable": stats.bytes,
            "write_back_alls": stats.write_back_alls,
            "rejected": stats.rejected,
        })
    }

    /// Answers `request`; says what to do once the answer is sent.
    pub fn handle(&self, request: &Request) -> (Value, AfterReply) {
        match request {
            Request::Status => (self.status(), AfterReply::Nothing),
            Request::Checkpoint { timeout_ms } => {
                let timeout = timeout_ms.map_or(CHECKPOINT_TIMEOUT, Duration::from_millis);
                (self.checkpoint(timeout), AfterReply::Nothing)
            }
            Request::Shutdown => {
                if self.vcpu.is_paused() {
                    self.vcpu.resume();
                }
                lock(&self.status).pending = Some(GuestRequest::Shutdown);
                (ok(json!({})), AfterReply::Nothing)
            }
            Request::Crash => (ok(json!({})), AfterReply::Crash),
            Request::Pause => {
                self.vcpu.pause();
                (ok(json!({ "state": "paused" })), AfterReply::Nothing)
            }
            Request::Resume => {
                self.vcpu.resume();
                (ok(json!({ "state": "running" })), AfterReply::Nothing)
            }
            Request::Metrics => (self.metrics(), AfterReply::Nothing),
        }
    }

    /// Stops the vCPU dead: nothing of the guest runs after this returns.
    pub fn crash(&self) {
        self.vcpu.stop();
    }

    /// Asks the guest for a graceful shutdown, as `shutdown` does, except that a paused
    /// machine stays paused (the guest shuts down once resumed).
    pub fn request_shutdown(&self) {
        lock(&self.status).pending = Some(GuestRequest::Shutdown);
    }

    fn status(&self) -> Value {
        let status = lock(&self.status);
        let workloads: serde_json::Map<String, Value> = status
            .workloads
            .iter()
            .map(|(name, w)| {
                let value = json!({
                    "pid": w.pid,
                    "progress": w.progress,
                    "checksum": format!("{:#018x}", w.checksum),
                    "verified": verified_name(w.last_check),
                    "heartbeats": w.heartbeats,
                });
                (name.clone(), value)
            })
            .collect();
        ok(json!({
            "state": if self.vcpu.is_paused() { "paused" } else { "running" },
            "boot_kind": status.boot_kind.map(<&str>::from),
            "boot_count": status.boot_count,
            "committed_generation": status.committed_generation,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "workloads": workloads,
        }))
    }

    fn checkpoint(&self, timeout: Duration) -> Value {
        if self.vcpu.is_paused() {
            return error("the machine is paused: resume it first");
        }
        let before = {
            let mut status = lock(&self.status);
            if status.boot_kind.is_none() {
                return error("the guest has not booted (or has no machine-control driver)");
            }
            status.pending = Some(GuestRequest::Checkpoint);
            status.of(Operation::WriteOut).count()
        };
        let deadline = Instant::now() + timeout;
        loop {
            let committed = lock(&self.status).of(Operation::WriteOut).nth(before).map(record_json);
            if let Some(record) = committed {
                return ok(json!({ "write_out": record }));
            }
            if Instant::now() > deadline {
                return error(format!(
                    "no write-out committed within {} ms (is the plate function off?)",
                    timeout.as_millis()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn metrics(&self) -> Value {
        let status = lock(&self.status);
        let of = |op| status.of(op).map(|r| r.total).collect::<Vec<_>>();
        let copied: u64 = status.operations.iter().map(|r| r.report.copied_bytes).sum();
        ok(json!({
            "write_outs": distribution(of(Operation::WriteOut)),
            "restores": distribution(of(Operation::Restore)),
            "bytes_copied": copied,
            "last_write_out": status.of(Operation::WriteOut).last().map(record_json),
            "last_restore": status.of(Operation::Restore).last().map(record_json),
            "persistence": self.persistence_json(),
            "engine": self.engine_json(),
        }))
    }
}

/// Parses one request line; the error says what is wrong, for the error reply.
pub fn parse(line: &str) -> Result<Request, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    let object = value.as_object().ok_or("bad request: a request is a JSON object, as {\"cmd\":\"status\"}")?;
    // serde does not reject unknown fields of an internally tagged enum: check them here.
    let is_checkpoint = object.get("cmd").and_then(Value::as_str) == Some("checkpoint");
    if let Some(key) = object.keys().find(|k| *k != "cmd" && !(is_checkpoint && *k == "timeout_ms")) {
        return Err(format!("bad request: unknown field `{key}`"));
    }
    serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))
}

#[cfg(test)]
mod tests {
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
    fn random_input_never_panics_the_parser() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let alphabet = br#"{}[]":,cmdstatuheckpoin0123456789 \u"#;
        for _ in 0..50_000 {
            let len = (state % 40) as usize;
            let line: String = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize] as char
                })
                .collect();
            let _ = parse(&line);
        }
    }

    #[test]
    fn distributions_have_the_quantiles() {
        let d = distribution((1..=100).map(Duration::from_millis).collect());
        assert_eq!(d["count"], 100);
        assert_eq!(d["min_ms"], 1.0);
        assert_eq!(d["median_ms"], 51.0);
        assert_eq!(d["p99_ms"], 99.0);
        assert_eq!(d["max_ms"], 100.0);
        assert_eq!(distribution(Vec::new())["count"], 0);
    }
}
