//! The cloud's database, embedded SQLite or a PostgreSQL server, behind
//! one small transaction interface so the fleet's logic (`store.rs`) is
//! written once. Queries are written with `?N` placeholders, which both
//! dialects read (PostgreSQL after `?` becomes `$`), and only the column
//! types both have: BIGINT/INTEGER, TEXT and BLOB/BYTEA.
//!
//! Each transaction can queue events (`Tx::notify`); they reach every
//! replica's [`Db::events`] once the transaction commits, and never if it
//! rolls back. SQLite sends them in-process; PostgreSQL with `NOTIFY`, so
//! a replica learns of what another one committed.

use crate::store::StoreError;
use parking_lot::Mutex;
use rusqlite::types::{ToSqlOutput, ValueRef};
use std::path::Path;
use tokio::sync::broadcast;

/// A value bound to a query or read from a row.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(v.to_owned())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::Text(v)
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::Text(v.clone())
    }
}
impl From<Vec<u8>> for Val {
    fn from(v: Vec<u8>) -> Self {
        Val::Blob(v)
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}

/// One row of a query's answer, its columns by position.
#[derive(Debug)]
pub struct Row(pub Vec<Val>);

impl Row {
    fn col(&self, i: usize) -> Result<&Val, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Schema(format!("no column {i}")))
    }
    pub fn int(&self, i: usize) -> Result<i64, StoreError> {
        match self.col(i)? {
            Val::Int(v) => Ok(*v),
            other => Err(StoreError::Schema(format!(
                "column {i} is {other:?}, not an integer"
            ))),
        }
    }
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.col(i)? {
            Val::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }
    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        match self.col(i)? {
            Val::Text(v) => Ok(v.clone()),
            other => Err(StoreError::Schema(format!(
                "column {i} is {other:?}, not text"
            ))),
        }
    }
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.col(i)? {
            Val::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }
    pub fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        match self.col(i)? {
            Val::Null => Ok(None),
            Val::Blob(b) => Ok(Some(b.clone())),
            other => Err(StoreError::Schema(format!(
                "column {i} is {other:?}, not bytes"
            ))),
        }
    }
}

/// What a transaction can do, whichever database holds it.
pub trait Tx {
    /// Runs a statement; the number of rows it changed.
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, StoreError>;
    /// Runs a query; its rows.
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StoreError>;
    /// Queues an event, sent to every replica once this commits.
    fn notify(&mut self, event: &str);
    /// Locks `table`'s row whose `key` column is `value` until the
    /// transaction ends, so two replicas do not both act on it. (SQLite
    /// needs nothing: its transactions are serialized already.)
    fn lock_row(&mut self, table: &str, key: &str, value: Val) -> Result<(), StoreError>;
}

/// The first row of a query, if any.
pub fn one(tx: &mut dyn Tx, sql: &str, params: &[Val]) -> Result<Option<Row>, StoreError> {
    Ok(tx.query(sql, params)?.into_iter().next())
}

/// The cloud's database connection(s).
pub struct Db {
    backend: Backend,
    events: broadcast::Sender<String>,
}

enum Backend {
    Sqlite(Mutex<rusqlite::Connection>),
}

/// Events a slow listener may fall behind by before it misses some (it
/// then rereads the state it cares about).
const EVENT_BACKLOG: usize = 4096;

