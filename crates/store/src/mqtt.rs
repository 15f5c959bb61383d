//! The broker's durable state: persistent sessions, their subscriptions and
//! queued QoS 1/2 messages, incoming QoS 2 packet ids not yet released, and
//! retained messages. Writes are submitted in order and group-committed;
//! the broker acknowledges a publish only once its rows are on disk.

use crate::{Store, StoreError};
use rusqlite::params;
use std::future::Future;

type Done = std::pin::Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// A message waiting for a persistent session.
#[derive(Clone, Debug)]
pub struct StoredMessage {
    pub client_id: String,
    pub id: i64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// When it stops being worth delivering (wall clock, ms).
    pub expires_ms: Option<i64>,
    /// Its MQTT 5 properties, encoded as on the wire (empty: none).
    pub properties: Vec<u8>,
}

/// A retained message as kept.
#[derive(Clone, Debug, Default)]
pub struct StoredRetained {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub properties: Vec<u8>,
    pub expires_ms: Option<i64>,
    /// When it was stored (wall clock, ms); none in stores made before.
    pub modified_ms: Option<i64>,
    /// The device (or client id) whose quota it counts against; none: the
    /// hub's own, or kept before owners were.
    pub owner: Option<String>,
}

/// Everything the broker restores at start.
#[derive(Debug, Default)]
pub struct MqttSnapshot {
    /// (client id, device name, session expiry in seconds; none: never)
    pub sessions: Vec<(String, Option<String>, Option<u32>)>,
    /// (client id, filter, qos, no_local, retain_as_published)
    pub subscriptions: Vec<(String, String, u8, bool, bool)>,
    pub queue: Vec<StoredMessage>,
    pub qos2_in: Vec<(String, u16)>,
    pub retained: Vec<StoredRetained>,
}

impl Store {
    pub fn mqtt_save_session(
        &self,
        client_id: &str,
        device: Option<&str>,
        expiry_s: Option<u32>,
    ) -> Done {
        let (c, d) = (client_id.to_owned(), device.map(str::to_owned));
        Box::pin(self.submit(move |conn| {
            conn.prepare_cached(
                "INSERT INTO mqtt_sessions (client_id, device, expiry_s) VALUES (?1, ?2, ?3)
                 ON CONFLICT(client_id) DO UPDATE SET device = ?2, expiry_s = ?3",
            )?
            .execute(params![c, d, expiry_s])
            .map(|_| ())
        }))
    }

    /// Forgets a session with its subscriptions, queue and QoS 2 state.
    pub fn mqtt_drop_session(&self, client_id: &str) -> Done {
        let c = client_id.to_owned();
        Box::pin(self.submit(move |conn| {
            for table in [
                "mqtt_sessions",
                "mqtt_subscriptions",
                "mqtt_queue",
                "mqtt_qos2_in",
            ] {
                conn.execute(
                    &format!("DELETE FROM {table} WHERE client_id = ?1"),
                    params![c],
                )?;
            }
            Ok(())
        }))
    }

    pub fn mqtt_save_subscription(
        &self,
        client_id: &str,
        filter: &str,
        qos: u8,
        no_local: bool,
        rap: bool,
    ) -> Done {
        let (c, f) = (client_id.to_owned(), filter.to_owned());
        Box::pin(self.submit(move |conn| {
            conn.prepare_cached("INSERT INTO mqtt_subscriptions (client_id, filter, qos, no_local, retain_as_published) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(client_id, filter) DO UPDATE SET qos = ?3, no_local = ?4, retain_as_published = ?5")?.execute(params![c, f, qos, no_local, rap])
            .map(|_| ())
        }))
    }

    pub fn mqtt_drop_subscription(&self, client_id: &str, filter: &str) -> Done {
        let (c, f) = (client_id.to_owned(), filter.to_owned());
        Box::pin(self.submit(move |conn| {
            conn.prepare_cached(
                "DELETE FROM mqtt_subscriptions WHERE client_id = ?1 AND filter = ?2",
            )?
            .execute(params![c, f])
            .map(|_| ())
        }))
    }

