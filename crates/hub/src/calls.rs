//! Calls: synchronous (the caller waits), asynchronous (durable, retried,
//! at least once) and nested (a running task calling another task).
//!
//! Every call from outside goes through the scheduler. A nested call runs
//! on its caller's reservation instead: the caller is already admitted and
//! blocked waiting for the callee, so making the callee queue behind it could
//! deadlock a full hub. Nesting depth is bounded by [`MAX_CALL_DEPTH`].

use crate::{Hub, HubInner, MAX_CALL_DEPTH};
use async_trait::async_trait;
use bytes::Bytes;
use rand::RngCore;
use roost_model::{CallId, CallStatus, Failure, FailureCode, Limits, TaskName};
use roost_runtime::{CallContext, Invocation, PreparedTask, TaskCaller};
use roost_scheduler::{Demand, InputHold, Rejected, Share, Ticket};
use roost_store::{NewCall, StoreError};
use serde::Serialize;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no task named {0:?} is deployed (see `roost tasks`)")]
    UnknownTask(String),
    #[error("no call with id {0:?} is known (finished calls are kept for the retention period)")]
    UnknownCall(String),
    #[error("the input is {size} bytes; the limit is {limit} bytes")]
    InputTooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Rejected(Rejected),
    #[error("the call is not finished yet (status {0})")]
    NotFinished(&'static str),
    #[error(transparent)]
    Failed(Failure),
    #[error("the hub's store failed: {0}")]
    Store(#[from] StoreError),
}

/// A call as `GET /v1/calls/{id}` shows it.
#[derive(Debug, Serialize)]
pub struct CallView {
    pub id: String,
    pub task: String,
    pub status: CallStatus,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorView>,
    pub created_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct ErrorView {
    pub code: FailureCode,
    pub message: String,
}

/// A deployed task as `GET /v1/tasks` shows it.
#[derive(Debug, Serialize)]
pub struct TaskView {
    pub name: String,
    pub runtime: String,
    #[serde(flatten)]
    pub limits: Limits,
    pub queued: usize,
    pub running: u32,
    pub succeeded: u64,
    pub failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<roost_runtime::PoolStats>,
    /// The uid (and gid, the same number) a process task's workers run as,
    /// when task identities are on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

/// Which edge a call came through (the `mode` metric label).
#[derive(Clone, Copy)]
enum Mode {
    Sync,
    Async,
    Nested,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
            Mode::Nested => "nested",
        }
    }
}

pub fn new_call_id() -> CallId {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    CallId::from_bytes(b)
}

/// Who asked for a call: whose share of the queue its place is charged to
/// (see `roost_scheduler::Share`), so a noisy caller fills its own part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The owner, or anyone outside the hub: the called task's share.
    Outside,
    /// A task calling on `/v1` or through Lambda `Invoke`: its own share.
    Task(TaskName),
    /// A route delivering a message: that route's share (its place in the
    /// deployment's route table).
    Route(u32),
}

fn demand(task: &dyn PreparedTask, caller: &Caller, input_bytes: usize) -> Demand {
    let s = task.spec();
    Demand {
        task: s.name.clone(),
        memory_mb: s.limits.memory_mb,
        concurrency: s.limits.concurrency,
        priority: s.limits.priority,
        share: match caller {
            Caller::Outside => Share::Task(s.name.clone()),
            Caller::Task(t) => Share::Task(t.clone()),
            Caller::Route(r) => Share::Route(*r),
        },
        input_bytes,
    }
}

impl Hub {
    /// Whether a task of this name is deployed.
    pub fn has_task(&self, name: &str) -> bool {
        self.task(name).is_ok()
    }

    fn task(&self, name: &str) -> Result<Arc<dyn PreparedTask>, CallError> {
        TaskName::parse(name)
            .ok()
            .and_then(|n| self.deployed(&n))
            .ok_or_else(|| CallError::UnknownTask(name.to_owned()))
    }

    /// The deployed task of that name, if it still is.
    fn deployed(&self, name: &TaskName) -> Option<Arc<dyn PreparedTask>> {
        self.inner.active.read().tasks.get(name).cloned()
    }

