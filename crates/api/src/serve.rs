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
    uid: Arc<std::sync::OnceLock<Option<u32>>>,
}

impl Peer {
    fn new(addr: SocketAddr, local: Option<SocketAddr>) -> Self {
        Peer {
            addr,
            local,
            uid: Arc::default(),
        }
    }

    /// The uid holding a loopback connection's client end (from
    /// `/proc/net/tcp`); none for a remote peer.
    pub fn local_uid(&self) -> Option<u32> {
        *self.uid.get_or_init(|| {
            let local = self.local?;
            if !self.addr.ip().is_loopback() {
                return None;
            }
            roost_runtime_process::peer::socket_owner(self.addr, local).map(|o| o.uid)
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
