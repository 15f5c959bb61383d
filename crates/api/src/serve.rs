//! Serving the router on a bound listener, in plain HTTP or over TLS
//! (rustls with ring), until the shutdown future resolves: each connection
//! under the listener's cap, a header timeout, an idle timeout and a
//! per-frame body timeout, so a client that sends little holds little.

use axum::extract::connect_info::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tower::ServiceExt;

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct ServeConfig {
    pub tls: Option<TlsFiles>,
    pub limits: ConnectionLimits,
}

/// What one client connection may hold of the hub.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Connections open at once; past it a client is refused (503, or
    /// closed), never queued.
    pub max_connections: usize,
    /// Time a client gets to send a whole request head, on a new
    /// connection and between requests on a kept-alive one.
    pub header_timeout: Duration,
    /// Time a connection may move no bytes (a stalled request body, an
    /// answer the client does not read, an idle HTTP/2 connection) before
    /// the hub closes it.
    pub idle_timeout: Duration,
    /// The listener's counters in the hub's registry.
    pub metrics: roost_listen::ListenerMetrics,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            metrics: Default::default(),
        }
    }
}

/// The other end of a connection, and (asked once per connection, only
/// when needed) which user of this machine holds it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    local: Option<SocketAddr>,
    user: Arc<std::sync::OnceLock<PeerUser>>,
}

/// Who holds the client end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerUser {
    /// Another machine.
    Remote,
    /// A process of this machine running as this uid.
    Local(u32),
    /// A connection from this machine whose owner could not be found (for
    /// one, a client that already closed its end: the kernel keeps no
    /// owner for a socket in TIME_WAIT). Not to be trusted as anyone.
    Unknown,
}

impl Peer {
    fn new(addr: SocketAddr, local: Option<SocketAddr>) -> Self {
        Peer {
            addr,
            local,
            user: Arc::default(),
        }
    }

    /// Who holds the connection's client end: a connection from this
    /// machine (loopback, or from one of its own addresses; IPv4-mapped
    /// IPv6 addresses count as IPv4) is looked up in the kernel's socket
    /// table.
    pub fn user(&self) -> PeerUser {
        *self.user.get_or_init(|| {
            let Some(local) = self.local else {
                return PeerUser::Unknown;
            };
            let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            let (peer, local_c) = (canon(self.addr), canon(local));
            if !(peer.ip().is_loopback() || peer.ip() == local_c.ip()) {
                return PeerUser::Remote;
            }
            let owner = roost_peer::socket_owner;
            // A v4-mapped pair is asked as IPv4 first, as it is as raw.
            let found = owner(peer, local_c).or_else(|| {
                (peer != self.addr)
                    .then(|| owner(self.addr, local))
                    .flatten()
            });
            match found {
                // No inode: a socket its process has already let go of.
                Some(o) if o.inode != 0 => PeerUser::Local(o.uid),
                _ => PeerUser::Unknown,
            }
        })
    }
}