    fn submit(
        &self,
        task: &dyn PreparedTask,
        caller: &Caller,
        held_input: usize,
        bounded: bool,
        hold: Option<InputHold>,
    ) -> Result<Ticket, CallError> {
        self.inner
            .scheduler
            .submit_holding(demand(task, caller, held_input), bounded, hold)
            .map_err(|r| {
                if matches!(r, Rejected::QueueFull { .. }) {
                    self.inner.metrics.rejected.inc();
                }
                CallError::Rejected(r)
            })
    }

    /// Checks the input's size, finds the task and takes a place in the
    /// queue for a call from outside; `held` is whether the input waits in
    /// memory with it (a sync call's) or in the store (an async call's).
    fn queue_call(
        &self,
        caller: &Caller,
        task: &str,
        input: &Bytes,
        limit: usize,
        held: bool,
        hold: Option<InputHold>,
    ) -> Result<(Arc<dyn PreparedTask>, Ticket), CallError> {
        if input.len() > limit {
            return Err(CallError::InputTooLarge {
                size: input.len(),
                limit,
            });
        }
        let prepared = self.task(task)?;
        let held_input = if held { input.len() } else { 0 };
        let ticket = self.submit(prepared.as_ref(), caller, held_input, true, hold)?;
        Ok((prepared, ticket))
    }

    /// The task an admitted call runs: the one deployed now under its name
    /// (a deployment may have replaced it while the call waited), or
    /// `unknown_task` if it left the deployment.
    fn admitted_task(&self, name: &TaskName) -> Result<Arc<dyn PreparedTask>, CallError> {
        self.deployed(name)
            .ok_or_else(|| CallError::UnknownTask(name.to_string()))
    }

    /// Runs a call and waits for its output.
    pub async fn call_sync(
        &self,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
    ) -> Result<Bytes, CallError> {
        self.call_sync_as(new_call_id(), &Caller::Outside, task, input, env)
            .await
    }

    /// A synchronous call under a call id chosen by the caller (so it can
    /// find the call's log lines afterwards).
    pub async fn call_sync_as(
        &self,
        id: CallId,
        caller: &Caller,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
    ) -> Result<Bytes, CallError> {
        self.call_sync_holding(id, caller, task, input, env, None)
            .await
    }

    /// Counts `bytes` of a call's input against the bound on waiting
    /// inputs before it is read (see `roost_scheduler::Scheduler::hold_input`).
    pub fn hold_input(&self, bytes: usize) -> Result<InputHold, CallError> {
        self.inner.scheduler.hold_input(bytes).map_err(|r| {
            self.inner.metrics.rejected.inc();
            CallError::Rejected(r)
        })
    }

    /// [`Hub::call_sync_as`] for an input read under `hold`, which the
    /// call's place in the queue takes over.
    pub async fn call_sync_holding(
        &self,
        id: CallId,
        caller: &Caller,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
        hold: Option<InputHold>,
    ) -> Result<Bytes, CallError> {
        let (prepared, ticket) = self.queue_call(
            caller,
            task,
            &input,
            self.inner.config.max_sync_input,
            true,
            hold,
        )?;
        let permit = match ticket.admitted().await {
            Ok(p) => p,
            Err(Rejected::Removed) => return Err(CallError::UnknownTask(task.to_owned())),
            Err(r) => return Err(CallError::Rejected(r)),
        };
        let prepared = self.admitted_task(&prepared.spec().name)?;
        self.inner
            .metrics
            .queue_wait
            .observe(permit.waited().as_secs_f64());
        let result = run(&self.inner, &prepared, &id, input, env, 0, Mode::Sync).await;
        drop(permit);
        result.map_err(CallError::Failed)
    }

