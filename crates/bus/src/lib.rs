//! The hub's message bus as the hub sees it: the messages it publishes and
//! taps, who published them, their QoS, the retained messages it reads, the
//! devices it hands over, and the durable state a bus keeps through the
//! hub's store. `roost-broker` implements [`MessageBus`]; the hub names only
//! this crate, so a change inside the broker recompiles neither the hub nor
//! what depends on it.

mod persist;
mod qos;

pub use persist::{Done, PersistError, Persistence, QueuePage, Queued, Restore, Retained};
pub use qos::{InvalidQoS, QoS};

use bytes::Bytes;
/// MQTT 5 properties as the wire carries them (`mqtt5-protocol`'s type:
/// the data plane's publishes set them, and the broker forwards them).
pub use mqtt5_protocol::Properties;
use std::sync::Arc;

/// A message as the bus routes it.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 properties to forward (topic alias removed).
    pub properties: Properties,
    /// Who published it (for no-local, and whether the tap sees it).
    pub from: Publisher,
    /// Its id in the store when queued for persistent sessions (0: not stored).
    pub id: u64,
    /// When it stops being worth delivering (MQTT 5 message expiry).
    pub expires_at: Option<std::time::Instant>,
}

impl Message {
    /// A QoS 1 message the hub itself publishes (a route, a task): it has
    /// no client behind it, so it feeds no `device:` route.
    pub fn from_hub(topic: &str, payload: Bytes) -> Self {
        Message {
            topic: topic.to_owned(),
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::new(),
            from: Publisher::Hub,
            id: 0,
            expires_at: None,
        }
    }
}

/// Who published a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Publisher {
    /// An MQTT client, by client id: its own no-local subscriptions do not
    /// get the message back, and the tap sees it.
    Client(String),
    /// The hub itself (a route, a task, a shadow answer, a restored
    /// message): the tap does not see it, so it feeds no `device:` route.
    Hub,
    /// Outside the hub without an MQTT connection (the owner's data-plane
    /// `Publish`): like a client's message the tap sees it, and being no
    /// client, no-local hides it from no one.
    Outside,
}

impl Publisher {
    /// Whether `client_id` published it (its no-local subscriptions skip it).
    pub fn is_client(&self, client_id: &str) -> bool {
        matches!(self, Publisher::Client(c) if c == client_id)
    }

    /// Whether the tap (the hub's route table) sees its messages.
    pub fn feeds_tap(&self) -> bool {
        !matches!(self, Publisher::Hub)
    }
}

/// A retained message as `GetRetainedMessage` shows it.
#[derive(Clone, Debug)]
pub struct RetainedMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// When it was retained (wall clock, ms).
    pub modified_ms: i64,
    /// Its MQTT 5 user properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// A retained message as `ListRetainedMessages` shows it.
#[derive(Clone, Debug)]
pub struct RetainedSummary {
    pub topic: String,
    pub payload_size: usize,
    pub qos: QoS,
    pub modified_ms: i64,
}

/// A device the deployment declares: who may connect, and where it may
/// publish and subscribe (`{device}` in a filter stands for its name).
#[derive(Clone, Debug)]
pub struct Device {
    pub name: String,
    /// An argon2 PHC string (`roost passwd`).
    pub password_hash: Option<String>,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// A device as `roost devices` shows it.
#[derive(Clone, Debug)]
pub struct DeviceState {
    pub name: String,
    pub connected: bool,
    pub client_ids: Vec<String>,
}

/// Says whether a topic is reserved for the hub (clients' publishes to it
/// are refused as not authorized).
pub type Reserved = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A hook called with (topic, payload) of each message a client publishes.
pub type Tap = Arc<dyn Fn(&str, &Bytes) + Send + Sync>;

/// What the hub asks of its message bus. Every method returns at once:
/// `publish` hands back the write that makes the message durable, for a
/// caller that acknowledges only once it is.
pub trait MessageBus: Send + Sync + 'static {
    /// Routes `message` to its subscribers (keeping it if it is retained).
    /// `Some` when it was kept for a persistent session or retained: the
    /// write resolves once that is on disk.
    fn publish(&self, message: Message) -> Option<Done>;
    /// Sees every message clients (and the outside) publish.
    fn set_tap(&self, tap: Tap);
    /// Topics only the hub publishes to, whatever a device's policy says.
    fn set_reserved(&self, reserved: Reserved);
    /// The devices of the active deployment (replacing the last set).
    fn set_devices(&self, devices: Vec<Device>);
    /// Every deployed device with its connection state.
    fn devices(&self) -> Vec<DeviceState>;
    /// The retained message of `topic`, unless there is none or it expired.
    fn retained_message(&self, topic: &str) -> Option<RetainedMessage>;
    /// Up to `limit` retained messages in topic order after `after`, those
    /// `visible` lets through, and where the next page starts (none: the
    /// end).
    fn retained_page(
        &self,
        after: Option<&str>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> (Vec<RetainedSummary>, Option<String>);
    /// The largest message it takes, in bytes (the data plane refuses
    /// larger publishes up front).
    fn max_message_bytes(&self) -> usize;
    /// Registers its metrics in the hub's registry.
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry);
}

/// What the hub hands the bus it is given: the store behind its durable
/// state, and that state as loaded at start.
pub struct BusState {
    pub persistence: Arc<dyn Persistence>,
    pub restore: Restore,
}
