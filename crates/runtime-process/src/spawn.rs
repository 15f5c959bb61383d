//! How a worker process comes to be: its command, environment and
//! `pre_exec` steps (its session, cgroup, user and death signal), or a fork
//! from its code group's zygote, and the pumps that carry its stdout and
//! stderr to the hub's log line by line.

use crate::identity::Identity;
use crate::isolation::WorkerGroup;
use crate::runtime_api::Shared;
use crate::worker::WorkerSpec;
use crate::zygote::{ForkRequest, Zygote, ZygoteError};
use roost_model::{Failure, FailureCode};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// Longest log line kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 8 << 10;
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
pub(crate) fn lambda_env(
    spec: &WorkerSpec,
    id: u64,
    api: &str,
    hub_marker: &str,
) -> Vec<(String, String)> {
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

pub(crate) type Launched =
    Result<(i32, watch::Receiver<Option<std::process::ExitStatus>>), Failure>;

pub(crate) async fn spawn_direct(
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
        // SAFETY: the closure runs `before_exec` in the forked child only.
        unsafe {
            cmd.pre_exec(move || before_exec(&group, run_as));
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

/// What a direct worker's child does between fork and exec: its own
/// session, its cgroup (or rlimit), its identity, its umask and death
/// signal.
///
/// The hub is multi-threaded, and another thread may have held a lock (the
/// allocator's, say) at the fork: a lock the child would wait on forever.
/// So this makes only async-signal-safe calls and allocates nothing; its
/// errors are raw errno values (`io::Error::from_raw_os_error`, never
/// `io::Error::other`), which `spawn` also hands the parent as they are.
///
/// # Safety
///
/// Only in a forked child before exec: it changes the process's session,
/// cgroup, limits and user.
unsafe fn before_exec(group: &WorkerGroup, run_as: Option<Identity>) -> std::io::Result<()> {
    // Its own session and process group (no terminal of the hub's; killed
    // as a group).
    if libc::setsid() < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Into its cgroup while still root, then down to the task's identity.
    group.enter()?;
    if let Some(id) = run_as {
        id.drop_to()?;
    }
    // The hub's own files are private (umask 077); a task's are its
    // business.
    libc::umask(0o022);
    // Die with the hub. PDEATHSIG follows the thread that forked; workers
    // are forked from the runtime's worker threads, which live as long as
    // the hub. Set after the user changes: a change of credentials clears
    // it.
    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if libc::getppid() == 1 {
        return Err(hub_gone());
    }
    Ok(())
}

/// Why a child does not exec: the hub died before its death signal was set,
/// so the signal would never come. An errno (no such process): building it
/// allocates nothing.
fn hub_gone() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ESRCH)
}

/// Forks the worker from the zygote; its stdout and stderr come back
/// through two FIFOs made for it.
pub(crate) async fn spawn_forked(
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
            return Err(crashed(e.to_string()));
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

/// Why a worker could not be forked from its zygote.
#[derive(Debug, thiserror::Error)]
enum ForkError {
    #[error("the zygote could not fork a worker: {0}")]
    Zygote(#[source] ZygoteError),
    #[error("the zygote reported pid {0}, which is not its child; the zygote was stopped")]
    NotItsChild(i32),
    #[error("cannot put the worker in its cgroup: {0}")]
    Place(#[source] std::io::Error),
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
) -> Result<(i32, watch::Receiver<Option<std::process::ExitStatus>>), ForkError> {
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
        .map_err(ForkError::Zygote)?;
    // The zygote runs task code (pre-loaded handlers), so what it says is
    // checked before the hub acts on it as root: the pid must be a child
    // of this zygote. A zygote that lies is killed.
    if !z.is_child(pid) {
        z.kill();
        return Err(ForkError::NotItsChild(pid));
    }
    // The child waits until the hub has put it in its cgroup: the task's
    // user may not write cgroup files, and no code of its call runs
    // outside its limits.
    if let Err(e) = group.place(pid) {
        // SAFETY: a checked child of the zygote, held before it ran anything.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = z.release(pid).await;
        return Err(ForkError::Place(e));
    }
    Ok((pid, exit))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set in a forked child only (it has its own copy of memory): from
    /// then on, an allocation or a free ends the child with `ALLOCATED`.
    static IN_CHILD: AtomicBool = AtomicBool::new(false);
    const ALLOCATED: i32 = 86;

    /// The system allocator, with a trap for children that allocate
    /// between fork and exec.
    struct ForkTrap;

    fn trap() {
        if IN_CHILD.load(Ordering::Relaxed) {
            // SAFETY: _exit is async-signal-safe and ends the child at once.
            unsafe { libc::_exit(ALLOCATED) };
        }
    }

    // SAFETY: every call is forwarded to the system allocator unchanged.
    unsafe impl GlobalAlloc for ForkTrap {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            trap();
            System.alloc(layout)
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            trap();
            System.alloc_zeroed(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            trap();
            System.dealloc(ptr, layout)
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            trap();
            System.realloc(ptr, layout, new_size)
        }
    }

    #[global_allocator]
    static ALLOCATOR: ForkTrap = ForkTrap;

    /// Runs `step` in a forked child before it execs `/bin/true`: the
    /// child's exit status (`ALLOCATED` if the step allocated), or the
    /// error `spawn` hands the parent when the step fails.
    pub(crate) fn exec_after(
        mut step: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
    ) -> std::io::Result<std::process::ExitStatus> {
        let mut cmd = std::process::Command::new("/bin/true");
        // SAFETY: runs the step under test in the child; setting the flag
        // is a plain store.
        unsafe {
            cmd.pre_exec(move || {
                IN_CHILD.store(true, Ordering::Relaxed);
                step()
            });
        }
        cmd.spawn()?.wait()
    }

    #[test]
    fn a_direct_workers_child_allocates_nothing_before_exec() {
        let group = Arc::new(crate::Isolation::Rlimit.worker_group("t", 256).unwrap());
        // As root (CI), the child also drops to a task's identity.
        let run_as = crate::identity::can_switch().then(|| Identity::derive("h", "task:t"));
        // SAFETY: before_exec runs in the forked child only.
        let status = exec_after(move || unsafe { before_exec(&group, run_as) }).unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "{status:?} ({ALLOCATED}: the child allocated before exec)"
        );
    }

    #[test]
    fn a_child_that_refuses_to_exec_reports_its_errno_without_allocating() {
        // An io::Error::other here allocates: the trap would end the child
        // before it reports, and spawn would seem to succeed.
        let e = exec_after(|| Err(hub_gone())).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "{e}");
    }
}
