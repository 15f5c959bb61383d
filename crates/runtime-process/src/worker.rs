//! One worker: a process speaking the AWS Lambda Runtime API to its own
//! endpoint (a listener per worker, so a worker can only ever see and answer
//! its own calls), with its stdout/stderr sent to the hub's log line by line.
//! The endpoint's server is `runtime_api`, the process's start `spawn`.

use crate::isolation::WorkerGroup;
use crate::runtime_api::{
    error_message, router, Current, Outcome, Pending, Shared, MAX_ERROR_DOCUMENT,
};
pub use crate::spawn::Launcher;
use crate::spawn::{lambda_env, spawn_direct, spawn_forked};
use bytes::Bytes;
use parking_lot::Mutex;
use roost_model::{Failure, FailureCode, TaskName};
use roost_runtime::LogSink;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// Time a worker gets to start and ask for its first call.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a worker needs to start.
pub struct WorkerSpec {
    pub task: TaskName,
    pub dir: PathBuf,
    pub command: Vec<String>,
    pub handler: String,
    pub env: Vec<(String, String)>,
    pub memory_mb: u32,
    pub region: String,
    pub version: String,
    /// The task's own user and group (when the hub runs as root).
    pub run_as: Option<crate::identity::Identity>,
}

pub struct Worker {
    pub id: u64,
    pid: i32,
    shared: Arc<Shared>,
    queue: mpsc::Sender<Pending>,
    exited: watch::Receiver<Option<std::process::ExitStatus>>,
    group: Arc<WorkerGroup>,
    server: tokio::task::JoinHandle<()>,
    pub last_used: Instant,
    /// Set once the hub has killed the worker, before its exit is seen, so
    /// it is never handed another call.
    killed: std::sync::atomic::AtomicBool,
}

