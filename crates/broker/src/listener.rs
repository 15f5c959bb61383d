//! Listening: one accept loop for every transport, which hands each
//! accepted TCP connection to its upgrade (none, WebSocket, TLS) and then
//! to the connection's own task.

use crate::connection::{self, LoggedIn, Stream};
use crate::{tls, Broker};
use roost_listen::ConnectionLimit;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Time a client gets to finish a TLS or WebSocket handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection made ready for MQTT: its byte stream, the device a
/// verified client certificate names, if any, and the flag its transport
/// watches for the client's login.
pub(crate) type Upgraded = (Box<dyn Stream>, Option<String>, LoggedIn);

impl Broker {
    /// Serves MQTT on an already bound listener until the task is dropped,
    /// at most `cap` connections at once (past it a connection is closed).
    pub async fn serve(self, listener: TcpListener, cap: ConnectionLimit) {
        self.accept_loop(listener, cap, "MQTT", |stream, _| async move {
            Some((
                Box::new(stream) as Box<dyn Stream>,
                None,
                LoggedIn::default(),
            ))
        })
        .await
    }

    /// Serves MQTT over WebSockets (subprotocol `mqtt`, binary frames), for
    /// browsers and clients behind HTTP-only networks.
    pub async fn serve_websocket(self, listener: TcpListener, cap: ConnectionLimit) {
        let broker = self.clone();
        self.accept_loop(listener, cap, "MQTT/WebSocket", move |stream, peer| {
            crate::websocket::upgrade(broker.clone(), stream, peer)
        })
        .await
    }

    /// Serves MQTT over TLS. With a client CA in `tls`, clients present
    /// certificates; a verified certificate's common name is the device it
    /// authenticates.
    pub async fn serve_tls(self, listener: TcpListener, tls: tls::MqttTls, cap: ConnectionLimit) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
        self.accept_loop(listener, cap, "MQTT/TLS", move |stream, peer| {
            let acceptor = acceptor.clone();
            async move {
                let handshake =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                let Ok(Ok(tls)) = handshake else {
                    tracing::debug!(%peer, "TLS handshake failed");
                    return None;
                };
                let device = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| tls::common_name(c.as_ref()));
                Some((
                    Box::new(tls) as Box<dyn Stream>,
                    device,
                    LoggedIn::default(),
                ))
            }
        })
        .await
    }

    /// Accepts connections until the task is dropped; each gets its own
    /// task, which runs `upgrade` (a handshake, say) and then serves MQTT
    /// on what it gives (none: the connection is dropped).
    async fn accept_loop<U, F>(
        self,
        listener: TcpListener,
        cap: ConnectionLimit,
        transport: &'static str,
        upgrade: U,
    ) where
        U: Fn(TcpStream, SocketAddr) -> F,
        F: Future<Output = Option<Upgraded>> + Send + 'static,
    {
        loop {
            // Past the cap (counted and logged by `cap`), the connection is
            // closed; accept errors are backed off there.
            let roost_listen::Accepted::Admitted(stream, peer, slot) = cap.accept(&listener).await
            else {
                continue;
            };
            tracing::trace!(%peer, "{transport} connection accepted");
            let broker = self.clone();
            let ready = upgrade(stream, peer);
            tokio::spawn(async move {
                let _slot = slot;
                if let Some((io, device, logged_in)) = ready.await {
                    connection::run(broker, io, peer, device, logged_in).await;
                }
            });
        }
    }
}
