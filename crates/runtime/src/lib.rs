//! The contract between the hub and the runtimes that execute task code.
//!
//! One trait per concern, one implementation per runtime (wasm, process):
//! a [`Runtime`] prepares a task's code once at deploy time, a
//! [`PreparedTask`] hands out [`Instance`]s, and an instance runs calls.
//! A runtime knows nothing of the scheduler's queue or of HTTP: it is given
//! an admitted [`Invocation`] and returns the output or a [`Failure`].
//!
//! What only some runtimes have is asked for, not assumed: a task's
//! [`WorkerPool`] (process tasks keep warm workers) and a runtime's
//! [`TaskIdentities`] (process tasks may run under users of their own).
//! The hub holds every runtime as `Arc<dyn Runtime>` and names none of
//! them; the binary builds them.
//!
//! Instances are first-class so that long-lived, stateful instances fit
//! later without a redesign: a process worker is an instance that serves
//! many calls.

use async_trait::async_trait;
use bytes::Bytes;
use roost_model::{CallId, Failure, RuntimeKind, TaskName, TaskSpec};
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
    /// Called once a deployment is applied, with every task now deployed
    /// (of every runtime): drops what only departed tasks used, such as the
    /// wasm runtime's compiled modules in memory.
    fn retain_only(&self, _live: &[&TaskSpec]) {}
    /// The users of their own this runtime runs tasks as, when it does
    /// (then the hub asks who a local connection to its API belongs to).
    fn task_identities(&self) -> Option<&dyn TaskIdentities> {
        None
    }
}

/// Task identities: the users of their own a runtime runs task code as.
pub trait TaskIdentities: Send + Sync {
    /// Whether `uid` is one a task identity can have, whether or not a
    /// deployed task has it (a retired task's worker may still call).
    fn is_task_uid(&self, uid: u32) -> bool;
}

/// A task whose code is loaded and ready.
#[async_trait]
pub trait PreparedTask: Send + Sync + 'static {
    fn spec(&self) -> &TaskSpec;
    /// An instance to run calls on. For wasm this is a fresh, isolated
    /// instance per call; for a process task a warm worker from its pool.
    async fn instance(&self) -> Result<Box<dyn Instance>, Failure>;
    /// Called when the task leaves the deployment, so pools can wind down.
    async fn retire(&self) {}
    /// The task's pool of warm workers, for runtimes that keep one.
    fn pool(&self) -> Option<&dyn WorkerPool> {
        None
    }
    /// The user its code runs as, when that is a task identity of its own
    /// (not the hub's).
    fn run_as_uid(&self) -> Option<u32> {
        None
    }
}

/// A task's pool of long-lived workers, sized by the demand it measures.
pub trait WorkerPool: Send + Sync {
    /// The pool's counters, for metrics and `roost tasks`.
    fn stats(&self) -> PoolStats;
    /// The demand the pool has measured, for the hub to keep across
    /// restarts.
    fn demand(&self) -> Demand;
    /// Seeds the pool with demand measured before a restart, so it pre-warms
    /// what it needed then.
    fn resume_demand(&self, demand: Demand);
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
}

/// One admitted call, as a runtime sees it.
pub struct Invocation {
    pub call_id: CallId,
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
