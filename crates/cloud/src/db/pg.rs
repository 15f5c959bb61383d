//! The PostgreSQL backend of [`super::Db`]: the sync `postgres` client
//! behind an `r2d2` pool, a listener connection that turns other
//! replicas' `NOTIFY`s into [`super::Db::events`], retries of
//! transactions the server aborted, and the schema's migrations.
//!
//! The sync client runs a small tokio runtime of its own inside each
//! connection, so it must not be used on an async runtime's worker (it
//! would panic starting a runtime within a runtime): `Db::transaction` is
//! called from `spawn_blocking` or plain threads, and opening, listening
//! and dropping connections happen on threads of this module's own.
//!
//! The pool is `r2d2` + `r2d2_postgres`: small, sync, and it checks a
//! connection before lending it (`SELECT` of nothing), so connections
//! that died with a restarted server are replaced rather than handed out.

use super::{Row, Tx, Val, SQLITE_MIGRATIONS};
use crate::store::StoreError;
use postgres::error::SqlState;
use postgres::types::{to_sql_checked, IsNull, Kind, ToSql, Type};
use postgres::{Client, Config, NoTls};
use r2d2_postgres::PostgresConnectionManager;
use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// The channel every replica's events go through.
const CHANNEL: &str = "roost_fleet";
/// The advisory lock migrations run under ("roost" in ASCII).
const MIGRATION_LOCK: i64 = 0x0072_6f6f_7374;
/// Connections each replica keeps for transactions.
const POOL_SIZE: u32 = 8;
/// How often a transaction aborted by a conflict with another one
/// (serialization failure, deadlock) is rerun before its error is given.
const CONFLICT_RETRIES: u32 = 10;

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

pub(super) struct Pg {
    /// Some until dropped (then dropped on a thread of its own).
    pool: Option<Pool>,
    /// host:port/database, for messages: never the password.
    target: String,
    /// Tags this replica's `NOTIFY`s, so its own listener skips them (it
    /// sends its own events in-process, at once, on commit).
    replica: String,
    stop: Arc<AtomicBool>,
    listener: Option<JoinHandle<()>>,
}

/// Why a transaction may be worth running again.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Retry {
    /// Aborted by the server for a conflict with another transaction.
    Conflict,
    /// The connection broke (before the commit was sent).
    Broken,
}

fn classify(e: &postgres::Error) -> Option<Retry> {
    if let Some(code) = e.code() {
        if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return Some(Retry::Conflict);
        }
        let c = code.code();
        // Class 08: connection exceptions; 57P01-3: the server is
        // shutting down or restarting.
        if c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03") {
            return Some(Retry::Broken);
        }
        return None;
    }
    // No SQLSTATE: the socket or the protocol failed.
    Some(Retry::Broken)
}

/// A message a person can act on; never holds the password.
fn describe(e: &postgres::Error, target: &str) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = format!(
                "PostgreSQL at {target} refused: {} (SQLSTATE {})",
                db.message(),
                db.code().code()
            );
            if let Some(d) = db.detail() {
                m.push_str(&format!("; {d}"));
            }
            if let Some(h) = db.hint() {
                m.push_str(&format!("; hint: {h}"));
            }
            m
        }
        None if classify(e) == Some(Retry::Broken) => {
            format!("cannot reach PostgreSQL at {target}: {e}; is it running? check --database")
        }
        None => format!("PostgreSQL at {target} failed: {e}"),
    }
}

fn db_err(e: postgres::Error, target: &str) -> StoreError {
    StoreError::Database(describe(&e, target))
}

fn connect_err(e: impl std::fmt::Display, target: &str) -> StoreError {
    StoreError::Database(format!(
        "cannot connect to PostgreSQL at {target}: {e}; is it running? check --database"
    ))
}

