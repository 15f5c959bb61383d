//! One worker: a process speaking the AWS Lambda Runtime API to its own
//! endpoint (a listener per worker, so a worker can only ever see and answer
//! its own calls), with its stdout/stderr sent to the hub's log line by line.

use crate::isolation::WorkerGroup;
use crate::zygote::{ForkRequest, Zygote};
use axum::body::Bytes as AxBytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use parking_lot::Mutex;
use roost_model::{Failure, FailureCode, TaskName};
use roost_runtime::LogSink;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot, watch};

/// Largest response or error body a worker may post (Lambda's sync limit).
pub const MAX_RESPONSE_BYTES: usize = 6 << 20;
/// Longest log line kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 8 << 10;
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

/// A call handed to the worker on its next `/next`.
struct Pending {
    request_id: String,
    body: Bytes,
    deadline_ms: u64,
    client_context: Option<String>,
}

enum Outcome {
    Response(Bytes),
    Error { kind: String, body: Bytes },
    Rejected(String),
}

struct Current {
    request_id: String,
    done: Option<oneshot::Sender<Outcome>>,
}

struct Shared {
    task: TaskName,
    arn: String,
    next: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    current: Mutex<Option<Current>>,
    /// Set once the worker first asks for a call (it has initialised).
    ready: watch::Sender<bool>,
    init_error: Mutex<Option<String>>,
    logs: Arc<dyn LogSink>,
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

fn json_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::json!({ "errorMessage": message, "errorType": kind }).to_string(),
    )
        .into_response()
}

async fn next(State(s): State<Arc<Shared>>) -> Response {
    s.ready.send_replace(true);
    let mut rx = s.next.lock().await;
    let Some(p) = rx.recv().await else {
        return json_error(
            StatusCode::GONE,
            "WorkerRetired",
            "this worker is being retired",
        );
    };
    let mut headers = HeaderMap::new();
    let mut put = |k: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert(k, v);
        }
    };
    put("Lambda-Runtime-Aws-Request-Id", &p.request_id);
    put("Lambda-Runtime-Deadline-Ms", &p.deadline_ms.to_string());
    put("Lambda-Runtime-Invoked-Function-Arn", &s.arn);
    put("Lambda-Runtime-Trace-Id", &trace_id());
    if let Some(cc) = &p.client_context {
        put("Lambda-Runtime-Client-Context", cc);
    }
    // awslambdaric decodes the event by content type; JSON is what Lambda
    // sends. Input that is not JSON is handed over as raw bytes instead.
    let json = p.body.is_empty() || serde_json::from_slice::<serde_json::Value>(&p.body).is_ok();
    put(
        "Content-Type",
        if json {
            "application/json"
        } else {
            "application/octet-stream"
        },
    );
    let body = if p.body.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        p.body
    };
    (StatusCode::OK, headers, body).into_response()
}

fn finish(s: &Shared, id: &str, outcome: Outcome) -> Response {
    let mut cur = s.current.lock();
    match cur.as_mut() {
        Some(c) if c.request_id == id => match c.done.take() {
            Some(tx) => {
                let _ = tx.send(outcome);
                *cur = None;
                (
                    StatusCode::ACCEPTED,
                    [("content-type", "application/json")],
                    r#"{"status":"OK"}"#,
                )
                    .into_response()
            }
            None => json_error(
                StatusCode::BAD_REQUEST,
                "InvalidStateTransition",
                "this request already has a result",
            ),
        },
        _ => json_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestID",
            "no call with this request id is in progress on this worker",
        ),
    }
}

async fn response(State(s): State<Arc<Shared>>, Path(id): Path<String>, body: AxBytes) -> Response {
    if body.len() > MAX_RESPONSE_BYTES {
        let r = finish(
            &s,
            &id,
            Outcome::Rejected(format!(
                "the response is over the {} MiB limit",
                MAX_RESPONSE_BYTES >> 20
            )),
        );
        if r.status() != StatusCode::ACCEPTED {
            return r;
        }
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "response over 6 MiB",
        );
    }
    finish(&s, &id, Outcome::Response(body))
}

async fn error(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: AxBytes,
) -> Response {
    let kind = headers
        .get("Lambda-Runtime-Function-Error-Type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Unhandled")
        .to_owned();
    let body = body.slice(..body.len().min(MAX_RESPONSE_BYTES));
    finish(&s, &id, Outcome::Error { kind, body })
}

async fn init_error(State(s): State<Arc<Shared>>, headers: HeaderMap, body: AxBytes) -> Response {
    let kind = headers
        .get("Lambda-Runtime-Function-Error-Type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Runtime.Unknown");
    let message = error_message(&body);
    s.logs
        .line(&s.task, "init", &format!("init error {kind}: {message}"));
    *s.init_error.lock() = Some(format!("{kind}: {message}"));
    (
        StatusCode::ACCEPTED,
        [("content-type", "application/json")],
        r#"{"status":"OK"}"#,
    )
        .into_response()
}

/// Largest handler error document passed on whole.
const MAX_ERROR_DOCUMENT: usize = 256 << 10;

