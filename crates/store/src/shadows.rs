//! Shadows and deployed secrets. A shadow row holds the serialized record
//! (version and document, or a tombstone keeping the version after a
//! delete); secrets are stored only as ciphertext, per deployment.

use crate::{Store, StoreError};
use rusqlite::{params, OptionalExtension};
use std::future::Future;

/// A deployed secret as kept: sealed with the hub's key.
#[derive(Clone, Debug)]
pub struct SealedSecret {
    pub name: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_ms: i64,
}

impl Store {
    /// Stores a shadow's record; `live` is false for a deleted shadow's
    /// tombstone. Writes run in the order submitted.
    pub fn shadow_put(
        &self,
        thing: &str,
        name: &str,
        record: String,
        live: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (t, n) = (thing.to_owned(), name.to_owned());
        self.submit(move |conn| {
            conn.prepare_cached(
                "INSERT INTO shadows (thing, name, record, live, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(thing, name) DO UPDATE SET record = ?3, live = ?4, updated_ms = ?5",
            )?
            .execute(params![t, n, record, live, crate::now_ms()])
            .map(|_| ())
        })
    }

    /// A shadow's stored record (`name` is empty for the classic shadow).
    pub fn shadow_get(&self, thing: &str, name: &str) -> Result<Option<String>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT record FROM shadows WHERE thing = ?1 AND name = ?2")?
                .query_row(params![thing, name], |r| r.get(0))
                .optional()
        })
    }

    /// The names of a thing's live named shadows after `after`, in order,
    /// at most `limit`.
    pub fn shadow_names(
        &self,
        thing: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT name FROM shadows WHERE thing = ?1 AND name > ?2 AND name != '' AND live = 1
                 ORDER BY name LIMIT ?3",
            )?
            .query_map(params![thing, after, limit as i64], |r| r.get(0))?
            .collect()
        })
    }

    /// Live shadows, for the metrics.
    pub fn shadow_count(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM shadows WHERE live = 1", [], |r| {
                r.get(0)
            })
        })
    }

    /// Keeps a deployment's sealed secrets (replacing any kept before).
    pub async fn put_secrets(
        &self,
        deployment: i64,
        secrets: Vec<SealedSecret>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute("DELETE FROM secrets WHERE deployment = ?1", [deployment])?;
            let mut ins = conn.prepare_cached(
                "INSERT INTO secrets (deployment, name, nonce, ciphertext, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for s in secrets {
                ins.execute(params![deployment, s.name, s.nonce, s.ciphertext, s.created_ms])?;
            }
            Ok(())
        })
        .await
    }

    /// Forgets the secrets of all but the `keep` newest inactive
    /// deployments (the ones whose packages are removed too).
    pub async fn drop_stale_secrets(&self, keep: usize) -> Result<usize, StoreError> {
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM secrets WHERE deployment IN
                   (SELECT id FROM deployments WHERE active = 0 ORDER BY id DESC LIMIT -1 OFFSET ?1)",
                [keep as i64],
            )
        })
        .await
    }

    /// A deployment's sealed secrets.
    pub fn secrets_of(&self, deployment: i64) -> Result<Vec<SealedSecret>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT name, nonce, ciphertext, created_ms FROM secrets WHERE deployment = ?1",
            )?
            .query_map([deployment], |r| {
                Ok(SealedSecret {
                    name: r.get(0)?,
                    nonce: r.get(1)?,
                    ciphertext: r.get(2)?,
                    created_ms: r.get(3)?,
                })
            })?
            .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shadows_keep_tombstones_and_list_live_named_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.db")).unwrap();
        s.shadow_put("t", "", "c".into(), true).await.unwrap();
        s.shadow_put("t", "b", "1".into(), true).await.unwrap();
        s.shadow_put("t", "a", "2".into(), true).await.unwrap();
        s.shadow_put("t", "z", "3".into(), false).await.unwrap();
        s.shadow_put("u", "x", "4".into(), true).await.unwrap();
        assert_eq!(s.shadow_names("t", "", 10).unwrap(), ["a", "b"]);
        assert_eq!(s.shadow_names("t", "a", 10).unwrap(), ["b"]);
        assert_eq!(s.shadow_names("t", "", 1).unwrap(), ["a"]);
        assert_eq!(s.shadow_get("t", "z").unwrap().as_deref(), Some("3"));
        assert_eq!(s.shadow_get("t", "nope").unwrap(), None);
        assert_eq!(s.shadow_count().unwrap(), 4);
    }

    #[tokio::test]
    async fn secrets_belong_to_their_deployment() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.db")).unwrap();
        let sealed = |n: &str| SealedSecret {
            name: n.into(),
            nonce: vec![1; 12],
            ciphertext: vec![2; 20],
            created_ms: 5,
        };
        s.put_secrets(1, vec![sealed("a"), sealed("b")])
            .await
            .unwrap();
        s.put_secrets(2, vec![sealed("c")]).await.unwrap();
        s.put_secrets(1, vec![sealed("a")]).await.unwrap();
        assert_eq!(s.secrets_of(1).unwrap().len(), 1);
        assert_eq!(s.secrets_of(2).unwrap()[0].name, "c");
        assert!(s.secrets_of(3).unwrap().is_empty());
    }
}