    /// Queues messages for persistent sessions, keeping at most `limit` per
    /// session (the oldest go first).
    pub fn mqtt_enqueue(&self, messages: Vec<StoredMessage>, limit: usize) -> Done {
        Box::pin(self.submit(move |conn| {
            let mut insert = conn.prepare_cached(
                "INSERT OR REPLACE INTO mqtt_queue (client_id, id, topic, payload, qos, retain, expires_ms, properties) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for m in &messages {
                insert.execute(params![m.client_id, m.id, m.topic, m.payload, m.qos, m.retain, m.expires_ms, m.properties])?;
            }
            // Everything at or below the newest `limit`-th message's id
            // goes: a walk of `limit` index entries and a range delete,
            // where `NOT IN (newest limit)` read and compared every row
            // of the session on every publish.
            let mut trim = conn.prepare_cached(
                "DELETE FROM mqtt_queue WHERE client_id = ?1 AND id <=
                 (SELECT id FROM mqtt_queue WHERE client_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )?;
            let mut seen = std::collections::HashSet::new();
            for m in &messages {
                if seen.insert(m.client_id.clone()) {
                    trim.execute(params![m.client_id, limit as i64])?;
                }
            }
            Ok(())
        }))
    }

    /// `client_id`'s queued messages after `after`, in id order: at most
    /// `limit`, each while those before it hold less than `max_bytes` of
    /// topics and payloads (so at least one). Read through the writer, so it sees every write submitted
    /// before it (a message acknowledged just before is not read again).
    pub fn mqtt_queued(
        &self,
        client_id: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<StoredMessage>, StoreError>> + Send + 'static {
        let c = client_id.to_owned();
        self.submit(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT client_id, id, topic, payload, qos, retain, expires_ms, properties FROM
                   (SELECT *, SUM(length(topic) + length(payload)) OVER (ORDER BY id) AS upto,
                           length(topic) + length(payload) AS size
                    FROM mqtt_queue WHERE client_id = ?1 AND id > ?2)
                 WHERE upto - size < ?3 OR upto = size
                 ORDER BY id LIMIT ?4",
            )?;
            let rows = st
                .query_map(
                    params![c, after, max_bytes as i64, limit as i64],
                    stored_message,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// A queued message was delivered and acknowledged.
    pub fn mqtt_delivered(&self, client_id: &str, id: i64) -> Done {
        let c = client_id.to_owned();
        Box::pin(self.submit(move |conn| {
            conn.prepare_cached("DELETE FROM mqtt_queue WHERE client_id = ?1 AND id = ?2")?
                .execute(params![c, id])
                .map(|_| ())
        }))
    }

    pub fn mqtt_qos2_received(&self, client_id: &str, packet_id: u16) -> Done {
        let c = client_id.to_owned();
        Box::pin(self.submit(move |conn| {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO mqtt_qos2_in (client_id, packet_id) VALUES (?1, ?2)",
            )?
            .execute(params![c, packet_id])
            .map(|_| ())
        }))
    }

    pub fn mqtt_qos2_released(&self, client_id: &str, packet_id: u16) -> Done {
        let c = client_id.to_owned();
        Box::pin(self.submit(move |conn| {
            conn.prepare_cached("DELETE FROM mqtt_qos2_in WHERE client_id = ?1 AND packet_id = ?2")?
                .execute(params![c, packet_id])
                .map(|_| ())
        }))
    }

    /// Keeps (or, with an empty payload, clears) a retained message.
    pub fn mqtt_retain(&self, m: StoredRetained) -> Done {
        Box::pin(self.submit(move |conn| {
            if m.payload.is_empty() {
                conn.prepare_cached("DELETE FROM mqtt_retained WHERE topic = ?1")?
                    .execute(params![m.topic])
            } else {
                conn.prepare_cached(
                    "INSERT INTO mqtt_retained (topic, payload, qos, properties, expires_ms, modified_ms, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT(topic) DO UPDATE SET payload = ?2, qos = ?3, properties = ?4, expires_ms = ?5, modified_ms = ?6, owner = ?7",
                )?
                .execute(params![m.topic, m.payload, m.qos, m.properties, m.expires_ms, m.modified_ms, m.owner])
            }
            .map(|_| ())
        }))
    }

    pub fn mqtt_load(&self) -> Result<MqttSnapshot, StoreError> {
        self.read(|c| {
            let mut snap = MqttSnapshot::default();
            let mut st = c.prepare("SELECT client_id, device, expiry_s FROM mqtt_sessions")?;
            snap.sessions = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
            let mut st = c.prepare("SELECT client_id, filter, qos, no_local, retain_as_published FROM mqtt_subscriptions")?;
            snap.subscriptions = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
                .collect::<Result<_, _>>()?;
            let mut st = c.prepare("SELECT client_id, id, topic, payload, qos, retain, expires_ms, properties FROM mqtt_queue ORDER BY client_id, id")?;
            snap.queue = st
                .query_map([], stored_message)?
                .collect::<Result<_, _>>()?;
            let mut st = c.prepare("SELECT client_id, packet_id FROM mqtt_qos2_in")?;
            snap.qos2_in = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            let mut st = c.prepare("SELECT topic, payload, qos, properties, expires_ms, modified_ms, owner FROM mqtt_retained")?;
            snap.retained = st
                .query_map([], |r| {
                    Ok(StoredRetained {
                        topic: r.get(0)?,
                        payload: r.get(1)?,
                        qos: r.get(2)?,
                        properties: r.get::<_, Option<Vec<u8>>>(3)?.unwrap_or_default(),
                        expires_ms: r.get(4)?,
                        modified_ms: r.get(5)?,
                        owner: r.get(6)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(snap)
        })
    }
}

/// A `mqtt_queue` row read as `client_id, id, topic, payload, qos, retain,
/// expires_ms, properties`.
fn stored_message(r: &rusqlite::Row) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        client_id: r.get(0)?,
        id: r.get(1)?,
        topic: r.get(2)?,
        payload: r.get(3)?,
        qos: r.get(4)?,
        retain: r.get(5)?,
        expires_ms: r.get(6)?,
        properties: r.get::<_, Option<Vec<u8>>>(7)?.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(client: &str, id: i64, payload: usize) -> StoredMessage {
        StoredMessage {
            client_id: client.into(),
            id,
            topic: "t".into(),
            payload: vec![0; payload],
            qos: 1,
            retain: false,
            expires_ms: None,
            properties: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_session_queue_keeps_its_newest_and_is_read_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        for id in 1..=10 {
            store
                .mqtt_enqueue(vec![message("a", id, 99), message("b", id, 1)], 6)
                .await
                .unwrap();
        }
        let ids = |rows: Vec<StoredMessage>| rows.into_iter().map(|m| m.id).collect::<Vec<_>>();
        // The newest 6 of each session are kept.
        assert_eq!(
            ids(store.mqtt_queued("a", 0, 100, 1 << 20).await.unwrap()),
            [5, 6, 7, 8, 9, 10]
        );
        assert_eq!(
            ids(store.mqtt_queued("b", 0, 100, 1 << 20).await.unwrap()),
            [5, 6, 7, 8, 9, 10]
        );
        // Pages: after an id, at most `limit`, and rows while those before
        // them hold less than `max_bytes` (100 bytes each here).
        assert_eq!(
            ids(store.mqtt_queued("a", 6, 2, 1 << 20).await.unwrap()),
            [7, 8]
        );
        assert_eq!(
            ids(store.mqtt_queued("a", 0, 100, 250).await.unwrap()),
            [5, 6, 7]
        );
        assert_eq!(ids(store.mqtt_queued("a", 0, 100, 1).await.unwrap()), [5]);
        assert!(store
            .mqtt_queued("a", 10, 100, 1 << 20)
            .await
            .unwrap()
            .is_empty());
        // A delivered message is not read again.
        store.mqtt_delivered("a", 7).await.unwrap();
        assert_eq!(
            ids(store.mqtt_queued("a", 6, 2, 1 << 20).await.unwrap()),
            [8, 9]
        );
    }
}
