//! Accepting TCP connections within the process's file descriptors: a cap
//! per listener (so a flood on one listener never takes the descriptors
//! another needs), accept errors such as EMFILE met with back-off rather
//! than a spin, and the open-files limit raised to the hard limit at start.
//!
//! Shared by the HTTP API (`roost-api`) and the MQTT listeners
//! (`roost-broker`); it knows nothing of either protocol.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most a listener logs about refused connections or failed accepts: one
/// line per period, with the count of those it did not log.
const LOG_PERIOD: Duration = Duration::from_secs(10);
/// Longest pause after an accept failed for want of descriptors or memory.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// One listener's connection counters, kept in the hub's registry.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    /// Connections open now (admitted under the cap).
    pub open: Gauge,
    /// The cap.
    pub max: Gauge,
    /// Connections refused because the cap was reached.
    pub refused: Counter,
    /// Accepts that failed (out of descriptors, say) and were retried.
    pub accept_errors: Counter,
}

/// The cap on one listener's open connections, plus a reserve of an
/// eighth more (at least one) that only clients on this machine (loopback:
/// the owner's CLI, tasks, local programs) may take, so a flood from the
/// network never locks them out.
pub struct ConnectionLimit {
    listener: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
    local: Arc<Semaphore>,
    metrics: ListenerMetrics,
    refusals: LogEvery,
    failures: LogEvery,
}

/// A connection admitted under its listener's cap; dropping it frees the
/// place.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// What an accept gave.
pub enum Accepted {
    /// Under the cap: serve it, holding the slot as long as it is open.
    Admitted(TcpStream, SocketAddr, Slot),
    /// Past the cap (already counted and logged): answer it briefly, or
    /// drop it.
    OverCap(TcpStream, SocketAddr),
}

impl ConnectionLimit {
    /// A cap of `max` open connections (at least 1) for the listener named
    /// `listener` in logs.
    pub fn new(listener: &'static str, max: usize, metrics: ListenerMetrics) -> Self {
        let max = max.max(1);
        metrics.max.set(max as i64);
        ConnectionLimit {
            listener,
            max,
            permits: Arc::new(Semaphore::new(max)),
            local: Arc::new(Semaphore::new(local_reserve(max))),
            metrics,
            refusals: LogEvery::default(),
            failures: LogEvery::default(),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// The next connection. An accept that fails for want of descriptors,
    /// buffers or memory (the connection stays in the kernel's queue) is
    /// retried after a pause that doubles up to a second, counted and
    /// logged at most once per period; one that fails for that connection
    /// alone (reset before it was accepted) is skipped.
    pub async fn accept(&self, listener: &TcpListener) -> Accepted {
        let mut backoff = Duration::from_millis(10);
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let local = peer.ip().to_canonical().is_loopback();
                    let permit = self.permits.clone().try_acquire_owned().or_else(|e| {
                        if local {
                            self.local.clone().try_acquire_owned()
                        } else {
                            Err(e)
                        }
                    });
                    return match permit {
                        Ok(permit) => {
                            self.metrics.open.inc();
                            Accepted::Admitted(
                                stream,
                                peer,
                                Slot {
                                    _permit: permit,
                                    open: self.metrics.open.clone(),
                                },
                            )
                        }
                        Err(_) => {
                            self.metrics.refused.inc();
                            if let Some(unlogged) = self.refusals.due() {
                                tracing::warn!(
                                    listener = self.listener,
                                    max = self.max,
                                    %peer,
                                    refused_unlogged = unlogged,
                                    "connection refused: the listener has as many connections open as its cap"
                                );
                            }
                            Accepted::OverCap(stream, peer)
                        }
                    };
                }
                Err(e) if exhausted(&e) => {
                    self.metrics.accept_errors.inc();
                    if let Some(unlogged) = self.failures.due() {
                        tracing::warn!(
                            listener = self.listener,
                            error = %e,
                            failed_unlogged = unlogged,
                            pause_ms = backoff.as_millis() as u64,
                            "accept failed for want of resources; pausing this listener"
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    tracing::debug!(listener = self.listener, error = %e, "accept failed");
                }
            }
        }
    }
}

/// The places beyond a cap of `max` kept for clients on loopback.
pub fn local_reserve(max: usize) -> usize {
    (max / 8).max(1)
}

/// Whether an accept error is the process's (out of descriptors, buffers
/// or memory) rather than one connection's.
fn exhausted(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Lets one line through per [`LOG_PERIOD`] and counts the rest. Written
/// here because it is a dozen lines: a rate-limiting crate (governor) would
/// bring a clock abstraction and a dependency tree for it.
#[derive(Default)]
struct LogEvery {
    last: Mutex<Option<Instant>>,
    skipped: AtomicU64,
}

impl LogEvery {
    /// `Some(lines skipped since the last one)` when a line may be logged.
    fn due(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LOG_PERIOD) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.skipped.swap(0, Ordering::Relaxed))
    }
}

