//! Who holds the other end of a TCP connection on this machine: given the
//! two addresses of an accepted connection, [`socket_owner`] finds the
//! client's socket in the kernel's table and returns the user that opened
//! it and the socket's inode (which a process's `/proc/PID/fd` links name).
//!
//! The hub asks this of every loopback connection: its HTTP API to judge a
//! request by the task user that sent it, the process runtime to admit a
//! worker's Runtime API connection only from that worker's processes.
//!
//! The kernel is asked with one exact `sock_diag` netlink query (what `ss`
//! uses; its cost does not grow with the number of sockets on the machine).
//! Where netlink is not available, `/proc/net/tcp{,6}` is read instead: a
//! scan, milliseconds with thousands of sockets in TIME_WAIT.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

/// The client end of a connection, as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOwner {
    /// The user that opened the socket.
    pub uid: u32,
    /// The socket's inode: `socket:[INODE]` in its holders' fd links; 0 when
    /// no process holds it any more.
    pub inode: u64,
}

/// Finds the client end of a connection from `peer` to `local` (both on
/// this machine): `None` when the kernel has no such socket, or the two
/// addresses are of different families.
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
    find_in_table(&table, &want_local, &want_remote)
}

/// Finds the socket from `want_local` to `want_remote` (as the table prints
/// addresses) in the text of `/proc/net/tcp{,6}`: a header line, then one
/// line per socket whose fields 1 and 2 are its addresses, 7 its user and
/// 9 its inode. A line that is short or whose numbers do not parse is no
/// match.
fn find_in_table(table: &str, want_local: &str, want_remote: &str) -> Option<SocketOwner> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && f[1] == want_local && f[2] == want_remote {
            let owner = SocketOwner {
                uid: f[7].parse().ok()?,
                inode: f[9].parse().ok()?,
            };
            // Inode 0 is a socket no process holds (TIME_WAIT, orphaned),
            // or a line whose fields have shifted: either way, no owner.
            (owner.inode != 0).then_some(owner)
        } else {
            None
        }
    })
}

/// An address as `/proc/net/tcp` prints it: the address as one host-order
/// word, then the port.
fn hex_v4(a: SocketAddrV4) -> String {
    format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(a.ip().octets()),
        a.port()
    )
}

/// As `/proc/net/tcp6` prints it: four host-order words, then the port.
fn hex_v6(a: SocketAddrV6) -> String {
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

    #[test]
    fn mixed_families_have_no_owner() {
        let v4: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let v6: SocketAddr = "[::1]:2000".parse().unwrap();
        assert_eq!(socket_owner(v4, v6), None);
        assert_eq!(diag_lookup(v6, v4).unwrap(), None);
        assert_eq!(proc_lookup(v4, v6), None);
    }

    #[test]
    fn addresses_are_written_as_the_kernel_prints_them() {
        assert_eq!(
            hex_v4("127.0.0.1:80".parse().unwrap()),
            "0100007F:0050".to_string()
        );
        assert_eq!(
            hex_v6("[::1]:443".parse().unwrap()),
            "00000000000000000000000001000000:01BB".to_string()
        );
        assert_eq!(
            hex_v6("[::ffff:127.0.0.1]:65535".parse().unwrap()),
            "0000000000000000FFFF00000100007F:FFFF".to_string()
        );
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
    const LOCAL: &str = "0100007F:A1B2";
    const REMOTE: &str = "0100007F:1F90";

    /// A table line for the socket from LOCAL to REMOTE with these user and
    /// inode fields.
    fn line(uid: &str, inode: &str) -> String {
        format!("   3: {LOCAL} {REMOTE} 01 00000000:00000000 00:00000000 00000000  {uid}        0 {inode} 1 0000000000000000 20 4 30 10 -1")
    }

    fn table(lines: &[&str]) -> String {
        std::iter::once(HEADER)
            .chain(lines.iter().copied())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_well_formed_table_line_is_found() {
        let good = line("1000", "123456");
        let t = table(&[&good]);
        assert_eq!(
            find_in_table(&t, LOCAL, REMOTE),
            Some(SocketOwner {
                uid: 1000,
                inode: 123456
            })
        );
        // The other direction is another socket.
        assert_eq!(find_in_table(&t, REMOTE, LOCAL), None);
        // The header is never taken for a socket, whatever it holds.
        assert_eq!(find_in_table(&good, LOCAL, REMOTE), None);
    }

    #[test]
    fn hostile_tables_yield_nothing_and_never_panic() {
        let full = line("1000", "123456");
        // Every cut of a matching line: short lines are skipped, and a cut
        // inside the inode field still parses as a (shorter) number.
        for cut in 0..full.len() {
            let t = table(&[&full[..cut]]);
            let found = find_in_table(&t, LOCAL, REMOTE);
            if let Some(o) = found {
                assert_eq!(o.uid, 1000, "cut at {cut}");
                assert!("123456".starts_with(&o.inode.to_string()), "cut at {cut}");
            }
        }
        let bad = [
            // Not numbers.
            line("zz", "123456"),
            line("1000", "0x1E240"),
            line("-1", "123456"),
            line("1000", "-5"),
            line("", ""),
            // Over the field's width.
            line("4294967296", "1"),
            line("1000", "18446744073709551616"),
            line(&"9".repeat(100_000), "1"),
            line("1000", &"9".repeat(100_000)),
            // Not the addresses asked for: padding, bad hex, too long.
            line("1000", "1").replace(LOCAL, "100007F:A1B2"),
            line("1000", "1").replace(LOCAL, "GGGGGGGG:A1B2"),
            line("1000", "1").replace(REMOTE, &"F".repeat(100_000)),
            // Not text a kernel writes.
            "\u{0}\u{0}\u{0}".to_string(),
            "ünïcødé ✓ ".repeat(1000),
            " ".repeat(100_000),
        ];
        for b in &bad {
            assert_eq!(find_in_table(&table(&[b]), LOCAL, REMOTE), None, "{b:.80}");
        }
        assert_eq!(find_in_table("", LOCAL, REMOTE), None);
        assert_eq!(find_in_table(HEADER, LOCAL, REMOTE), None);
        assert_eq!(find_in_table("\n\n\n", LOCAL, REMOTE), None);
        // Garbage around a good line does not hide it.
        let good = line("42", "7");
        let mut lines: Vec<&str> = bad.iter().map(String::as_str).collect();
        lines.push(&good);
        assert_eq!(
            find_in_table(&table(&lines), LOCAL, REMOTE),
            Some(SocketOwner { uid: 42, inode: 7 })
        );
    }
}