    /// Queues a durable call; returns once it is on disk. While it waits,
    /// its input is in the store only (it is read back once admitted), so
    /// acknowledged calls cost the queue no memory for their inputs.
    pub async fn call_async(
        &self,
        caller: &Caller,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
    ) -> Result<CallId, CallError> {
        // Take the place in the queue first (this is the bound check), then
        // persist; the call only runs after both.
        let (prepared, ticket) = self.queue_call(
            caller,
            task,
            &input,
            self.inner.config.max_async_input,
            false,
            None,
        )?;
        let id = new_call_id();
        self.inner
            .store
            .insert_call(NewCall {
                id: id.to_string(),
                task: task.to_owned(),
                input: input.to_vec(),
                env,
                max_attempts: self.inner.config.async_attempts,
            })
            .await?;
        drop(input);
        let hub = self.clone();
        let (call_id, task) = (id.clone(), prepared.spec().name.clone());
        tokio::spawn(async move { hub.run_async(call_id, task, Some(ticket), 0).await });
        Ok(id)
    }

    /// Puts every acknowledged, unfinished async call back in the queue.
    pub(crate) async fn recover_async_calls(&self) -> Result<(), StoreError> {
        let interrupted = self.inner.store.requeue_interrupted().await?;
        let queued = self.inner.store.queued_calls()?;
        if !queued.is_empty() {
            tracing::info!(
                calls = queued.len(),
                interrupted,
                "requeued async calls acknowledged before the restart"
            );
        }
        // Their inputs and environments stay in the store until each is
        // admitted: starting reads only the queue.
        for call in queued {
            // Both were valid when the call was stored.
            let Some(id) = CallId::parse(&call.id) else {
                tracing::error!(call_id = %call.id, "a stored call has an id the hub never hands out; it is left alone");
                continue;
            };
            let Ok(task) = TaskName::parse(&call.task) else {
                log_store(
                    self.inner
                        .store
                        .fail_call(id.as_str(), &no_longer_deployed(&call.task))
                        .await,
                );
                continue;
            };
            let hub = self.clone();
            tokio::spawn(async move {
                let wait = (call.next_at_ms - roost_store::now_ms()).max(0) as u64;
                tokio::time::sleep(Duration::from_millis(wait)).await;
                hub.run_async(id, task, None, call.attempts).await
            });
        }
        Ok(())
    }

    /// One async call from admission to its recorded outcome, retrying with
    /// exponential backoff until its attempts are used up. Its input and
    /// environment are read from the store each time it is admitted.
    async fn run_async(
        &self,
        id: CallId,
        task: TaskName,
        mut ticket: Option<Ticket>,
        mut attempts: u32,
    ) {
        let store = &self.inner.store;
        let gone = || async {
            log_store(
                store
                    .fail_call(id.as_str(), &no_longer_deployed(task.as_str()))
                    .await,
            )
        };
        loop {
            let Some(prepared) = self.deployed(&task) else {
                return gone().await;
            };
            let ticket = match ticket.take() {
                Some(t) => t,
                None => match self.submit(prepared.as_ref(), &Caller::Outside, 0, false, None) {
                    Ok(t) => t,
                    // Shutting down: the call stays queued on disk.
                    Err(_) => return,
                },
            };
            let permit = match ticket.admitted().await {
                Ok(p) => p,
                Err(Rejected::Removed) => return gone().await,
                Err(_) => return, // shutting down; still queued on disk
            };
            // It runs what is deployed under its name now.
            let Some(prepared) = self.deployed(&task) else {
                return gone().await;
            };
            let (input, env) = match store.call_input(id.as_str()) {
                Ok(Some((input, env))) => (Bytes::from(input), env),
                Ok(None) => {
                    tracing::warn!(call_id = %id, "a queued call's row is gone (purged?); it is dropped");
                    return;
                }
                Err(e) => {
                    tracing::error!(call_id = %id, error = %e, "cannot read a queued call's input; it stays queued");
                    return;
                }
            };
            self.inner
                .metrics
                .queue_wait
                .observe(permit.waited().as_secs_f64());
            if let Err(e) = store.mark_running(id.as_str()).await {
                tracing::error!(call_id = %id, error = %e, "cannot mark call running; it stays queued");
                return;
            }
            attempts += 1;
            let result = run(&self.inner, &prepared, &id, input, env, 0, Mode::Async).await;
            // The permit is held until the outcome is on disk, so a hub
            // that is idle (drained) has recorded every outcome.
            match result {
                Ok(out) => {
                    log_store(store.succeed_call(id.as_str(), out.to_vec()).await);
                    return;
                }
                Err(f) if attempts < self.inner.config.async_attempts => {
                    let delay = self.inner.config.retry_backoff * 2u32.saturating_pow(attempts - 1);
                    let delay = delay.min(Duration::from_secs(300));
                    self.inner.metrics.retries.inc();
                    tracing::info!(call_id = %id, %task, attempt = attempts, error = %f, retry_in_ms = delay.as_millis() as u64, "async call failed; will retry");
                    let next = roost_store::now_ms() + delay.as_millis() as i64;
                    if store.retry_call(id.as_str(), &f, next).await.is_err() {
                        return;
                    }
                    drop(permit);
                    tokio::time::sleep(delay).await;
                }
                Err(f) => {
                    tracing::warn!(call_id = %id, %task, attempts, error = %f, "async call failed for good");
                    log_store(store.fail_call(id.as_str(), &f).await);
                    return;
                }
            }
        }
    }

