//! The hub's MQTT broker: MQTT 3.1.1 and 5.0 for any standard client, with
//! device identity and per-device topic policies.
//!
//! The wire format comes from `mqtt5-protocol` (both protocol versions,
//! maintained, used by its own broker); the broker logic is ours, because no
//! Rust broker crate gives us device policies from the deployment and the
//! hub's own durability and routing hooks. This crate owns sessions,
//! subscriptions (a topic trie), retained messages, QoS flows, wills and
//! keep-alive; it knows nothing of tasks or HTTP.

mod bus;
mod connection;
mod listener;
mod login;
mod metrics;
mod persist;
pub mod policy;
pub mod tls;
mod websocket;
/// Topic rules live in their own crate; re-exported for callers that name
/// them through the broker.
pub use roost_topic as topic;

pub use login::LoginLimits;
pub use persist::{Done, PersistError, Persistence, Queued, Restore, Retained};
pub use policy::{Device, Devices, Policy};
/// The message vocabulary is the bus's (`roost-bus`), shared with the hub.
pub use roost_bus::{
    DeviceState, InvalidQoS, Message, MessageBus, Publisher, QoS, Reserved, RetainedMessage,
    RetainedSummary, Tap,
};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
pub use roost_bus::Properties;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use topic::Trie;

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Accept clients that give no user name.
    pub allow_anonymous: bool,
    /// Largest packet accepted, in bytes.
    pub max_packet_bytes: usize,
    /// Messages kept for an offline persistent session; older ones are dropped.
    pub session_queue_limit: usize,
    /// Messages waiting to be written to one connection; past it messages
    /// for that client are dropped.
    pub outgoing_buffer: usize,
    /// How long a client's buffer may stay full before the client is
    /// disconnected as not reading.
    pub slow_client_grace: std::time::Duration,
    /// The work a client may cause before it has logged in.
    pub login: LoginLimits,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: false,
            max_packet_bytes: 1 << 20,
            session_queue_limit: 1000,
            outgoing_buffer: 10_000,
            slow_client_grace: std::time::Duration::from_secs(5),
            login: LoginLimits::default(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
}

/// What the broker hands a connection.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Boxed: the channel preallocates slots, and an idle connection should
    /// cost a few bytes per slot, not a whole message each.
    Deliver(Box<Message>),
    /// Another connection took over this session.
    TakenOver,
}

pub(crate) struct Session {
    pub conn: Option<(u64, mpsc::Sender<Outbound>)>,
    pub persistent: bool,
    pub subscriptions: HashMap<String, SubOptions>,
    pub queue: VecDeque<Message>,
    pub device: Option<String>,
    /// Incoming QoS 2 packet ids received and not yet released.
    pub qos2_in: std::collections::HashSet<u16>,
    /// Since when its connection's buffer has been full.
    pub backlogged_since: Option<std::time::Instant>,
    /// The last connection that held it (for session expiry).
    pub last_conn: u64,
}

#[derive(Default)]
pub(crate) struct State {
    pub sessions: HashMap<String, Session>,
    pub subs: Trie<SubOptions>,
    /// In topic order, so `ListRetainedMessages` pages without sorting;
    /// each with when it was retained (wall clock, ms).
    pub retained: BTreeMap<String, (Message, i64)>,
    /// Shared subscriptions (`$share/GROUP/FILTER`): the trie holds one key
    /// per group and filter, the members take turns.
    pub shared: Trie<()>,
    pub shared_members: HashMap<String, SharedGroup>,
}

#[derive(Default)]
pub(crate) struct SharedGroup {
    pub members: Vec<(String, SubOptions)>,
    pub next: usize,
}

/// `$share/GROUP/FILTER` → (GROUP, FILTER), if well formed.
pub(crate) fn split_shared(f: &str) -> Option<(&str, &str)> {
    let rest = f.strip_prefix("$share/")?;
    let (group, filter) = rest.split_once('/')?;
    (!group.is_empty() && !group.contains(['+', '#']) && topic::valid_filter(filter))
        .then_some((group, filter))
}

impl State {
    /// Adds (or replaces) a client's subscription, plain or shared.
    pub fn add_sub(&mut self, client: &str, filter: &str, opts: SubOptions) {
        match split_shared(filter) {
            Some((group, inner)) => {
                let key = format!("{group}\0{inner}");
                self.shared.insert(inner, &key, ());
                let g = self.shared_members.entry(key).or_default();
                g.members.retain(|(c, _)| c != client);
                g.members.push((client.to_owned(), opts));
            }
            None => self.subs.insert(filter, client, opts),
        }
    }

