//! Durable async calls: queued on disk before they are acknowledged, moved
//! through running to succeeded or failed, retried with backoff, purged after
//! the retention period.

use crate::{now_ms, Store, StoreError};
use roost_model::{CallStatus, Failure, FailureCode};
use rusqlite::{params, OptionalExtension, Row};

/// A call's input and the extra environment it runs with.
pub type CallInput = (Vec<u8>, Vec<(String, String)>);

pub struct NewCall {
    pub id: String,
    pub task: String,
    pub input: Vec<u8>,
    /// Extra environment for the call (for example `ROOST_TOPIC`).
    pub env: Vec<(String, String)>,
    pub max_attempts: u32,
}

#[derive(Clone, Debug)]
pub struct StoredCall {
    pub id: String,
    pub task: String,
    pub status: CallStatus,
    pub attempts: u32,
    pub max_attempts: u32,
    /// When a queued call may next run (unix ms); 0 means now.
    pub next_at_ms: i64,
    pub failure: Option<Failure>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

const COLUMNS: &str = "id, task, status, attempts, max_attempts, next_at_ms, error_code, error_message, created_ms, finished_ms";

fn row_to_call(r: &Row<'_>) -> rusqlite::Result<StoredCall> {
    let status: String = r.get(2)?;
    let code: Option<String> = r.get(6)?;
    let message: Option<String> = r.get(7)?;
    Ok(StoredCall {
        id: r.get(0)?,
        task: r.get(1)?,
        status: CallStatus::parse(&status).unwrap_or(CallStatus::Failed),
        attempts: r.get(3)?,
        max_attempts: r.get(4)?,
        next_at_ms: r.get(5)?,
        failure: code.map(|c| {
            Failure::new(
                FailureCode::parse(&c).unwrap_or(FailureCode::TaskError),
                message.unwrap_or_default(),
            )
        }),
        created_ms: r.get(8)?,
        finished_ms: r.get(9)?,
    })
}

impl Store {
    /// Records a new queued call; when this resolves the call is on disk.
    pub async fn insert_call(&self, call: NewCall) -> Result<(), StoreError> {
        let env = serde_json::to_string(&call.env).unwrap_or_else(|_| "[]".into());
        self.write(move |c| {
            c.execute(
                "INSERT INTO calls (id, task, input, env, status, max_attempts, created_ms) VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6)",
                params![call.id, call.task, call.input, env, call.max_attempts, now_ms()],
            )
            .map(|_| ())
        })
        .await
    }

    /// Marks a call running and counts the attempt.
    pub async fn mark_running(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |c| {
            c.execute(
                "UPDATE calls SET status = 'running', attempts = attempts + 1 WHERE id = ?1",
                params![id],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn succeed_call(&self, id: &str, output: Vec<u8>) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |c| {
            c.execute(
                "UPDATE calls SET status = 'succeeded', output = ?2, error_code = NULL, error_message = NULL, finished_ms = ?3 WHERE id = ?1",
                params![id, output, now_ms()],
            )
            .map(|_| ())
        })
        .await
    }

    pub async fn fail_call(&self, id: &str, failure: &Failure) -> Result<(), StoreError> {
        let (id, code, message) = (
            id.to_owned(),
            failure.code.as_str(),
            failure.message.clone(),
        );
        self.write(move |c| {
            c.execute(
                "UPDATE calls SET status = 'failed', error_code = ?2, error_message = ?3, finished_ms = ?4 WHERE id = ?1",
                params![id, code, message, now_ms()],
            )
            .map(|_| ())
        })
        .await
    }

    /// Puts a failed attempt back in the queue to run again at `next_at_ms`.
    pub async fn retry_call(
        &self,
        id: &str,
        failure: &Failure,
        next_at_ms: i64,
    ) -> Result<(), StoreError> {
        let (id, code, message) = (
            id.to_owned(),
            failure.code.as_str(),
            failure.message.clone(),
        );
        self.write(move |c| {
            c.execute(
                "UPDATE calls SET status = 'queued', error_code = ?2, error_message = ?3, next_at_ms = ?4 WHERE id = ?1",
                params![id, code, message, next_at_ms],
            )
            .map(|_| ())
        })
        .await
    }

    /// Calls that were running when the hub stopped go back to the queue
    /// (at-least-once). Returns how many.
    pub async fn requeue_interrupted(&self) -> Result<usize, StoreError> {
        self.write(|c| {
            c.execute(
                "UPDATE calls SET status = 'queued' WHERE status = 'running'",
                [],
            )
        })
        .await
    }

    /// Deletes finished calls older than `before_ms`. Returns how many.
    pub async fn purge_finished(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.write(move |c| {
            c.execute(
                "DELETE FROM calls WHERE finished_ms IS NOT NULL AND finished_ms < ?1",
                params![before_ms],
            )
        })
        .await
    }

    pub fn get_call(&self, id: &str) -> Result<Option<StoredCall>, StoreError> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM calls WHERE id = ?1"),
                params![id],
                row_to_call,
            )
            .optional()
        })
    }

    /// The input and extra environment of a call, loaded when it runs.
    pub fn call_input(&self, id: &str) -> Result<Option<CallInput>, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT input, env FROM calls WHERE id = ?1",
                params![id],
                |r| {
                    let env: String = r.get(1)?;
                    Ok((r.get(0)?, serde_json::from_str(&env).unwrap_or_default()))
                },
            )
            .optional()
        })
    }

    pub fn call_output(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|c| {
            c.query_row("SELECT output FROM calls WHERE id = ?1", params![id], |r| {
                r.get::<_, Option<Vec<u8>>>(0)
            })
            .optional()
            .map(Option::flatten)
        })
    }

    /// Every queued call, oldest first.
    pub fn queued_calls(&self) -> Result<Vec<StoredCall>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLUMNS} FROM calls WHERE status = 'queued' ORDER BY created_ms, rowid"
            ))?;
            let rows = st.query_map([], row_to_call)?;
            rows.collect()
        })
    }
}
