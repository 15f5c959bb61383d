//! Serving the router on a bound listener, in plain HTTP or over TLS
//! (rustls with ring), until the shutdown future resolves.

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::serve::IncomingStream;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
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

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        // Called once per accepted connection: the place to set it up.
        let _ = stream.io().set_nodelay(true);
        Peer::new(*stream.remote_addr(), stream.io().local_addr().ok())
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

/// Serves until `shutdown` resolves; then stops accepting connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let Some(tls) = config.tls else {
        return axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
            .with_graceful_shutdown(shutdown)
            .await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(load_tls(&tls)?));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let who = Peer::new(peer, tcp.local_addr().ok());
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(ConnectInfo(who.clone()));
                app.clone().oneshot(req)
            });
            if let Err(e) = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
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
