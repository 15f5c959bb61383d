//! The contract between the hub and the runtimes that execute task code.
//!
//! One trait per concern, one implementation per runtime (wasm, process):
//! a [`Runtime`] prepares a task's code once at deploy time, a
//! [`PreparedTask`] hands out [`Instance`]s, and an instance runs calls.
//! A runtime knows nothing of the scheduler's queue or of HTTP: it is given
//! an admitted [`Invocation`] and returns the output or a [`Failure`].
//!
//! Instances are first-class so that long-lived, stateful instances fit
//! later without a redesign: a process worker is an instance that serves
//! many calls; `checkpoint` and `PreparedTask::restore` are where suspend,
//! checkpoint and resume-on-another-hub plug in.

use async_trait::async_trait;
use bytes::Bytes;
use roost_model::{Failure, FailureCode, RuntimeKind, TaskName, TaskSpec};
use std::sync::Arc;
use std::time::Duration;

/// Why a task could not be prepared; shown to the user as a manifest problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PrepareError(pub String);

/// Executes task code of one kind.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    fn kind(&self) -> RuntimeKind;
    /// Makes a task ready to run (compile, verify, warm up). Called while a
    /// deployment is validated, before it is applied.
    async fn prepare(&self, spec: &TaskSpec) -> Result<Arc<dyn PreparedTask>, PrepareError>;
}

/// A task whose code is loaded and ready.
#[async_trait]
pub trait PreparedTask: Send + Sync + 'static {
    fn spec(&self) -> &TaskSpec;
    /// An instance to run calls on. For wasm this is a fresh, isolated
    /// instance per call; for a process task a warm worker from its pool.
    async fn instance(&self) -> Result<Box<dyn Instance>, Failure>;
    /// Resumes an instance from a checkpoint taken by [`Instance::checkpoint`].
    async fn restore(&self, _checkpoint: Checkpoint) -> Result<Box<dyn Instance>, Failure> {
        Err(Failure::new(
            FailureCode::TaskError,
            format!(
                "the {} runtime cannot restore checkpoints",
                self.spec().runtime
            ),
        ))
    }
    /// Called when the task leaves the deployment, so pools can wind down.
    async fn retire(&self) {}
    /// The state of the task's worker pool, for runtimes that keep one.
    fn pool_stats(&self) -> Option<PoolStats> {
        None
    }
    /// The user its code runs as, when that is a task identity of its own
    /// (not the hub's).
    fn run_as_uid(&self) -> Option<u32> {
        None
    }
    /// The demand the pool has measured, for the hub to keep across
    /// restarts.
    fn demand(&self) -> Option<Demand> {
        None
    }
    /// Seeds the pool with demand measured before a restart, so it pre-warms
    /// what it needed then.
    fn resume_demand(&self, _demand: Demand) {}
}

/// Measured demand on a task: smoothed arrival rate and service time.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Demand {
    pub rate_per_s: f64,
    pub service_s: f64,
}

/// A worker pool's counters (process tasks).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PoolStats {
    /// Workers alive (idle, busy or starting).
    pub workers: u32,
    pub idle: u32,
    /// What the reservation policy currently asks for.
    pub target: u32,
    pub cold_starts: u64,
    pub warm_hits: u64,
}

/// One execution environment of a task.
#[async_trait]
pub trait Instance: Send {
    /// Runs one call to completion, within `invocation.timeout`.
    async fn invoke(&mut self, invocation: Invocation) -> Result<Bytes, Failure>;
    /// Suspends the instance and captures its state.
    async fn checkpoint(&mut self) -> Result<Checkpoint, Failure> {
        Err(Failure::new(
            FailureCode::TaskError,
            "this runtime cannot checkpoint its instances",
        ))
    }
}

/// The captured state of a suspended instance.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub task: TaskName,
    pub runtime: RuntimeKind,
    pub state: Bytes,
}

/// One admitted call, as a runtime sees it.
pub struct Invocation {
    pub call_id: String,
    pub input: Bytes,
    /// Queue wait is already excluded: the clock starts now.
    pub timeout: Duration,
    /// Extra environment for this call (for example `ROOST_TOPIC`).
    pub env: Vec<(String, String)>,
    pub context: CallContext,
}

/// What a running call may reach on the hub.
#[derive(Clone)]
pub struct CallContext {
    pub task: TaskName,
    /// 0 for a call from outside; callee depth is caller depth + 1.
    pub depth: u32,
    pub calls: Arc<dyn TaskCaller>,
    pub logs: Arc<dyn LogSink>,
}

/// Lets a running task call another task (intra-task communication) and
/// publish to the hub's MQTT broker.
#[async_trait]
pub trait TaskCaller: Send + Sync {
    async fn call(&self, from: &CallContext, task: &str, input: Bytes) -> Result<Bytes, Failure>;
    /// Publishes `payload` to `topic` (QoS 1); resolves once it is durable
    /// for every persistent session it was queued for.
    async fn publish(&self, from: &CallContext, topic: &str, payload: Bytes)
        -> Result<(), Failure>;
}

/// Receives a task's log lines (its stderr, for wasm).
pub trait LogSink: Send + Sync {
    fn line(&self, task: &TaskName, call_id: &str, line: &str);
}
