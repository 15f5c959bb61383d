//! The control plane's state in embedded SQLite: the fleet's hubs and
//! their enrolment tokens. Migrations are numbered and run at open (the
//! schema's version is SQLite's `user_version`), so an older data dir is
//! brought up to date and a newer one is refused rather than misread.

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

/// The schema, one step per version; a step is never edited once shipped.
const MIGRATIONS: &[&str] = &[
    // 1: hubs and their one-time enrolment tokens (kept hashed).
    "CREATE TABLE hubs (
        name TEXT PRIMARY KEY,
        groups TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        enrolled_ms INTEGER
    );
    CREATE TABLE enrolment_tokens (
        token_hash TEXT PRIMARY KEY,
        hub TEXT NOT NULL REFERENCES hubs(name) ON DELETE CASCADE,
        expires_ms INTEGER NOT NULL,
        used_ms INTEGER
    );",
    // 2: the public key a hub enrolled with (ed25519, hex).
    "ALTER TABLE hubs ADD COLUMN public_key TEXT;",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the cloud's database failed: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the database is at schema version {found}, newer than this roost ({known}); run a newer roost cloud")]
    TooNew { found: i64, known: i64 },
    #[error("a hub named {0:?} is already in the fleet")]
    HubExists(String),
}

/// A hub as the fleet knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HubRecord {
    pub name: String,
    pub groups: Vec<String>,
    pub created_ms: i64,
    /// When it exchanged its enrolment token (none: not yet).
    pub enrolled_ms: Option<i64>,
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (or creates) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Adds a hub with an enrolment token (kept only as its hash).
    pub fn add_hub(
        &self,
        hub: &HubRecord,
        token_hash: &str,
        expires_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction()?;
        let added = tx.execute(
            "INSERT INTO hubs (name, groups, created_ms) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            params![
                hub.name,
                serde_json::to_string(&hub.groups).unwrap_or_default(),
                hub.created_ms
            ],
        )?;
        if added == 0 {
            return Err(StoreError::HubExists(hub.name.clone()));
        }
        tx.execute(
            "INSERT INTO enrolment_tokens (token_hash, hub, expires_ms) VALUES (?1, ?2, ?3)",
            params![token_hash, hub.name, expires_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Every hub, by name.
    pub fn hubs(&self) -> Result<Vec<HubRecord>, StoreError> {
        let conn = self.conn.lock();
        let mut st =
            conn.prepare("SELECT name, groups, created_ms, enrolled_ms FROM hubs ORDER BY name")?;
        let rows = st.query_map([], hub_record)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes a hub (and its unused tokens); whether it was there.
    pub fn remove_hub(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .lock()
            .execute("DELETE FROM hubs WHERE name = ?1", params![name])?
            > 0)
    }

    /// Enrols the hub a token names with `public_key`: the token is used
    /// up, and the key recorded, together. None: the token is unknown,
    /// used or expired.
    pub fn enrol(
        &self,
        token_hash: &str,
        public_key: &str,
        now_ms: i64,
    ) -> Result<Option<HubRecord>, StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction()?;
        let hub: Option<String> = tx
            .query_row(
                "UPDATE enrolment_tokens SET used_ms = ?2
                 WHERE token_hash = ?1 AND used_ms IS NULL AND expires_ms > ?2
                 RETURNING hub",
                params![token_hash, now_ms],
                |r| r.get(0),
            )
            .optional()?;
        let Some(name) = hub else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE hubs SET enrolled_ms = ?2, public_key = ?3 WHERE name = ?1",
            params![name, now_ms, public_key],
        )?;
        let record = tx.query_row(
            "SELECT name, groups, created_ms, enrolled_ms FROM hubs WHERE name = ?1",
            params![name],
            hub_record,
        )?;
        tx.commit()?;
        Ok(Some(record))
    }

    /// The public key a hub enrolled with, if it has.
    pub fn public_key(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .lock()
            .query_row(
                "SELECT public_key FROM hubs WHERE name = ?1",
                params![name],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }
}

/// A `hubs` row read as `name, groups, created_ms, enrolled_ms`.
fn hub_record(r: &rusqlite::Row) -> rusqlite::Result<HubRecord> {
    let groups: String = r.get(1)?;
    Ok(HubRecord {
        name: r.get(0)?,
        groups: serde_json::from_str(&groups).unwrap_or_default(),
        created_ms: r.get(2)?,
        enrolled_ms: r.get(3)?,
    })
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        // Each step and its version number commit together.
        conn.execute_batch(&format!(
            "BEGIN; {step}; PRAGMA user_version = {version}; COMMIT;"
        ))?;
        tracing::info!(version, "migrated the cloud's database");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(name: &str) -> HubRecord {
        HubRecord {
            name: name.into(),
            groups: vec!["eu".into()],
            created_ms: 1,
            enrolled_ms: None,
        }
    }

    #[test]
    fn migrations_run_once_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
        s.add_hub(&hub("a"), "h1", 100).unwrap();
        drop(s);
        // Opening again runs nothing and keeps the data.
        let s = Store::open(&path).unwrap();
        assert_eq!(s.hubs().unwrap().len(), 1);
        s.conn
            .lock()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        drop(s);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn a_token_works_once_and_not_after_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("cloud.db")).unwrap();
        s.add_hub(&hub("a"), "ta", 100).unwrap();
        s.add_hub(&hub("b"), "tb", 100).unwrap();
        assert!(matches!(
            s.add_hub(&hub("a"), "tc", 100),
            Err(StoreError::HubExists(_))
        ));
        let take = |t: &str, now| s.enrol(t, "key", now).unwrap().map(|h| h.name);
        assert_eq!(take("ta", 50).as_deref(), Some("a"));
        assert_eq!(take("ta", 51), None, "used");
        assert_eq!(take("tb", 100), None, "expired");
        assert_eq!(take("forged", 1), None);
        let hubs = s.hubs().unwrap();
        assert_eq!(hubs[0].enrolled_ms, Some(50));
        assert_eq!(hubs[1].enrolled_ms, None);
        assert!(s.remove_hub("a").unwrap());
        assert!(!s.remove_hub("a").unwrap());
        assert_eq!(s.hubs().unwrap().len(), 1);
    }
}
