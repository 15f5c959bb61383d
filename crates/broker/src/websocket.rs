//! MQTT over WebSocket: the handshake (subprotocol `mqtt`), the MQTT
//! packet limit applied to WebSocket messages and frames, and the byte
//! budget a client may spend under the WebSocket layer before it logs in.

use crate::connection::{LoggedIn, Stream};
use crate::listener::{Upgraded, HANDSHAKE_TIMEOUT};
use crate::Broker;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes of the HTTP upgrade request (headers, cookies) a client may send
/// on top of its CONNECT before it has logged in.
const HANDSHAKE_BYTES: usize = 16 << 10;

/// The WebSocket handshake, agreeing on the `mqtt` subprotocol when the
/// client offers it. No message or frame may exceed the MQTT packet limit
/// (tungstenite's own default is 64 MiB, buffered whole), and until login
/// the socket holds the client to its pre-login budget.
// The handshake callback's Result type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
pub(crate) async fn upgrade(
    broker: Broker,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<Upgraded> {
    use async_tungstenite::tungstenite::handshake::server::{Request, Response};
    let pick_mqtt = |req: &Request, mut resp: Response| {
        let offers_mqtt = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == "mqtt");
        if offers_mqtt {
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                "mqtt".parse().expect("static header"),
            );
        }
        Ok(resp)
    };
    let config = &broker.inner.config;
    let ws_config = WebSocketConfig {
        max_message_size: Some(config.max_packet_bytes),
        max_frame_size: Some(config.max_packet_bytes),
        ..Default::default()
    };
    let logged_in = LoggedIn::default();
    let socket = PreLoginBudget {
        left: config.login.max_connect_bytes.min(config.max_packet_bytes) + HANDSHAKE_BYTES,
        socket: stream,
        logged_in: logged_in.clone(),
        broker: broker.clone(),
        peer,
        over: false,
    };
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        async_tungstenite::tokio::accept_hdr_async_with_config(socket, pick_mqtt, Some(ws_config)),
    )
    .await;
    let Ok(Ok(ws)) = handshake else {
        tracing::debug!(%peer, "WebSocket handshake failed");
        return None;
    };
    let io = ws_stream_tungstenite::WsStream::new(ws);
    Some((Box::new(io) as Box<dyn Stream>, None, logged_in))
}

/// The client's socket under the WebSocket layer, holding it to a byte
/// budget until it has logged in. Tungstenite assembles a whole message
/// before the broker sees a byte of it, and a stream's limits cannot be
/// changed once it is up (async-tungstenite has no `set_config`); here,
/// below it, what it can buffer is at most what it was given. Written by
/// hand: `tokio::io::Take` ends the stream silently, cannot be lifted by
/// the connection above the layers that own it, and does not write.
struct PreLoginBudget {
    socket: TcpStream,
    left: usize,
    logged_in: LoggedIn,
    broker: Broker,
    peer: SocketAddr,
    /// Whether the client has gone over (counted and logged once).
    over: bool,
}

impl AsyncRead for PreLoginBudget {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.logged_in.get() {
            return Pin::new(&mut this.socket).poll_read(cx, buf);
        }
        if this.left == 0 {
            if !std::mem::replace(&mut this.over, true) {
                tracing::debug!(peer = %this.peer, "a WebSocket client sent more than --mqtt-max-connect-bytes before logging in; closing");
                this.broker
                    .inner
                    .stats
                    .oversize_before_login
                    .fetch_add(1, Ordering::Relaxed);
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "more bytes before login than --mqtt-max-connect-bytes allows",
            )));
        }
        let n = this.left.min(buf.remaining());
        let got = {
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(n));
            ready!(Pin::new(&mut this.socket).poll_read(cx, &mut limited))?;
            limited.filled().len()
        };
        buf.advance(got);
        this.left -= got;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PreLoginBudget {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }
}