/// The `errorMessage` of a Lambda error document, or the body itself.
fn error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let msg = v.get("errorMessage")?.as_str()?.to_owned();
            Some(match v.get("errorType").and_then(|t| t.as_str()) {
                Some(t) => format!("{t}: {msg}"),
                None => msg,
            })
        })
        .unwrap_or_else(|| text.chars().take(2000).collect())
}

fn trace_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("Root=1-{secs:08x}-{};Sampled=0", hex::encode(b))
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(response),
        )
        .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
        .route("/2018-06-01/runtime/init/error", post(init_error))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_RESPONSE_BYTES + 1))
        .with_state(shared)
}

/// Sends a stream's lines to the log, cutting lines over MAX_LINE, tagged
/// with the request id of the call in progress.
async fn pump_lines(mut r: impl AsyncRead + Unpin, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 16 << 10];
    let mut line: Vec<u8> = Vec::new();
    let mut dropping = false;
    let emit = |line: &[u8], s: &Shared| {
        let id = s
            .current
            .lock()
            .as_ref()
            .map(|c| c.request_id.clone())
            .unwrap_or_else(|| "-".into());
        s.logs.line(
            &s.task,
            &id,
            String::from_utf8_lossy(line).trim_end_matches('\r'),
        );
    };
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                if !dropping || !line.is_empty() {
                    emit(&line, &shared);
                }
                line.clear();
                dropping = false;
            } else if line.len() < MAX_LINE {
                line.push(b);
            } else if !dropping {
                emit(&line, &shared);
                line.clear();
                dropping = true;
            }
        }
    }
    if !line.is_empty() {
        emit(&line, &shared);
    }
}

/// How a worker process comes to be.
pub enum Launcher {
    /// A fresh process from the task's command.
    Direct,
    /// Forked from the code group's pre-loaded zygote.
    Zygote(Arc<Zygote>),
}

/// The environment Lambda gives a function, plus the task's own.
/// Variables a worker keeps from the hub's own environment; everything
/// else (the hub's token, its own AWS keys or profile) stays with the hub.
const INHERITED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The hub's variables a worker (or a zygote) keeps.
pub(crate) fn inherited_env() -> Vec<(String, String)> {
    INHERITED
        .iter()
        .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
        .collect()
}

/// A worker's whole environment: the few inherited variables, Lambda's,
/// then the task's (which carry the hub's `AWS_*` settings for it).
fn lambda_env(spec: &WorkerSpec, id: u64, api: &str, hub_marker: &str) -> Vec<(String, String)> {
    let mut env = inherited_env();
    env.extend::<Vec<(String, String)>>(vec![
        ("AWS_LAMBDA_RUNTIME_API".into(), api.into()),
        ("_HANDLER".into(), spec.handler.clone()),
        ("LAMBDA_TASK_ROOT".into(), spec.dir.display().to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME".into(), spec.task.to_string()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".into(),
            spec.memory_mb.to_string(),
        ),
        ("AWS_LAMBDA_FUNCTION_VERSION".into(), spec.version.clone()),
        ("AWS_LAMBDA_INITIALIZATION_TYPE".into(), "on-demand".into()),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME".into(),
            format!("/roost/{}", spec.task),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME".into(), format!("worker-{id}")),
        ("AWS_REGION".into(), spec.region.clone()),
        ("AWS_DEFAULT_REGION".into(), spec.region.clone()),
        ("AWS_EXECUTION_ENV".into(), "roost".into()),
        ("TZ".into(), ":UTC".into()),
        ("ROOST_WORKER_OF".into(), hub_marker.into()),
    ]);
    env.extend(spec.env.iter().cloned());
    env
}

type Launched = Result<(i32, watch::Receiver<Option<std::process::ExitStatus>>), Failure>;

