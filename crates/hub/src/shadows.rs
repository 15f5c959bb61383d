//! The hub's shadows: one ordered queue per shadow, so requests to a shadow
//! apply in arrival order (MQTT and HTTP alike) while different shadows run
//! concurrently and share the store's group commits. A change is answered
//! only once it is on disk; then it is announced on the shadow topics and
//! its delta feeds the `shadow:THING` routes.

use crate::HubInner;
use bytes::Bytes;
use roost_shadows::{
    parse_client_token, parse_update, Operation, Response, ShadowError, ShadowErrorKind, ShadowId,
    ShadowRecord,
};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Requests waiting for one shadow at most; past it the request is
/// rejected as throttled rather than queued without bound.
const QUEUE_PER_SHADOW: usize = 1000;
/// How long a shadow's worker stays after its last request.
const IDLE: Duration = Duration::from_secs(30);

/// Where a shadow request came from: over MQTT the answer goes to the
/// `/accepted` or `/rejected` topic; over HTTP or from a route, to the
/// caller waiting for it.
pub enum Origin {
    Mqtt,
    Caller(oneshot::Sender<Result<Value, ShadowFailure>>),
}

pub use roost_shadows::ShadowFailure;

struct Request {
    op: Operation,
    payload: Bytes,
    origin: Origin,
}

type Key = (String, String);

pub(crate) struct Shadows {
    queues: parking_lot::Mutex<HashMap<Key, mpsc::Sender<Request>>>,
}

impl Shadows {
    pub fn new() -> Self {
        Self {
            queues: parking_lot::Mutex::new(HashMap::new()),
        }
    }
}

fn key(id: &ShadowId) -> Key {
    (
        id.thing.as_str().to_owned(),
        id.name
            .as_ref()
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
    )
}

/// The clock shadows are stamped with: epoch seconds.
pub fn now_s() -> u64 {
    (roost_store::now_ms() / 1000) as u64
}

/// Queues a request for its shadow, in order behind the ones before it.
pub(crate) fn submit(
    inner: &Arc<HubInner>,
    id: ShadowId,
    op: Operation,
    payload: Bytes,
    origin: Origin,
) {
    let k = key(&id);
    let mut queues = inner.shadows.queues.lock();
    let mut request = Request {
        op,
        payload,
        origin,
    };
    // Twice at most: a worker that is gone (it panicked) is replaced once.
    for _ in 0..2 {
        let tx = queues
            .entry(k.clone())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE_PER_SHADOW);
                tokio::spawn(run(Arc::downgrade(inner), id.clone(), k.clone(), rx));
                tx
            })
            .clone();
        match tx.try_send(request) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(r)) => {
                queues.remove(&k);
                request = r;
            }
            Err(mpsc::error::TrySendError::Full(r)) => {
                request = r;
                break;
            }
        }
    }
    drop(queues);
    let token = parse_client_token(&request.payload);
    answer(
        inner,
        &id,
        request.op,
        request.origin,
        Err(ShadowFailure::Throttled),
        token.as_deref(),
    );
}

/// One shadow's worker: holds its record, applies requests in order.
async fn run(hub: Weak<HubInner>, id: ShadowId, k: Key, mut rx: mpsc::Receiver<Request>) {
    let mut record: Option<ShadowRecord> = None;
    loop {
        let req = match tokio::time::timeout(IDLE, rx.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(_) => {
                let Some(inner) = hub.upgrade() else { return };
                let mut queues = inner.shadows.queues.lock();
                // Senders send under this lock, so an empty queue now stays
                // empty until the entry is gone.
                if rx.is_empty() {
                    queues.remove(&k);
                    return;
                }
                continue;
            }
        };
        let Some(inner) = hub.upgrade() else { return };
        if record.is_none() {
            match load(&inner, &k) {
                Ok(r) => record = Some(r),
                Err(e) => {
                    let token = parse_client_token(&req.payload);
                    answer(&inner, &id, req.op, req.origin, Err(e), token.as_deref());
                    continue;
                }
            }
        }
        let current = record.as_ref().expect("loaded above");
        let (result, token) = apply(&inner, &id, &k, current, &req).await;
        match &result {
            Ok((Some(new), _)) => record = Some(new.clone()),
            // After a failed write the disk is the truth: read it again.
            Err(ShadowFailure::Store(_)) => record = None,
            _ => {}
        }
        answer(
            &inner,
            &id,
            req.op,
            req.origin,
            result.map(|(_, v)| v),
            token.as_deref(),
        );
    }
}

