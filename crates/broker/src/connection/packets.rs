//! The packet loop: what a connected client sends (publish, subscribe,
//! acknowledgements, ping, disconnect), what the broker hands it, and its
//! keep-alive, until it leaves or breaks the protocol.

use super::frame::{read_frame, Frame};
use super::{Conn, TOPIC_ALIAS_MAX};
use crate::persist::background;
use crate::topic::{valid_filter, valid_topic_name};
use crate::{route, Message, Outbound, Publisher, QoS, SubOptions};
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::StreamExt;
use mqtt5_protocol::packet::puback::PubAckPacket;
use mqtt5_protocol::packet::pubcomp::PubCompPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::pubrec::PubRecPacket;
use mqtt5_protocol::packet::pubrel::PubRelPacket;
use mqtt5_protocol::packet::suback::{SubAckPacket, SubAckReasonCode};
use mqtt5_protocol::packet::unsuback::{UnsubAckPacket, UnsubAckReasonCode};
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::{Packet, Properties, PropertyId, ReasonCode};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Acknowledgements a connection may have waiting for their publishes to
/// be durable before it stops reading the client.
const MAX_PENDING_ACKS: usize = 256;

/// Bytes of publishes a connection may have waiting to be durable before
/// it stops reading the client (the count bound alone lets 256 large
/// messages wait).
const MAX_PENDING_BYTES: usize = 8 << 20;

/// How often a connection whose window is shut checks whether the broker
/// let it go as slow.
const SLOW_CHECK: Duration = Duration::from_millis(500);

