//! Shared code for process tasks (MISSION row 12): a Python zygote per code
//! group. The zygote imports the runtime client (`awslambdaric`) and each
//! task's handler module once, freezes its heap (`gc.freeze()`), and forks
//! workers on request, so every worker of the group shares those pages
//! copy-on-write. Each forked worker still enters its own cgroup (or
//! rlimit), process group and Runtime API endpoint like any other worker.
//!
//! Only `[python, "-m", "awslambdaric"]` commands can be pre-loaded this way;
//! other commands (a `bootstrap` binary or script) start as separate
//! processes, and the hub says so in its log.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{oneshot, watch};

const SCRIPT: &str = include_str!("zygote.py");

/// Whether a command is one the zygote can stand in for.
pub fn can_preload(command: &[String]) -> bool {
    command.len() == 3 && command[1] == "-m" && command[2] == "awslambdaric"
}

type Exit = watch::Receiver<Option<ExitStatus>>;

/// What went wrong starting or talking to a zygote.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("cannot create {}: {source}", dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {} to workers: {source}", dir.display())]
    OpenDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The control socket between the hub and the zygote.
    #[error("{0}")]
    Channel(#[source] std::io::Error),
    #[error("cannot start the zygote with {python}: {source}")]
    Spawn {
        python: String,
        source: std::io::Error,
    },
    #[error("the zygote ({python}) did not start; is awslambdaric installed for that Python?")]
    NotStarted { python: String },
    #[error("the zygote did not answer")]
    NoAnswer,
    #[error("the zygote is gone")]
    Gone,
    #[error("the zygote is gone: {0}")]
    Lost(#[source] std::io::Error),
    /// The handler module could not be imported (the zygote's message).
    #[error("{0}")]
    Preload(String),
    /// The zygote could not fork (its message).
    #[error("{0}")]
    Fork(String),
    #[error("unexpected answer from the zygote")]
    Unexpected,
}

enum Reply {
    Forked(i32, Exit),
    Preloaded(Option<String>),
    Error(String),
}

pub struct Zygote {
    pub python: String,
    ctl: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
    next_id: AtomicU64,
    child: Mutex<Option<tokio::process::Child>>,
    pub fifo_dir: PathBuf,
    pid: i32,
}

/// What a forked worker needs from the zygote.
pub struct ForkRequest<'a> {
    pub cwd: &'a Path,
    pub handler: &'a str,
    pub env: &'a [(String, String)],
    pub rlimit_data: Option<u64>,
    pub stdout: &'a Path,
    pub stderr: &'a Path,
}