impl Db {
    /// Opens (or creates) the SQLite database at `path` and migrates it.
    pub fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let conn = rusqlite::Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;",
        )?;
        migrate_sqlite(&conn)?;
        Ok(Db {
            backend: Backend::Sqlite(Mutex::new(conn)),
            events: broadcast::channel(EVENT_BACKLOG).0,
        })
    }

    /// Connects to a PostgreSQL server and migrates its schema.
    pub fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let _ = url;
        Err(StoreError::Database(
            "PostgreSQL support is being built (issue 11); leave --database out to use SQLite"
                .into(),
        ))
    }

    /// Which database this is, for logs: `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
        }
    }

    /// Every event committed from now on, by any replica.
    pub fn events(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// Runs `f` in one transaction: committed if it returns Ok, rolled
    /// back otherwise. `f` may run more than once (a database may abort a
    /// transaction that deadlocked with another replica's, and it is then
    /// retried), so it must do nothing but through `tx`. Blocking: call it
    /// off the async runtime's workers.
    pub fn transaction<R>(
        &self,
        mut f: impl FnMut(&mut dyn Tx) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let mut conn = conn.lock();
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let mut t = SqliteTx {
                    tx,
                    events: Vec::new(),
                };
                let r = f(&mut t)?;
                let events = std::mem::take(&mut t.events);
                t.tx.commit()?;
                for e in events {
                    let _ = self.events.send(e);
                }
                Ok(r)
            }
        }
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => Ok(conn
                .lock()
                .query_row("PRAGMA user_version", [], |r| r.get(0))?),
        }
    }

    /// Sets the schema version by hand (tests of the migration guard).
    #[cfg(test)]
    pub(crate) fn force_schema_version(&self, v: i64) {
        match &self.backend {
            Backend::Sqlite(conn) => conn
                .lock()
                .execute_batch(&format!("PRAGMA user_version = {v}"))
                .unwrap(),
        }
    }
}

struct SqliteTx<'c> {
    tx: rusqlite::Transaction<'c>,
    events: Vec<String>,
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Val::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Val::Int(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Val::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Val::Blob(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
        })
    }
}

impl Tx for SqliteTx<'_> {
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, StoreError> {
        let mut st = self.tx.prepare_cached(sql)?;
        Ok(st.execute(rusqlite::params_from_iter(params))? as u64)
    }

    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StoreError> {
        let mut st = self.tx.prepare_cached(sql)?;
        let n = st.column_count();
        let mut rows = st.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut cols = Vec::with_capacity(n);
            for i in 0..n {
                cols.push(match r.get_ref(i)? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(v) => Val::Int(v),
                    ValueRef::Real(v) => Val::Int(v as i64),
                    ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Val::Blob(b.to_vec()),
                });
            }
            out.push(Row(cols));
        }
        Ok(out)
    }

    fn notify(&mut self, event: &str) {
        self.events.push(event.to_owned());
    }

    fn lock_row(&mut self, _table: &str, _key: &str, _value: Val) -> Result<(), StoreError> {
        Ok(())
    }
}

/// SQLite's schema, one step per version (its `user_version`); a step is
/// never edited once shipped.
const SQLITE_MIGRATIONS: &[&str] = &[
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
    // 3: the fleet's own keys, the hubs' connection state, packages,
    // deployments and each hub's status in them, and the hubs' shadows.
    "CREATE TABLE fleet (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    ALTER TABLE hubs ADD COLUMN connected_ms INTEGER;
    ALTER TABLE hubs ADD COLUMN last_seen_ms INTEGER;
    CREATE TABLE packages (
        sha256 TEXT PRIMARY KEY,
        bytes BLOB NOT NULL,
        size INTEGER NOT NULL,
        signature TEXT NOT NULL,
        manifest TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE deployments (
        id INTEGER PRIMARY KEY,
        target_kind TEXT NOT NULL,
        target TEXT NOT NULL,
        package TEXT NOT NULL REFERENCES packages(sha256),
        secrets BLOB,
        rollout_batch INTEGER NOT NULL,
        max_failures_pct INTEGER NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE deployment_hubs (
        deployment INTEGER NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
        hub TEXT NOT NULL REFERENCES hubs(name) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL,
        started_ms INTEGER,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (deployment, hub)
    );
    CREATE INDEX deployment_hubs_by_hub ON deployment_hubs (hub, deployment);
    CREATE TABLE shadows (
        hub TEXT NOT NULL REFERENCES hubs(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (hub, name)
    );",
];

/// How many schema versions this roost knows (the same for both
/// databases).
pub fn known_version() -> i64 {
    SQLITE_MIGRATIONS.len() as i64
}

fn migrate_sqlite(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = known_version();
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (i, step) in SQLITE_MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        // Each step and its version number commit together.
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {step}; PRAGMA user_version = {version}; COMMIT;"
        ))?;
        tracing::info!(version, "migrated the cloud's database");
    }
    Ok(())
}