async fn spawn_direct(
    spec: &WorkerSpec,
    env: &[(String, String)],
    group: &Arc<WorkerGroup>,
    shared: &Arc<Shared>,
) -> Launched {
    let mut cmd = tokio::process::Command::new(&spec.command[0]);
    cmd.args(&spec.command[1..]);
    if !spec.handler.is_empty() {
        cmd.arg(&spec.handler);
    }
    cmd.current_dir(&spec.dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    {
        let group = group.clone();
        let run_as = spec.run_as;
        // SAFETY: the closure only makes async-signal-safe calls (setsid,
        // prctl, getppid, umask, WorkerGroup::enter's open/write/setrlimit
        // and Identity::drop_to's setgroups/setgid/setuid/prctl).
        unsafe {
            cmd.pre_exec(move || {
                // Its own session and process group (no terminal of the
                // hub's; killed as a group).
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Into its cgroup while still root, then down to the task's
                // identity.
                group.enter()?;
                if let Some(id) = run_as {
                    id.drop_to()?;
                }
                // The hub's own files are private (umask 077); a task's are
                // its business.
                libc::umask(0o022);
                // Die with the hub. PDEATHSIG follows the thread that
                // forked; workers are forked from the runtime's worker
                // threads, which live as long as the hub. Set after the
                // user changes: a change of credentials clears it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("the hub is gone"));
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| {
        Failure::new(
            FailureCode::Crashed,
            format!(
                "cannot start `{}`: {e} (is it installed and on the hub's PATH?)",
                spec.command[0]
            ),
        )
    })?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump_lines(out, shared.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump_lines(err, shared.clone()));
    }
    let (exit_tx, exited) = watch::channel(None);
    let group = group.clone();
    tokio::spawn(async move {
        let status = child.wait().await.ok();
        // Take the worker's children with it (a bootstrap's curl).
        if pid > 0 {
            // SAFETY: signalling the worker's own process group.
            unsafe { libc::killpg(pid, libc::SIGKILL) };
        }
        group.kill_all();
        let _ = exit_tx.send(status);
    });
    Ok((pid, exited))
}

/// Forks the worker from the zygote; its stdout and stderr come back
/// through two FIFOs made for it.
async fn spawn_forked(
    z: &Arc<Zygote>,
    id: u64,
    spec: &WorkerSpec,
    env: &[(String, String)],
    group: &Arc<WorkerGroup>,
    shared: &Arc<Shared>,
) -> Launched {
    let crashed = |m: String| Failure::new(FailureCode::Crashed, m);
    let base = z.fifo_dir.join(format!("{}-{id}", spec.task));
    let (out_path, err_path) = (base.with_extension("out"), base.with_extension("err"));
    for p in [&out_path, &err_path] {
        let _ = std::fs::remove_file(p);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|e| crashed(e.to_string()))?;
        // SAFETY: mkfifo with a valid C string.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(crashed(format!(
                "cannot make a FIFO: {}",
                std::io::Error::last_os_error()
            )));
        }
        // The worker opens its ends as the task's user.
        if let Some(id) = spec.run_as {
            std::os::unix::fs::chown(p, Some(id.uid), Some(id.gid))
                .map_err(|e| crashed(format!("cannot hand a FIFO to the task's user: {e}")))?;
        }
    }
    // Read ends open read-write, so they neither block nor see EOF before
    // the worker opens its ends.
    let open = |p: &PathBuf| {
        tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(p)
            .map_err(|e| crashed(format!("cannot open a FIFO: {e}")))
    };
    let (out, err) = (open(&out_path)?, open(&err_path)?);
    let pump_out = tokio::spawn(pump_lines(out, shared.clone()));
    let pump_err = tokio::spawn(pump_lines(err, shared.clone()));
    let (pid, mut zexit) = match fork_and_place(z, spec, env, group, &out_path, &err_path).await {
        Ok(x) => x,
        Err(e) => {
            pump_out.abort();
            pump_err.abort();
            return Err(crashed(e));
        }
    };
    if let Err(e) = z.release(pid).await {
        tracing::warn!(task = %spec.task, error = %e, "could not release a forked worker");
    }
    let (exit_tx, exited) = watch::channel(None);
    let group = group.clone();
    tokio::spawn(async move {
        let status = loop {
            if let Some(s) = *zexit.borrow_and_update() {
                break Some(s);
            }
            if zexit.changed().await.is_err() {
                break None;
            }
        };
        // SAFETY: signalling the worker's own process group.
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        group.kill_all();
        // Let the last lines through, then stop reading.
        tokio::time::sleep(Duration::from_millis(50)).await;
        pump_out.abort();
        pump_err.abort();
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        let _ = exit_tx.send(status);
    });
    Ok((pid, exited))
}

/// Has the zygote fork a worker and puts it in its cgroup while it waits;
/// the worker is then released by the caller.
async fn fork_and_place(
    z: &Arc<Zygote>,
    spec: &WorkerSpec,
    env: &[(String, String)],
    group: &Arc<WorkerGroup>,
    stdout: &std::path::Path,
    stderr: &std::path::Path,
) -> Result<(i32, watch::Receiver<Option<std::process::ExitStatus>>), String> {
    let (pid, exit) = z
        .fork(ForkRequest {
            cwd: &spec.dir,
            handler: &spec.handler,
            env,
            rlimit_data: group.rlimit_bytes(),
            stdout,
            stderr,
        })
        .await
        .map_err(|e| format!("the zygote could not fork a worker: {e}"))?;
    // The zygote runs task code (pre-loaded handlers), so what it says is
    // checked before the hub acts on it as root: the pid must be a child
    // of this zygote. A zygote that lies is killed.
    if !z.is_child(pid) {
        z.kill();
        return Err(format!(
            "the zygote reported pid {pid}, which is not its child; the zygote was stopped"
        ));
    }
    // The child waits until the hub has put it in its cgroup: the task's
    // user may not write cgroup files, and no code of its call runs
    // outside its limits.
    if let Err(e) = group.place(pid) {
        // SAFETY: a checked child of the zygote, held before it ran anything.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = z.release(pid).await;
        return Err(format!("cannot put the worker in its cgroup: {e}"));
    }
    Ok((pid, exit))
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
        let owner = crate::peer::Owner::default();
        let own = crate::peer::OwnListener {
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