impl Zygote {
    /// Starts a zygote with `python` and waits until it has loaded the
    /// runtime client.
    pub async fn start(
        python: &str,
        fifo_dir: PathBuf,
        group: &str,
        run_as: Option<crate::identity::Identity>,
    ) -> Result<Arc<Self>, ZygoteError> {
        std::fs::create_dir_all(&fifo_dir).map_err(|source| ZygoteError::CreateDir {
            dir: fifo_dir.clone(),
            source,
        })?;
        if run_as.is_some() {
            // The workers open their FIFOs (0600, theirs) in here: the
            // folders are searchable, not listable.
            use std::os::unix::fs::PermissionsExt;
            for d in fifo_dir.ancestors().take(3) {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).map_err(
                    |source| ZygoteError::OpenDir {
                        dir: d.to_path_buf(),
                        source,
                    },
                )?;
            }
        }
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(ZygoteError::Channel)?;
        let theirs_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        let mut cmd = tokio::process::Command::new(python);
        // The zygote runs task code (the handlers it pre-loads): it gets a
        // worker's clean environment, never the hub's (its token, its AWS
        // settings), its own session (no terminal of the hub's), and its
        // output goes to the hub's log.
        cmd.arg("-c")
            .arg(SCRIPT)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .env_clear()
            .envs(crate::spawn::inherited_env())
            .env("ROOST_CODE_GROUP", group)
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child only, and makes only
        // async-signal-safe calls (setsid, dup2, umask, prctl and
        // Identity::drop_to's); it allocates nothing (its errors are raw
        // errno values), since another thread may have held the allocator's
        // lock at the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::dup2(theirs_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(id) = run_as {
                    id.drop_to()?;
                }
                libc::umask(0o022);
                // After the user changes, which clears it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| ZygoteError::Spawn {
            python: python.to_owned(),
            source,
        })?;
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let group = group.to_owned();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(code_group = %group, "zygote: {line}");
                }
            });
        }
        drop(theirs);
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        ours.set_nonblocking(true).map_err(ZygoteError::Channel)?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(ZygoteError::Channel)?;
        let (read, write) = stream.into_split();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>> = Arc::default();
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        {
            let pending = pending.clone();
            tokio::spawn(async move {
                let mut exits: HashMap<i32, watch::Sender<Option<ExitStatus>>> = HashMap::new();
                let mut lines = BufReader::new(read).lines();
                let mut ready = Some(ready_tx);
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    let id = v["id"].as_u64().unwrap_or(0);
                    let reply = match v["op"].as_str() {
                        Some("ready") => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                            continue;
                        }
                        Some("forked") => {
                            let pid = v["pid"].as_i64().unwrap_or(0) as i32;
                            if pid <= 0 {
                                Reply::Error(format!("the zygote reported pid {pid}"))
                            } else {
                                let (tx, rx) = watch::channel(None);
                                exits.insert(pid, tx);
                                Reply::Forked(pid, rx)
                            }
                        }
                        Some("preloaded") => {
                            Reply::Preloaded(v["error"].as_str().map(str::to_owned))
                        }
                        Some("error") => {
                            Reply::Error(v["message"].as_str().unwrap_or("fork failed").to_owned())
                        }
                        Some("exit") => {
                            let pid = v["pid"].as_i64().unwrap_or(0) as i32;
                            if let Some(tx) = exits.remove(&pid) {
                                let _ = tx.send(Some(ExitStatus::from_raw(
                                    v["status"].as_i64().unwrap_or(0) as i32,
                                )));
                            }
                            continue;
                        }
                        _ => continue,
                    };
                    if let Some(tx) = pending.lock().remove(&id) {
                        let _ = tx.send(reply);
                    }
                }
                // The zygote is gone: its children died with it (PDEATHSIG).
                for (_, tx) in exits {
                    let _ = tx.send(Some(ExitStatus::from_raw(libc::SIGKILL)));
                }
                pending.lock().clear();
            });
        }
        let z = Arc::new(Zygote {
            python: python.to_owned(),
            ctl: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            child: Mutex::new(Some(child)),
            fifo_dir,
            pid,
        });
        match tokio::time::timeout(std::time::Duration::from_secs(30), ready_rx).await {
            Ok(Ok(())) => Ok(z),
            _ => Err(ZygoteError::NotStarted {
                python: python.to_owned(),
            }),
        }
    }

    async fn request(&self, mut msg: serde_json::Value) -> Result<Reply, ZygoteError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        msg["id"] = id.into();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        self.send(&msg).await?;
        tokio::time::timeout(std::time::Duration::from_secs(60), rx)
            .await
            .map_err(|_| ZygoteError::NoAnswer)?
            .map_err(|_| ZygoteError::Gone)
    }

    /// Imports a handler module into the zygote, so later forks share it.
    pub async fn preload(&self, dir: &Path, handler: &str) -> Result<(), ZygoteError> {
        let module = handler.rsplit_once('.').map(|(m, _)| m).unwrap_or(handler);
        let module = module.replace('/', ".");
        match self
            .request(serde_json::json!({"op": "preload", "dir": dir, "module": module}))
            .await?
        {
            Reply::Preloaded(None) => Ok(()),
            Reply::Preloaded(Some(e)) => Err(ZygoteError::Preload(e)),
            _ => Err(ZygoteError::Unexpected),
        }
    }

    /// Forks a worker; returns its pid and a receiver of its exit.
    pub async fn fork(&self, req: ForkRequest<'_>) -> Result<(i32, Exit), ZygoteError> {
        let env: serde_json::Map<String, serde_json::Value> = req
            .env
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let msg = serde_json::json!({
            "op": "fork",
            "cwd": req.cwd,
            "handler": req.handler,
            "env": env,
            "rlimit_data": req.rlimit_data,
            "stdout": req.stdout,
            "stderr": req.stderr,
        });
        match self.request(msg).await? {
            Reply::Forked(pid, exit) => Ok((pid, exit)),
            Reply::Error(e) => Err(ZygoteError::Fork(e)),
            _ => Err(ZygoteError::Unexpected),
        }
    }

    /// Lets a forked worker go on, once the hub has put it in its cgroup
    /// (it waits before running anything of the task's).
    pub async fn release(&self, pid: i32) -> Result<(), ZygoteError> {
        self.send(&serde_json::json!({"op": "release", "pid": pid}))
            .await
    }

    /// Writes one line of the protocol.
    async fn send(&self, msg: &serde_json::Value) -> Result<(), ZygoteError> {
        let mut line = msg.to_string();
        line.push('\n');
        self.ctl
            .lock()
            .await
            .write_all(line.as_bytes())
            .await
            .map_err(ZygoteError::Lost)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether `pid` is a live child of this zygote (from `/proc`, not from
    /// anything the zygote said).
    pub fn is_child(&self, pid: i32) -> bool {
        pid > 0 && pid != self.pid && crate::listener::proc_stat_field(pid, 1) == Some(self.pid)
    }

    /// Stops the zygote (and with it, through PDEATHSIG, its children).
    pub fn kill(&self) {
        if let Some(c) = self.child.lock().as_mut() {
            let _ = c.start_kill();
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().take() {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.fifo_dir);
    }
}
