//! What the local services ask of the hub, as a trait: who holds an access
//! key, shadows, retained messages, publishing, calls and secrets. The hub's
//! side implements it (`roost-api` adapts the real `Hub`); the tests here
//! use a fake, so every service is tested without a running hub.

use async_trait::async_trait;
use bytes::Bytes;
use roost_bus::{RetainedMessage, RetainedSummary};
use roost_model::{CallId, Failure, Principal, TaskName};
use roost_shadows::{Operation, ShadowFailure, ShadowId};
use serde_json::Value;

/// The hub's settings the services answer by.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The region a request's credential scope must name.
    pub region: String,
    /// The largest synchronous call input (Lambda `Invoke`).
    pub max_call_input: usize,
    /// The largest MQTT packet the broker takes (a `Publish` payload).
    pub max_publish_bytes: usize,
    /// The largest shadow request document.
    pub max_shadow_request_bytes: usize,
}

/// How a message is published: QoS (0 or 1), retain, and the MQTT 5
/// properties subscribers see.
#[derive(Default, Debug)]
pub struct PublishOptions {
    pub qos: u8,
    pub retain: bool,
    pub properties: roost_bus::Properties,
    /// MQTT 5 message expiry.
    pub expiry: Option<std::time::Duration>,
    /// Whether `device:` routes see it, as they see an MQTT client's
    /// message: true for the owner's (a local program), never for a task's
    /// (a task publishing to a topic routed back to it would loop).
    pub feeds_routes: bool,
}

/// A deployed secret, opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretValue {
    pub value: String,
    pub created_ms: i64,
    /// The deployment it came with (its version, as Secrets Manager sees it).
    pub deployment: i64,
}

/// Why a call through a local service did not give the task's answer.
#[derive(Debug, thiserror::Error)]
pub enum CallRefused {
    #[error("no task named {0:?} is deployed")]
    UnknownTask(String),
    #[error("the input is larger than the limit of {limit} bytes")]
    InputTooLarge { limit: usize },
    /// The hub is too busy (queue full, memory); retry later.
    #[error("{0}")]
    Busy(String),
    /// The task ran and failed.
    #[error(transparent)]
    Failed(Failure),
    /// The hub itself failed (its store).
    #[error(transparent)]
    Hub(HubFailure),
}

/// The hub failed at something it should be able to do (its store, its
/// broker's persistence): the service answers 500 with its message.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct HubFailure(pub Box<dyn std::error::Error + Send + Sync>);

impl HubFailure {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        HubFailure(Box::new(e))
    }
}

/// The hub, as the local services see it.
#[async_trait]
pub trait LocalHub: Send + Sync {
    fn settings(&self) -> &Settings;

    /// The hub's clock, unix seconds (signatures, shadow timestamps).
    fn now_s(&self) -> u64;

    /// Who holds `access_key_id`, and its secret key.
    fn principal(&self, access_key_id: &str) -> Option<(Principal, String)>;

    /// Counts a request to a local service, for the metrics.
    fn count_request(&self, service: &str, status: u16);

    /// Runs a shadow request in order with every other request to that
    /// shadow; the accepted document or why not.
    async fn shadow(
        &self,
        id: ShadowId,
        op: Operation,
        payload: Bytes,
    ) -> Result<Value, ShadowFailure>;

    /// Runs a shadow request as if a device had published it: the answer
    /// goes to the `/accepted` or `/rejected` topic.
    fn shadow_over_mqtt(&self, id: ShadowId, op: Operation, payload: Bytes);

    /// A thing's named shadows after `after`, at most `limit`.
    fn shadow_names(
        &self,
        thing: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, ShadowFailure>;

    /// Whether only the hub may publish to `topic` (`$aws/` topics but a
    /// shadow's request topics).
    fn reserved_topic(&self, topic: &str) -> bool;

    /// Publishes as the hub; resolves once a QoS 1 message is stored for
    /// the sessions that will get it.
    async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        options: PublishOptions,
    ) -> Result<(), HubFailure>;

    /// The retained message of `topic`, unless there is none or it expired.
    fn retained_message(&self, topic: &str) -> Option<RetainedMessage>;

    /// Retained topics after `after` that `visible` lets through, at most
    /// `limit`, and where to go on from if there may be more.
    fn retained_page(
        &self,
        after: Option<&str>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> (Vec<RetainedSummary>, Option<String>);

    /// Whether a task of that name is deployed.
    fn has_task(&self, name: &str) -> bool;

    /// A fresh call id (so a call's log can be found after it).
    fn new_call_id(&self) -> CallId;

    /// Calls `task` for `caller` (whose share of the queue the call waits
    /// in) and waits for its output.
    async fn call_sync(
        &self,
        caller: &Principal,
        id: CallId,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
    ) -> Result<Bytes, CallRefused>;

    /// Queues a call durably for `caller`; its id.
    async fn call_async(
        &self,
        caller: &Principal,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
    ) -> Result<CallId, CallRefused>;

    /// The log lines one call of `task` wrote, oldest first.
    fn call_log(&self, task: &TaskName, call_id: &str) -> Vec<String>;

    /// A secret of the active deployment, opened; `None` if it has none of
    /// that name.
    fn secret(&self, name: &str) -> Result<Option<SecretValue>, HubFailure>;
}
