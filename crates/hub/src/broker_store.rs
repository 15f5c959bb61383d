//! Keeps the message bus's durable state in the hub's store: the adapter
//! between `roost-bus`'s `Persistence` trait and the store (which owns the
//! SQL).

use roost_bus::{Done, PersistError, Persistence, QoS, QueuePage, Queued, Restore, Retained};
use roost_store::{Store, StoredMessage, StoredRetained};
use std::sync::Arc;

pub(crate) struct BrokerStore(pub Arc<Store>);

fn done(
    f: impl std::future::Future<Output = Result<(), roost_store::StoreError>> + Send + 'static,
) -> Done {
    Box::pin(async move { f.await.map_err(persist_error) })
}

fn persist_error(e: roost_store::StoreError) -> PersistError {
    match e {
        roost_store::StoreError::Closed => PersistError::Closed,
        e => PersistError::Write(Box::new(e)),
    }
}

fn queued(m: StoredMessage) -> Queued {
    Queued {
        client_id: m.client_id,
        id: m.id as u64,
        topic: m.topic,
        payload: m.payload,
        qos: qos(m.qos),
        retain: m.retain,
        expires_ms: m.expires_ms,
        properties: m.properties,
    }
}

/// A QoS as the store keeps it back as the broker's; the store holds only
/// what the broker gave it, so anything else is read as the highest.
fn qos(n: u8) -> QoS {
    QoS::try_from(n).unwrap_or(QoS::ExactlyOnce)
}

impl Persistence for BrokerStore {
    fn save_session(&self, client_id: &str, device: Option<&str>, expiry_s: Option<u32>) -> Done {
        done(self.0.mqtt_save_session(client_id, device, expiry_s))
    }
    fn drop_session(&self, client_id: &str) -> Done {
        done(self.0.mqtt_drop_session(client_id))
    }
    fn save_subscription(
        &self,
        client_id: &str,
        filter: &str,
        qos: QoS,
        no_local: bool,
        rap: bool,
    ) -> Done {
        done(
            self.0
                .mqtt_save_subscription(client_id, filter, qos.into(), no_local, rap),
        )
    }
    fn drop_subscription(&self, client_id: &str, filter: &str) -> Done {
        done(self.0.mqtt_drop_subscription(client_id, filter))
    }
    fn enqueue(&self, messages: Vec<Queued>, limit: usize) -> Done {
        let rows = messages
            .into_iter()
            .map(|m| StoredMessage {
                client_id: m.client_id,
                id: m.id as i64,
                topic: m.topic,
                payload: m.payload,
                qos: m.qos.into(),
                retain: m.retain,
                expires_ms: m.expires_ms,
                properties: m.properties,
            })
            .collect();
        done(self.0.mqtt_enqueue(rows, limit))
    }
    fn delivered(&self, client_id: &str, id: u64) -> Done {
        done(self.0.mqtt_delivered(client_id, id as i64))
    }
    fn queued(&self, client_id: &str, after: u64, limit: usize, max_bytes: usize) -> QueuePage {
        let rows = self
            .0
            .mqtt_queued(client_id, after as i64, limit, max_bytes);
        Box::pin(async move {
            let rows = rows.await.map_err(persist_error)?;
            Ok(rows.into_iter().map(queued).collect())
        })
    }
    fn qos2_received(&self, client_id: &str, packet_id: u16) -> Done {
        done(self.0.mqtt_qos2_received(client_id, packet_id))
    }
    fn qos2_released(&self, client_id: &str, packet_id: u16) -> Done {
        done(self.0.mqtt_qos2_released(client_id, packet_id))
    }
    fn retain(&self, m: Retained) -> Done {
        done(self.0.mqtt_retain(StoredRetained {
            topic: m.topic,
            payload: m.payload,
            qos: m.qos.into(),
            properties: m.properties,
            expires_ms: m.expires_ms,
            modified_ms: Some(m.modified_ms),
            owner: m.owner,
        }))
    }
}

/// The broker's state as the store holds it.
pub(crate) fn restore(store: &Store) -> Result<Restore, roost_store::StoreError> {
    let s = store.mqtt_load()?;
    Ok(Restore {
        sessions: s.sessions,
        subscriptions: s
            .subscriptions
            .into_iter()
            .map(|(client, filter, q, no_local, rap)| (client, filter, qos(q), no_local, rap))
            .collect(),
        queue: s.queue.into_iter().map(queued).collect(),
        qos2_in: s.qos2_in,
        retained: s
            .retained
            .into_iter()
            .map(|r| Retained {
                topic: r.topic,
                payload: r.payload,
                qos: qos(r.qos),
                properties: r.properties,
                expires_ms: r.expires_ms,
                // Older stores kept no time: count it from this start.
                modified_ms: r.modified_ms.unwrap_or_else(roost_store::now_ms),
                owner: r.owner,
            })
            .collect(),
    })
}
