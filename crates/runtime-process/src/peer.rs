//! Makes each worker's Runtime API endpoint serve its own worker only, and
//! tells who holds the other end of a loopback connection ([`socket_owner`]).
//!
//! The endpoint is a loopback TCP port (the Runtime API is addressed as
//! `host:port`), which any local process could connect to. On accept, the
//! hub finds the connecting socket in `/proc/net/tcp` and accepts the
//! connection only if one of the worker's own processes (its cgroup, or its
//! process group) holds that socket; anything else is closed unanswered.

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
        let Some(SocketOwner { inode, .. }) = socket_owner(peer, local) else {
            return false;
        };
        let target = format!("socket:[{inode}]");
        candidate_pids(&info)
            .into_iter()
            .any(|pid| holds(pid, &target))
    }
}

/// The client end of a loopback connection, as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOwner {
    /// The user that opened the socket.
    pub uid: u32,
    pub inode: u64,
}

/// Finds the client end of a loopback connection from `peer` to `local`:
/// one exact `sock_diag` netlink query (what `ss` uses; the cost does not
/// grow with the number of sockets on the machine), or, where netlink is
/// not available, a scan of `/proc/net/tcp{,6}` (which does: milliseconds
/// with thousands of sockets in TIME_WAIT).
pub fn socket_owner(peer: SocketAddr, local: SocketAddr) -> Option<SocketOwner> {
    match diag_lookup(peer, local) {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag unavailable; reading /proc/net/tcp");
            proc_lookup(peer, local)
        }
    }
}

/// Asks the kernel for the one TCP socket whose source is `peer` and whose
/// destination is `local`. `Ok(None)`: there is none.
fn diag_lookup(peer: SocketAddr, local: SocketAddr) -> std::io::Result<Option<SocketOwner>> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};
    let family = match (peer, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => AF_INET6,
        _ => return Ok(None),
    };
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    // No NLM_F_DUMP: an exact lookup by the socket's four-tuple.
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: peer.port(),
                destination_port: local.port(),
                source_address: peer.ip(),
                destination_address: local.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: match on the addresses alone.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut answer = vec![0u8; 8192];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&answer[..n])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Some(SocketOwner {
            uid: r.header.uid,
            inode: r.header.inode as u64,
        })),
        NetlinkPayload::Error(e) if e.to_io().kind() == std::io::ErrorKind::NotFound => Ok(None),
        NetlinkPayload::Error(e) => Err(e.to_io()),
        other => Err(std::io::Error::other(format!(
            "unexpected sock_diag answer: {other:?}"
        ))),
    }
}

fn proc_lookup(peer: SocketAddr, local: SocketAddr) -> Option<SocketOwner> {
    let (table, want_local, want_remote) = match (peer, local) {
        (SocketAddr::V4(p), SocketAddr::V4(l)) => ("/proc/net/tcp", hex_v4(p), hex_v4(l)),
        (SocketAddr::V6(p), SocketAddr::V6(l)) => ("/proc/net/tcp6", hex_v6(p), hex_v6(l)),
        _ => return None,
    };
    let table = std::fs::read_to_string(table).ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && f[1] == want_local && f[2] == want_remote {
            Some(SocketOwner {
                uid: f[7].parse().ok()?,
                inode: f[9].parse().ok()?,
            })
        } else {
            None
        }
    })
}

/// An address as `/proc/net/tcp` prints it: the address as one host-order
/// word, then the port.
fn hex_v4(a: std::net::SocketAddrV4) -> String {
    format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(a.ip().octets()),
        a.port()
    )
}

/// As `/proc/net/tcp6` prints it: four host-order words, then the port.
fn hex_v6(a: std::net::SocketAddrV6) -> String {
    let o = a.ip().octets();
    let mut s = String::with_capacity(37);
    for w in o.chunks(4) {
        s.push_str(&format!(
            "{:08X}",
            u32::from_le_bytes([w[0], w[1], w[2], w[3]])
        ));
    }
    s.push_str(&format!(":{:04X}", a.port()));
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_loopback_connection_is_found() {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        for ip in ["127.0.0.1", "[::1]"] {
            let Ok(server) = std::net::TcpListener::bind(format!("{ip}:0")) else {
                continue; // no IPv6 loopback here
            };
            let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
            let (_conn, peer) = server.accept().unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            let owner = socket_owner(peer, server.local_addr().unwrap())
                .unwrap_or_else(|| panic!("{ip}: not found"));
            assert_eq!(owner.uid, me);
            assert!(owner.inode > 0);
            // Both ways of asking agree.
            let local = server.local_addr().unwrap();
            assert_eq!(diag_lookup(peer, local).unwrap(), Some(owner));
            assert_eq!(proc_lookup(peer, local), Some(owner));
            // Another port: nothing.
            let mut other = server.local_addr().unwrap();
            other.set_port(1);
            assert_eq!(socket_owner(peer, other), None);
            assert_eq!(diag_lookup(peer, other).unwrap(), None);
        }
    }
}