    pub fn call_view(&self, id: &str) -> Result<CallView, CallError> {
        let c = CallId::parse(id)
            .map(|id| self.inner.store.get_call(id.as_str()))
            .transpose()?
            .flatten()
            .ok_or_else(|| CallError::UnknownCall(id.to_owned()))?;
        Ok(CallView {
            id: c.id,
            task: c.task,
            status: c.status,
            attempts: c.attempts,
            error: c.failure.map(|f| ErrorView {
                code: f.code,
                message: f.message,
            }),
            created_ms: c.created_ms,
            finished_ms: c.finished_ms,
        })
    }

    /// The output of a finished call, or why there is none.
    pub fn call_output(&self, id: &str) -> Result<Bytes, CallError> {
        let view = self.call_view(id)?;
        match view.status {
            CallStatus::Succeeded => Ok(Bytes::from(
                self.inner.store.call_output(id)?.unwrap_or_default(),
            )),
            CallStatus::Failed => {
                let e = view.error.unwrap_or(ErrorView {
                    code: FailureCode::TaskError,
                    message: "failed".into(),
                });
                Err(CallError::Failed(Failure::new(e.code, e.message)))
            }
            s => Err(CallError::NotFinished(s.as_str())),
        }
    }

    pub fn tasks(&self) -> Vec<TaskView> {
        let active = self.inner.active.read().clone();
        let snap = self.inner.scheduler.snapshot();
        let mut out: Vec<TaskView> = active
            .tasks
            .values()
            .map(|t| {
                let s = t.spec();
                let (queued, running) = snap
                    .per_task
                    .iter()
                    .find(|(n, _, _)| n == &s.name)
                    .map(|(_, q, r)| (*q, *r))
                    .unwrap_or((0, 0));
                let (succeeded, failed) = self.inner.metrics.totals(s.name.as_str());
                TaskView {
                    name: s.name.to_string(),
                    runtime: s.runtime.to_string(),
                    limits: s.limits,
                    queued,
                    running,
                    succeeded,
                    failed,
                    pool: t.pool().map(|p| p.stats()),
                    uid: t.run_as_uid(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// How an async call ends whose task left the deployment before it ran.
fn no_longer_deployed(task: &str) -> Failure {
    Failure::new(
        FailureCode::UnknownTask,
        format!("task {task:?} is no longer deployed"),
    )
}

fn log_store(r: Result<(), StoreError>) {
    if let Err(e) = r {
        tracing::error!(error = %e, "cannot record a call's outcome");
    }
}

/// Runs one admitted call on a fresh instance and records its metrics.
async fn run(
    inner: &Arc<HubInner>,
    task: &Arc<dyn PreparedTask>,
    call_id: &CallId,
    input: Bytes,
    env: Vec<(String, String)>,
    depth: u32,
    mode: Mode,
) -> Result<Bytes, Failure> {
    let spec = task.spec();
    let started = Instant::now();
    let context = CallContext {
        task: spec.name.clone(),
        depth,
        calls: Arc::new(NestedCaller {
            hub: Arc::downgrade(inner),
        }),
        logs: inner.logs.clone(),
    };
    let result = match task.instance().await {
        Ok(mut instance) => {
            instance
                .invoke(Invocation {
                    call_id: call_id.clone(),
                    input,
                    timeout: Duration::from_millis(spec.limits.timeout_ms),
                    env,
                    context,
                })
                .await
        }
        Err(f) => Err(f),
    };
    let outcome = match &result {
        Ok(_) => "succeeded",
        Err(f) => f.code.as_str(),
    };
    if let Ok(out) = &result {
        // Every succeeded output feeds the task:NAME routes.
        let routes = inner.routes.read().clone();
        routes.on_task_output(&spec.name, out);
    }
    let m = &inner.metrics;
    m.count(spec.name.as_str(), result.is_ok());
    m.calls
        .get_or_create(&crate::metrics::CallLabels {
            task: spec.name.to_string(),
            outcome: outcome.into(),
            mode: mode.label().into(),
        })
        .inc();
    m.duration
        .get_or_create(&crate::metrics::TaskLabel {
            task: spec.name.to_string(),
        })
        .observe(started.elapsed().as_secs_f64());
    if let Err(f) = &result {
        tracing::debug!(task = %spec.name, %call_id, code = %f.code, message = %f.message, "call failed");
    }
    result
}

/// Lets a running task call another task: runs on the caller's
/// reservation, bounded in depth.
struct NestedCaller {
    hub: Weak<HubInner>,
}

#[async_trait]
impl TaskCaller for NestedCaller {
    async fn call(&self, from: &CallContext, task: &str, input: Bytes) -> Result<Bytes, Failure> {
        let Some(inner) = self.hub.upgrade() else {
            return Err(Failure::new(
                FailureCode::Unavailable,
                "the hub is shutting down",
            ));
        };
        if from.depth + 1 >= MAX_CALL_DEPTH {
            return Err(Failure::new(
                FailureCode::CallDepth,
                format!("calls are nested deeper than {MAX_CALL_DEPTH} (does a task call itself in a loop?)"),
            ));
        }
        let hub = Hub {
            inner: inner.clone(),
        };
        let callee = hub.task(task).map_err(|_| {
            Failure::new(
                FailureCode::UnknownTask,
                format!("no task named {task:?} is deployed"),
            )
        })?;
        if input.len() > inner.config.max_sync_input {
            return Err(Failure::new(
                FailureCode::TaskError,
                format!(
                    "the input is over the {} byte limit",
                    inner.config.max_sync_input
                ),
            ));
        }
        let id = new_call_id();
        Box::pin(run(
            &inner,
            &callee,
            &id,
            input,
            Vec::new(),
            from.depth + 1,
            Mode::Nested,
        ))
        .await
    }

    async fn publish(
        &self,
        from: &CallContext,
        topic: &str,
        payload: Bytes,
    ) -> Result<(), Failure> {
        let Some(inner) = self.hub.upgrade() else {
            return Err(Failure::new(
                FailureCode::Unavailable,
                "the hub is shutting down",
            ));
        };
        if !roost_topic::valid_topic_name(topic) {
            return Err(Failure::new(
                FailureCode::TaskError,
                format!("{topic:?} is not a topic a message can be published to"),
            ));
        }
        // The same grant as the IoT data plane's Publish: one permission
        // model for everything a task publishes.
        let allowed = inner.active.read().tasks.get(&from.task).is_some_and(|t| {
            t.spec()
                .allow
                .publish
                .iter()
                .any(|f| roost_topic::matches(f, topic))
        });
        if !allowed || crate::reserved_topic(topic) {
            return Err(Failure::new(
                FailureCode::Forbidden,
                format!(
                    "task {} may not publish to {topic:?}: add a filter that matches it to the task's allow.publish",
                    from.task
                ),
            ));
        }
        let done = inner
            .bus
            .publish(roost_bus::Message::from_hub(topic, payload));
        if let Some(done) = done {
            done.await.map_err(|e| {
                Failure::new(
                    FailureCode::Unavailable,
                    format!("the message could not be stored: {e}"),
                )
            })?;
        }
        tracing::debug!(task = %from.task, topic, "task published");
        Ok(())
    }
}
