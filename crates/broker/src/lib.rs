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
mod retained;
pub mod tls;
mod websocket;
/// Topic rules live in their own crate; re-exported for callers that name
/// them through the broker.
pub use roost_topic as topic;

pub use login::LoginLimits;
pub use persist::{Done, PersistError, Persistence, QueuePage, Queued, Restore, Retained};
pub use policy::{Device, Devices, Policy};
pub use retained::{RetainedLimit, RetainedLimits};
/// The message vocabulary is the bus's (`roost-bus`), shared with the hub.
pub use roost_bus::{
    DeviceState, InvalidQoS, Message, MessageBus, Publisher, QoS, Reserved, RetainedMessage,
    RetainedSummary, Tap,
};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use retained::RetainedStore;
pub use roost_bus::Properties;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Bytes of messages waiting to be written to one connection (and kept
    /// in memory for one offline session); past it, the same.
    pub outgoing_buffer_bytes: usize,
    /// How many retained messages are kept, per device and in all.
    pub retained: RetainedLimits,
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
            outgoing_buffer_bytes: 16 << 20,
            retained: RetainedLimits::default(),
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
    /// cost a few bytes per slot, not a whole message each. The charge
    /// holds its bytes against the connection's byte bound until the
    /// connection takes it.
    Deliver(Box<Message>, Charge),
    /// Another connection took over this session.
    TakenOver,
}

/// Bytes a message holds, as counted against a client's byte bounds.
pub(crate) fn weight(m: &Message) -> usize {
    // The topic, the payload, and a fixed share for the rest (the struct,
    // its properties' usual size).
    m.topic.len() + m.payload.len() + 256
}

/// A message's bytes, counted against its connection's buffer until it is
/// dropped (taken by the connection, or left in a closed channel).
#[derive(Debug)]
pub(crate) struct Charge {
    queued: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The broker's end of a connection's channel, bounded in messages (the
/// channel's capacity) and in bytes.
#[derive(Debug)]
pub(crate) struct Outlet {
    tx: mpsc::Sender<Outbound>,
    queued: Arc<AtomicUsize>,
}

impl From<mpsc::Sender<Outbound>> for Outlet {
    fn from(tx: mpsc::Sender<Outbound>) -> Self {
        Self {
            tx,
            queued: Arc::default(),
        }
    }
}

impl Outlet {
    pub fn try_send(&self, o: Outbound) -> Result<(), mpsc::error::TrySendError<Outbound>> {
        self.tx.try_send(o)
    }

    /// Hands `m` to the connection unless its buffer is full, in messages
    /// or in `max_bytes` (a single message bigger than that still goes
    /// through an empty buffer).
    pub fn offer(&self, m: Message, max_bytes: usize) -> Result<(), Refused> {
        let bytes = crate::weight(&m);
        let before = self.queued.fetch_add(bytes, Ordering::Relaxed);
        let charge = Charge {
            queued: self.queued.clone(),
            bytes,
        };
        if before > 0 && before + bytes > max_bytes {
            return Err(Refused::Full);
        }
        self.tx
            .try_send(Outbound::Deliver(Box::new(m), charge))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Refused::Full,
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            })
    }
}

/// Why a connection did not take a message.
pub(crate) enum Refused {
    Full,
    Closed,
}

/// What an offline persistent session holds beyond its queue.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    /// Bytes of `Session::queue`.
    pub bytes: usize,
    /// Messages for it were left in the store only (its buffer or queue
    /// was full): its next connection reads its queue from the store.
    pub stored_only: bool,
}

pub(crate) struct Session {
    pub conn: Option<(u64, Outlet)>,
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
    pub backlog: Backlog,
}