fn load_tls(files: &TlsFiles) -> std::io::Result<rustls::ServerConfig> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {e}"))
    };
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&files.cert)
            .map_err(|e| bad(&format!("cannot open {}", files.cert.display()), &e))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| bad("the certificate file is not PEM", &e))?;
    if certs.is_empty() {
        return Err(bad("no certificate found", &files.cert.display()));
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&files.key)
            .map_err(|e| bad(&format!("cannot open {}", files.key.display()), &e))?,
    ))
    .map_err(|e| bad("the key file is not PEM", &e))?
    .ok_or_else(|| bad("no private key found", &files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS setup", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("the certificate and key do not fit", &e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves until `shutdown` resolves; then stops accepting connections,
/// asks every open one to finish what it is answering, and returns once
/// they have closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = match &config.tls {
        Some(tls) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(load_tls(tls)?))),
        None => None,
    };
    let limits = Arc::new(config.limits);
    let cap =
        roost_listen::ConnectionLimit::new("http", limits.max_connections, limits.metrics.clone());
    let over_cap_answers = Arc::new(tokio::sync::Semaphore::new(OVER_CAP_ANSWERS));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a sender: once all are dropped, all
    // connections have closed.
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = cap.accept(&listener) => a,
        };
        let (tcp, peer, slot) = match accepted {
            roost_listen::Accepted::Admitted(tcp, peer, slot) => (tcp, peer, slot),
            roost_listen::Accepted::OverCap(tcp, _) => {
                // A plain HTTP client is told why (and /healthz still
                // answers), within a bounded lane; a TLS one, or any past
                // the lane, is closed at once.
                if acceptor.is_none() {
                    if let Ok(p) = over_cap_answers.clone().try_acquire_owned() {
                        let max = cap.max();
                        tokio::spawn(async move {
                            answer_over_cap(tcp, max).await;
                            drop(p);
                        });
                    }
                }
                continue;
            }
        };
        let who = Peer::new(peer, tcp.local_addr().ok());
        let (app, limits, acceptor) = (app.clone(), limits.clone(), acceptor.clone());
        let (stop, open) = (stop_rx.clone(), open_tx.clone());
        tokio::spawn(async move {
            let _held = (slot, open);
            match acceptor {
                None => serve_connection(tcp, who, app, &limits, stop).await,
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    serve_connection(tls, who, app, &limits, stop).await
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    drop(open_tx);
    let _ = open_rx.recv().await;
    Ok(())
}

/// Serves HTTP on one connection under the limits: hyper's header timer
/// (which also bounds the wait for the next request on a kept-alive
/// connection), a per-frame timeout on request bodies, a timeout on writes
/// the client does not take, and a graceful close once the connection has
/// moved no bytes for the idle timeout (a request being answered still
/// gets its answer).
async fn serve_connection<T>(
    io: T,
    who: Peer,
    app: Router,
    limits: &ConnectionLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let idle = limits.idle_timeout;
    let activity = Arc::new(Activity::new());
    let io = Watched::new(io, activity.clone(), idle);
    let peer = who.addr;
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req =
            req.map(|b| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(idle, b)));
        req.extensions_mut().insert(ConnectInfo(who.clone()));
        app.clone().oneshot(req)
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    // With upgrades: the cloud serves its hubs' WebSockets through this too.
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|s| *s), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tick.tick(), if !closing => {
                if activity.quiet_for() >= idle {
                    tracing::debug!(%peer, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Connections past the cap that are answered rather than dropped, at once.
const OVER_CAP_ANSWERS: usize = 16;
/// Time an over-cap client gets to send its request head.
const OVER_CAP_READ: Duration = Duration::from_secs(1);
/// Time a client gets to finish a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers a plain HTTP connection past the cap without serving it: `GET
/// /healthz` still says the hub is alive, anything else gets 503 with the
/// API's error document and `Retry-After`. Reads at most one small head,
/// briefly, so answering costs next to nothing.
async fn answer_over_cap(mut tcp: tokio::net::TcpStream, max: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = [0u8; 1024];
    let mut n = 0;
    let _ = tokio::time::timeout(OVER_CAP_READ, async {
        while n < head.len() {
            match tcp.read(&mut head[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
            if head[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    let head = &head[..n];
    let healthz = head.starts_with(b"GET /healthz ") || head.starts_with(b"GET /healthz?");
    let response = if healthz {
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n".to_owned()
    } else {
        let body = serde_json::json!({"error": {
            "code": "too_many_connections",
            "message": format!("the hub's HTTP API has {max} connections open, its limit (--http-max-connections); retry shortly"),
        }})
        .to_string();
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let _ = tokio::time::timeout(OVER_CAP_READ, async {
        let _ = tcp.write_all(response.as_bytes()).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

/// When a connection last moved a byte, either way.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn quiet_for(&self) -> Duration {
        let since = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(since)
    }
}

/// A connection's byte stream, noting activity, and failing a write the
/// client has not taken for the idle timeout (a client that stops reading
/// an answer would otherwise hold its connection forever). Hand-written:
/// `tokio-io-timeout` does this but is not among our dependencies, and the
/// activity mark is ours anyway.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
    write_timeout: Duration,
    write_stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Watched<T> {
    fn new(io: T, activity: Arc<Activity>, write_timeout: Duration) -> Self {
        Watched {
            io,
            activity,
            write_timeout,
            write_stalled: None,
        }
    }

    /// Passes a write's outcome through, timing how long it stays pending.
    fn on_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match r {
            Poll::Pending => {
                let timeout = self.write_timeout;
                let stalled = self
                    .write_stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stalled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client took none of the answer for the idle timeout",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.write_stalled = None;
                self.activity.touch();
                ready
            }
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.on_write(cx, r)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.on_write(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.on_write(cx, r)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_remote_local_or_unknown_never_assumed() {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (conn, peer) = server.accept().unwrap();
        let local = conn.local_addr().unwrap();
        assert_eq!(Peer::new(peer, Some(local)).user(), PeerUser::Local(me));
        // The same, seen through an IPv4-mapped IPv6 address.
        let mapped = |a: SocketAddr| match a {
            SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
            v6 => v6,
        };
        assert_eq!(
            Peer::new(mapped(peer), Some(mapped(local))).user(),
            PeerUser::Local(me)
        );
        // A local connection nobody holds: unknown, not the owner.
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(Peer::new(gone, Some(local)).user(), PeerUser::Unknown);
        assert_eq!(Peer::new(peer, None).user(), PeerUser::Unknown);
        // Another machine.
        let far: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        assert_eq!(Peer::new(far, Some(local)).user(), PeerUser::Remote);
    }
}