fn load(inner: &HubInner, k: &Key) -> Result<ShadowRecord, ShadowFailure> {
    match inner.store.shadow_get(&k.0, &k.1) {
        Ok(Some(s)) => ShadowRecord::from_stored(&s)
            .map_err(|e| ShadowFailure::Store(format!("the stored shadow does not parse: {e}"))),
        Ok(None) => Ok(ShadowRecord::default()),
        Err(e) => Err(ShadowFailure::Store(e.to_string())),
    }
}

type Applied = Result<(Option<ShadowRecord>, Value), ShadowFailure>;

/// Runs one request against the current record: the new record (if it
/// changed, already on disk) and the accepted document.
async fn apply(
    inner: &Arc<HubInner>,
    id: &ShadowId,
    k: &Key,
    current: &ShadowRecord,
    req: &Request,
) -> (Applied, Option<String>) {
    let now = now_s();
    let limits = &inner.config.shadow_limits;
    match req.op {
        Operation::Get => {
            let token = parse_client_token(&req.payload);
            let r = current
                .get(id, token.as_deref(), now)
                .map(|v| (None, v))
                .map_err(ShadowFailure::from);
            (r, token)
        }
        Operation::Delete => {
            let token = parse_client_token(&req.payload);
            let (new, accepted) = match current.delete(id, token.as_deref(), now) {
                Ok(x) => x,
                Err(e) => return (Err(e.into()), token),
            };
            if let Err(e) = inner
                .store
                .shadow_put(&k.0, &k.1, new.to_stored(), false)
                .await
            {
                return (Err(ShadowFailure::Store(e.to_string())), token);
            }
            (Ok((Some(new), accepted)), token)
        }
        Operation::Update => {
            let update = match parse_update(&req.payload, limits) {
                Ok(u) => u,
                Err(e) => return (Err(e.into()), parse_client_token(&req.payload)),
            };
            let token = update.client_token.clone();
            let outcome = match current.update(&update, limits, now) {
                Ok(o) => o,
                Err(e) => return (Err(e.into()), token),
            };
            if let Err(e) = inner
                .store
                .shadow_put(&k.0, &k.1, outcome.record.to_stored(), true)
                .await
            {
                return (Err(ShadowFailure::Store(e.to_string())), token);
            }
            if let Some(delta) = &outcome.delta {
                let topic = roost_shadows::delta_topic(id);
                let body = Bytes::from(delta.to_string());
                publish(inner, &topic, body.clone());
                let routes = inner.routes.read().clone();
                routes.on_shadow_delta(id.thing.as_str(), &topic, &body);
            }
            publish(
                inner,
                &roost_shadows::documents_topic(id),
                Bytes::from(outcome.documents.to_string()),
            );
            (Ok((Some(outcome.record), outcome.accepted)), token)
        }
    }
}

fn publish(inner: &HubInner, topic: &str, payload: Bytes) {
    if let Some(done) = inner
        .bus
        .publish(roost_bus::Message::from_hub(topic, payload))
    {
        tokio::spawn(async move {
            if let Err(e) = done.await {
                tracing::error!(error = %e, "a shadow response could not be stored");
            }
        });
    }
}