#[derive(Default)]
pub(crate) struct State {
    pub sessions: HashMap<String, Session>,
    pub subs: Trie<SubOptions>,
    pub retained: RetainedStore,
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
    /// Retained messages refused, by the limit they would have passed
    /// (device, total).
    pub retained_refused: [AtomicU64; 2],
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
        let mut state = State {
            retained: RetainedStore::new(config.retained),
            ..State::default()
        };
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
                    backlog: Backlog::default(),
                },
            );
        }
        for (client, filter, qos, no_local, rap) in restore.subscriptions {
            // Kept by an older hub under looser topic rules (more levels
            // than the trie now takes): left out, not restored.
            let plain = split_shared(&filter).map_or(filter.as_str(), |(_, f)| f);
            if !topic::valid_filter(plain) {
                tracing::warn!(client = %client, "a stored subscription's filter breaks the topic rules; it is not restored");
                continue;
            }
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
                s.backlog.bytes += q.topic.len() + q.payload.len() + 256;
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
            if !topic::valid_topic_name(&r.topic) {
                // Kept by an older hub under looser topic rules (more
                // levels than the topic tree walks).
                tracing::warn!(topic = %r.topic.chars().take(100).collect::<String>(), "a stored retained message's topic is no longer valid; not restored");
                continue;
            }
            // What was kept before is kept again, even past limits lowered
            // since: the limits refuse new messages, they delete nothing.
            state.retained.insert(retained::Entry {
                bytes: retained::size_of(&r.topic, r.payload.len(), r.properties.len()),
                message: Message {
                    topic: r.topic,
                    payload: Bytes::from(r.payload),
                    qos: r.qos,
                    retain: true,
                    properties: decode_properties(&r.properties),
                    from: Publisher::Hub,
                    id: 0,
                    expires_at: r.expires_ms.map(instant_of_wall_clock),
                },
                at: r.modified_ms,
                owner: r.owner,
            });
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

    /// Whether `client`'s session is still held by connection `conn` (the
    /// broker lets a slow client go by taking its session's connection).
    pub(crate) fn holds(&self, client: &str, conn: u64) -> bool {
        self.inner
            .state
            .lock()
            .sessions
            .get(client)
            .is_some_and(|s| s.conn.as_ref().is_some_and(|(id, _)| *id == conn))
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

    /// Bytes of retained messages kept (as counted against the limits).
    pub fn retained_bytes(&self) -> usize {
        self.inner.state.lock().retained.bytes()
    }

    /// The retained message of `topic`, unless there is none or it expired.
    pub fn retained_message(&self, topic: &str) -> Option<RetainedMessage> {
        let st = self.inner.state.lock();
        let retained::Entry { message: m, at, .. } = st.retained.get(topic)?;
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
        let topics = st
            .retained
            .by_topic
            .range::<str, _>((start, Bound::Unbounded));
        for (scanned, (t, retained::Entry { message: m, at, .. })) in topics.enumerate() {
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
        route(&self.inner, message, false).unwrap_or(None)
    }
}

/// Delivers a message to every matching subscription (and keeps it if it
/// is retained). Never blocks: a connection whose buffer is full is told to
/// go, an offline persistent session queues up to its limit.
///
/// A retained message past its device's or the total limit is refused
/// (`Err`, nothing delivered) when `refusable` (the publisher can be told:
/// an MQTT 5 QoS 1/2 PUBLISH, answered 0x97); otherwise it is delivered but
/// not retained, and what its topic held is discarded, as a new retained
/// message would have replaced it (MQTT 3.1.1 3.3.1.3).
pub(crate) fn route(
    inner: &Inner,
    msg: Message,
    refusable: bool,
) -> Result<Option<Done>, RetainedLimit> {
    route_owned(inner, msg, refusable, None)
}

/// [`route`], with the retained quota `owner` given rather than looked up
/// from the publisher's session (a will goes out after its session is
/// gone, and still counts against its device).
pub(crate) fn route_owned(
    inner: &Inner,
    mut msg: Message,
    refusable: bool,
    owner: Option<String>,
) -> Result<Option<Done>, RetainedLimit> {
    let mut writes: Vec<Done> = Vec::new();
    let mut st = inner.state.lock();
    if msg.retain {
        let at = now_ms();
        let properties = encode_properties(&msg.properties);
        let owner = owner.or_else(|| match &msg.from {
            // A device's quota is its own whatever client id it uses.
            Publisher::Client(c) => Some(
                st.sessions
                    .get(c)
                    .and_then(|s| s.device.clone())
                    .unwrap_or_else(|| c.clone()),
            ),
            _ => None,
        });
        let mut stored = Retained {
            topic: msg.topic.clone(),
            payload: msg.payload.to_vec(),
            qos: msg.qos,
            properties: properties.clone(),
            expires_ms: msg.expires_at.map(wall_clock_ms),
            modified_ms: at,
            owner: owner.clone(),
        };
        if msg.payload.is_empty() {
            st.retained.remove(&msg.topic);
        } else {
            let entry = retained::Entry {
                bytes: retained::size_of(&msg.topic, msg.payload.len(), properties.len()),
                message: msg.clone(),
                at,
                owner: owner.clone(),
            };
            match st.retained.admits(&entry) {
                Ok(()) => st.retained.insert(entry),
                Err(limit) => {
                    inner.stats.retained_refused[limit as usize].fetch_add(1, Ordering::Relaxed);
                    if st.retained.first_refusal(owner.as_deref(), limit) {
                        let l = st.retained.limits;
                        tracing::warn!(
                            device = owner.as_deref().unwrap_or("(hub)"),
                            topic = %msg.topic,
                            limit = limit.label(),
                            per_device = l.per_device,
                            per_device_bytes = l.per_device_bytes,
                            total = l.total,
                            total_bytes = l.total_bytes,
                            "retained message refused: over the retained-message limit (raise --mqtt-retained-per-device / --mqtt-retained-total, or clear retained topics); further refusals are only counted until one gets in"
                        );
                    }
                    if refusable {
                        return Err(limit);
                    }
                    st.retained.remove(&msg.topic);
                    stored.payload.clear();
                }
            }
        }
        if let Some(p) = &inner.persist {
            writes.push(p.retain(stored));
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
    let max_bytes = inner.config.outgoing_buffer_bytes;
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
        // Non-zero: it is in the store for this session.
        let stored_id = m.id;
        match &session.conn {
            Some((_, outlet)) => match outlet.offer(m, max_bytes) {
                Ok(()) => session.backlogged_since = None,
                Err(Refused::Full) => {
                    // Its buffer is full: this message is not delivered
                    // now. A persistent session still has it in the store,
                    // which its next connection reads its queue from. A
                    // client that stays this far behind is not reading: it
                    // is let go.
                    inner.stats.dropped_slow.fetch_add(1, Ordering::Relaxed);
                    if stored_id != 0 {
                        session.backlog.stored_only = true;
                    }
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
                Err(Refused::Closed) => {}
            },
            None if session.persistent && m.qos.is_acknowledged() => {
                if session.queue.len() >= limit {
                    if let Some(old) = session.queue.pop_front() {
                        session.backlog.bytes =
                            session.backlog.bytes.saturating_sub(crate::weight(&old));
                    }
                    inner
                        .stats
                        .dropped_queue_full
                        .fetch_add(1, Ordering::Relaxed);
                }
                // Past its bytes, the oldest leave memory: those in the
                // store stay there for its next connection, the others
                // are lost.
                let weight = crate::weight(&m);
                while session.backlog.bytes + weight > max_bytes {
                    let Some(old) = session.queue.pop_front() else {
                        break;
                    };
                    session.backlog.bytes =
                        session.backlog.bytes.saturating_sub(crate::weight(&old));
                    if old.id != 0 {
                        session.backlog.stored_only = true;
                    } else {
                        inner
                            .stats
                            .dropped_queue_full
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                session.backlog.bytes += weight;
                session.queue.push_back(m);
            }
            None => {}
        }
    }
    // Submitted before the lock is let go, so a connection reading its
    // queue from the store (after a message reached it) sees the message.
    if let Some(p) = &inner.persist {
        if !queued.is_empty() {
            writes.push(p.enqueue(std::mem::take(&mut queued), limit));
        }
    }
    drop(st);
    if msg.from.feeds_tap() {
        let tap = inner.tap.read().clone();
        if let Some(tap) = tap {
            tap(&msg.topic, &msg.payload);
        }
    }
    if writes.is_empty() {
        return Ok(None);
    }
    Ok(Some(Box::pin(async move {
        for w in writes {
            w.await?;
        }
        Ok(())
    })))
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

    /// A session of `client` (a device of that name) subscribed to `filter`
    /// at QoS 1, connected through a channel of `capacity` messages.
    fn connected(
        b: &Broker,
        client: &str,
        filter: &str,
        persistent: bool,
        capacity: usize,
    ) -> mpsc::Receiver<Outbound> {
        let (tx, rx) = mpsc::channel(capacity);
        let mut st = b.inner.state.lock();
        let opts = SubOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
        };
        st.add_sub(client, filter, opts);
        st.sessions.insert(
            client.to_owned(),
            Session {
                conn: Some((1, tx.into())),
                persistent,
                subscriptions: HashMap::from([(filter.to_owned(), opts)]),
                queue: VecDeque::new(),
                device: Some(client.to_owned()),
                qos2_in: Default::default(),
                backlogged_since: None,
                last_conn: 1,
                backlog: Backlog::default(),
            },
        );
        rx
    }

    fn from_device(device: &str, topic: &str, payload: usize) -> Message {
        let mut m = Message::from_hub(topic, Bytes::from(vec![b'x'; payload]));
        m.from = Publisher::Client(device.to_owned());
        m.retain = true;
        m
    }

    #[tokio::test]
    async fn a_device_over_its_retained_quota_is_refused_or_not_retained() {
        let mut config = BrokerConfig::default();
        config.retained.per_device = 3;
        let b = Broker::new(config);
        let _rx = connected(&b, "d", "nothing/#", false, 10);
        let mut watcher = connected(&b, "w", "d/#", false, 100);
        for i in 0..3 {
            assert!(route(&b.inner, from_device("d", &format!("d/{i}"), 10), true).is_ok());
        }
        assert_eq!(b.retained_count(), 3);
        // A fourth that can be refused is: not retained, not delivered.
        let got = route(&b.inner, from_device("d", "d/3", 10), true);
        assert!(matches!(got, Err(RetainedLimit::Device)));
        assert_eq!(b.retained_count(), 3);
        assert_eq!(b.stats().retained_refused[0].load(Ordering::Relaxed), 1);
        let mut delivered = Vec::new();
        while let Ok(Outbound::Deliver(m, _)) = watcher.try_recv() {
            delivered.push(m.topic);
        }
        assert_eq!(delivered, ["d/0", "d/1", "d/2"]);
        // One that cannot be refused (QoS 0, MQTT 3.1.1) is delivered, not
        // kept, and what its topic held goes: a bigger d/2 clears d/2.
        assert!(route(&b.inner, from_device("d", "d/2", 10 << 20), false).is_ok());
        assert!(matches!(watcher.try_recv(), Ok(Outbound::Deliver(m, _)) if m.topic == "d/2"));
        assert_eq!(b.retained_count(), 2);
        assert!(b.retained_message("d/2").is_none());
        // Replacing its own takes nothing more; the hub is never refused.
        assert!(route(&b.inner, from_device("d", "d/0", 10), true).is_ok());
        for i in 0..5 {
            retain(&b, &format!("hub/{i}"), QoS::AtLeastOnce);
        }
        assert_eq!(b.retained_count(), 7);
        assert_eq!(b.stats().retained_refused[0].load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_connection_buffer_is_bounded_in_bytes() {
        let config = BrokerConfig {
            outgoing_buffer_bytes: 10_000,
            ..BrokerConfig::default()
        };
        let b = Broker::new(config);
        // Room for 1,000 messages, but 10 kB only: about nine of 1 kB.
        let mut rx = connected(&b, "s", "t/#", true, 1000);
        for _ in 0..50 {
            let m = Message::from_hub("t/x", Bytes::from(vec![0; 1000]));
            let _ = route(&b.inner, m, false);
        }
        let mut taken = 0;
        while let Ok(Outbound::Deliver(..)) = rx.try_recv() {
            taken += 1;
        }
        assert!((5..=10).contains(&taken), "{taken} taken");
        assert_eq!(
            b.stats().dropped_slow.load(Ordering::Relaxed),
            50 - taken as u64
        );
        // Taking them gave their bytes back.
        let st = b.inner.state.lock();
        let (_, outlet) = st.sessions["s"].conn.as_ref().unwrap();
        assert_eq!(outlet.queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_offline_queue_is_bounded_in_bytes_too() {
        let config = BrokerConfig {
            outgoing_buffer_bytes: 10_000,
            ..BrokerConfig::default()
        };
        let b = Broker::new(config);
        drop(connected(&b, "s", "t/#", true, 1));
        b.inner.state.lock().sessions.get_mut("s").unwrap().conn = None;
        for _ in 0..50 {
            let mut m = Message::from_hub("t/x", Bytes::from(vec![0; 1000]));
            m.qos = QoS::AtLeastOnce;
            let _ = route(&b.inner, m, false);
        }
        let st = b.inner.state.lock();
        let s = &st.sessions["s"];
        assert!(s.queue.len() < 10, "{} queued", s.queue.len());
        assert!(s.backlog.bytes <= 10_000);
        assert_eq!(
            b.stats().dropped_queue_full.load(Ordering::Relaxed),
            50 - s.queue.len() as u64
        );
    }
}
