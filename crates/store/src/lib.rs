//! The hub's store: everything the hub keeps across restarts, in one SQLite
//! database under the data dir. This crate is the only code that writes SQL.
//!
//! Writes go through one writer thread that batches whatever is waiting
//! into a single transaction (group commit): each caller's write is durable
//! (WAL, `synchronous = FULL`) when its future resolves, but concurrent
//! writers share one fsync. Reads use their own connection; WAL lets them
//! run beside the writer.

mod calls;
mod demand;
mod deployments;
mod mqtt;
mod shadows;

pub use calls::{NewCall, StoredCall};
pub use deployments::StoredDeployment;
pub use mqtt::{MqttSnapshot, StoredMessage, StoredRetained};
pub use shadows::SealedSecret;

use parking_lot::Mutex;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the store's writer has stopped (is the disk full or the hub shutting down?)")]
    Closed,
    #[error("the transaction could not be committed: {0}")]
    Commit(String),
    #[error("cannot open the store at {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// Most writes merged into one transaction.
const MAX_BATCH: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deployments (
    id          INTEGER PRIMARY KEY,
    created_ms  INTEGER NOT NULL,
    manifest    TEXT NOT NULL,
    package_dir TEXT NOT NULL,
    previous    INTEGER,
    active      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS calls (
    id            TEXT PRIMARY KEY,
    task          TEXT NOT NULL,
    input         BLOB NOT NULL,
    env           TEXT NOT NULL DEFAULT '[]',
    status        TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL,
    next_at_ms    INTEGER NOT NULL DEFAULT 0,
    error_code    TEXT,
    error_message TEXT,
    output        BLOB,
    created_ms    INTEGER NOT NULL,
    finished_ms   INTEGER
);
CREATE TABLE IF NOT EXISTS task_demand (
    task       TEXT PRIMARY KEY,
    rate       REAL NOT NULL,
    service_s  REAL NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mqtt_sessions (
    client_id TEXT PRIMARY KEY,
    device    TEXT,
    expiry_s  INTEGER
);
CREATE TABLE IF NOT EXISTS mqtt_subscriptions (
    client_id TEXT NOT NULL,
    filter    TEXT NOT NULL,
    qos       INTEGER NOT NULL,
    no_local  INTEGER NOT NULL,
    retain_as_published INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)
);
CREATE TABLE IF NOT EXISTS mqtt_queue (
    client_id TEXT NOT NULL,
    id        INTEGER NOT NULL,
    topic     TEXT NOT NULL,
    payload   BLOB NOT NULL,
    qos       INTEGER NOT NULL,
    retain    INTEGER NOT NULL,
    expires_ms INTEGER,
    properties BLOB,
    PRIMARY KEY (client_id, id)
);
CREATE TABLE IF NOT EXISTS mqtt_qos2_in (
    client_id TEXT NOT NULL,
    packet_id INTEGER NOT NULL,
    PRIMARY KEY (client_id, packet_id)
);
CREATE TABLE IF NOT EXISTS mqtt_retained (
    topic   TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos     INTEGER NOT NULL,
    properties BLOB,
    expires_ms INTEGER,
    modified_ms INTEGER,
    owner   TEXT
);
CREATE TABLE IF NOT EXISTS shadows (
    thing      TEXT NOT NULL,
    name       TEXT NOT NULL,
    record     TEXT NOT NULL,
    live       INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (thing, name)
);
CREATE TABLE IF NOT EXISTS secrets (
    deployment INTEGER NOT NULL,
    name       TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (deployment, name)
);
CREATE INDEX IF NOT EXISTS calls_by_status ON calls(status);
CREATE INDEX IF NOT EXISTS calls_by_finish ON calls(finished_ms) WHERE finished_ms IS NOT NULL;
";

type Completion = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Completion + Send>;

pub struct Store {
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    reader: Mutex<Connection>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn open_conn(path: &Path) -> Result<Connection, StoreError> {
    let open = |path: &Path| -> rusqlite::Result<Connection> {
        let c = Connection::open(path)?;
        c.busy_timeout(std::time::Duration::from_secs(10))?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", "FULL")?;
        c.pragma_update(None, "foreign_keys", "ON")?;
        Ok(c)
    };
    open(path).map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let writer = open_conn(path)?;
        writer.execute_batch(SCHEMA)?;
        migrate(&writer)?;
        let reader = open_conn(path)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("roost-store".into())
            .spawn(move || writer_loop(writer, rx))
            .expect("spawn the store writer thread");
        Ok(Self {
            writer: Mutex::new(Some(tx)),
            reader: Mutex::new(reader),
            writer_thread: Mutex::new(Some(handle)),
        })
    }

    /// Runs `f` in the next group-committed transaction; resolves once it is
    /// on disk.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.submit(f).await
    }

    /// Queues `f` for the writer now (writes run in the order they were
    /// submitted) and returns a future that resolves once it is on disk.
    fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<R, StoreError>> + Send + 'static {
        let (tx, rx) = oneshot::channel::<Result<R, StoreError>>();
        let job: Job = Box::new(move |conn| {
            // A savepoint per write, so one failing write leaves the rest of
            // the batch intact.
            let result = conn
                .execute_batch("SAVEPOINT w")
                .and_then(|_| f(conn))
                .and_then(|r| conn.execute_batch("RELEASE w").map(|_| r));
            match result {
                Ok(r) => Box::new(move |commit: Result<(), &StoreError>| {
                    let _ = tx.send(match commit {
                        Ok(()) => Ok(r),
                        Err(e) => Err(StoreError::Commit(e.to_string())),
                    });
                }),
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK TO w; RELEASE w");
                    Box::new(move |_| {
                        let _ = tx.send(Err(StoreError::Sqlite(e)));
                    })
                }
            }
        });
        let sent = match self.writer.lock().as_ref() {
            Some(w) => w.send(job).is_ok(),
            None => false,
        };
        async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            rx.await.map_err(|_| StoreError::Closed)?
        }
    }

    fn read<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, StoreError> {
        Ok(f(&self.reader.lock())?)
    }

    /// Stops the writer after the writes already sent are committed.
    pub fn close(&self) {
        self.writer.lock().take();
        if let Some(h) = self.writer_thread.lock().take() {
            let _ = h.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// Columns added after a table first shipped: stores made by an older hub
/// get them on open (SQLite has no `ADD COLUMN IF NOT EXISTS`).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("mqtt_sessions", "expiry_s", "INTEGER"),
    ("mqtt_queue", "expires_ms", "INTEGER"),
    ("mqtt_queue", "properties", "BLOB"),
    ("mqtt_retained", "properties", "BLOB"),
    ("mqtt_retained", "expires_ms", "INTEGER"),
    ("mqtt_retained", "modified_ms", "INTEGER"),
    ("mqtt_retained", "owner", "TEXT"),
];

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, kind) in ADDED_COLUMNS {
        let present = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    // Retained messages kept before their time was: counted from the first
    // start that knows, once, so it stays put across later restarts.
    conn.execute(
        "UPDATE mqtt_retained SET modified_ms = ?1 WHERE modified_ms IS NULL",
        [now_ms()],
    )?;
    Ok(())
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let began = conn.execute_batch("BEGIN IMMEDIATE");
        let mut completions = Vec::with_capacity(batch.len());
        if let Err(e) = began {
            let e = StoreError::Sqlite(e);
            for job in batch {
                // Not in a transaction: report the failure without running.
                drop(job);
                tracing::error!(error = %e, "store: cannot begin a transaction");
            }
            continue;
        }
        for job in batch {
            completions.push(job(&conn));
        }
        match conn.execute_batch("COMMIT") {
            Ok(()) => completions.into_iter().for_each(|c| c(Ok(()))),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                let e = StoreError::Sqlite(e);
                tracing::error!(error = %e, "store: commit failed");
                completions.into_iter().for_each(|c| c(Err(&e)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_writes_all_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(&dir.path().join("s.db")).unwrap());
        let mut handles = Vec::new();
        for i in 0..200 {
            let s = store.clone();
            handles.push(tokio::spawn(async move {
                s.insert_call(NewCall {
                    id: format!("{i:032x}"),
                    task: "echo".into(),
                    input: vec![1, 2, 3],
                    env: vec![],
                    max_attempts: 3,
                })
                .await
                .unwrap();
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(store.queued_calls().unwrap().len(), 200);
        drop(store);
        let reopened = Store::open(&dir.path().join("s.db")).unwrap();
        assert_eq!(reopened.queued_calls().unwrap().len(), 200);
    }

    #[test]
    fn a_store_from_before_a_column_existed_gets_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE mqtt_sessions (client_id TEXT PRIMARY KEY, device TEXT);
                 INSERT INTO mqtt_sessions VALUES ('c1', NULL);
                 CREATE TABLE mqtt_retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
                 INSERT INTO mqtt_retained VALUES ('a/b', x'01', 1);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let snap = s.mqtt_load().unwrap();
        assert_eq!(snap.sessions, vec![("c1".to_owned(), None, None)]);
        // An old retained message gets a time, once: the same on later opens.
        let first = snap.retained[0].modified_ms;
        assert!(first.is_some());
        drop(s);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let s = Store::open(&path).unwrap();
        assert_eq!(s.mqtt_load().unwrap().retained[0].modified_ms, first);
    }

    #[tokio::test]
    async fn a_failing_write_does_not_spoil_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(&dir.path().join("s.db")).unwrap());
        let call = |id: &str| NewCall {
            id: id.into(),
            task: "t".into(),
            input: vec![],
            env: vec![],
            max_attempts: 1,
        };
        let (a, b, c) = tokio::join!(
            store.insert_call(call("a")),
            store.insert_call(call("a")), // duplicate id: fails alone
            store.insert_call(call("c")),
        );
        assert!(a.is_ok() && c.is_ok());
        assert!(b.is_err());
        assert_eq!(store.queued_calls().unwrap().len(), 2);
    }
}