    /// Removes a client's subscription; true if it had one.
    pub fn remove_sub(&mut self, client: &str, filter: &str) -> bool {
        match split_shared(filter) {
            Some((group, inner)) => {
                let key = format!("{group}\0{inner}");
                let Some(g) = self.shared_members.get_mut(&key) else {
                    return false;
                };
                let before = g.members.len();
                g.members.retain(|(c, _)| c != client);
                let removed = g.members.len() != before;
                if g.members.is_empty() {
                    self.shared_members.remove(&key);
                    self.shared.remove(inner, &key);
                }
                removed
            }
            None => self.subs.remove(filter, client),
        }
    }
}

/// Counters for metrics.
#[derive(Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub connects_refused: AtomicU64,
    pub messages_in: [AtomicU64; 3],
    pub messages_out: [AtomicU64; 3],
    pub dropped_by_policy: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub slow_clients_dropped: AtomicU64,
    pub dropped_slow: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Connections closed for sending more than the CONNECT limit before login.
    pub oversize_before_login: AtomicU64,
}

pub(crate) struct Inner {
    pub config: BrokerConfig,
    pub state: Mutex<State>,
    pub devices: RwLock<Arc<Devices>>,
    pub stats: Stats,
    pub next_conn: AtomicU64,
    pub persist: Option<Arc<dyn Persistence>>,
    pub next_msg: AtomicU64,
    /// Sees every message MQTT clients publish (the hub's route table).
    pub tap: RwLock<Option<Tap>>,
    /// Topics only the hub publishes to, whatever a device's policy says.
    pub reserved: RwLock<Option<Reserved>>,
    /// Password-check slots, the failure back-off and refusal counts.
    pub logins: login::Logins,
}

/// MQTT 5 properties as kept in the store: their wire encoding.
fn encode_properties(p: &Properties) -> Vec<u8> {
    if p.is_empty() {
        return Vec::new();
    }
    let mut b = bytes::BytesMut::new();
    match p.encode(&mut b) {
        Ok(()) => b.to_vec(),
        Err(_) => Vec::new(),
    }
}

/// Stored properties back; whatever does not decode is left out.
fn decode_properties(b: &[u8]) -> Properties {
    if b.is_empty() {
        return Properties::new();
    }
    Properties::decode(&mut &b[..]).unwrap_or_default()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An expiry instant as wall-clock milliseconds, for the store.
fn wall_clock_ms(at: std::time::Instant) -> i64 {
    now_ms()
        + at.saturating_duration_since(std::time::Instant::now())
            .as_millis() as i64
}

/// A stored wall-clock expiry as an instant (now, if already past).
fn instant_of_wall_clock(ms: i64) -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_millis((ms - now_ms()).max(0) as u64)
}

/// A running broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
}

impl Broker {
    /// A broker that keeps nothing across restarts.
    pub fn new(config: BrokerConfig) -> Self {
        Self::with_persistence(config, None, Restore::default())
    }

    /// A broker whose persistent sessions, queued QoS 1/2 messages and
    /// retained messages live in `persist`, starting from `restore`.
    pub fn with_persistence(
        config: BrokerConfig,
        persist: Option<Arc<dyn Persistence>>,
        restore: Restore,
    ) -> Self {
        let mut state = State::default();
        let mut max_id = 0;
        let mut expiring = Vec::new();
        for (client, device, expiry_s) in restore.sessions {
            if let Some(s) = expiry_s {
                expiring.push((client.clone(), std::time::Duration::from_secs(s as u64)));
            }
            state.sessions.insert(
                client,
                Session {
                    conn: None,
                    persistent: true,
                    subscriptions: HashMap::new(),
                    queue: VecDeque::new(),
                    device,
                    qos2_in: Default::default(),
                    backlogged_since: None,
                    last_conn: 0,
                },
            );
        }
        for (client, filter, qos, no_local, rap) in restore.subscriptions {
            if let Some(s) = state.sessions.get_mut(&client) {
                let opts = SubOptions {
                    qos,
                    no_local,
                    retain_as_published: rap,
                };
                s.subscriptions.insert(filter.clone(), opts);
                state.add_sub(&client, &filter, opts);
            }
        }
        for q in restore.queue {
            max_id = max_id.max(q.id);
            if let Some(s) = state.sessions.get_mut(&q.client_id) {
                s.queue.push_back(Message {
                    topic: q.topic,
                    payload: Bytes::from(q.payload),
                    qos: q.qos,
                    retain: q.retain,
                    properties: decode_properties(&q.properties),
                    from: Publisher::Hub,
                    id: q.id,
                    expires_at: q.expires_ms.map(instant_of_wall_clock),
                });
            }
        }
        for (client, pid) in restore.qos2_in {
            if let Some(s) = state.sessions.get_mut(&client) {
                s.qos2_in.insert(pid);
            }
        }
        for r in restore.retained {
            state.retained.insert(
                r.topic.clone(),
                (
                    Message {
                        topic: r.topic,
                        payload: Bytes::from(r.payload),
                        qos: r.qos,
                        retain: true,
                        properties: decode_properties(&r.properties),
                        from: Publisher::Hub,
                        id: 0,
                        expires_at: r.expires_ms.map(instant_of_wall_clock),
                    },
                    r.modified_ms,
                ),
            );
        }
        let broker = Self {
            inner: Arc::new(Inner {
                logins: login::Logins::new(config.login.clone()),
                config,
                state: Mutex::new(state),
                devices: RwLock::new(Arc::new(Devices::default())),
                stats: Stats::default(),
                next_conn: AtomicU64::new(1),
                persist,
                next_msg: AtomicU64::new(max_id + 1),
                tap: RwLock::new(None),
                reserved: RwLock::new(None),
            }),
        };
        // A restored session's connection is gone: it expires its interval
        // after this start (it may have been offline before, but it never
        // outlives its interval by more than the time the hub was down).
        for (client, expiry) in expiring {
            broker.expire_session_after(client, 0, expiry);
        }
        broker
    }

