//! One client connection: framing, CONNECT and authentication, then the
//! packet loop (publish, subscribe, QoS flows, keep-alive) until the client
//! leaves, breaks the protocol or stops reading.

use crate::persist::background;
use crate::policy::{verify_password, Policy};
use crate::topic::{matches, valid_filter, valid_topic_name};
use crate::{route, Broker, Message, Outbound, Session, SubOptions};
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use mqtt5_protocol::packet::connack::ConnAckPacket;
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::packet::disconnect::DisconnectPacket;
use mqtt5_protocol::packet::puback::PubAckPacket;
use mqtt5_protocol::packet::pubcomp::PubCompPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::pubrec::PubRecPacket;
use mqtt5_protocol::packet::pubrel::PubRelPacket;
use mqtt5_protocol::packet::suback::{SubAckPacket, SubAckReasonCode};
use mqtt5_protocol::packet::unsuback::{UnsubAckPacket, UnsubAckReasonCode};
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::{FixedHeader, Packet, PacketType, Properties, PropertyId, QoS, ReasonCode};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// A client's byte stream: plain TCP or TLS.
pub(crate) trait Stream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
type TcpStream = Box<dyn Stream>;
use tokio::sync::mpsc;

/// Time a client gets to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Topic aliases a v5 client may use towards the broker.
const TOPIC_ALIAS_MAX: u16 = 64;
/// Outgoing QoS 1/2 messages awaiting acknowledgement per connection.
const MAX_INFLIGHT: usize = 64;

#[derive(Debug)]
enum Frame {
    Packet(Packet),
    /// Larger than the broker accepts.
    TooLarge,
    Malformed(String),
}

/// Pulls one whole packet off the front of `buf`, if there is one.
fn next_frame(buf: &mut BytesMut, max: usize, version: u8) -> Option<Frame> {
    if buf.len() < 2 {
        return None;
    }
    // The remaining length is a variable-length integer of 1 to 4 bytes.
    let mut len: usize = 0;
    let mut header = 1;
    loop {
        if header >= buf.len() {
            return None;
        }
        let b = buf[header];
        len |= ((b & 0x7f) as usize) << (7 * (header - 1));
        header += 1;
        if b & 0x80 == 0 {
            break;
        }
        if header > 4 {
            return Some(Frame::Malformed(
                "remaining length longer than 4 bytes".into(),
            ));
        }
    }
    let total = header + len;
    if total > max {
        return Some(Frame::TooLarge);
    }
    if buf.len() < total {
        return None;
    }
    let mut frame = buf.split_to(total).freeze();
    let fixed = match FixedHeader::decode(&mut frame) {
        Ok(h) => h,
        Err(e) => return Some(Frame::Malformed(e.to_string())),
    };
    if !fixed.validate_flags() {
        return Some(Frame::Malformed("reserved flags set".into()));
    }
    let decoded = if fixed.packet_type == PacketType::Connect {
        Packet::decode_from_body(fixed.packet_type, &fixed, &mut frame)
    } else {
        Packet::decode_from_body_with_version(fixed.packet_type, &fixed, &mut frame, version)
    };
    Some(match decoded {
        Ok(p) => Frame::Packet(p),
        Err(e) => Frame::Malformed(e.to_string()),
    })
}

/// Reads until one whole packet is buffered (a free function so the packet
/// loop can borrow the connection's other fields at the same time).
async fn read_frame(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    broker: &Broker,
    version: u8,
) -> Option<Frame> {
    loop {
        if let Some(f) = next_frame(rbuf, broker.inner.config.max_packet_bytes, version) {
            return Some(f);
        }
        if rbuf.capacity() - rbuf.len() < 256 {
            rbuf.reserve(if rbuf.is_empty() { 512 } else { 4096 });
        }
        let n = stream.read_buf(rbuf).await.ok()?;
        if n == 0 {
            return None;
        }
        broker
            .inner
            .stats
            .bytes_in
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// An acknowledgement (encoded) that may go out once its publish is durable.
type PendingAck =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, String>> + Send>>;

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
    persistent: bool,
    /// MQTT 5 session expiry: how long the session outlives the connection.
    session_expiry: Option<Duration>,
    /// Incoming QoS 2 packet ids received and not yet released.
    incoming_qos2: HashSet<u16>,
    pending: VecDeque<Message>,
    will: Option<Message>,
    peer: SocketAddr,
    cert_device: Option<String>,
}

/// Serves one client. `cert_device` is the device a verified TLS client
/// certificate names, if any: that client is authenticated by it.
pub(crate) async fn run(
    broker: Broker,
    stream: TcpStream,
    peer: SocketAddr,
    cert_device: Option<String>,
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
        persistent: false,
        session_expiry: None,
        incoming_qos2: HashSet::new(),
        pending: VecDeque::new(),
        will: None,
        peer,
        cert_device,
    };
    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, conn.read_frame()).await {
        Ok(Some(Frame::Packet(Packet::Connect(c)))) => c,
        Ok(Some(Frame::TooLarge)) => {
            tracing::debug!(%peer, "CONNECT over the packet size limit");
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
        let _ = conn.flush().await;
        return;
    };
    let clean = conn.serve(rx, keep_alive).await;
    conn.leave(clean).await;
}

