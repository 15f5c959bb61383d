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

mod pg;

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
    Postgres(pg::Pg),
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

    /// Connects to a PostgreSQL server (a `postgres://` URL), migrates its
    /// schema and starts listening for the other replicas' events. Safe to
    /// call from anywhere, an async worker included: the sync client's
    /// work is done on threads of its own.
    pub fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let events = broadcast::channel(EVENT_BACKLOG).0;
        let ev = events.clone();
        let url = url.to_owned();
        let pg = std::thread::Builder::new()
            .name("roost-pg-open".into())
            .spawn(move || pg::Pg::open(&url, ev))
            .map_err(|e| StoreError::Database(format!("cannot start a thread: {e}")))?
            .join()
            .map_err(|_| StoreError::Database("opening PostgreSQL panicked".into()))??;
        Ok(Db {
            backend: Backend::Postgres(pg),
            events,
        })
    }

    /// Which database this is, for logs: `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
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
            Backend::Postgres(pg) => pg.transaction(&mut f, &self.events),
        }
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        match &self.backend {
            Backend::Sqlite(conn) => Ok(conn
                .lock()
                .query_row("PRAGMA user_version", [], |r| r.get(0))?),
            Backend::Postgres(pg) => pg.schema_version(),
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
            Backend::Postgres(pg) => pg.force_schema_version(v),
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

/// A fresh PostgreSQL database for one test, on the server
/// `ROOST_TEST_POSTGRES` names (`. scripts/postgres.sh` starts one and sets
/// it); dropped with the test.
#[cfg(test)]
pub(crate) mod testpg {
    use postgres::NoTls;

    pub(crate) struct TestDb {
        admin: String,
        pub name: String,
        pub url: String,
    }

    impl TestDb {
        /// None, with a note, when no server is named, outside CI; with
        /// `CI=true` that is a failure, so CI cannot lose these tests.
        pub(crate) fn new() -> Option<TestDb> {
            let admin = match std::env::var("ROOST_TEST_POSTGRES") {
                Ok(u) if !u.is_empty() => u,
                _ if std::env::var("CI").as_deref() == Ok("true") => panic!(
                    "CI=true but ROOST_TEST_POSTGRES is not set: the PostgreSQL tests must run \
                     in CI (.ci/run starts a server with scripts/postgres.sh)"
                ),
                _ => {
                    eprintln!(
                        "note: ROOST_TEST_POSTGRES is not set, so the PostgreSQL half of this test \
                         is skipped; `. scripts/postgres.sh` starts a server and sets it"
                    );
                    return None;
                }
            };
            let name = format!("roost_t_{:016x}", rand::random::<u64>());
            let mut c = postgres::Client::connect(&admin, NoTls)
                .unwrap_or_else(|e| panic!("cannot connect to ROOST_TEST_POSTGRES: {e}"));
            c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
            let url = with_dbname(&admin, &name);
            Some(TestDb { admin, name, url })
        }
    }

    /// `url` naming database `name` instead.
    fn with_dbname(url: &str, name: &str) -> String {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (url, String::new()),
        };
        let start = base.find("://").map_or(0, |i| i + 3);
        let end = base[start..].find('/').map_or(base.len(), |i| start + i);
        format!("{}/{name}{query}", &base[..end])
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            if let Ok(mut c) = postgres::Client::connect(&self.admin, NoTls) {
                let _ = c.batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testpg::TestDb;
    use super::*;
    use crate::store::{NewDeployment, PackageRecord, Store, Target};
    use std::time::Duration;

    fn recv(rx: &mut broadcast::Receiver<String>, within: Duration) -> Option<String> {
        let until = std::time::Instant::now() + within;
        loop {
            match rx.try_recv() {
                Ok(e) => return Some(e),
                Err(broadcast::error::TryRecvError::Empty) if std::time::Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }

    #[test]
    fn an_event_committed_on_one_replica_reaches_the_other_and_a_rollback_sends_none() {
        let Some(pg) = TestDb::new() else { return };
        let a = Db::open_postgres(&pg.url).unwrap();
        let b = Db::open_postgres(&pg.url).unwrap();
        assert_eq!(a.kind(), "postgres");
        let (mut on_a, mut on_b) = (a.events(), b.events());
        let r: Result<(), StoreError> = a.transaction(|tx| {
            tx.notify("rolled-back");
            Err(StoreError::Refused("no".into()))
        });
        assert!(r.is_err());
        a.transaction(|tx| {
            tx.notify("hub:x");
            Ok(())
        })
        .unwrap();
        assert_eq!(
            recv(&mut on_b, Duration::from_secs(10)).as_deref(),
            Some("hub:x")
        );
        // The committing replica has it at once, and once.
        assert_eq!(on_a.try_recv().ok().as_deref(), Some("hub:x"));
        std::thread::sleep(Duration::from_millis(500));
        assert!(on_a.try_recv().is_err(), "no echo from its own listener");
        assert!(
            on_b.try_recv().is_err(),
            "nothing more: the rollback sent none"
        );
    }

    #[test]
    fn values_and_nulls_of_every_type_go_in_and_out() {
        let Some(pg) = TestDb::new() else { return };
        let db = Db::open_postgres(&pg.url).unwrap();
        let rows = db
            .transaction(|tx| {
                tx.exec(
                    "INSERT INTO hubs (name, groups, created_ms, enrolled_ms, public_key) VALUES (?1, ?2, ?3, ?4, ?5)",
                    &[Val::from("h?1"), "[]".into(), 7.into(), Val::Null, Val::Null],
                )?;
                tx.exec(
                    "INSERT INTO packages (sha256, bytes, size, signature, manifest, created_ms) VALUES (?1, ?2, ?3, '?4', '', 1)",
                    &["p".into(), vec![0u8, 255].into(), 2.into()],
                )?;
                tx.query(
                    "SELECT h.name, h.created_ms, h.enrolled_ms, h.public_key, p.bytes, p.signature, 1 = 1, CAST(2 AS INTEGER)
                     FROM hubs h, packages p WHERE h.name = ?1",
                    &["h?1".into()],
                )
            })
            .unwrap();
        assert_eq!(
            rows[0].0,
            vec![
                Val::Text("h?1".into()),
                Val::Int(7),
                Val::Null,
                Val::Null,
                Val::Blob(vec![0, 255]),
                Val::Text("?4".into()),
                Val::Int(1),
                Val::Int(2),
            ]
        );
    }

    #[test]
    fn it_works_from_spawn_blocking_and_opens_on_an_async_worker() {
        let Some(pg) = TestDb::new() else { return };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = pg.url.clone();
        rt.block_on(async move {
            // Opening (and dropping) is done on threads of its own, so an
            // async caller (as Cloud::open's) is fine.
            let db = std::sync::Arc::new(Db::open_postgres(&url).unwrap());
            let d = db.clone();
            let v = tokio::task::spawn_blocking(move || {
                d.transaction(|tx| one(tx, "SELECT ?1 + 1", &[41.into()])?.unwrap().int(0))
            })
            .await
            .unwrap()
            .unwrap();
            assert_eq!(v, 42);
            drop(db);
        });
    }

    #[test]
    fn replicas_migrating_at_once_both_succeed_and_a_newer_schema_is_refused() {
        let Some(pg) = TestDb::new() else { return };
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let url = pg.url.clone();
                std::thread::spawn(move || Db::open_postgres(&url))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        for db in &opened {
            assert_eq!(db.schema_version().unwrap(), known_version());
        }
        opened[0].force_schema_version(99);
        drop(opened);
        assert!(matches!(
            Db::open_postgres(&pg.url),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn a_server_that_is_not_there_is_named_without_its_password() {
        let e = Db::open_postgres("postgres://roost:s3cret@127.0.0.1:1/fleet")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("cannot connect to PostgreSQL at 127.0.0.1:1/fleet"),
            "{e}"
        );
        assert!(e.contains("check --database"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let e = Db::open_postgres("mysql://x").err().unwrap().to_string();
        assert!(e.contains("not a PostgreSQL URL"), "{e}");
    }

    /// Two replicas lock two rows in opposite orders: PostgreSQL aborts
    /// one (deadlock_detected), which is rerun and succeeds.
    #[test]
    fn a_deadlocked_transaction_is_rerun() {
        let Some(pg) = TestDb::new() else { return };
        let a = std::sync::Arc::new(Db::open_postgres(&pg.url).unwrap());
        let b = std::sync::Arc::new(Db::open_postgres(&pg.url).unwrap());
        a.transaction(|tx| {
            tx.exec(
                "INSERT INTO fleet (key, value) VALUES ('x', ''), ('y', '')",
                &[],
            )
        })
        .unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let run = |db: std::sync::Arc<Db>, first: &'static str, second: &'static str| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut runs = 0;
                db.transaction(|tx| {
                    runs += 1;
                    tx.lock_row("fleet", "key", first.into())?;
                    if runs == 1 {
                        barrier.wait();
                    }
                    tx.lock_row("fleet", "key", second.into())?;
                    tx.exec(
                        "UPDATE fleet SET value = value || ?1 WHERE key = 'x'",
                        &[first.into()],
                    )
                })
                .unwrap();
                runs
            })
        };
        let (ta, tb) = (run(a.clone(), "x", "y"), run(b.clone(), "y", "x"));
        let runs = ta.join().unwrap() + tb.join().unwrap();
        assert_eq!(runs, 3, "one of the two ran twice");
        let v = a
            .transaction(|tx| {
                one(tx, "SELECT value FROM fleet WHERE key = 'x'", &[])?
                    .unwrap()
                    .text(0)
            })
            .unwrap();
        assert!(v == "xy" || v == "yx", "{v:?}: each committed once");
    }

    /// A connection that breaks mid-transaction (here: its server process
    /// is ended) is replaced and the transaction run once more; the
    /// listener, ended too, reconnects and sends `resync`.
    #[test]
    fn a_broken_connection_is_replaced_and_the_listener_resyncs() {
        let Some(pg) = TestDb::new() else { return };
        let db = Db::open_postgres(&pg.url).unwrap();
        let mut events = db.events();
        let mut runs = 0;
        let v = db
            .transaction(|tx| {
                runs += 1;
                if runs == 1 {
                    tx.query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()",
                        &[],
                    )?;
                }
                one(tx, "SELECT ?1 * 2", &[21.into()])?.unwrap().int(0)
            })
            .unwrap();
        assert_eq!((v, runs), (42, 2));
        assert_eq!(
            recv(&mut events, Duration::from_secs(30)).as_deref(),
            Some("resync")
        );
        let mut runs = 0;
        db.transaction(|tx| {
            runs += 1;
            tx.query("SELECT pg_terminate_backend(pg_backend_pid())", &[])?;
            Ok(())
        })
        .unwrap_err();
        assert_eq!(runs, 2, "a broken connection is retried once, not more");
    }

    /// The deployment a hub's shadow desires.
    fn desired(s: &Store, hub: &str) -> Option<i64> {
        s.shadow(hub, crate::store::DEPLOYMENT_SHADOW)
            .unwrap()
            .document
            .and_then(|d| d.desired)
            .and_then(|d| d.state.get("deployment").and_then(|v| v.as_i64()))
    }

    /// Two replicas, four threads: deployments to one group created while
    /// hubs report on the deployments they were sent. Conflicting
    /// transactions (deadlocks between a deployment's and a hub's row
    /// locks, taken in either order) are retried, so every call succeeds,
    /// and the rollout's rules hold.
    #[test]
    fn concurrent_rollouts_on_two_replicas_keep_their_rules() {
        let Some(pg) = TestDb::new() else { return };
        let stores: Vec<std::sync::Arc<Store>> = (0..2)
            .map(|_| std::sync::Arc::new(Store::new(Db::open_postgres(&pg.url).unwrap())))
            .collect();
        let s = &stores[0];
        let hubs: Vec<String> = (0..6).map(|i| format!("h{i}")).collect();
        for h in &hubs {
            s.add_hub(
                &crate::store::HubRecord {
                    name: h.clone(),
                    groups: vec!["g".into()],
                    created_ms: 1,
                    enrolled_ms: None,
                    connected_ms: None,
                    last_seen_ms: None,
                },
                h,
                100,
            )
            .unwrap();
        }
        s.put_package(
            &PackageRecord {
                sha256: "p".into(),
                size: 1,
                signature: "sig".into(),
                manifest: String::new(),
                created_ms: 1,
            },
            b"p",
        )
        .unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = stores[t % 2].clone();
                let hubs = hubs.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        if t < 2 && i % 5 == 0 {
                            s.create_deployment(
                                &NewDeployment {
                                    target: Target::Group("g".into()),
                                    package: "p".into(),
                                    secrets: None,
                                    rollout_batch: 2,
                                    max_failures_pct: 100,
                                },
                                i,
                            )
                            .unwrap();
                        }
                        // Every hub reports on what its shadow desires.
                        for (k, h) in hubs.iter().enumerate() {
                            if (k + i as usize + t).is_multiple_of(2) {
                                continue;
                            }
                            if let Some(id) = desired(&s, h) {
                                let status = ["downloading", "succeeded", "failed"][(i as usize + k) % 3];
                                s.report(
                                    h,
                                    &serde_json::json!({"deployment": id, "status": status, "reason": ""}),
                                    100 + i,
                                )
                                .unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let deployments = s.deployments(100).unwrap();
        assert_eq!(deployments.len(), 10);
        for d in &deployments {
            let (_, rows) = s.deployment(d.id).unwrap().unwrap();
            assert_eq!(
                rows.len(),
                hubs.len(),
                "each hub once in deployment {}",
                d.id
            );
            let in_flight = rows
                .iter()
                .filter(|r| r.started_ms.is_some() && !crate::store::terminal(&r.status))
                .count();
            assert!(
                in_flight <= 2,
                "deployment {} has {in_flight} hubs in flight, batch 2",
                d.id
            );
            if d.state == "done" {
                assert!(rows.iter().all(|r| crate::store::terminal(&r.status)));
            }
        }
        for h in &hubs {
            // At most one unfinished deployment a hub was sent, and the
            // shadow desires the newest one it was sent and not superseded in.
            let mut sent_open = 0;
            let mut newest = None;
            for d in &deployments {
                let (_, rows) = s.deployment(d.id).unwrap().unwrap();
                let r = rows.iter().find(|r| &r.hub == h).unwrap();
                if r.started_ms.is_some() && !crate::store::terminal(&r.status) {
                    sent_open += 1;
                }
                if r.started_ms.is_some() && r.status != "superseded" {
                    newest = newest.max(Some(d.id));
                }
            }
            assert!(sent_open <= 1, "{h} has {sent_open} unfinished deployments");
            assert_eq!(desired(s, h), newest, "{h}'s shadow");
        }
    }
}
