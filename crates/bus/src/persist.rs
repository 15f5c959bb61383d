//! What a bus keeps across restarts, behind a trait so the bus knows
//! nothing of the store's SQL: the hub implements it with the store.
//! Every method submits its write at once (writes run in the order they
//! were submitted) and returns a future that resolves when it is on disk.

use crate::QoS;
use std::future::Future;
use std::pin::Pin;

/// A write that resolves once it is on disk.
pub type Done = Pin<Box<dyn Future<Output = Result<(), PersistError>> + Send>>;

/// A page of a session's stored queue, read after every write submitted
/// before it.
pub type QueuePage = Pin<Box<dyn Future<Output = Result<Vec<Queued>, PersistError>> + Send>>;

/// Why the broker's state could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The store refused or failed the write.
    #[error("the store could not write the broker's state: {0}")]
    Write(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store stopped taking writes (shutting down, or it failed).
    #[error("the store has stopped taking the broker's writes")]
    Closed,
}

/// A message queued for one persistent session.
#[derive(Clone, Debug)]
pub struct Queued {
    pub client_id: String,
    pub id: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// When it stops being worth delivering (wall clock, ms since the epoch).
    pub expires_ms: Option<i64>,
    /// Its MQTT 5 properties, encoded as on the wire (empty: none).
    pub properties: Vec<u8>,
}

/// A retained message as kept (an empty payload clears the topic).
#[derive(Clone, Debug, Default)]
pub struct Retained {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub properties: Vec<u8>,
    pub expires_ms: Option<i64>,
    /// When it was retained (wall clock, ms).
    pub modified_ms: i64,
    /// The device (or client id) whose quota it counts against; none: the
    /// hub's own, or kept before owners were.
    pub owner: Option<String>,
}

/// The broker's durable state as loaded at start.
#[derive(Debug, Default)]
pub struct Restore {
    /// (client id, device, session expiry in seconds; none: never)
    pub sessions: Vec<(String, Option<String>, Option<u32>)>,
    /// (client id, filter, qos, no_local, retain_as_published)
    pub subscriptions: Vec<(String, String, QoS, bool, bool)>,
    pub queue: Vec<Queued>,
    pub qos2_in: Vec<(String, u16)>,
    pub retained: Vec<Retained>,
}

pub trait Persistence: Send + Sync {
    /// Keeps a persistent session; `expiry_s` is how long it outlives its
    /// connection (none: until the client cleans it).
    fn save_session(&self, client_id: &str, device: Option<&str>, expiry_s: Option<u32>) -> Done;
    fn drop_session(&self, client_id: &str) -> Done;
    fn save_subscription(
        &self,
        client_id: &str,
        filter: &str,
        qos: QoS,
        no_local: bool,
        retain_as_published: bool,
    ) -> Done;
    fn drop_subscription(&self, client_id: &str, filter: &str) -> Done;
    /// Queues messages for persistent sessions, at most `limit` per session.
    fn enqueue(&self, messages: Vec<Queued>, limit: usize) -> Done;
    fn delivered(&self, client_id: &str, id: u64) -> Done;
    /// `client_id`'s queued messages after message `after`, in order: at
    /// most `limit`, each while those before it hold less than `max_bytes`
    /// (so at least one). Read when messages were left in the store only (the
    /// session's buffer was full).
    fn queued(&self, client_id: &str, after: u64, limit: usize, max_bytes: usize) -> QueuePage;
    fn qos2_received(&self, client_id: &str, packet_id: u16) -> Done;
    fn qos2_released(&self, client_id: &str, packet_id: u16) -> Done;
    /// Keeps a retained message (an empty payload clears it).
    fn retain(&self, message: Retained) -> Done;
}
