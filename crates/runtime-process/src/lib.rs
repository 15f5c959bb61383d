//! The process runtime: any executable that speaks the AWS Lambda Runtime
//! API runs as a task (unmodified `awslambdaric` handlers, a `bootstrap`
//! shell script with curl, ...).
//!
//! Each task has a pool of long-lived worker processes. A call leases a warm
//! worker (or starts one: a cold start, whose start-up does not count toward
//! the call's timeout), hands it the call through the worker's own Runtime
//! API endpoint, and returns it to the pool afterwards. Workers run in their
//! own process group with their own memory limit (see `isolation`), die with
//! the hub, and are replaced when they crash, overrun or exceed memory.
//!
//! The pool is sized by a reservation policy from anticipated demand (see
//! [`pool::target_workers`]), within the task's `min_warm`/`max_workers`.

mod isolation;
pub mod pool;
mod worker;

pub use isolation::Isolation;

use async_trait::async_trait;
use bytes::Bytes;
use roost_model::{Failure, FailureCode, RuntimeKind, TaskCode, TaskSpec};
use roost_runtime::{
    Instance, Invocation, LogSink, PoolStats, PrepareError, PreparedTask, Runtime,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct ProcessConfig {
    /// Identifies this hub's workers and cgroups (derived from the data dir).
    pub hub_id: String,
    /// The region the Lambda environment reports (`AWS_REGION`).
    pub region: String,
}

pub struct ProcessRuntime {
    config: ProcessConfig,
    isolation: Isolation,
    logs: Arc<dyn LogSink>,
}

impl ProcessRuntime {
    /// Detects how worker limits can be enforced and sweeps up whatever an
    /// earlier run of this hub left behind.
    pub fn new(config: ProcessConfig, logs: Arc<dyn LogSink>) -> Self {
        let isolation = Isolation::detect(&config.hub_id);
        let swept = isolation.sweep();
        isolation.tidy_others();
        tracing::info!(limits = isolation.describe(), "process runtime ready");
        if swept > 0 {
            tracing::warn!(
                processes = swept,
                "killed workers left behind by an earlier run of this hub"
            );
        }
        Self {
            config,
            isolation,
            logs,
        }
    }

    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }
}

/// Finds `command[0]`: absolute, relative to the task folder (`./bootstrap`),
/// or on the hub's PATH.
fn resolve_command(cmd: &str, dir: &Path) -> Option<PathBuf> {
    let p = Path::new(cmd);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_owned());
    }
    if cmd.contains('/') {
        let full = dir.join(p);
        return full.is_file().then_some(full);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|f| f.is_file())
    })
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    async fn prepare(&self, spec: &TaskSpec) -> Result<Arc<dyn PreparedTask>, PrepareError> {
        let TaskCode::Process {
            dir,
            command,
            handler,
            min_warm,
            max_workers,
        } = &spec.code
        else {
            return Err(PrepareError("not a process task".into()));
        };
        let Some(program) = resolve_command(&command[0], dir) else {
            return Err(PrepareError(format!(
                "command {:?} was not found (give an absolute path, ./name in the task folder, or a program on the hub's PATH)",
                command[0]
            )));
        };
        let mut command = command.clone();
        command[0] = program.display().to_string();
        let wspec = worker::WorkerSpec {
            task: spec.name.clone(),
            dir: dir.clone(),
            command,
            handler: handler.clone(),
            env: spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            memory_mb: spec.limits.memory_mb,
            region: self.config.region.clone(),
            version: "$LATEST".into(),
        };
        let pool = pool::Pool::new(
            spec.clone(),
            wspec,
            self.isolation.clone(),
            self.logs.clone(),
            self.config.hub_id.clone(),
            *min_warm,
            *max_workers,
        );
        // Pre-warm now, so a command that fails at start fails the deployment.
        pool.prewarm(*min_warm)
            .await
            .map_err(|f| PrepareError(f.message))?;
        pool.start_policy();
        Ok(Arc::new(ProcessTask {
            spec: spec.clone(),
            pool,
        }))
    }
}

pub struct ProcessTask {
    spec: TaskSpec,
    pool: Arc<pool::Pool>,
}

#[async_trait]
impl PreparedTask for ProcessTask {
    fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    async fn instance(&self) -> Result<Box<dyn Instance>, Failure> {
        Ok(Box::new(self.pool.lease().await?))
    }

    async fn retire(&self) {
        self.pool.retire();
    }

    fn pool_stats(&self) -> Option<PoolStats> {
        Some(self.pool.stats())
    }
}

#[async_trait]
impl Instance for pool::Lease {
    async fn invoke(&mut self, inv: Invocation) -> Result<Bytes, Failure> {
        let client_context = inv
            .env
            .iter()
            .find(|(k, _)| k == "ROOST_TOPIC")
            .map(|(_, topic)| serde_json::json!({ "custom": { "topic": topic } }).to_string());
        let Some(worker) = self.worker.as_mut() else {
            return Err(Failure::new(FailureCode::Crashed, "no worker"));
        };
        let started = std::time::Instant::now();
        let r = worker
            .invoke(
                inv.call_id,
                inv.input,
                inv.timeout,
                client_context,
                self.memory_mb,
            )
            .await;
        self.service = Some(started.elapsed());
        r
    }
}
