//! CONNECT: the protocol version, who the client is (a client
//! certificate, a device's user name and password, or anonymous), its
//! client id and will, and taking up or starting its session.

use super::{session_expiry, Conn, TOPIC_ALIAS_MAX};
use crate::login::AuthFailure;
use crate::persist::background;
use crate::policy::Policy;
use crate::topic::valid_topic_name;
use crate::{Message, Outbound, Publisher, Session};
use bytes::{BufMut, Bytes};
use mqtt5_protocol::packet::connack::ConnAckPacket;
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::{Properties, PropertyId, ReasonCode};
use std::collections::{HashMap, HashSet, VecDeque};
use tokio::sync::mpsc;

impl Conn {
    /// A CONNACK refusing the connection. MQTT 3.1.1 has its own return
    /// codes (4 bad credentials, 5 not authorized), written here directly.
    fn refuse(&mut self, v5: ReasonCode, v3_code: u8) {
        if self.version == 5 {
            self.queue(&ConnAckPacket::new(false, v5));
        } else {
            self.wbuf.put_slice(&[0x20, 0x02, 0x00, v3_code]);
        }
    }

    /// Refuses a login: the CONNACK code for `reason` in the client's
    /// version, counted by reason and logged at most every few seconds.
    fn refuse_login(&mut self, reason: AuthFailure, device: Option<&str>, why: &str) {
        let (v5, v3) = match reason {
            AuthFailure::BadPassword | AuthFailure::UnknownDevice => {
                (ReasonCode::BadUsernameOrPassword, 4)
            }
            AuthFailure::NoCredentials | AuthFailure::BadCertificate => {
                (ReasonCode::NotAuthorized, 5)
            }
            AuthFailure::BadAuthMethod => (ReasonCode::BadAuthenticationMethod, 5),
            // 3.1.1 has no "try later" but "server unavailable", which
            // clients retry, as they should here.
            AuthFailure::Backoff => (ReasonCode::ConnectionRateExceeded, 3),
            AuthFailure::Busy => (ReasonCode::ServerBusy, 3),
        };
        self.broker
            .inner
            .logins
            .refused(reason, self.peer, device, why);
        self.refuse(v5, v3);
    }

    /// Authenticates and registers the session; returns the outbound
    /// channel and the keep-alive, or refuses.
    pub(super) async fn accept(
        &mut self,
        c: ConnectPacket,
    ) -> Option<(mpsc::Receiver<Outbound>, u16)> {
        self.version = c.protocol_version;
        if !(self.version == 4 || self.version == 5) {
            // 3.1 (version 3) clients get "unacceptable protocol version".
            self.wbuf.put_slice(&[0x20, 0x02, 0x00, 0x01]);
            return None;
        }
        // Enhanced authentication (MQTT 5, 4.12) is not offered: a client
        // asking for a method is told so, as the spec wants, and nothing
        // else of its CONNECT is looked at.
        if self.version == 5 {
            if let Some(method) = c.properties.get_authentication_method() {
                let why = format!("authentication method {method:?} is not supported (devices log in with a password or a client certificate)");
                self.refuse_login(AuthFailure::BadAuthMethod, c.username.as_deref(), &why);
                return None;
            }
        }
        let devices = self.broker.inner.devices.read().clone();
        let by_cert = self
            .cert_device
            .as_ref()
            .and_then(|d| devices.get(d).cloned());
        if let (Some(name), None) = (self.cert_device.clone(), &by_cert) {
            self.refuse_login(
                AuthFailure::BadCertificate,
                Some(&name),
                "the client certificate names no deployed device",
            );
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
                    self.refuse_login(
                        AuthFailure::BadCertificate,
                        username,
                        "the user name is not the certificate's device",
                    );
                    return None;
                }
                p
            }
            None if self.broker.inner.config.allow_anonymous => Policy::anonymous(),
            None => {
                self.refuse_login(
                    AuthFailure::NoCredentials,
                    None,
                    "an anonymous client (start the hub with --allow-anonymous to accept them)",
                );
                return None;
            }
            Some(user) => {
                let Some(p) = devices.get(user).cloned() else {
                    self.refuse_login(AuthFailure::UnknownDevice, Some(user), "no such device");
                    return None;
                };
                let checked = match (&p.device.password_hash, c.password.clone()) {
                    (Some(hash), Some(pw)) => {
                        self.broker
                            .inner
                            .logins
                            .check_password(self.peer.ip(), user, hash.clone(), pw)
                            .await
                    }
                    // Nothing to check: no argon2 and no strike.
                    _ => Err(AuthFailure::BadPassword),
                };
                if let Err(reason) = checked {
                    let why = match reason {
                        AuthFailure::Backoff => "too many failed logins from this address or as this device: retry later",
                        AuthFailure::Busy => "no password check came free in time: retry later",
                        _ => "wrong or missing password",
                    };
                    self.refuse_login(reason, Some(user), why);
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
                qos: w.qos.into(),
                retain: w.retain,
                properties: Properties::new(),
                from: Publisher::Client(client_id.clone()),
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
                    backlog: Default::default(),
                });
            session_present =
                !c.clean_start && (!session.subscriptions.is_empty() || !session.queue.is_empty());
            session.conn = Some((self.conn_id, tx.into()));
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
}
