//! The real hub behind the local services' `LocalHub` trait. It lives here,
//! in the one crate that depends on both: `overrides` says what it needs and
//! knows no hub, `hub` knows no HTTP service; this newtype only translates
//! (hub types and errors to the services' own).

use async_trait::async_trait;
use bytes::Bytes;
use roost_bus::{RetainedMessage, RetainedSummary};
use roost_hub::{CallError, Caller, Hub};
use roost_model::{CallId, Principal, TaskName};
use roost_overrides::{CallRefused, HubFailure, LocalHub, PublishOptions, SecretValue, Settings};
use roost_shadows::{Operation, ShadowFailure, ShadowId};
use serde_json::Value;

pub struct HubForServices {
    hub: Hub,
    settings: Settings,
}

impl HubForServices {
    pub fn new(hub: Hub) -> Self {
        let c = hub.config();
        let settings = Settings {
            region: c.region.clone(),
            max_call_input: c.max_sync_input,
            max_publish_bytes: hub.bus().max_message_bytes(),
            max_shadow_request_bytes: c.shadow_limits.max_request_bytes,
        };
        HubForServices { hub, settings }
    }
}

/// A task calling through Lambda `Invoke` waits in its own share of the
/// queue; the owner's calls wait in the called task's.
fn caller_of(p: &Principal) -> Caller {
    match p {
        Principal::Owner => Caller::Outside,
        Principal::Task(t, _) => Caller::Task(t.clone()),
    }
}

fn refused(e: CallError) -> CallRefused {
    match e {
        CallError::UnknownTask(t) => CallRefused::UnknownTask(t),
        CallError::InputTooLarge { limit, .. } => CallRefused::InputTooLarge { limit },
        CallError::Rejected(r) => CallRefused::Busy(r.to_string()),
        CallError::Failed(f) => CallRefused::Failed(f),
        other => CallRefused::Hub(HubFailure::new(other)),
    }
}

#[async_trait]
impl LocalHub for HubForServices {
    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn now_s(&self) -> u64 {
        roost_hub::shadows::now_s()
    }

    fn principal(&self, access_key_id: &str) -> Option<(Principal, String)> {
        self.hub.principal(access_key_id)
    }

    fn count_request(&self, service: &str, status: u16) {
        self.hub.count_local_request(service, status)
    }

    async fn shadow(
        &self,
        id: ShadowId,
        op: Operation,
        payload: Bytes,
    ) -> Result<Value, ShadowFailure> {
        self.hub.shadow(id, op, payload).await
    }

    fn shadow_over_mqtt(&self, id: ShadowId, op: Operation, payload: Bytes) {
        self.hub.shadow_over_mqtt(id, op, payload)
    }

    fn shadow_names(
        &self,
        thing: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, ShadowFailure> {
        self.hub
            .shadow_names(thing, after, limit)
            .map_err(|e| ShadowFailure::Store(e.to_string()))
    }

    fn reserved_topic(&self, topic: &str) -> bool {
        roost_hub::reserved_topic(topic)
    }

    async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        o: PublishOptions,
    ) -> Result<(), HubFailure> {
        let options = roost_hub::local::PublishOptions {
            qos: o.qos,
            retain: o.retain,
            properties: o.properties,
            expiry: o.expiry,
            feeds_routes: o.feeds_routes,
        };
        self.hub
            .publish(topic, payload, options)
            .await
            .map_err(HubFailure::new)
    }

    fn retained_message(&self, topic: &str) -> Option<RetainedMessage> {
        self.hub.bus().retained_message(topic)
    }

    fn retained_page(
        &self,
        after: Option<&str>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> (Vec<RetainedSummary>, Option<String>) {
        self.hub.bus().retained_page(after, limit, visible)
    }

    fn has_task(&self, name: &str) -> bool {
        self.hub.has_task(name)
    }

    fn new_call_id(&self) -> CallId {
        roost_hub::new_call_id()
    }

    async fn call_sync(
        &self,
        caller: &Principal,
        id: CallId,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
    ) -> Result<Bytes, CallRefused> {
        self.hub
            .call_sync_as(id, &caller_of(caller), task, input, env)
            .await
            .map_err(refused)
    }

    async fn call_async(
        &self,
        caller: &Principal,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
    ) -> Result<CallId, CallRefused> {
        self.hub
            .call_async(&caller_of(caller), task, input, env)
            .await
            .map_err(refused)
    }

    fn call_log(&self, task: &TaskName, call_id: &str) -> Vec<String> {
        self.hub
            .logs()
            .of_call(task, call_id)
            .into_iter()
            .map(|l| l.line)
            .collect()
    }

    fn secret(&self, name: &str) -> Result<Option<SecretValue>, HubFailure> {
        let s = self.hub.secret(name).map_err(HubFailure::new)?;
        Ok(s.map(|s| SecretValue {
            value: s.value,
            created_ms: s.created_ms,
            deployment: s.deployment,
        }))
    }
}
