//! Makes each worker's Runtime API endpoint serve its own worker only.
//!
//! The endpoint is a loopback TCP port (the Runtime API is addressed as
//! `host:port`), which any local process could connect to. On accept, the
//! hub finds the connecting socket ([`roost_peer::socket_owner`]) and
//! accepts the connection only if one of the worker's own processes (its
//! cgroup, or its process group) holds that socket; anything else is closed
//! unanswered.

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// Who may talk to an endpoint: set once the worker has started.
#[derive(Clone, Default)]
pub struct Owner(Arc<Mutex<Option<OwnerInfo>>>);

#[derive(Clone)]
struct OwnerInfo {
    pgid: i32,
    cgroup_procs: Option<PathBuf>,
}

impl Owner {
    pub fn set(&self, pgid: i32, cgroup_procs: Option<PathBuf>) {
        *self.0.lock() = Some(OwnerInfo { pgid, cgroup_procs });
    }

    fn allows(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        // A forked worker may connect before the hub has heard its pid.
        let mut info = None;
        for _ in 0..200 {
            info = self.0.lock().clone();
            if info.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let Some(info) = info else { return false };
        let Some(roost_peer::SocketOwner { inode, .. }) = roost_peer::socket_owner(peer, local)
        else {
            return false;
        };
        let target = format!("socket:[{inode}]");
        candidate_pids(&info)
            .into_iter()
            .any(|pid| holds(pid, &target))
    }
}

fn candidate_pids(info: &OwnerInfo) -> Vec<i32> {
    if let Some(p) = &info.cgroup_procs {
        if let Ok(s) = std::fs::read_to_string(p) {
            return s.lines().filter_map(|l| l.trim().parse().ok()).collect();
        }
    }
    // No cgroup: the worker's process group.
    let mut pids = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if proc_stat_field(pid, 2) == Some(info.pgid) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// A numeric field of `/proc/PID/stat`, counted after the command name
/// (0: state, 1: parent pid, 2: process group, ...).
pub(crate) fn proc_stat_field(pid: i32, n: usize) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the
    // last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n)?.parse().ok()
}

fn holds(pid: i32, target: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target))
}

/// A listener that hands axum only the worker's own connections.
pub struct OwnListener {
    pub inner: TcpListener,
    pub owner: Owner,
    pub task: String,
}

impl axum::serve::Listener for OwnListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "runtime API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    continue;
                }
            };
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            let owner = self.owner.clone();
            let allowed = tokio::task::spawn_blocking(move || owner.allows(peer, local))
                .await
                .unwrap_or(false);
            if allowed {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            tracing::warn!(task = %self.task, %peer, "refused a Runtime API connection that is not from this worker");
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