impl Conn {
    /// The packet loop. Returns true when the client disconnected cleanly
    /// (its will is discarded).
    pub(super) async fn serve(
        &mut self,
        rx: &mut mpsc::Receiver<Outbound>,
        keep_alive: u16,
    ) -> bool {
        self.take_backlog();
        self.drain_pending();
        if self.flush_unless_let_go().await.is_err() {
            return false;
        }
        // MQTT: the server waits one and a half keep-alive periods.
        let idle_limit = (keep_alive > 0).then(|| Duration::from_millis(keep_alive as u64 * 1500));
        let mut last_heard = Instant::now();
        loop {
            if self.window_open() && self.stored_after.is_some() {
                if let Err(e) = self.load_stored().await {
                    tracing::error!(client = %self.client_id, error = %e, "cannot read the session's stored queue; disconnecting");
                    return false;
                }
                self.drain_pending();
            }
            self.feed_retained();
            if self.flush_unless_let_go().await.is_err() {
                return false;
            }
            let window_open = self.window_open();
            let more_to_send = self.more_to_send();
            let deadline = idle_limit.map(|l| last_heard + l);
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // A client with this many publishes not yet durable is not
                // read from until some are: what it sends waits in its own
                // socket, not in the hub's memory.
                frame = read_frame(&mut self.stream, &mut self.rbuf, &self.broker, self.version, self.broker.inner.config.max_packet_bytes), if self.acks.len() < MAX_PENDING_ACKS && self.pending_bytes.load(Ordering::Relaxed) < MAX_PENDING_BYTES => {
                    last_heard = Instant::now();
                    match frame {
                        None => return false,
                        Some(Frame::TooLarge) => {
                            tracing::info!(client = %self.client_id, "packet over the size limit; disconnecting");
                            self.disconnect_with(ReasonCode::PacketTooLarge);
                            self.final_flush().await;
                            return false;
                        }
                        Some(Frame::Malformed(why)) => {
                            tracing::info!(client = %self.client_id, %why, "malformed packet; disconnecting");
                            self.disconnect_with(ReasonCode::MalformedPacket);
                            self.final_flush().await;
                            return false;
                        }
                        Some(Frame::Packet(p)) => match self.handle(p) {
                            Step::Continue => {}
                            Step::Clean => return true,
                            Step::Broken(reason) => {
                                self.disconnect_with(reason);
                                self.final_flush().await;
                                return false;
                            }
                        },
                    }
                }
                Some(ack) = self.acks.next(), if !self.acks.is_empty() => match ack {
                    Ok(bytes) => self.wbuf.put_slice(&bytes),
                    Err(e) => {
                        tracing::error!(client = %self.client_id, error = %e, "a publish could not be made durable; disconnecting so the client sends it again");
                        self.final_flush().await;
                        return false;
                    }
                },
                // While the window is shut (a client not acknowledging),
                // messages wait in the channel, which is bounded: past it
                // the broker counts this client as slow and lets it go.
                out = rx.recv(), if window_open => match out {
                    Some(Outbound::Deliver(m, _charge)) => {
                        if !self.read_from_store(&m) {
                            self.deliver(*m);
                        }
                        // Batch whatever else is waiting into one write.
                        while self.window_open() {
                            let Ok(Outbound::Deliver(m, _charge)) = rx.try_recv() else {
                                break;
                            };
                            if !self.read_from_store(&m) {
                                self.deliver(*m);
                            }
                        }
                    }
                    Some(Outbound::TakenOver) => {
                        self.disconnect_with(ReasonCode::SessionTakenOver);
                        self.final_flush().await;
                        return false;
                    }
                    None => {
                        // The broker let go of us: we were too slow.
                        return false;
                    }
                },
                // Retained messages or stored ones to send, nothing to wait for.
                () = std::future::ready(()), if more_to_send => {}
                // While the window is shut, the channel is not read, so
                // whether the broker let go of this slow client is looked
                // up now and then.
                _ = tokio::time::sleep(SLOW_CHECK), if !window_open => {
                    if !self.broker.holds(&self.client_id, self.conn_id) {
                        return false;
                    }
                }
                _ = sleep => {
                    tracing::info!(client = %self.client_id, "keep-alive expired; disconnecting");
                    self.disconnect_with(ReasonCode::KeepAliveTimeout);
                    self.final_flush().await;
                    return false;
                }
            }
        }
    }

    /// Writes what is buffered, unless the broker lets this connection go
    /// (as slow) while the client does not read: the write is then given
    /// up instead of waiting on the socket for ever.
    async fn flush_unless_let_go(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let (broker, client, conn) = (self.broker.clone(), self.client_id.clone(), self.conn_id);
        let let_go = async move {
            loop {
                tokio::time::sleep(SLOW_CHECK).await;
                if !broker.holds(&client, conn) {
                    return;
                }
            }
        };
        tokio::select! {
            // Most writes complete at once, and the timer is never started.
            biased;
            written = self.flush() => written,
            () = let_go => Err(std::io::Error::other("let go as a slow client")),
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
                let gone: HashSet<&String> = u.filters.iter().collect();
                self.retained_due.retain(|d| !gone.contains(&d.filter));
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
        let qos = QoS::from(p.qos);
        self.broker.inner.stats.messages_in[qos.as_u8() as usize].fetch_add(1, Ordering::Relaxed);
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
        let duplicate_qos2 = qos == QoS::ExactlyOnce
            && p.packet_id
                .is_some_and(|id| self.incoming_qos2.contains(&id));
        let mut durable = None;
        // Over its retained-message quota: an MQTT 5 QoS 1/2 publish is
        // refused with "quota exceeded"; any other is delivered, not
        // retained (see `route`).
        let mut over_quota = false;
        if allowed && !duplicate_qos2 {
            let mut props = Properties::new();
            if self.version == 5 {
                for (id, v) in p.properties.iter() {
                    if id != PropertyId::TopicAlias && id != PropertyId::SubscriptionIdentifier {
                        let _ = props.add(id, v.clone());
                    }
                }
            }
            let refusable = self.version == 5 && qos.is_acknowledged();
            let weight = topic.len() + p.payload.len();
            let routed = route(
                &self.broker.inner,
                Message {
                    topic,
                    payload: Bytes::from(p.payload),
                    qos,
                    retain: p.retain,
                    properties: props,
                    from: Publisher::Client(self.client_id.clone()),
                    id: 0,
                    expires_at: p
                        .properties
                        .get_message_expiry_interval()
                        .map(|s| Instant::now() + Duration::from_secs(s as u64)),
                },
                refusable,
            );
            match routed {
                Ok(d) => durable = d.map(|d| self.charge_pending(d, weight)),
                Err(_) => over_quota = true,
            }
        }
        let refused = if over_quota {
            Some(ReasonCode::QuotaExceeded)
        } else {
            (!allowed && self.version == 5).then_some(ReasonCode::NotAuthorized)
        };
        match (qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => {
                if let Some(reason) = refused {
                    self.ack_after(&PubAckPacket::new_with_reason(id, reason), None);
                } else {
                    // Acknowledged only once it is on disk for every
                    // persistent session it was queued for.
                    self.ack_after(&PubAckPacket::new(id), durable);
                }
            }
            (QoS::ExactlyOnce, Some(id)) => {
                if let Some(reason) = refused {
                    self.ack_after(&PubRecPacket::new_with_reason(id, reason), None);
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
            (QoS::AtMostOnce, _) => {
                if let Some(d) = durable {
                    // Nothing to acknowledge, but its write is waited for
                    // with the others: a client flooding QoS 0 retains (or
                    // messages kept for persistent sessions) is read no
                    // faster than the store takes them (MAX_PENDING_ACKS),
                    // instead of queueing writes without bound.
                    let client = self.client_id.clone();
                    self.acks.push_back(Box::pin(async move {
                        if let Err(e) = d.await {
                            tracing::error!(%client, error = %e, "a QoS 0 message could not be stored");
                        }
                        Ok(Bytes::new())
                    }));
                }
            }
            _ => return Step::Broken(ReasonCode::ProtocolError),
        }
        Step::Continue
    }

    /// Counts `bytes` against this connection's pending writes until `d`
    /// is done (or dropped with the connection).
    fn charge_pending(&self, d: crate::Done, bytes: usize) -> crate::Done {
        let pending = self.pending_bytes.clone();
        pending.fetch_add(bytes, Ordering::Relaxed);
        Box::pin(async move {
            let r = d.await;
            pending.fetch_sub(bytes, Ordering::Relaxed);
            r
        })
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
                        qos: f.options.qos.into(),
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
                        retained.push((f.filter.clone(), opts.qos));
                    }
                    match opts.qos {
                        QoS::AtMostOnce => SubAckReasonCode::GrantedQoS0,
                        QoS::AtLeastOnce => SubAckReasonCode::GrantedQoS1,
                        QoS::ExactlyOnce => SubAckReasonCode::GrantedQoS2,
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
        // Sent in chunks by the packet loop, off the broker's lock.
        self.send_retained(retained);
        Step::Continue
    }
}

pub(super) enum Step {
    Continue,
    Clean,
    Broken(ReasonCode),
}