    /// Sets the hook that sees every message clients publish.
    pub fn set_tap(&self, tap: Tap) {
        *self.inner.tap.write() = Some(tap);
    }

    /// Sets which topics clients may never publish to (the hub's own
    /// response topics, for example).
    pub fn set_reserved(&self, reserved: Reserved) {
        *self.inner.reserved.write() = Some(reserved);
    }

    /// Forgets `client`'s session `expiry` from now, unless a connection
    /// other than `conn_id` (0: none since the start) has taken it up.
    pub(crate) fn expire_session_after(
        &self,
        client: String,
        conn_id: u64,
        expiry: std::time::Duration,
    ) {
        let broker = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(expiry).await;
            let mut st = broker.inner.state.lock();
            let idle = st
                .sessions
                .get(&client)
                .is_some_and(|s| s.conn.is_none() && s.last_conn == conn_id);
            if idle {
                if let Some(s) = st.sessions.remove(&client) {
                    for f in s.subscriptions.keys() {
                        st.remove_sub(&client, f);
                    }
                }
                drop(st);
                if let Some(p) = &broker.inner.persist {
                    persist::background(p.drop_session(&client));
                }
                tracing::debug!(client = %client, "session expired");
            }
        });
    }

    pub(crate) fn is_reserved(&self, topic: &str) -> bool {
        self.inner
            .reserved
            .read()
            .as_ref()
            .is_some_and(|r| r(topic))
    }

    /// Replaces the device list (from a deployment).
    pub fn set_devices(&self, devices: Devices) {
        *self.inner.devices.write() = Arc::new(devices);
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Sessions the broker holds (connected or persistent offline).
    pub fn session_count(&self) -> usize {
        self.inner.state.lock().sessions.len()
    }

    /// Connections open now.
    pub fn connected_count(&self) -> usize {
        self.inner
            .state
            .lock()
            .sessions
            .values()
            .filter(|s| s.conn.is_some())
            .count()
    }

    pub fn retained_count(&self) -> usize {
        self.inner.state.lock().retained.len()
    }

    /// The retained message of `topic`, unless there is none or it expired.
    pub fn retained_message(&self, topic: &str) -> Option<RetainedMessage> {
        let st = self.inner.state.lock();
        let (m, at) = st.retained.get(topic)?;
        if m.expires_at.is_some_and(|t| t <= std::time::Instant::now()) {
            return None;
        }
        Some(RetainedMessage {
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            qos: m.qos,
            modified_ms: *at,
            user_properties: m
                .properties
                .get_all(mqtt5_protocol::PropertyId::UserProperty)
                .unwrap_or_default()
                .iter()
                .filter_map(|v| match v {
                    mqtt5_protocol::PropertyValue::Utf8StringPair(k, v) => {
                        Some((k.clone(), v.clone()))
                    }
                    _ => None,
                })
                .collect(),
        })
    }

    /// Up to `limit` retained messages in topic order, after `after` (a
    /// page's last topic), that `visible` lets through, and where the next
    /// page starts (none: this was the last). Payloads stay out (their
    /// sizes are in). One call looks at no more than `RETAINED_SCAN`
    /// topics, so the broker's lock is held briefly however many there are
    /// and however few the caller may see: a page may then come back short,
    /// with a place to go on from.
    pub fn retained_page(
        &self,
        after: Option<&str>,
        limit: usize,
        visible: impl Fn(&str) -> bool,
    ) -> (Vec<RetainedSummary>, Option<String>) {
        use std::ops::Bound;
        const RETAINED_SCAN: usize = 10_000;
        let st = self.inner.state.lock();
        let now = std::time::Instant::now();
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut page = Vec::new();
        let mut last_seen: Option<&String> = None;
        let topics = st.retained.range::<str, _>((start, Bound::Unbounded));
        for (scanned, (t, (m, at))) in topics.enumerate() {
            if page.len() == limit || scanned == RETAINED_SCAN {
                // More follow: the next page starts after the last topic
                // looked at.
                return (page, last_seen.cloned());
            }
            last_seen = Some(t);
            if m.expires_at.is_some_and(|e| e <= now) || !visible(t) {
                continue;
            }
            page.push(RetainedSummary {
                topic: t.clone(),
                payload_size: m.payload.len(),
                qos: m.qos,
                modified_ms: *at,
            });
        }
        (page, None)
    }

    /// Every deployed device with its connection state.
    pub fn devices(&self) -> Vec<DeviceState> {
        let devices = self.inner.devices.read().clone();
        let st = self.inner.state.lock();
        let mut out: Vec<DeviceState> = devices
            .names()
            .map(|name| {
                let client_ids: Vec<String> = st
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.conn.is_some() && s.device.as_deref() == Some(name))
                    .map(|(id, _)| id.clone())
                    .collect();
                DeviceState {
                    name: name.to_owned(),
                    connected: !client_ids.is_empty(),
                    client_ids,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Publishes a message from inside the hub (routes, tasks); resolves
    /// once it is durable for every persistent session it was queued for.
    pub fn publish(&self, message: Message) -> Option<Done> {
        route(&self.inner, message)
    }
}

/// Delivers a message to every matching subscription (and keeps it if it
/// is retained). Never blocks: a connection whose buffer is full is told to
/// go, an offline persistent session queues up to its limit.
pub(crate) fn route(inner: &Inner, mut msg: Message) -> Option<Done> {
    let mut writes: Vec<Done> = Vec::new();
    let mut st = inner.state.lock();
    if msg.retain {
        let at = now_ms();
        if msg.payload.is_empty() {
            st.retained.remove(&msg.topic);
        } else {
            st.retained.insert(msg.topic.clone(), (msg.clone(), at));
        }
        if let Some(p) = &inner.persist {
            writes.push(p.retain(Retained {
                topic: msg.topic.clone(),
                payload: msg.payload.to_vec(),
                qos: msg.qos,
                properties: encode_properties(&msg.properties),
                expires_ms: msg.expires_at.map(wall_clock_ms),
                modified_ms: at,
            }));
        }
    }
    let mut queued: Vec<Queued> = Vec::new();
    let mut matched = Vec::new();
    st.subs.matching(&msg.topic, &mut matched);
    // A client subscribed through several filters gets the message once, at
    // the highest QoS granted.
    let mut groups = Vec::new();
    st.shared.matching(&msg.topic, &mut groups);
    for (key, ()) in groups {
        // One member of each matching group gets it: the next connected
        // one in turn (or, if none is connected, the next one).
        let State {
            shared_members,
            sessions,
            ..
        } = &mut *st;
        let Some(g) = shared_members.get_mut(&key) else {
            continue;
        };
        let n = g.members.len();
        let pick = (0..n)
            .map(|i| (g.next + i) % n)
            .find(|&i| {
                sessions
                    .get(&g.members[i].0)
                    .is_some_and(|s| s.conn.is_some())
            })
            .unwrap_or(g.next % n);
        g.next = pick + 1;
        matched.push(g.members[pick].clone());
    }
    matched.retain(|(client, opts)| !(opts.no_local && msg.from.is_client(client)));
    // Sort by client, best QoS first, and keep the first of each client.
    matched.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.qos.cmp(&a.1.qos)));
    matched.dedup_by(|later, first| later.0 == first.0);
    let best = matched;
    let limit = inner.config.session_queue_limit;
    if msg.qos.is_acknowledged() && inner.persist.is_some() {
        msg.id = inner.next_msg.fetch_add(1, Ordering::Relaxed);
    }
    for (client, opts) in best {
        let Some(session) = st.sessions.get_mut(&client) else {
            continue;
        };
        let mut m = msg.clone();
        m.qos = m.qos.min(opts.qos);
        m.retain = opts.retain_as_published && msg.retain;
        if session.persistent && m.qos.is_acknowledged() && m.id != 0 {
            queued.push(Queued {
                client_id: client.clone(),
                id: m.id,
                topic: m.topic.clone(),
                payload: m.payload.to_vec(),
                qos: m.qos,
                retain: m.retain,
                expires_ms: m.expires_at.map(wall_clock_ms),
                properties: encode_properties(&m.properties),
            });
        } else {
            m.id = 0;
        }
        match &session.conn {
            Some((_, tx)) => match tx.try_send(Outbound::Deliver(Box::new(m))) {
                Ok(()) => session.backlogged_since = None,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Its buffer is full: this message is not delivered
                    // (a persistent session still has it in the store for
                    // its next connection). A client that stays this far
                    // behind is not reading: it is let go.
                    inner.stats.dropped_slow.fetch_add(1, Ordering::Relaxed);
                    let since = *session
                        .backlogged_since
                        .get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= inner.config.slow_client_grace {
                        inner
                            .stats
                            .slow_clients_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(client = %client, "client is not reading; disconnecting it");
                        session.conn = None;
                        session.backlogged_since = None;
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            },
            None if session.persistent && m.qos.is_acknowledged() => {
                if session.queue.len() >= limit {
                    session.queue.pop_front();
                    inner
                        .stats
                        .dropped_queue_full
                        .fetch_add(1, Ordering::Relaxed);
                }
                session.queue.push_back(m);
            }
            None => {}
        }
    }
    drop(st);
    if msg.from.feeds_tap() {
        let tap = inner.tap.read().clone();
        if let Some(tap) = tap {
            tap(&msg.topic, &msg.payload);
        }
    }
    if let Some(p) = &inner.persist {
        if !queued.is_empty() {
            writes.push(p.enqueue(queued, limit));
        }
    }
    if writes.is_empty() {
        return None;
    }
    Some(Box::pin(async move {
        for w in writes {
            w.await?;
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retain(b: &Broker, topic: &str, qos: QoS) {
        let mut m = Message::from_hub(topic, Bytes::from_static(b"x"));
        m.retain = true;
        m.qos = qos;
        let _ = b.publish(m);
    }

    #[test]
    fn retained_messages_page_in_topic_order_and_only_visible_ones() {
        let b = Broker::new(BrokerConfig::default());
        for i in (0..25).rev() {
            retain(&b, &format!("s/{i:02}"), QoS::AtLeastOnce);
            retain(&b, &format!("p/{i:02}"), QoS::ExactlyOnce);
        }
        let got = b.retained_message("p/03").unwrap();
        assert_eq!((got.qos, &got.payload[..]), (QoS::ExactlyOnce, &b"x"[..]));
        assert!(got.modified_ms > 0);
        assert!(b.retained_message("p/99").is_none());
        // Pages of 10 over the s/ topics only: 10, 10, 5, in order.
        let (mut all, mut after) = (Vec::new(), None::<String>);
        loop {
            let (page, next) = b.retained_page(after.as_deref(), 10, |t| t.starts_with("s/"));
            assert!(page.len() <= 10);
            all.extend(page.into_iter().map(|m| m.topic));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let want: Vec<String> = (0..25).map(|i| format!("s/{i:02}")).collect();
        assert_eq!(all, want);
        // A cleared topic is gone from both.
        let mut clear = Message::from_hub("s/00", Bytes::new());
        clear.retain = true;
        let _ = b.publish(clear);
        assert!(b.retained_message("s/00").is_none());
        assert_eq!(b.retained_page(None, 1, |_| true).0[0].topic, "p/00");
    }

    #[test]
    fn a_listing_stops_after_its_scan_budget_with_a_place_to_go_on() {
        let b = Broker::new(BrokerConfig::default());
        for i in 0..10_050 {
            retain(&b, &format!("hidden/{i:05}"), QoS::AtMostOnce);
        }
        retain(&b, "z/seen", QoS::AtMostOnce);
        // Nothing visible in the first 10,000: a short (empty) page, and
        // where to go on from.
        let (page, next) = b.retained_page(None, 50, |t| t.starts_with("z/"));
        assert!(page.is_empty());
        let next = next.expect("more to look at");
        let (page, next) = b.retained_page(Some(&next), 50, |t| t.starts_with("z/"));
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].topic, "z/seen");
        assert_eq!(next, None);
    }
}
