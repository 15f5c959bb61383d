//! Measured demand per task (arrival rate, service time), kept so that a
//! restarted hub sizes its worker pools from what it saw before.

use crate::{now_ms, Store, StoreError};
use rusqlite::{params, OptionalExtension};

impl Store {
    pub async fn save_demand(
        &self,
        task: &str,
        rate: f64,
        service_s: f64,
    ) -> Result<(), StoreError> {
        let task = task.to_owned();
        self.write(move |c| {
            c.execute(
                "INSERT INTO task_demand (task, rate, service_s, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(task) DO UPDATE SET rate = ?2, service_s = ?3, updated_ms = ?4",
                params![task, rate, service_s, now_ms()],
            )
            .map(|_| ())
        })
        .await
    }

    /// (rate per second, service seconds) last saved for a task.
    pub fn load_demand(&self, task: &str) -> Result<Option<(f64, f64)>, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT rate, service_s FROM task_demand WHERE task = ?1",
                params![task],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }
}