/// Delivers the outcome: to the `/accepted` or `/rejected` topic for MQTT
/// requests (accepted updates and deletes are announced on `/accepted`
/// whatever their origin, as AWS does), to the waiting caller otherwise.
fn answer(
    inner: &HubInner,
    id: &ShadowId,
    op: Operation,
    origin: Origin,
    result: Result<Value, ShadowFailure>,
    token: Option<&str>,
) {
    inner
        .metrics
        .shadow_requests
        .get_or_create(&crate::metrics::ShadowLabels {
            operation: match op {
                Operation::Get => "get",
                Operation::Update => "update",
                Operation::Delete => "delete",
            }
            .into(),
            outcome: if result.is_ok() {
                "accepted"
            } else {
                "rejected"
            }
            .into(),
        })
        .inc();
    let announce = matches!(origin, Origin::Mqtt) || (result.is_ok() && op != Operation::Get);
    if announce {
        let (which, body) = match &result {
            Ok(v) => (Response::Accepted, v.clone()),
            Err(e) => (Response::Rejected, rejection(e, token)),
        };
        publish(
            inner,
            &roost_shadows::response_topic(id, op, which),
            Bytes::from(body.to_string()),
        );
    }
    match origin {
        Origin::Mqtt => {
            if let Err(e) = &result {
                tracing::debug!(shadow = %id.topic_prefix(), error = %e, "shadow request rejected");
            }
        }
        Origin::Caller(tx) => {
            let _ = tx.send(result);
        }
    }
}

/// The `/rejected` document for any failure.
fn rejection(e: &ShadowFailure, token: Option<&str>) -> Value {
    let now = now_s();
    match e {
        ShadowFailure::Rejected(e) => e.rejected(token, now),
        ShadowFailure::Throttled => {
            ShadowError::new(ShadowErrorKind::Throttled, "Too Many Requests").rejected(token, now)
        }
        ShadowFailure::Store(_) => {
            ShadowError::new(ShadowErrorKind::Internal, "Internal service failure")
                .rejected(token, now)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Hub, HubConfig, Parts};
    use roost_shadows::{Operation, ShadowId};

    /// Shadows need no task code run.
    /// A hub with no runtimes and the real broker as its bus.
    fn no_runtimes() -> Parts {
        Parts {
            extra_metrics: Vec::new(),
            runtimes: Vec::new(),
            logs: Default::default(),
            bus: Box::new(|state: roost_bus::BusState| {
                std::sync::Arc::new(roost_broker::Broker::with_persistence(
                    roost_broker::BrokerConfig::default(),
                    Some(state.persistence),
                    state.restore,
                ))
            }),
        }
    }

    fn id(thing: &str) -> ShadowId {
        ShadowId::parse(thing, None).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_updates_to_a_shadow_all_apply_in_turn_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::start(HubConfig::new(dir.path().to_owned()), no_runtimes())
            .await
            .unwrap();
        // 200 updates to one shadow and 200 spread over 10 others, at once.
        let mut calls = Vec::new();
        for i in 0..400u32 {
            let hub = hub.clone();
            let thing = if i % 2 == 0 {
                "hot".to_owned()
            } else {
                format!("t{}", i % 20)
            };
            calls.push(tokio::spawn(async move {
                let doc = format!(r#"{{"state":{{"reported":{{"n{i}":{i}}}}}}}"#);
                hub.shadow(id(&thing), Operation::Update, doc.into())
                    .await
                    .unwrap()["version"]
                    .as_u64()
                    .unwrap()
            }));
        }
        let mut hot_versions = Vec::new();
        for (i, c) in calls.into_iter().enumerate() {
            let v = c.await.unwrap();
            if i % 2 == 0 {
                hot_versions.push(v);
            }
        }
        // Each accepted update got its own version: none lost, none doubled.
        hot_versions.sort();
        assert_eq!(hot_versions, (1..=200).collect::<Vec<u64>>());
        let doc = hub
            .shadow(id("hot"), Operation::Get, bytes::Bytes::new())
            .await
            .unwrap();
        assert_eq!(doc["version"], 200);
        assert_eq!(doc["state"]["reported"].as_object().unwrap().len(), 200);
        hub.drain(std::time::Duration::from_secs(1)).await;
        drop(hub);

        let hub = Hub::start(HubConfig::new(dir.path().to_owned()), no_runtimes())
            .await
            .unwrap();
        let doc = hub
            .shadow(id("hot"), Operation::Get, bytes::Bytes::new())
            .await
            .unwrap();
        assert_eq!(doc["version"], 200);
        let doc = hub
            .shadow(id("t1"), Operation::Get, bytes::Bytes::new())
            .await
            .unwrap();
        assert_eq!(doc["version"], 20, "odd i land on 10 shadows, 20 each");
    }
}
