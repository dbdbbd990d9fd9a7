//! The typed replies of the control interface, and [`Response`], which puts a reply's fields
//! beside `ok` on the wire.

use std::collections::BTreeMap;
use std::time::Duration;

use devices::control::OperationRecord;
use nvram::control::Verified;
use serde::{Deserialize, Serialize, Serializer};

use super::ApiError;
use crate::image::ImageFate;
use crate::quantile::Summary;

pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
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

/// A program the guest did not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedReply {
    pub program: String,
    /// Why, in words.
    pub reason: String,
}

/// The reply to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub state: RunState,
    /// `cold`, `resumed`, `restored`, or none before the guest said.
    pub boot_kind: Option<String>,
    pub boot_count: u64,
    pub committed_generation: u64,
    /// This boot's restore went back this many generations behind the one the root header
    /// records (a damaged commit was passed over); absent when it did not.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rolled_back: u32,
    pub uptime_ms: u64,
    pub workloads: BTreeMap<String, WorkloadReply>,
    /// The user programs the guest refused to start this boot, and why (the first
    /// `devices::control::MAX_REFUSED`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<RefusedReply>,
    /// What became of the image file; none when the controller does not watch it.
    #[serde(default)]
    pub image: Option<ImageState>,
    /// Set when the image is not intact: what that means for the guest's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The image file as the VMM finds it ([`crate::image::ImageFate`] without its figures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    Intact,
    Deleted,
    Truncated,
    Moved,
}

impl From<ImageFate> for ImageState {
    fn from(fate: ImageFate) -> Self {
        match fate {
            ImageFate::Intact => Self::Intact,
            ImageFate::Deleted => Self::Deleted,
            ImageFate::Truncated { .. } => Self::Truncated,
            ImageFate::Moved => Self::Moved,
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One write-out or restore, as the guest measured it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationReply {
    pub generation: u64,
    pub plates: u64,
    pub plated_bytes: u64,
    pub copied_bytes: u64,
    pub copier: String,
    /// A restore that went back behind the generation the root header records: by how
    /// many generations (the newer commit was found damaged).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rolled_back: u32,
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
            rolled_back: r.report.rolled_back,
            total_ms: ms(r.total),
            phases_ms: nvram::control::PHASES.iter().zip(r.phases).map(|(name, d)| (name.to_string(), ms(d))).collect(),
        }
    }
}

/// The reply to `checkpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointReply {
    pub write_out: OperationReply,
    /// Set when the image was moved or replaced: the state is kept, but not at its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The reply to `shutdown`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShutdownReply {
    /// Set when the image is not intact: the shutdown goes on, but does not keep the state
    /// where the next boot looks for it (or at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
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
                count: s.count as usize,
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
    /// Bytes only summed, not copied (the restore's check of the save areas).
    #[serde(default)]
    pub summed_only: u64,
    pub rejected: u64,
    pub busy_ms: f64,
}

/// The reply to `metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReply {
    pub write_outs: Distribution,
    pub restores: Distribution,
    /// Lazy restores' ends (every page back), timed from their restore's start.
    #[serde(default)]
    pub restore_tails: Distribution,
    pub bytes_copied: u64,
    pub last_write_out: Option<OperationReply>,
    pub last_restore: Option<OperationReply>,
    #[serde(default)]
    pub last_restore_tail: Option<OperationReply>,
    pub persistence: Option<PersistenceReply>,
    pub engine: Option<EngineReply>,
}

/// The reply to `crash`: nothing but `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Empty {}

/// A response: on the wire, the reply's fields and `"ok": true`, or `"ok": false` and
/// `error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Status(StatusReply),
    Checkpoint(CheckpointReply),
    Shutdown(ShutdownReply),
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
            Self::Shutdown(reply) => Ok { ok: true, reply }.serialize(serializer),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let warned = Response::Shutdown(ShutdownReply { warning: Some("gone".into()) });
        assert_eq!(serde_json::to_value(&warned).unwrap(), serde_json::json!({ "ok": true, "warning": "gone" }));
        let refused = Response::from(ApiError::Paused);
        assert!(!refused.is_ok());
        assert_eq!(
            serde_json::to_value(&refused).unwrap(),
            serde_json::json!({ "ok": false, "error": "the machine is paused: resume it first" })
        );
    }
}