/// The process's limit on open files, before and after [`raise_open_files`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFiles {
    pub was: u64,
    pub now: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (or the kernel's
/// `fs.nr_open` when the hard limit is unlimited): systemd and many shells
/// start services at a soft 1024, which a hub with a few hundred devices
/// and tasks exhausts.
pub fn raise_open_files() -> std::io::Result<OpenFiles> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let was = lim.rlim_cur;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if target > was {
        lim.rlim_cur = target;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(OpenFiles {
        was,
        now: target.max(was),
        hard: lim.rlim_max,
    })
}

/// The soft open-files limit in force (1024, the usual default, if it
/// cannot be read).
pub fn open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

/// How the open-files limit is shared: a reserve for everything that is
/// not a client connection (the store, task processes and their pipes,
/// outgoing connections, compiled modules), then the HTTP API and the MQTT
/// listeners each get a share, so no listener's flood takes another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shares {
    /// Descriptors no listener may take.
    pub reserve: u64,
    /// The HTTP API's cap.
    pub http: usize,
    /// Each MQTT listener's cap.
    pub mqtt_each: usize,
}

/// Most connections the HTTP API takes by default, however many
/// descriptors there are: it serves the owner, local programs and tasks,
/// not a fleet.
pub const HTTP_DEFAULT_CEILING: usize = 4096;

impl Shares {
    /// A quarter of what is left after the reserve (an eighth of the limit,
    /// at least 64) goes to the HTTP API (at most [`HTTP_DEFAULT_CEILING`]),
    /// the rest is split between the `mqtt_listeners` MQTT listeners; each
    /// cap leaves room for its [`local_reserve`].
    pub fn of(limit: u64, mqtt_listeners: usize) -> Shares {
        let reserve = (limit / 8).max(64).min(limit / 2);
        let clients = (limit - reserve) * 8 / 9;
        let http = ((clients / 4) as usize).clamp(1, HTTP_DEFAULT_CEILING);
        let mqtt = clients.saturating_sub((clients / 4).max(1));
        Shares {
            reserve,
            http,
            mqtt_each: ((mqtt / mqtt_listeners.max(1) as u64) as usize).max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_keep_a_reserve_and_never_overlap() {
        for (limit, listeners) in [(256, 1), (1024, 1), (1024, 3), (65536, 2), (1 << 20, 3)] {
            let s = Shares::of(limit, listeners);
            let with_local = |cap: usize| (cap + local_reserve(cap)) as u64;
            let used = s.reserve + with_local(s.http) + with_local(s.mqtt_each) * listeners as u64;
            assert!(used <= limit, "{limit}: {s:?}");
            assert!(s.reserve >= 64, "{limit}: {s:?}");
        }
        assert_eq!(
            Shares::of(1024, 1),
            Shares {
                reserve: 128,
                http: 199,
                mqtt_each: 597
            }
        );
        assert_eq!(Shares::of(1 << 20, 1).http, HTTP_DEFAULT_CEILING);
    }

    #[test]
    fn a_log_line_per_period_the_rest_counted() {
        let l = LogEvery::default();
        assert_eq!(l.due(), Some(0));
        assert_eq!(l.due(), None);
        assert_eq!(l.due(), None);
        *l.last.lock().unwrap() = Some(Instant::now() - LOG_PERIOD);
        assert_eq!(l.due(), Some(2));
    }

    #[tokio::test]
    async fn past_the_cap_connections_are_handed_back_and_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = ListenerMetrics::default();
        let limit = ConnectionLimit::new("test", 2, metrics.clone());
        // Two under the cap and one in the loopback reserve.
        let _clients: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut slots = Vec::new();
        for _ in 0..3 {
            match limit.accept(&listener).await {
                Accepted::Admitted(s, _, slot) => slots.push((s, slot)),
                Accepted::OverCap(..) => panic!("under the cap"),
            }
        }
        assert!(matches!(
            limit.accept(&listener).await,
            Accepted::OverCap(..)
        ));
        assert_eq!((metrics.open.get(), metrics.refused.get()), (3, 1));
        assert_eq!(metrics.max.get(), 2);
        slots.pop();
        assert_eq!(metrics.open.get(), 2);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        assert!(matches!(
            limit.accept(&listener).await,
            Accepted::Admitted(..)
        ));
    }

    /// This machine's address on its way out, if it has one that is not
    /// loopback (found without sending anything).
    fn outward_ip() -> Option<std::net::IpAddr> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        s.connect("192.0.2.1:9").ok()?;
        let ip = s.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    }

    #[tokio::test]
    async fn the_loopback_reserve_is_for_loopback_clients_only() {
        let Some(ip) = outward_ip() else {
            eprintln!("no address but loopback: nothing to check");
            return;
        };
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let limit = ConnectionLimit::new("test", 1, ListenerMetrics::default());
        let _far = std::net::TcpStream::connect((ip, port)).unwrap();
        let Accepted::Admitted(_s, _, _slot) = limit.accept(&listener).await else {
            panic!("under the cap");
        };
        // Past the cap: another from the outward address is refused...
        let _far2 = std::net::TcpStream::connect((ip, port)).unwrap();
        assert!(matches!(
            limit.accept(&listener).await,
            Accepted::OverCap(..)
        ));
        // ...one from loopback takes the reserve.
        let _near = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(matches!(
            limit.accept(&listener).await,
            Accepted::Admitted(..)
        ));
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let f = raise_open_files().unwrap();
        assert!(f.now >= f.was);
        if f.hard != libc::RLIM_INFINITY {
            assert_eq!(f.now, f.hard);
        }
    }
}
