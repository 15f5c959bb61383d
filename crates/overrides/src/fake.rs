//! A `LocalHub` for the services' unit tests: shadows in a map, retained
//! messages in a sorted map, and every publish and call recorded, so a test
//! drives a service as the dispatcher would and looks at what reached the hub.

use crate::{CallRefused, HubFailure, LocalHub, PublishOptions, SecretValue, Settings};
use async_trait::async_trait;
use bytes::Bytes;
use roost_bus::{RetainedMessage, RetainedSummary};
use roost_model::{CallId, Principal, TaskName};
use roost_shadows::{Operation, ShadowError, ShadowErrorKind, ShadowFailure, ShadowId};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

pub struct FakeHub {
    pub settings: Settings,
    pub now: u64,
    pub keys: HashMap<String, (Principal, String)>,
    pub shadows: Mutex<BTreeMap<String, Value>>,
    pub names: Vec<String>,
    pub retained: BTreeMap<String, RetainedMessage>,
    pub published: Mutex<Vec<(String, Bytes, PublishOptions)>>,
    pub over_mqtt: Mutex<Vec<(ShadowId, Operation, Bytes)>>,
    pub counted: Mutex<Vec<(String, u16)>>,
    pub tasks: Vec<String>,
    pub calls: Mutex<Vec<CallRecord>>,
    pub secrets: HashMap<String, SecretValue>,
    /// Makes the store fail.
    pub broken: bool,
}

impl Default for FakeHub {
    fn default() -> Self {
        FakeHub {
            settings: Settings {
                region: "us-east-1".into(),
                max_call_input: 1024,
                max_publish_bytes: 4096,
                max_shadow_request_bytes: 8192,
            },
            now: 1_795_514_400,
            keys: HashMap::new(),
            shadows: Mutex::default(),
            names: Vec::new(),
            retained: BTreeMap::new(),
            published: Mutex::default(),
            over_mqtt: Mutex::default(),
            counted: Mutex::default(),
            tasks: Vec::new(),
            calls: Mutex::default(),
            secrets: HashMap::new(),
            broken: false,
        }
    }
}

/// A call the fake was asked to make: task, input, extra environment.
pub type CallRecord = (String, Bytes, Vec<(String, String)>);

impl FakeHub {
    pub fn retain(&mut self, topic: &str, payload: &[u8], qos: u8) {
        self.retained.insert(
            topic.into(),
            RetainedMessage {
                topic: topic.into(),
                payload: Bytes::copy_from_slice(payload),
                qos: roost_bus::QoS::try_from(qos).expect("a QoS of 0, 1 or 2"),
                modified_ms: 1_000,
                user_properties: vec![("site".into(), "plant-7".into())],
            },
        );
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the disk is full")]
struct DiskFull;

#[async_trait]
impl LocalHub for FakeHub {
    fn settings(&self) -> &Settings {
        &self.settings
    }
    fn now_s(&self) -> u64 {
        self.now
    }
    fn principal(&self, access_key_id: &str) -> Option<(Principal, String)> {
        self.keys.get(access_key_id).cloned()
    }
    fn count_request(&self, service: &str, status: u16) {
        self.counted.lock().unwrap().push((service.into(), status));
    }
    async fn shadow(
        &self,
        id: ShadowId,
        op: Operation,
        payload: Bytes,
    ) -> Result<Value, ShadowFailure> {
        if self.broken {
            return Err(ShadowFailure::Store("the disk is full".into()));
        }
        let key = id.to_string();
        let mut shadows = self.shadows.lock().unwrap();
        let missing = || {
            ShadowFailure::Rejected(ShadowError::new(
                ShadowErrorKind::NotFound,
                format!("No shadow exists with name: '{key}'"),
            ))
        };
        match op {
            Operation::Get => shadows.get(&key).cloned().ok_or_else(missing),
            Operation::Delete => shadows
                .remove(&key)
                .map(|_| serde_json::json!({ "version": 1 }))
                .ok_or_else(missing),
            Operation::Update => {
                let doc: Value = serde_json::from_slice(&payload).map_err(|_| {
                    ShadowFailure::Rejected(ShadowError::new(
                        ShadowErrorKind::BadRequest,
                        "Payload contains invalid json",
                    ))
                })?;
                shadows.insert(key, doc.clone());
                Ok(doc)
            }
        }
    }
    fn shadow_over_mqtt(&self, id: ShadowId, op: Operation, payload: Bytes) {
        self.over_mqtt.lock().unwrap().push((id, op, payload));
    }
    fn shadow_names(
        &self,
        _thing: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, ShadowFailure> {
        if self.broken {
            return Err(ShadowFailure::Store("the disk is full".into()));
        }
        Ok(self
            .names
            .iter()
            .filter(|n| n.as_str() > after)
            .take(limit)
            .cloned()
            .collect())
    }
    fn reserved_topic(&self, topic: &str) -> bool {
        topic.starts_with("$aws/") && roost_shadows::parse_request_topic(topic).is_none()
    }
    async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        options: PublishOptions,
    ) -> Result<(), HubFailure> {
        if self.broken {
            return Err(HubFailure::new(DiskFull));
        }
        self.published
            .lock()
            .unwrap()
            .push((topic.into(), payload, options));
        Ok(())
    }
    fn retained_message(&self, topic: &str) -> Option<RetainedMessage> {
        self.retained.get(topic).cloned()
    }
    fn retained_page(
        &self,
        after: Option<&str>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> (Vec<RetainedSummary>, Option<String>) {
        let mut page: Vec<RetainedSummary> = self
            .retained
            .values()
            .filter(|m| after.is_none_or(|a| m.topic.as_str() > a) && visible(&m.topic))
            .take(limit + 1)
            .map(|m| RetainedSummary {
                topic: m.topic.clone(),
                payload_size: m.payload.len(),
                qos: m.qos,
                modified_ms: m.modified_ms,
            })
            .collect();
        let next = (page.len() > limit).then(|| {
            page.truncate(limit);
            page.last().map(|m| m.topic.clone()).unwrap_or_default()
        });
        (page, next)
    }
    fn has_task(&self, name: &str) -> bool {
        self.tasks.iter().any(|t| t == name)
    }
    fn new_call_id(&self) -> CallId {
        CallId::from_bytes([7; 16])
    }
    async fn call_sync(
        &self,
        _caller: &Principal,
        _id: CallId,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
    ) -> Result<Bytes, CallRefused> {
        if !self.has_task(task) {
            return Err(CallRefused::UnknownTask(task.into()));
        }
        self.calls
            .lock()
            .unwrap()
            .push((task.into(), input.clone(), env));
        Ok(input)
    }
    async fn call_async(
        &self,
        _caller: &Principal,
        task: &str,
        input: Bytes,
        env: Vec<(String, String)>,
    ) -> Result<CallId, CallRefused> {
        if !self.has_task(task) {
            return Err(CallRefused::UnknownTask(task.into()));
        }
        self.calls.lock().unwrap().push((task.into(), input, env));
        Ok(self.new_call_id())
    }
    fn call_log(&self, _task: &TaskName, _call_id: &str) -> Vec<String> {
        vec!["started".into(), "done".into()]
    }
    fn secret(&self, name: &str) -> Result<Option<SecretValue>, HubFailure> {
        if self.broken {
            return Err(HubFailure::new(DiskFull));
        }
        Ok(self.secrets.get(name).cloned())
    }
}