impl Conn {
    async fn read_frame(&mut self) -> Option<Frame> {
        read_frame(&mut self.stream, &mut self.rbuf, &self.broker, self.version).await
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

    /// A CONNACK refusing the connection. MQTT 3.1.1 has its own return
    /// codes (4 bad credentials, 5 not authorized), written here directly.
    fn refuse(&mut self, v5: ReasonCode, v3_code: u8) {
        if self.version == 5 {
            self.queue(&ConnAckPacket::new(false, v5));
        } else {
            self.wbuf.put_slice(&[0x20, 0x02, 0x00, v3_code]);
        }
    }

    /// Authenticates and registers the session; returns the outbound
    /// channel and the keep-alive, or refuses.
    async fn accept(&mut self, c: ConnectPacket) -> Option<(mpsc::Receiver<Outbound>, u16)> {
        self.version = c.protocol_version;
        if !(self.version == 4 || self.version == 5) {
            // 3.1 (version 3) clients get "unacceptable protocol version".
            self.wbuf.put_slice(&[0x20, 0x02, 0x00, 0x01]);
            return None;
        }
        let devices = self.broker.inner.devices.read().clone();
        let by_cert = self
            .cert_device
            .as_ref()
            .and_then(|d| devices.get(d).cloned());
        if let (Some(name), None) = (&self.cert_device, &by_cert) {
            tracing::info!(peer = %self.peer, certificate = %name, "refused: the client certificate names no deployed device");
            self.refuse(ReasonCode::NotAuthorized, 5);
            return None;
        }
        // AWS IoT Device SDKs append `?SDK=...&Version=...` (usage metrics)
        // to the user name, and AWS IoT ignores it; device names never hold
        // a `?`, so the name is what comes before it.
        let username = c
            .username
            .as_deref()
            .map(|u| u.split_once('?').map_or(u, |(name, _)| name));
        let policy = match username {
            _ if by_cert.is_some() => {
                let p = by_cert.expect("checked");
                if username.is_some_and(|u| u != p.device.name) {
                    tracing::info!(peer = %self.peer, "refused: the user name is not the certificate's device");
                    self.refuse(ReasonCode::NotAuthorized, 5);
                    return None;
                }
                p
            }
            None if self.broker.inner.config.allow_anonymous => Policy::anonymous(),
            None => {
                tracing::info!(peer = %self.peer, "refused an anonymous client (start the hub with --allow-anonymous to accept them)");
                self.refuse(ReasonCode::NotAuthorized, 5);
                return None;
            }
            Some(user) => {
                let Some(p) = devices.get(user).cloned() else {
                    tracing::info!(peer = %self.peer, user, "refused: no such device");
                    self.refuse(ReasonCode::BadUsernameOrPassword, 4);
                    return None;
                };
                let ok = match (&p.device.password_hash, c.password.clone()) {
                    (Some(hash), Some(pw)) => {
                        let hash = hash.clone();
                        tokio::task::spawn_blocking(move || verify_password(&hash, &pw))
                            .await
                            .unwrap_or(false)
                    }
                    _ => false,
                };
                if !ok {
                    tracing::info!(peer = %self.peer, device = user, "refused: wrong password");
                    self.refuse(ReasonCode::BadUsernameOrPassword, 4);
                    return None;
                }
                p
            }
        };
        let mut client_id = c.client_id.clone();
        if client_id.is_empty() {
            if self.version == 4 && !c.clean_start {
                self.wbuf.put_slice(&[0x20, 0x02, 0x00, 0x02]);
                return None;
            }
            client_id = format!("roost-{:016x}", self.conn_id);
        }
        // A device's name is its client id; no one else may take it.
        let own_name = !policy.device.name.is_empty() && policy.device.name == client_id;
        if devices.get(&client_id).is_some() && !own_name {
            tracing::info!(peer = %self.peer, client_id, "refused: the client id is another device's name");
            self.refuse(ReasonCode::NotAuthorized, 5);
            return None;
        }
        if let Some(w) = &c.will {
            if !valid_topic_name(&w.topic)
                || !policy.may_publish(&w.topic)
                || self.broker.is_reserved(&w.topic)
            {
                self.refuse(ReasonCode::NotAuthorized, 5);
                return None;
            }
            self.will = Some(Message {
                topic: w.topic.clone(),
                payload: Bytes::from(w.payload.clone()),
                qos: w.qos as u8,
                retain: w.retain,
                properties: Properties::new(),
                from: client_id.clone(),
                id: 0,
                expires_at: None,
            });
        }
        let persistent = if self.version == 5 {
            c.properties.get_session_expiry_interval().unwrap_or(0) > 0
        } else {
            !c.clean_start
        };
        let (tx, rx) = mpsc::channel(self.broker.inner.config.outgoing_buffer);
        let session_present;
        let queued;
        {
            let mut st = self.broker.inner.state.lock();
            if let Some(old) = st.sessions.get_mut(&client_id) {
                if let Some((_, old_tx)) = old.conn.take() {
                    let _ = old_tx.try_send(Outbound::TakenOver);
                }
            }
            if c.clean_start {
                if let Some(old) = st.sessions.remove(&client_id) {
                    for f in old.subscriptions.keys() {
                        st.remove_sub(&client_id, f);
                    }
                }
            }
            let session = st
                .sessions
                .entry(client_id.clone())
                .or_insert_with(|| Session {
                    conn: None,
                    persistent,
                    subscriptions: HashMap::new(),
                    queue: VecDeque::new(),
                    device: None,
                    qos2_in: HashSet::new(),
                    backlogged_since: None,
                    last_conn: 0,
                });
            session_present =
                !c.clean_start && (!session.subscriptions.is_empty() || !session.queue.is_empty());
            session.conn = Some((self.conn_id, tx));
            session.last_conn = self.conn_id;
            session.persistent = persistent;
            session.device = (!policy.device.name.is_empty()).then(|| policy.device.name.clone());
            queued = std::mem::take(&mut session.queue);
            self.incoming_qos2 = session.qos2_in.clone();
        }
        self.session_expiry = c
            .properties
            .get_session_expiry_interval()
            .filter(|&s| self.version == 5 && s > 0)
            .and_then(session_expiry);
        self.persistent = persistent;
        self.client_id = client_id;
        self.policy = policy;
        if let Some(p) = &self.broker.inner.persist {
            // Submitted in order, ahead of anything this session does next.
            if c.clean_start || !persistent {
                background(p.drop_session(&self.client_id));
            }
        }
        if persistent {
            self.save_session();
        }
        if self.version == 5 {
            let mut ack = ConnAckPacket::new(session_present, ReasonCode::Success);
            let mut p = Properties::new();
            p.add(
                PropertyId::TopicAliasMaximum,
                mqtt5_protocol::PropertyValue::TwoByteInteger(TOPIC_ALIAS_MAX),
            )
            .ok();
            p.add(
                PropertyId::MaximumPacketSize,
                mqtt5_protocol::PropertyValue::FourByteInteger(
                    self.broker.inner.config.max_packet_bytes as u32,
                ),
            )
            .ok();
            p.add(
                PropertyId::SharedSubscriptionAvailable,
                mqtt5_protocol::PropertyValue::Byte(1),
            )
            .ok();
            if c.client_id.is_empty() {
                p.set_assigned_client_identifier(self.client_id.clone());
            }
            ack.properties = p;
            self.queue(&ack);
        } else {
            self.queue(&ConnAckPacket::new_v311(
                session_present,
                ReasonCode::Success,
            ));
        }
        tracing::debug!(client = %self.client_id, device = %self.policy.device.name, version = self.version, "MQTT client connected");
        self.pending.extend(queued);
        Some((rx, c.keep_alive))
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
        if m.qos > 0 && self.inflight.len() + self.released.len() >= MAX_INFLIGHT {
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
        let qos = QoS::from(m.qos);
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
        if m.qos > 0 {
            let id = self.next_packet_id();
            p.packet_id = Some(id);
            self.inflight.insert(id, m.clone());
        }
        self.broker.inner.stats.messages_out[m.qos as usize].fetch_add(1, Ordering::Relaxed);
        self.queue(&p);
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

    /// The packet loop. Returns true when the client disconnected cleanly
    /// (its will is discarded).
    async fn serve(&mut self, mut rx: mpsc::Receiver<Outbound>, keep_alive: u16) -> bool {
        self.drain_pending();
        if self.flush().await.is_err() {
            return false;
        }
        // MQTT: the server waits one and a half keep-alive periods.
        let idle_limit = (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500));
        let mut last_heard = Instant::now();
        loop {
            let deadline = idle_limit.map(|l| last_heard + l);
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                frame = read_frame(&mut self.stream, &mut self.rbuf, &self.broker, self.version) => {
                    last_heard = Instant::now();
                    match frame {
                        None => return false,
                        Some(Frame::TooLarge) => {
                            tracing::info!(client = %self.client_id, "packet over the size limit; disconnecting");
                            self.disconnect_with(ReasonCode::PacketTooLarge);
                            let _ = self.flush().await;
                            return false;
                        }
                        Some(Frame::Malformed(why)) => {
                            tracing::info!(client = %self.client_id, %why, "malformed packet; disconnecting");
                            self.disconnect_with(ReasonCode::MalformedPacket);
                            let _ = self.flush().await;
                            return false;
                        }
                        Some(Frame::Packet(p)) => match self.handle(p) {
                            Step::Continue => {}
                            Step::Clean => return true,
                            Step::Broken(reason) => {
                                self.disconnect_with(reason);
                                let _ = self.flush().await;
                                return false;
                            }
                        },
                    }
                }
                Some(ack) = self.acks.next(), if !self.acks.is_empty() => match ack {
                    Ok(bytes) => self.wbuf.put_slice(&bytes),
                    Err(e) => {
                        tracing::error!(client = %self.client_id, error = %e, "a publish could not be made durable; disconnecting so the client sends it again");
                        let _ = self.flush().await;
                        return false;
                    }
                },
                out = rx.recv() => match out {
                    Some(Outbound::Deliver(m)) => {
                        self.deliver(*m);
                        // Batch whatever else is waiting into one write.
                        while let Ok(Outbound::Deliver(m)) = rx.try_recv() {
                            self.deliver(*m);
                        }
                    }
                    Some(Outbound::TakenOver) => {
                        self.disconnect_with(ReasonCode::SessionTakenOver);
                        let _ = self.flush().await;
                        return false;
                    }
                    None => {
                        // The broker let go of us: we were too slow.
                        return false;
                    }
                },
                _ = sleep => {
                    tracing::info!(client = %self.client_id, "keep-alive expired; disconnecting");
                    self.disconnect_with(ReasonCode::KeepAliveTimeout);
                    let _ = self.flush().await;
                    return false;
                }
            }
            if self.flush().await.is_err() {
                return false;
            }
        }
    }

    fn handle(&mut self, p: Packet) -> Step {
        match p {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(a) => {
                if let Some(m) = self.inflight.remove(&a.packet_id) {
                    self.forget_stored(m.id);
                }
                self.drain_pending();
                Step::Continue
            }
            Packet::PubRec(r) => {
                if let Some(m) = self.inflight.remove(&r.packet_id) {
                    self.released.insert(r.packet_id, m.id);
                }
                self.queue(&PubRelPacket::new(r.packet_id));
                Step::Continue
            }
            Packet::PubComp(c) => {
                if let Some(id) = self.released.remove(&c.packet_id) {
                    self.forget_stored(id);
                }
                self.drain_pending();
                Step::Continue
            }
            Packet::PubRel(r) => {
                if self.incoming_qos2.remove(&r.packet_id) {
                    if let Some(s) = self
                        .broker
                        .inner
                        .state
                        .lock()
                        .sessions
                        .get_mut(&self.client_id)
                    {
                        s.qos2_in.remove(&r.packet_id);
                    }
                    if let (true, Some(p)) = (self.persistent, &self.broker.inner.persist) {
                        background(p.qos2_released(&self.client_id, r.packet_id));
                    }
                }
                // The PUBCOMP follows any PUBREC/PUBACK still waiting.
                let mut comp = BytesMut::new();
                let _ = PubCompPacket::new(r.packet_id).encode(&mut comp);
                let comp = comp.freeze();
                self.acks.push_back(Box::pin(async move { Ok(comp) }));
                Step::Continue
            }
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => {
                let mut ack = if self.version == 5 {
                    UnsubAckPacket::new(u.packet_id)
                } else {
                    UnsubAckPacket::new_v311(u.packet_id)
                };
                let mut st = self.broker.inner.state.lock();
                for f in &u.filters {
                    let had = st.remove_sub(&self.client_id, f);
                    if let (true, Some(p)) = (self.persistent, &self.broker.inner.persist) {
                        background(p.drop_subscription(&self.client_id, f));
                    }
                    if let Some(s) = st.sessions.get_mut(&self.client_id) {
                        s.subscriptions.remove(f);
                    }
                    ack.reason_codes.push(if had {
                        UnsubAckReasonCode::Success
                    } else {
                        UnsubAckReasonCode::NoSubscriptionExisted
                    });
                }
                drop(st);
                self.queue(&ack);
                Step::Continue
            }
            Packet::PingReq => {
                self.wbuf.put_slice(&[0xD0, 0x00]);
                Step::Continue
            }
            Packet::Disconnect(d) => {
                if let Some(secs) = d.properties.get_session_expiry_interval() {
                    if let Err(code) = self.change_session_expiry(secs) {
                        return Step::Broken(code);
                    }
                }
                // MQTT 5: "disconnect with will message" keeps the will.
                if d.reason_code == ReasonCode::DisconnectWithWillMessage {
                    return Step::Broken(ReasonCode::Success);
                }
                Step::Clean
            }
            Packet::Connect(_) => Step::Broken(ReasonCode::ProtocolError),
            _ => Step::Broken(ReasonCode::ProtocolError),
        }
    }

    fn on_publish(&mut self, p: PublishPacket) -> Step {
        let qos = p.qos as u8;
        self.broker.inner.stats.messages_in[qos as usize].fetch_add(1, Ordering::Relaxed);
        let mut topic = p.topic_name.clone();
        if self.version == 5 {
            if let Some(alias) = p.properties.get_topic_alias() {
                if alias == 0 || alias > TOPIC_ALIAS_MAX {
                    return Step::Broken(ReasonCode::TopicAliasInvalid);
                }
                if topic.is_empty() {
                    match self.aliases.get(&alias) {
                        Some(t) => topic = t.clone(),
                        None => return Step::Broken(ReasonCode::ProtocolError),
                    }
                } else {
                    self.aliases.insert(alias, topic.clone());
                }
            }
        }
        if !valid_topic_name(&topic) {
            tracing::info!(client = %self.client_id, topic = %topic.chars().take(100).collect::<String>(), "PUBLISH to an invalid topic name; disconnecting");
            return Step::Broken(ReasonCode::TopicNameInvalid);
        }
        let allowed = self.policy.may_publish(&topic) && !self.broker.is_reserved(&topic);
        if !allowed {
            self.broker
                .inner
                .stats
                .dropped_by_policy
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(client = %self.client_id, device = %self.policy.device.name, %topic, "publish outside the device's policy dropped");
        }
        let duplicate_qos2 = qos == 2
            && p.packet_id
                .is_some_and(|id| self.incoming_qos2.contains(&id));
        let mut durable = None;
        if allowed && !duplicate_qos2 {
            let mut props = Properties::new();
            if self.version == 5 {
                for (id, v) in p.properties.iter() {
                    if id != PropertyId::TopicAlias && id != PropertyId::SubscriptionIdentifier {
                        let _ = props.add(id, v.clone());
                    }
                }
            }
            durable = route(
                &self.broker.inner,
                Message {
                    topic,
                    payload: Bytes::from(p.payload),
                    qos,
                    retain: p.retain,
                    properties: props,
                    from: self.client_id.clone(),
                    id: 0,
                    expires_at: p
                        .properties
                        .get_message_expiry_interval()
                        .map(|s| Instant::now() + Duration::from_secs(s as u64)),
                },
            );
        }
        let refused = !allowed && self.version == 5;
        match (qos, p.packet_id) {
            (1, Some(id)) => {
                if refused {
                    self.ack_after(
                        &PubAckPacket::new_with_reason(id, ReasonCode::NotAuthorized),
                        None,
                    );
                } else {
                    // Acknowledged only once it is on disk for every
                    // persistent session it was queued for.
                    self.ack_after(&PubAckPacket::new(id), durable);
                }
            }
            (2, Some(id)) => {
                if refused {
                    self.ack_after(
                        &PubRecPacket::new_with_reason(id, ReasonCode::NotAuthorized),
                        None,
                    );
                } else {
                    let mut durable = durable;
                    if self.incoming_qos2.insert(id) {
                        if let Some(s) = self
                            .broker
                            .inner
                            .state
                            .lock()
                            .sessions
                            .get_mut(&self.client_id)
                        {
                            s.qos2_in.insert(id);
                        }
                        if let (true, Some(p)) = (self.persistent, &self.broker.inner.persist) {
                            let state = p.qos2_received(&self.client_id, id);
                            durable = Some(match durable {
                                Some(d) => Box::pin(async move {
                                    d.await?;
                                    state.await
                                }),
                                None => state,
                            });
                        }
                    }
                    self.ack_after(&PubRecPacket::new(id), durable);
                }
            }
            (0, _) => {
                if let Some(d) = durable {
                    background(d);
                }
            }
            _ => return Step::Broken(ReasonCode::ProtocolError),
        }
        Step::Continue
    }

    fn on_subscribe(&mut self, s: mqtt5_protocol::packet::subscribe::SubscribePacket) -> Step {
        let mut ack = if self.version == 5 {
            SubAckPacket::new(s.packet_id)
        } else {
            SubAckPacket::new_v311(s.packet_id)
        };
        let mut retained = Vec::new();
        {
            let mut st = self.broker.inner.state.lock();
            for f in &s.filters {
                let shared = crate::split_shared(&f.filter);
                let inner_filter = shared.map(|(_, inner)| inner).unwrap_or(&f.filter);
                let code = if f.filter.starts_with("$share/") && shared.is_none() {
                    // A malformed shared subscription. (3.1.1 clients may use
                    // well-formed ones too, as with mosquitto.)
                    SubAckReasonCode::TopicFilterInvalid
                } else if shared.is_some() && f.options.no_local {
                    SubAckReasonCode::UnspecifiedError
                } else if !valid_filter(inner_filter) {
                    SubAckReasonCode::TopicFilterInvalid
                } else if !self.policy.may_subscribe(inner_filter) {
                    tracing::warn!(client = %self.client_id, device = %self.policy.device.name, filter = %f.filter, "subscription outside the device's policy refused");
                    SubAckReasonCode::NotAuthorized
                } else {
                    let opts = SubOptions {
                        qos: f.options.qos as u8,
                        no_local: f.options.no_local,
                        retain_as_published: f.options.retain_as_published,
                    };
                    let existed = st
                        .sessions
                        .get(&self.client_id)
                        .is_some_and(|s| s.subscriptions.contains_key(&f.filter));
                    st.add_sub(&self.client_id, &f.filter, opts);
                    if let (true, Some(p)) = (self.persistent, &self.broker.inner.persist) {
                        background(p.save_subscription(
                            &self.client_id,
                            &f.filter,
                            opts.qos,
                            opts.no_local,
                            opts.retain_as_published,
                        ));
                    }
                    if let Some(sess) = st.sessions.get_mut(&self.client_id) {
                        sess.subscriptions.insert(f.filter.clone(), opts);
                    }
                    use mqtt5_protocol::packet::subscribe::RetainHandling;
                    // Retained messages are not sent for shared subscriptions.
                    let send_retained = shared.is_none()
                        && match f.options.retain_handling {
                            RetainHandling::SendAtSubscribe => true,
                            RetainHandling::SendAtSubscribeIfNew => !existed,
                            RetainHandling::DoNotSend => false,
                        };
                    if send_retained {
                        for (m, _) in st.retained.values() {
                            if matches(&f.filter, &m.topic) {
                                let mut m = m.clone();
                                m.qos = m.qos.min(opts.qos);
                                m.retain = true;
                                retained.push(m);
                            }
                        }
                    }
                    match opts.qos {
                        0 => SubAckReasonCode::GrantedQoS0,
                        1 => SubAckReasonCode::GrantedQoS1,
                        _ => SubAckReasonCode::GrantedQoS2,
                    }
                };
                // MQTT 3.1.1 knows only 0x80 for a refused subscription.
                let code = if self.version == 4 && (code as u8) >= 0x80 {
                    SubAckReasonCode::UnspecifiedError
                } else {
                    code
                };
                ack.reason_codes.push(code);
            }
        }
        self.queue(&ack);
        for m in retained {
            self.deliver(m);
        }
        Step::Continue
    }

    /// Ends the connection: the will goes out unless the client said goodbye,
    /// and a session that is not persistent is forgotten.
    async fn leave(&mut self, clean: bool) {
        let _ = self.flush().await;
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
                let unacked: Vec<Message> = self
                    .inflight
                    .drain()
                    .map(|(_, m)| m)
                    .chain(self.pending.drain(..))
                    .collect();
                if let Some(s) = st.sessions.get_mut(&self.client_id) {
                    s.conn = None;
                    for m in unacked.into_iter().rev() {
                        s.queue.push_front(m);
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
                if let Some(d) = route(&self.broker.inner, w) {
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

enum Step {
    Continue,
    Clean,
    Broken(ReasonCode),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn drain(bytes: &[u8], max: usize, version: u8) -> Vec<String> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = next_frame(&mut buf, max, version) {
            let stop = !matches!(f, Frame::Packet(_));
            out.push(format!("{f:?}").chars().take(40).collect());
            if stop {
                break;
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Whatever arrives, the decoder returns a packet, "need more",
        /// "too large" or "malformed": it never panics or loops.
        #[test]
        fn arbitrary_bytes_never_break_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512), v5 in any::<bool>()) {
            let _ = drain(&bytes, 256, if v5 { 5 } else { 4 });
        }

        /// Arbitrary bytes behind a valid fixed header of each packet type.
        #[test]
        fn arbitrary_bodies_never_break_the_decoder(kind in 1u8..16, flags in 0u8..16, body in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut bytes = vec![(kind << 4) | flags, body.len() as u8];
            bytes.extend(body);
            let _ = drain(&bytes, 1 << 20, 5);
            let _ = drain(&bytes, 1 << 20, 4);
        }

        /// Valid publishes survive encode, framing at any split, and decode.
        #[test]
        fn publishes_round_trip(topic in "[a-z]{1,8}(/[a-z0-9]{1,8}){0,4}", payload in proptest::collection::vec(any::<u8>(), 0..300), qos in 0u8..3, split in 0usize..400, v5 in any::<bool>()) {
            let mut p = if v5 {
                PublishPacket::new(topic.clone(), payload.clone(), QoS::from(qos))
            } else {
                PublishPacket::new_v311(topic.clone(), payload.clone(), QoS::from(qos))
            };
            if qos > 0 {
                p.packet_id = Some(7);
            }
            let mut wire = BytesMut::new();
            p.encode(&mut wire).unwrap();
            let split = split.min(wire.len());
            let mut buf = BytesMut::from(&wire[..split]);
            let version = if v5 { 5 } else { 4 };
            let first = next_frame(&mut buf, 1 << 20, version);
            if split < wire.len() {
                prop_assert!(first.is_none(), "a partial packet must wait for more bytes");
                buf.extend_from_slice(&wire[split..]);
            } else {
                prop_assert!(first.is_some());
                buf = BytesMut::from(&wire[..]);
            }
            match next_frame(&mut buf, 1 << 20, version) {
                Some(Frame::Packet(Packet::Publish(d))) => {
                    prop_assert_eq!(d.topic_name, topic);
                    prop_assert_eq!(d.payload, payload);
                    prop_assert_eq!(d.qos as u8, qos);
                }
                other => prop_assert!(false, "decoded {:?}", other.map(|f| format!("{f:?}"))),
            }
        }
    }

    #[test]
    fn a_huge_remaining_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0x7f][..]);
        assert!(matches!(
            next_frame(&mut buf, 1 << 20, 4),
            Some(Frame::TooLarge)
        ));
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(matches!(
            next_frame(&mut buf, 1 << 20, 4),
            Some(Frame::Malformed(_))
        ));
    }
}
