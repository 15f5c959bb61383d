//! The shared vocabulary of Roost: the typed values every other crate passes
//! around (task names, limits, call ids, error codes). Parsing happens at the
//! edge; once a value has one of these types it is known to be valid.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A task's name: `[a-z0-9][a-z0-9-]{0,62}`, so it is safe in URLs, file
/// names, metric labels and log lines without escaping.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TaskName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid task name {0:?}: use 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit")]
pub struct InvalidTaskName(pub String);

impl TaskName {
    pub fn parse(s: &str) -> Result<Self, InvalidTaskName> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidTaskName(s.to_owned()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TaskName {
    type Err = InvalidTaskName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for TaskName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which runtime executes a task's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Wasm,
    Process,
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuntimeKind::Wasm => "wasm",
            RuntimeKind::Process => "process",
        })
    }
}

/// The limits a task runs under; admission reserves `memory_mb` per running call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_mb: u32,
    pub timeout_ms: u64,
    pub concurrency: u32,
    pub priority: i32,
}

impl Limits {
    pub const MAX_MEMORY_MB: u32 = 4096;
    pub const MAX_TIMEOUT_MS: u64 = 15 * 60 * 1000;
    pub const MAX_CONCURRENCY: u32 = 1024;
    pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;
}

/// The id of a call: 32 lowercase hex digits (128 random bits).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CallId(String);

impl CallId {
    pub fn from_bytes(b: [u8; 16]) -> Self {
        let mut s = String::with_capacity(32);
        for x in b {
            s.push_str(&format!("{x:02x}"));
        }
        Self(s)
    }
    /// Accepts only the shape the hub hands out, so an id is safe anywhere.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 32
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
        .then(|| Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a call failed, as users see it: the `code` in an error body and the
/// `outcome` label in metrics. Each code maps to one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The task ran and reported failure (trap, non-zero exit, handler error).
    TaskError,
    /// The task tried to use more memory than its `memory_mb`.
    MemoryLimit,
    /// The task ran longer than its `timeout_ms`.
    Timeout,
    /// The task's worker or instance died in a way the task did not report.
    Crashed,
    /// The task is no longer deployed (an async call outlived its deployment).
    UnknownTask,
    /// Calls nested deeper than the hub allows.
    CallDepth,
    /// The hub was shutting down and could not run the call.
    Unavailable,
    /// The task asked for something its manifest `allow` does not grant.
    Forbidden,
}

impl FailureCode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::TaskError => "task_error",
            FailureCode::MemoryLimit => "memory_limit",
            FailureCode::Timeout => "timeout",
            FailureCode::Crashed => "crashed",
            FailureCode::UnknownTask => "unknown_task",
            FailureCode::CallDepth => "call_depth",
            FailureCode::Unavailable => "unavailable",
            FailureCode::Forbidden => "forbidden",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "task_error" => FailureCode::TaskError,
            "memory_limit" => FailureCode::MemoryLimit,
            "timeout" => FailureCode::Timeout,
            "crashed" => FailureCode::Crashed,
            "unknown_task" => FailureCode::UnknownTask,
            "call_depth" => FailureCode::CallDepth,
            "unavailable" => FailureCode::Unavailable,
            "forbidden" => FailureCode::Forbidden,
            _ => return None,
        })
    }
    /// The HTTP status the communications API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            FailureCode::Timeout => 504,
            FailureCode::UnknownTask => 404,
            FailureCode::CallDepth => 508,
            FailureCode::Unavailable => 503,
            FailureCode::Forbidden => 403,
            _ => 502,
        }
    }
}

impl fmt::Display for FailureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The call variable that carries a Lambda Invoke's ClientContext (JSON)
/// to a process task's `context.client_context`.
pub const CLIENT_CONTEXT_VAR: &str = "ROOST_CLIENT_CONTEXT";

/// A failed call: its code and a message for a human.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Failure {
    pub code: FailureCode,
    pub message: String,
    /// The task's own error document, when it reported one (a Lambda
    /// handler's `{"errorMessage", "errorType", "stackTrace"}`), passed on
    /// whole where the caller's protocol carries it (Lambda `Invoke`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Failure {
    pub fn new(code: FailureCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Where a call is in its life, as `GET /v1/calls/{id}` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl CallStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Queued => "queued",
            CallStatus::Running => "running",
            CallStatus::Succeeded => "succeeded",
            CallStatus::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => CallStatus::Queued,
            "running" => CallStatus::Running,
            "succeeded" => CallStatus::Succeeded,
            "failed" => CallStatus::Failed,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_follow_the_manifest_grammar() {
        for ok in ["echo", "a", "0-x", "py-hello", &"a".repeat(63)] {
            assert!(TaskName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "A",
            "a_b",
            "a/b",
            "../x",
            "a b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(TaskName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn call_ids_accept_only_their_own_shape() {
        let id = CallId::from_bytes([0xab; 16]);
        assert_eq!(CallId::parse(id.as_str()), Some(id));
        assert!(CallId::parse("../../etc/passwd").is_none());
        assert!(CallId::parse(&"A".repeat(32)).is_none());
    }

    #[test]
    fn failure_codes_round_trip() {
        for c in [
            FailureCode::TaskError,
            FailureCode::MemoryLimit,
            FailureCode::Timeout,
            FailureCode::Crashed,
            FailureCode::UnknownTask,
            FailureCode::CallDepth,
            FailureCode::Unavailable,
            FailureCode::Forbidden,
        ] {
            assert_eq!(FailureCode::parse(c.as_str()), Some(c));
        }
    }
}

pub mod task;
pub use task::{
    Access, DeviceSpec, Grants, HealthCheck, Resource, RouteDestination, RouteSource, RouteSpec,
    SecretSpec, TaskCode, TaskSpec,
};

/// Whom a signed request to the hub's local AWS APIs comes from: the hub
/// finds it (by access key), the local services judge what it may do. Here
/// because both sides name it and neither owns the other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The hub's owner (`DATA_DIR/aws-credentials`): every right.
    Owner,
    /// A task, with the rights its manifest `allow` grants.
    Task(TaskName, Grants),
}

impl Principal {
    /// How logs and errors name the caller.
    pub fn describe(&self) -> String {
        match self {
            Principal::Owner => "the hub's owner".into(),
            Principal::Task(t, _) => format!("task {t}"),
        }
    }
}