/// Where a config points, for messages: hosts, ports and database.
fn target_of(config: &Config) -> String {
    use postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(|p| p.to_string()).collect();
    let host = if hosts.is_empty() {
        "localhost".to_owned()
    } else {
        hosts.join(",")
    };
    let port = if ports.is_empty() {
        "5432".to_owned()
    } else {
        ports.join(",")
    };
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

impl Pg {
    /// Connects, migrates, starts the listener and fills the pool. Runs on
    /// a thread of its own (see `Db::open_postgres`).
    pub(super) fn open(url: &str, events: broadcast::Sender<String>) -> Result<Pg, StoreError> {
        let mut config: Config = url.parse().map_err(|e| {
            StoreError::Database(format!(
                "--database is not a PostgreSQL URL (postgres://user@host:port/database): {e}"
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("roost cloud");
        }
        let target = target_of(&config);
        let mut client = config.connect(NoTls).map_err(|e| connect_err(e, &target))?;
        migrate(&mut client, &target)?;
        // The listener's connection: LISTEN before this returns, so every
        // event committed from now on is seen.
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(|e| db_err(e, &target))?;
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .test_on_check_out(true)
            .connection_timeout(Duration::from_secs(10))
            .build(PostgresConnectionManager::new(config.clone(), NoTls))
            .map_err(|e| connect_err(e, &target))?;
        let replica = format!("{:016x}", rand::thread_rng().gen::<u64>());
        let stop = Arc::new(AtomicBool::new(false));
        let listener = {
            let (replica, stop, target) = (replica.clone(), stop.clone(), target.clone());
            std::thread::Builder::new()
                .name("roost-pg-listen".into())
                .spawn(move || listen(client, config, &replica, &events, &stop, &target))
                .map_err(|e| StoreError::Database(format!("cannot start a thread: {e}")))?
        };
        tracing::info!(database = %target, "connected to PostgreSQL");
        Ok(Pg {
            pool: Some(pool),
            target,
            replica,
            stop,
            listener: Some(listener),
        })
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("the pool lives until drop")
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<PostgresConnectionManager<NoTls>>, StoreError> {
        self.pool().get().map_err(|e| connect_err(e, &self.target))
    }

    /// Runs `f` in a transaction, rerunning it when the server aborted it
    /// for a conflict with another replica's (a few times, after a short
    /// random pause) or when its connection broke before the commit (once:
    /// a commit whose answer was lost is not rerun, as it may have taken).
    pub(super) fn transaction<R>(
        &self,
        f: &mut impl FnMut(&mut dyn Tx) -> Result<R, StoreError>,
        events: &broadcast::Sender<String>,
    ) -> Result<R, StoreError> {
        let mut conflicts = 0;
        let mut broken = 0;
        loop {
            match self.attempt(f) {
                Ok((r, sent)) => {
                    for e in sent {
                        let _ = events.send(e);
                    }
                    return Ok(r);
                }
                Err((_, Some(Retry::Conflict))) if conflicts < CONFLICT_RETRIES => {
                    conflicts += 1;
                    let cap = 5u64 << conflicts.min(5);
                    std::thread::sleep(Duration::from_millis(
                        rand::thread_rng().gen_range(1..=cap),
                    ));
                }
                Err((e, Some(Retry::Broken))) if broken < 1 => {
                    broken += 1;
                    tracing::warn!(error = %e, "PostgreSQL connection broke; running the transaction again");
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn attempt<R>(
        &self,
        f: &mut impl FnMut(&mut dyn Tx) -> Result<R, StoreError>,
    ) -> Result<(R, Vec<String>), (StoreError, Option<Retry>)> {
        let mut conn = self.conn().map_err(|e| (e, None))?;
        let tx = conn
            .transaction()
            .map_err(|e| (db_err_ref(&e, &self.target), classify(&e)))?;
        let mut t = PgTx {
            tx,
            events: Vec::new(),
            failure: None,
            target: &self.target,
        };
        let r = match f(&mut t) {
            Ok(r) => r,
            Err(e) => return Err((e, t.failure)),
        };
        // The events go out with the commit, or not at all.
        let events = std::mem::take(&mut t.events);
        for e in &events {
            let payload = format!("{} {e}", self.replica);
            t.exec(
                "SELECT pg_notify(?1, ?2)",
                &[CHANNEL.into(), payload.into()],
            )
            .map_err(|err| (err, t.failure))?;
        }
        t.tx.commit().map_err(|e| {
            let retry = match classify(&e) {
                Some(Retry::Conflict) => Some(Retry::Conflict),
                _ => None,
            };
            let mut err = describe(&e, &self.target);
            if retry.is_none() && e.as_db_error().is_none() {
                err.push_str(" (while committing: the change may or may not be stored)");
            }
            (StoreError::Database(err), retry)
        })?;
        Ok((r, events))
    }

    pub(super) fn schema_version(&self) -> Result<i64, StoreError> {
        let mut conn = self.conn()?;
        let row = conn
            .query_one("SELECT version FROM schema_version", &[])
            .map_err(|e| db_err(e, &self.target))?;
        Ok(row.get(0))
    }

    #[cfg(test)]
    pub(super) fn force_schema_version(&self, v: i64) {
        self.conn()
            .unwrap()
            .execute("UPDATE schema_version SET version = $1", &[&v])
            .unwrap();
    }
}

fn db_err_ref(e: &postgres::Error, target: &str) -> StoreError {
    StoreError::Database(describe(e, target))
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Connections close with a blocking call: off any async worker.
        let pool = self.pool.take();
        let listener = self.listener.take();
        let _ = std::thread::Builder::new()
            .name("roost-pg-close".into())
            .spawn(move || {
                drop(pool);
                if let Some(l) = listener {
                    let _ = l.join();
                }
            })
            .map(|h| h.join());
    }
}

/// The listener: forwards other replicas' events; when its connection
/// breaks it reconnects with back-off and sends `resync` (events may have
/// been missed meanwhile).
fn listen(
    mut client: Client,
    mut config: Config,
    replica: &str,
    events: &broadcast::Sender<String>,
    stop: &AtomicBool,
    target: &str,
) {
    config.connect_timeout(Duration::from_secs(5));
    loop {
        match pump(&mut client, replica, events, stop) {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(database = %target, error = %e, "lost the PostgreSQL listener connection; reconnecting")
            }
        }
        drop(client);
        let mut backoff = Duration::from_millis(100);
        client = loop {
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            match config.connect(NoTls).and_then(|mut c| {
                c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
                Ok(c)
            }) {
                Ok(c) => break c,
                Err(e) => {
                    tracing::debug!(database = %target, error = %e, "PostgreSQL not back yet");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        tracing::info!(database = %target, "PostgreSQL listener reconnected; resyncing");
        let _ = events.send("resync".into());
    }
}

/// Forwards notifications until `stop` (Ok) or the connection breaks.
fn pump(
    client: &mut Client,
    replica: &str,
    events: &broadcast::Sender<String>,
    stop: &AtomicBool,
) -> Result<(), String> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut quiet_since = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let got = {
            let mut n = client.notifications();
            let mut it = n.timeout_iter(Duration::from_millis(200));
            it.next().map_err(|e| e.to_string())?
        };
        match got {
            Some(note) => {
                quiet_since = Instant::now();
                match note.payload().split_once(' ') {
                    Some((from, _)) if from == replica => {}
                    Some((_, event)) => {
                        let _ = events.send(event.to_owned());
                    }
                    None => {
                        let _ = events.send(note.payload().to_owned());
                    }
                }
            }
            None => {
                if client.is_closed() {
                    return Err("the server closed the connection".into());
                }
                // A connection can die without a word (a lost route): ask.
                if quiet_since.elapsed() > Duration::from_secs(10) {
                    client
                        .is_valid(Duration::from_secs(5))
                        .map_err(|e| e.to_string())?;
                    quiet_since = Instant::now();
                }
            }
        }
    }
}

struct PgTx<'c, 't> {
    tx: postgres::Transaction<'c>,
    events: Vec<String>,
    /// Why the first failed statement may be worth a rerun.
    failure: Option<Retry>,
    target: &'t str,
}

/// A parameter's type left for the server to infer (OID 0): a NULL then
/// takes its column's type, whichever that is.
fn unspecified() -> Type {
    Type::new("unknown".into(), 0, Kind::Pseudo, "pg_catalog".into())
}

impl PgTx<'_, '_> {
    fn fail(&mut self, e: postgres::Error) -> StoreError {
        if self.failure.is_none() {
            self.failure = classify(&e);
        }
        db_err(e, self.target)
    }

    fn prepare(&mut self, sql: &str, params: &[Val]) -> Result<postgres::Statement, StoreError> {
        let types: Vec<Type> = params
            .iter()
            .map(|p| match p {
                Val::Null => unspecified(),
                Val::Int(_) => Type::INT8,
                Val::Text(_) => Type::TEXT,
                Val::Blob(_) => Type::BYTEA,
            })
            .collect();
        let sql = placeholders(sql);
        self.tx
            .prepare_typed(&sql, &types)
            .map_err(|e| self.fail(e))
    }
}

fn refs(params: &[Val]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl Tx for PgTx<'_, '_> {
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64, StoreError> {
        let st = self.prepare(sql, params)?;
        self.tx
            .execute(&st, &refs(params))
            .map_err(|e| self.fail(e))
    }

    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, StoreError> {
        let st = self.prepare(sql, params)?;
        let rows = self
            .tx
            .query(&st, &refs(params))
            .map_err(|e| self.fail(e))?;
        rows.iter().map(|r| row(r, self.target)).collect()
    }

    fn notify(&mut self, event: &str) {
        self.events.push(event.to_owned());
    }

    fn lock_row(&mut self, table: &str, key: &str, value: Val) -> Result<(), StoreError> {
        let ident =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident(table) || !ident(key) {
            return Err(StoreError::Schema(format!(
                "cannot lock {table:?}.{key:?}: not plain names"
            )));
        }
        self.exec(
            &format!("SELECT 1 FROM {table} WHERE {key} = ?1 FOR UPDATE"),
            &[value],
        )
        .map(|_| ())
    }
}

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Val::Text(v) => v.as_str().to_sql(ty, out),
            Val::Blob(v) => v.as_slice().to_sql(ty, out),
        }
    }

    /// Any: the statement was prepared with each value's own type (a NULL
    /// with its column's), and `to_sql` writes what that type holds.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn row(r: &postgres::Row, target: &str) -> Result<Row, StoreError> {
    let mut cols = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let get_err = |e: postgres::Error| db_err(e, target);
        let v = match *c.type_() {
            Type::INT8 => r
                .try_get::<_, Option<i64>>(i)
                .map_err(get_err)?
                .map(Val::Int),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)
                .map_err(get_err)?
                .map(|v| Val::Int(v.into())),
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)
                .map_err(get_err)?
                .map(|v| Val::Int(v.into())),
            Type::BOOL => r
                .try_get::<_, Option<bool>>(i)
                .map_err(get_err)?
                .map(|v| Val::Int(v.into())),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => r
                .try_get::<_, Option<String>>(i)
                .map_err(get_err)?
                .map(Val::Text),
            Type::BYTEA => r
                .try_get::<_, Option<Vec<u8>>>(i)
                .map_err(get_err)?
                .map(Val::Blob),
            ref t => {
                return Err(StoreError::Schema(format!(
                    "column {} ({i}) is of type {t}, which roost does not read",
                    c.name()
                )))
            }
        };
        cols.push(v.unwrap_or(Val::Null));
    }
    Ok(Row(cols))
}

/// `?N` placeholders as PostgreSQL's `$N`, leaving string literals,
/// quoted names and `--` comments as they are (and a `?` not followed by
/// a digit, PostgreSQL's JSON operator). `E'...'` strings with
/// backslash-escaped quotes are not read (no query here has one).
pub(super) fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    let mut comment = false;
    while let Some(c) = chars.next() {
        if comment {
            comment = c != '\n';
        } else if let Some(q) = quote {
            // A doubled quote closes and reopens: same result.
            if c == q {
                quote = None;
            }
        } else {
            match c {
                '\'' | '"' => quote = Some(c),
                '-' if chars.peek() == Some(&'-') => comment = true,
                '?' if chars.peek().is_some_and(|d| d.is_ascii_digit()) => {
                    out.push('$');
                    continue;
                }
                _ => {}
            }
        }
        out.push(c);
    }
    out
}

/// PostgreSQL's schema, one step per version, the same versions as
/// SQLite's: BIGINT for every integer, BYTEA for bytes, an identity
/// column for `deployments.id`. A step is never edited once shipped.
const POSTGRES_MIGRATIONS: &[&str] = &[
    // 1: hubs and their one-time enrolment tokens (kept hashed).
    "CREATE TABLE hubs (
        name TEXT PRIMARY KEY,
        groups TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        enrolled_ms BIGINT
    );
    CREATE TABLE enrolment_tokens (
        token_hash TEXT PRIMARY KEY,
        hub TEXT NOT NULL REFERENCES hubs(name) ON DELETE CASCADE,
        expires_ms BIGINT NOT NULL,
        used_ms BIGINT
    );",
    // 2: the public key a hub enrolled with (ed25519, hex).
    "ALTER TABLE hubs ADD COLUMN public_key TEXT;",
    // 3: the fleet's own keys, the hubs' connection state, packages,
    // deployments and each hub's status in them, and the hubs' shadows.
    "CREATE TABLE fleet (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    ALTER TABLE hubs ADD COLUMN connected_ms BIGINT;
    ALTER TABLE hubs ADD COLUMN last_seen_ms BIGINT;
    CREATE TABLE packages (
        sha256 TEXT PRIMARY KEY,
        bytes BYTEA NOT NULL,
        size BIGINT NOT NULL,
        signature TEXT NOT NULL,
        manifest TEXT NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE deployments (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        target_kind TEXT NOT NULL,
        target TEXT NOT NULL,
        package TEXT NOT NULL REFERENCES packages(sha256),
        secrets BYTEA,
        rollout_batch BIGINT NOT NULL,
        max_failures_pct BIGINT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE deployment_hubs (
        deployment BIGINT NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
        hub TEXT NOT NULL REFERENCES hubs(name) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL,
        started_ms BIGINT,
        updated_ms BIGINT NOT NULL,
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

// Both databases know the same versions.
const _: () = assert!(POSTGRES_MIGRATIONS.len() == SQLITE_MIGRATIONS.len());

/// Brings the schema to this roost's version: each step and its version
/// commit together, each under an advisory lock, so replicas starting at
/// once migrate one after the other (the later ones find it done).
fn migrate(client: &mut Client, target: &str) -> Result<(), StoreError> {
    let known = super::known_version();
    loop {
        let err = |e| db_err(e, target);
        let mut tx = client.transaction().map_err(err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(err)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);
             INSERT INTO schema_version SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM schema_version);",
        )
        .map_err(err)?;
        let found: i64 = tx
            .query_one("SELECT version FROM schema_version", &[])
            .map_err(err)?
            .get(0);
        if found > known {
            return Err(StoreError::TooNew { found, known });
        }
        if found == known {
            tx.commit().map_err(err)?;
            return Ok(());
        }
        tx.batch_execute(POSTGRES_MIGRATIONS[found as usize])
            .map_err(err)?;
        tx.execute("UPDATE schema_version SET version = $1", &[&(found + 1)])
            .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(version = found + 1, "migrated the cloud's database");
    }
}

#[cfg(test)]
mod tests {
    use super::placeholders;

    #[test]
    fn placeholders_become_dollars_outside_literals() {
        assert_eq!(
            placeholders("SELECT a FROM t WHERE x = ?1 AND y = '?2' AND \"?3\" = ?10 -- ?4\n AND z ? 'k' AND w = ?5"),
            "SELECT a FROM t WHERE x = $1 AND y = '?2' AND \"?3\" = $10 -- ?4\n AND z ? 'k' AND w = $5"
        );
        assert_eq!(placeholders("'it''s ?1' ?2"), "'it''s ?1' $2");
    }
}