impl Worker {
    /// Starts a worker and waits until it asks for its first call.
    pub async fn start(
        id: u64,
        spec: &WorkerSpec,
        group: WorkerGroup,
        logs: Arc<dyn LogSink>,
        hub_marker: &str,
        launcher: &Launcher,
    ) -> Result<Worker, Failure> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| {
                Failure::new(
                    FailureCode::Crashed,
                    format!("cannot open a Runtime API port: {e}"),
                )
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::new(FailureCode::Crashed, e.to_string()))?;
        let (queue, rx) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            task: spec.task.clone(),
            arn: format!(
                "arn:aws:lambda:{}:000000000000:function:{}",
                spec.region, spec.task
            ),
            next: tokio::sync::Mutex::new(rx),
            current: Mutex::new(None),
            ready: watch::channel(false).0,
            init_error: Mutex::new(None),
            logs,
        });
        let app = router(shared.clone());
        let owner = crate::listener::Owner::default();
        let own = crate::listener::OwnListener {
            inner: listener,
            owner: owner.clone(),
            task: spec.task.to_string(),
        };
        let server = tokio::spawn(async move {
            let _ = axum::serve(own, app).await;
        });

        let env = lambda_env(spec, id, &addr.to_string(), hub_marker);
        let group = Arc::new(group);
        let launched = match launcher {
            Launcher::Direct => spawn_direct(spec, &env, &group, &shared).await,
            Launcher::Zygote(z) => spawn_forked(z, id, spec, &env, &group, &shared).await,
        };
        let (pid, exited) = match launched {
            Ok(x) => x,
            Err(f) => {
                server.abort();
                return Err(f);
            }
        };
        owner.set(pid, group.procs_file());
        let worker = Worker {
            id,
            pid,
            shared,
            queue,
            exited,
            group,
            server,
            last_used: Instant::now(),
            killed: std::sync::atomic::AtomicBool::new(false),
        };
        let mut ready = worker.shared.ready.subscribe();
        let exited = worker.exited.clone();
        tokio::select! {
            r = ready.wait_for(|r| *r) => { let _ = r; }
            _ = wait_exit(exited) => {
                let status = *worker.exited.borrow();
                let why = worker.shared.init_error.lock().clone();
                return Err(Failure::new(FailureCode::Crashed, match why {
                    Some(e) => format!("the worker failed to initialise: {e}"),
                    None => format!("the worker exited while starting ({}); see `roost logs {}`", describe(status), spec.task),
                }));
            }
            _ = tokio::time::sleep(INIT_TIMEOUT) => {
                worker.kill();
                return Err(Failure::new(FailureCode::Timeout, format!("the worker did not ask for a call within {} s of starting", INIT_TIMEOUT.as_secs())));
            }
        }
        if let Some(e) = worker.shared.init_error.lock().clone() {
            worker.kill();
            return Err(Failure::new(
                FailureCode::Crashed,
                format!("the worker failed to initialise: {e}"),
            ));
        }
        Ok(worker)
    }

    pub fn is_alive(&self) -> bool {
        !self.killed.load(std::sync::atomic::Ordering::Relaxed) && self.exited.borrow().is_none()
    }

    pub fn kill(&self) {
        self.killed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if self.pid > 0 {
            // SAFETY: signalling the worker's own process group.
            unsafe { libc::killpg(self.pid, libc::SIGKILL) };
        }
        self.group.kill_all();
    }

    /// Runs one call on this worker. On anything but a clean result the
    /// worker is not reusable (`is_alive` turns false).
    pub async fn invoke(
        &mut self,
        request_id: String,
        input: Bytes,
        timeout: Duration,
        client_context: Option<String>,
        memory_mb: u32,
    ) -> Result<Bytes, Failure> {
        let (tx, rx) = oneshot::channel();
        *self.shared.current.lock() = Some(Current {
            request_id: request_id.clone(),
            done: Some(tx),
        });
        let deadline_ms = SystemTime::now()
            .checked_add(timeout)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_used = Instant::now();
        let pending = Pending {
            request_id,
            body: input,
            deadline_ms,
            client_context,
        };
        if self.queue.send(pending).await.is_err() {
            return Err(Failure::new(FailureCode::Crashed, "the worker is gone"));
        }
        let exited = self.exited.clone();
        let result = tokio::select! {
            r = rx => match r {
                Ok(Outcome::Response(b)) => Ok(b),
                Ok(Outcome::Error { kind, body }) => {
                    let message = error_message(&body);
                    let code = if message.starts_with("MemoryError") { FailureCode::MemoryLimit } else { FailureCode::TaskError };
                    let failure = Failure::new(code, format!("{message} ({kind})"));
                    // The handler's own error document, for Lambda Invoke.
                    let document = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .filter(|v| v.is_object() && body.len() <= MAX_ERROR_DOCUMENT);
                    Err(match document {
                        Some(_) => failure.with_detail(String::from_utf8_lossy(&body)),
                        None => failure,
                    })
                }
                Ok(Outcome::Rejected(why)) => Err(Failure::new(FailureCode::TaskError, why)),
                Err(_) => Err(Failure::new(FailureCode::Crashed, "the worker went away")),
            },
            _ = wait_exit(exited) => {
                // Give the kernel a moment to account the OOM kill.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let status = *self.exited.borrow();
                if self.group.oom_killed() {
                    Err(Failure::new(FailureCode::MemoryLimit, format!("the worker was killed for using more than memory_mb = {memory_mb}")))
                } else {
                    Err(Failure::new(FailureCode::Crashed, format!("the worker exited during the call ({})", describe(status))))
                }
            }
            _ = tokio::time::sleep(timeout) => {
                self.kill();
                Err(Failure::new(FailureCode::Timeout, format!("the call ran longer than timeout_ms = {}", timeout.as_millis())))
            }
        };
        *self.shared.current.lock() = None;
        self.last_used = Instant::now();
        if result.is_err()
            && self.is_alive()
            && !matches!(&result, Err(f) if f.code == FailureCode::TaskError)
        {
            self.kill();
        }
        result
    }

    /// Whether this worker's limits are enforced by a cgroup.
    pub fn in_cgroup(&self) -> bool {
        self.group.uses_cgroup()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
        self.server.abort();
    }
}

/// Resolves when the worker process has exited.
async fn wait_exit(mut rx: watch::Receiver<Option<std::process::ExitStatus>>) {
    loop {
        if rx.borrow_and_update().is_some() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn describe(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (_, Some(sig)) => format!("killed by signal {sig}"),
            _ => "unknown status".into(),
        },
        None => "still running".into(),
    }
}
