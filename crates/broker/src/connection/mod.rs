//! One client connection: the state it holds and what it does to it
//! (write, deliver, keep its session, leave). Framing, CONNECT and
//! authentication, and the packet loop each have their own module.

mod connect;
mod frame;
mod packets;

use crate::persist::background;
use crate::policy::Policy;
use crate::{route_owned, Broker, Message, Outbound, PersistError};
use bytes::{Bytes, BytesMut};
use frame::Frame;
use futures::stream::FuturesOrdered;
use mqtt5_protocol::packet::disconnect::DisconnectPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::{Packet, Properties, PropertyId, ReasonCode};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
/// A client's byte stream: plain TCP or TLS.
pub(crate) trait Stream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
type TcpStream = Box<dyn Stream>;

/// Whether the client has logged in (its CONNECT accepted), shared with
/// its transport: until then, packets are held to the CONNECT limit and a
/// WebSocket to its pre-login byte budget.
#[derive(Clone, Debug, Default)]
pub(crate) struct LoggedIn(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl LoggedIn {
    pub(crate) fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Time a client gets to send CONNECT.
/// How long the last write of an ending connection may take.
const FINAL_FLUSH: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Topic aliases a v5 client may use towards the broker.
const TOPIC_ALIAS_MAX: u16 = 64;
/// Outgoing QoS 1/2 messages awaiting acknowledgement per connection.
const MAX_INFLIGHT: usize = 64;
/// Retained messages taken at once for a SUBSCRIBE (at QoS 1/2, no more
/// than the in-flight window has room for): the lock is held for one
/// chunk, and other work goes on between chunks.
const RETAINED_CHUNK: usize = 64;
/// Stored messages read at once when a session's queue is in the store.
const STORED_PAGE: usize = 256;

/// The retained messages a subscription has still to get: the next chunk
/// starts after `after`.
struct RetainedDue {
    filter: String,
    qos: crate::QoS,
    after: Option<String>,
}

/// An acknowledgement (encoded) that may go out once its publish is durable.
type PendingAck =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, PersistError>> + Send>>;

struct Conn {
    broker: Broker,
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    version: u8,
    client_id: String,
    conn_id: u64,
    policy: Policy,
    aliases: HashMap<u16, String>,
    next_pid: u16,
    /// Outgoing QoS 1/2 publishes not yet acknowledged, by packet id.
    inflight: HashMap<u16, Message>,
    /// Outgoing QoS 2 publishes acknowledged with PUBREC, awaiting PUBCOMP
    /// (packet id → stored message id).
    released: HashMap<u16, u64>,
    /// Acknowledgements waiting for their publish to be durable, in order.
    acks: FuturesOrdered<PendingAck>,
    /// Bytes of this client's publishes whose store writes are pending.
    pending_bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    persistent: bool,
    /// MQTT 5 session expiry: how long the session outlives the connection.
    session_expiry: Option<Duration>,
    /// Incoming QoS 2 packet ids received and not yet released.
    incoming_qos2: HashSet<u16>,
    pending: VecDeque<Message>,
    /// Subscriptions whose retained messages are still being sent.
    retained_due: VecDeque<RetainedDue>,
    /// While the session's queue is read from the store, the id of the
    /// last message read (stored messages coming through the channel are
    /// skipped meanwhile: the store has them, in order).
    stored_after: Option<u64>,
    /// The highest stored message id read from the store.
    loaded_up_to: u64,
    will: Option<Message>,
    peer: SocketAddr,
    cert_device: Option<String>,
    logged_in: LoggedIn,
}

/// Serves one client. `cert_device` is the device a verified TLS client
/// certificate names, if any: that client is authenticated by it.
pub(crate) async fn run(
    broker: Broker,
    stream: TcpStream,
    peer: SocketAddr,
    cert_device: Option<String>,
    logged_in: LoggedIn,
) {
    let mut conn = Conn {
        conn_id: broker.inner.next_conn.fetch_add(1, Ordering::Relaxed),
        broker,
        stream,
        // Buffers grow with the packets; an idle connection holds little.
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        version: 4,
        client_id: String::new(),
        policy: Policy::anonymous(),
        aliases: HashMap::new(),
        next_pid: 0,
        inflight: HashMap::new(),
        released: HashMap::new(),
        acks: FuturesOrdered::new(),
        pending_bytes: Default::default(),
        persistent: false,
        session_expiry: None,
        incoming_qos2: HashSet::new(),
        pending: VecDeque::new(),
        retained_due: VecDeque::new(),
        stored_after: None,
        loaded_up_to: 0,
        will: None,
        peer,
        cert_device,
        logged_in,
    };
    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, conn.read_frame()).await {
        Ok(Some(Frame::Packet(Packet::Connect(c)))) => c,
        Ok(Some(Frame::TooLarge)) => {
            tracing::debug!(%peer, limit = conn.packet_limit(), "CONNECT over the size limit (--mqtt-max-connect-bytes)");
            conn.broker
                .inner
                .stats
                .oversize_before_login
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok(other) => {
            tracing::debug!(%peer, first = ?other.map(|f| format!("{f:?}").chars().take(80).collect::<String>()), "the first packet was not a valid CONNECT");
            return;
        }
        Err(_) => return,
    };
    conn.broker
        .inner
        .stats
        .connections
        .fetch_add(1, Ordering::Relaxed);
    let Some((rx, keep_alive)) = conn.accept(*connect).await else {
        conn.broker
            .inner
            .stats
            .connects_refused
            .fetch_add(1, Ordering::Relaxed);
        conn.final_flush().await;
        return;
    };
    conn.logged_in.set();
    let mut rx = rx;
    let clean = conn.serve(&mut rx, keep_alive).await;
    conn.leave(clean, &mut rx).await;
}

impl Conn {
    /// The largest packet this client may send now: a CONNECT is small,
    /// so until login it is held to the CONNECT limit (a client that has
    /// not logged in cannot make the hub buffer a megabyte).
    fn packet_limit(&self) -> usize {
        let config = &self.broker.inner.config;
        if self.logged_in.get() {
            config.max_packet_bytes
        } else {
            config.login.max_connect_bytes.min(config.max_packet_bytes)
        }
    }

    async fn read_frame(&mut self) -> Option<Frame> {
        let max = self.packet_limit();
        frame::read_frame(
            &mut self.stream,
            &mut self.rbuf,
            &self.broker,
            self.version,
            max,
        )
        .await
    }

    fn queue<P: MqttPacket>(&mut self, p: &P) {
        if let Err(e) = p.encode(&mut self.wbuf) {
            tracing::warn!(client = %self.client_id, error = %e, "cannot encode a packet");
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let n = self.wbuf.len();
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        if self.wbuf.capacity() > 64 << 10 {
            self.wbuf = BytesMut::new();
        }
        self.broker
            .inner
            .stats
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The last write of a connection that is ending (a refusal, a
    /// DISCONNECT, what was left): given a second, then given up, so a
    /// peer that stopped reading cannot hold the connection's task, its
    /// slot and its buffer open forever.
    async fn final_flush(&mut self) {
        match tokio::time::timeout(FINAL_FLUSH, self.flush()).await {
            Ok(Ok(())) => {}
            _ => self.wbuf = BytesMut::new(),
        }
    }

    /// A stored message reached this persistent session: drop its row.
    fn forget_stored(&self, id: u64) {
        if id != 0 && self.persistent {
            if let Some(p) = &self.broker.inner.persist {
                background(p.delivered(&self.client_id, id));
            }
        }
    }

    /// Sends `ack` once `durable` (if any) is on disk, after earlier acks.
    fn ack_after<P: MqttPacket>(&mut self, ack: &P, durable: Option<crate::Done>) {
        if durable.is_none() && self.acks.is_empty() {
            // Nothing to wait for and nothing ahead of it: straight out.
            self.queue(ack);
            return;
        }
        let mut buf = BytesMut::new();
        let _ = ack.encode(&mut buf);
        let bytes = buf.freeze();
        self.acks.push_back(Box::pin(async move {
            if let Some(d) = durable {
                d.await?;
            }
            Ok(bytes)
        }));
    }

    /// Forgets the session `expiry` after this connection ended, unless a
    /// client has taken it up again by then.
    fn expire_later(&self, expiry: Duration) {
        self.broker
            .expire_session_after(self.client_id.clone(), self.conn_id, expiry);
    }

    /// Keeps this persistent session (its device and expiry) in the store.
    fn save_session(&self) {
        if let Some(p) = &self.broker.inner.persist {
            let device = &self.policy.device.name;
            background(p.save_session(
                &self.client_id,
                (!device.is_empty()).then_some(device.as_str()),
                self.session_expiry.map(|d| d.as_secs() as u32),
            ));
        }
    }

    /// MQTT 5 lets a client change its session's expiry when it leaves
    /// (3.14.2.2.2): 0 ends the session with the connection, the maximum
    /// keeps it forever; a session that had none may not gain one.
    fn change_session_expiry(&mut self, secs: u32) -> Result<(), ReasonCode> {
        if self.version != 5 {
            return Ok(());
        }
        if !self.persistent {
            return if secs == 0 {
                Ok(())
            } else {
                Err(ReasonCode::ProtocolError)
            };
        }
        self.session_expiry = session_expiry(secs);
        if secs == 0 {
            self.persistent = false;
            if let Some(s) = self
                .broker
                .inner
                .state
                .lock()
                .sessions
                .get_mut(&self.client_id)
            {
                s.persistent = false;
            }
            if let Some(p) = &self.broker.inner.persist {
                background(p.drop_session(&self.client_id));
            }
        } else {
            self.save_session();
        }
        Ok(())
    }

    fn next_packet_id(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1);
            if self.next_pid != 0
                && !self.inflight.contains_key(&self.next_pid)
                && !self.released.contains_key(&self.next_pid)
            {
                return self.next_pid;
            }
        }
    }

    /// Writes a message to this client (QoS 1/2 wait in `inflight`).
    fn deliver(&mut self, m: Message) {
        if m.qos.is_acknowledged() && self.inflight.len() + self.released.len() >= MAX_INFLIGHT {
            self.pending.push_back(m);
            return;
        }
        let remaining = m
            .expires_at
            .map(|t| t.saturating_duration_since(Instant::now()));
        if remaining.is_some_and(|r| r.is_zero()) {
            // Expired while it waited: dropped, as MQTT 5 says.
            self.forget_stored(m.id);
            return;
        }
        let qos = mqtt5_protocol::QoS::from(m.qos);
        let mut p = if self.version == 5 {
            let mut p = PublishPacket::new(m.topic.clone(), m.payload.to_vec(), qos);
            p.properties = m.properties.clone();
            if let Some(r) = remaining {
                // The receiver sees what is left of the expiry.
                let mut props = Properties::new();
                for (id, v) in m.properties.iter() {
                    if id != PropertyId::MessageExpiryInterval {
                        let _ = props.add(id, v.clone());
                    }
                }
                props.set_message_expiry_interval(r.as_secs().max(1) as u32);
                p.properties = props;
            }
            p
        } else {
            PublishPacket::new_v311(m.topic.clone(), m.payload.to_vec(), qos)
        };
        p.retain = m.retain;
        if m.qos.is_acknowledged() {
            let id = self.next_packet_id();
            p.packet_id = Some(id);
            self.inflight.insert(id, m.clone());
        }
        self.broker.inner.stats.messages_out[m.qos.as_u8() as usize]
            .fetch_add(1, Ordering::Relaxed);
        self.queue(&p);
    }

    /// Whether this connection takes more messages: its in-flight window
    /// has room and nothing waits ahead. While it does not, the broker's
    /// channel fills, and past it the client is slow (see `route`).
    fn window_open(&self) -> bool {
        self.inflight.len() + self.released.len() < MAX_INFLIGHT && self.pending.is_empty()
    }

    /// Whether there is work to do with no packet to wait for: a chunk of
    /// retained messages, or a page of the stored queue.
    fn more_to_send(&self) -> bool {
        self.window_open() && (!self.retained_due.is_empty() || self.stored_after.is_some())
    }

    /// Sends the next chunk of a subscription's retained messages.
    fn feed_retained(&mut self) {
        if !self.window_open() {
            return;
        }
        let Some(due) = self.retained_due.front_mut() else {
            return;
        };
        let room = if due.qos.is_acknowledged() {
            MAX_INFLIGHT - self.inflight.len() - self.released.len()
        } else {
            RETAINED_CHUNK
        }
        .min(RETAINED_CHUNK);
        let (chunk, last) = self.broker.inner.state.lock().retained.chunk(
            &due.filter,
            due.after.as_deref(),
            room,
            due.qos,
        );
        match last {
            Some(l) => due.after = Some(l),
            None => {
                self.retained_due.pop_front();
            }
        }
        for m in chunk {
            self.deliver(m);
        }
    }

    /// One SUBSCRIBE's subscriptions are to get their retained messages
    /// (from the first again, if they were still getting them). One pass
    /// over what is due, however many filters the SUBSCRIBE names.
    fn send_retained(&mut self, due: Vec<(String, crate::QoS)>) {
        let mut by_filter: HashMap<String, crate::QoS> = HashMap::with_capacity(due.len());
        let mut order = Vec::with_capacity(due.len());
        for (filter, qos) in due {
            // A filter named twice: its last options win.
            if by_filter.insert(filter.clone(), qos).is_none() {
                order.push(filter);
            }
        }
        self.retained_due
            .retain(|d| !by_filter.contains_key(&d.filter));
        for filter in order {
            let qos = by_filter[&filter];
            self.retained_due.push_back(RetainedDue {
                filter,
                qos,
                after: None,
            });
        }
    }

    /// At the start of a connection: if messages for this session were
    /// left in the store only, its queue is read from the store instead.
    fn take_backlog(&mut self) {
        let mut st = self.broker.inner.state.lock();
        let Some(s) = st.sessions.get_mut(&self.client_id) else {
            return;
        };
        // CONNECT took its queue.
        s.backlog.bytes = 0;
        let stored_only = std::mem::take(&mut s.backlog.stored_only);
        if stored_only && self.persistent && self.broker.inner.persist.is_some() {
            // The queue's stored messages are read again, in order.
            self.pending.retain(|m| m.id == 0);
            self.stored_after = Some(0);
        }
    }

    /// Reads the next page of the stored queue into `pending`.
    async fn load_stored(&mut self) -> Result<(), PersistError> {
        let (Some(after), Some(p)) = (self.stored_after, self.broker.inner.persist.clone()) else {
            return Ok(());
        };
        let max_bytes = self.broker.inner.config.outgoing_buffer_bytes;
        let page = p
            .queued(&self.client_id, after, STORED_PAGE, max_bytes)
            .await?;
        self.stored_after = page.last().map(|q| q.id);
        for q in page {
            self.loaded_up_to = self.loaded_up_to.max(q.id);
            self.pending.push_back(Message {
                topic: q.topic,
                payload: Bytes::from(q.payload),
                qos: q.qos,
                retain: q.retain,
                properties: crate::decode_properties(&q.properties),
                from: crate::Publisher::Hub,
                id: q.id,
                expires_at: q.expires_ms.map(crate::instant_of_wall_clock),
            });
        }
        Ok(())
    }

    /// Whether a message from the channel is one the store gives (or gave)
    /// this connection already.
    fn read_from_store(&self, m: &Message) -> bool {
        m.id != 0 && (self.stored_after.is_some() || m.id <= self.loaded_up_to)
    }

    fn drain_pending(&mut self) {
        while self.inflight.len() + self.released.len() < MAX_INFLIGHT {
            let Some(m) = self.pending.pop_front() else {
                break;
            };
            self.deliver(m);
        }
    }

    fn disconnect_with(&mut self, reason: ReasonCode) {
        if self.version == 5 {
            self.queue(&DisconnectPacket::new(reason));
        }
    }

    /// Ends the connection: the will goes out unless the client said goodbye,
    /// and a session that is not persistent is forgotten.
    async fn leave(&mut self, clean: bool, rx: &mut mpsc::Receiver<Outbound>) {
        self.final_flush().await;
        let mut st = self.broker.inner.state.lock();
        let ours = st
            .sessions
            .get(&self.client_id)
            .is_some_and(|s| s.conn.as_ref().is_none_or(|(id, _)| *id == self.conn_id));
        if ours {
            let persistent = st
                .sessions
                .get(&self.client_id)
                .is_some_and(|s| s.persistent);
            if persistent {
                // What was in flight, read and waiting, and still in the
                // channel (not read while the window was shut): all of it
                // goes back to the session, for its next connection.
                let mut unacked: Vec<Message> = self
                    .inflight
                    .drain()
                    .map(|(_, m)| m)
                    .chain(self.pending.drain(..))
                    .collect();
                while let Ok(out) = rx.try_recv() {
                    if let Outbound::Deliver(m, _charge) = out {
                        unacked.push(*m);
                    }
                }
                if let Some(s) = st.sessions.get_mut(&self.client_id) {
                    s.conn = None;
                    for m in unacked.into_iter().rev() {
                        s.backlog.bytes += crate::weight(&m);
                        s.queue.push_front(m);
                    }
                    // The store holds more than was read: the next
                    // connection goes on reading it.
                    if self.stored_after.is_some() {
                        s.backlog.stored_only = true;
                    }
                }
                if let Some(expiry) = self.session_expiry {
                    self.expire_later(expiry);
                }
            } else if let Some(s) = st.sessions.remove(&self.client_id) {
                for f in s.subscriptions.keys() {
                    st.remove_sub(&self.client_id, f);
                }
            }
        }
        drop(st);
        if !clean {
            if let Some(w) = self.will.take() {
                // Its session may be gone: it counts against the device.
                let device = &self.policy.device.name;
                let owner = if device.is_empty() {
                    self.client_id.clone()
                } else {
                    device.clone()
                };
                if let Ok(Some(d)) = route_owned(&self.broker.inner, w, false, Some(owner)) {
                    background(d);
                }
            }
        }
        tracing::debug!(client = %self.client_id, clean, "MQTT client left");
    }
}

/// An MQTT 5 session expiry interval: the maximum means never.
fn session_expiry(secs: u32) -> Option<Duration> {
    (secs != u32::MAX).then(|| Duration::from_secs(secs as u64))
}
