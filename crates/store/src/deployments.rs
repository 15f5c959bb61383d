//! Deployments: each manifest the hub accepted, which one is active, and the
//! one before it (for `roost deploy --rollback`).

use crate::{now_ms, Store, StoreError};
use rusqlite::{params, OptionalExtension};

#[derive(Clone, Debug)]
pub struct StoredDeployment {
    pub id: i64,
    pub created_ms: i64,
    pub manifest: String,
    /// Folder under the data dir holding the unpacked package.
    pub package_dir: String,
    /// The deployment that was active when this one was applied.
    pub previous: Option<i64>,
}

const COLUMNS: &str = "id, created_ms, manifest, package_dir, previous";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredDeployment> {
    Ok(StoredDeployment {
        id: r.get(0)?,
        created_ms: r.get(1)?,
        manifest: r.get(2)?,
        package_dir: r.get(3)?,
        previous: r.get(4)?,
    })
}

impl Store {
    /// The id the next deployment will get (used to name its folder).
    pub fn next_deployment_id(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT COALESCE(MAX(id), 0) + 1 FROM deployments",
                [],
                |r| r.get(0),
            )
        })
    }

    /// Records a deployment and makes it the active one, in one transaction.
    pub async fn activate_new_deployment(
        &self,
        id: i64,
        manifest: String,
        package_dir: String,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            let previous: Option<i64> = c
                .query_row("SELECT id FROM deployments WHERE active = 1", [], |r| r.get(0))
                .optional()?;
            c.execute("UPDATE deployments SET active = 0 WHERE active = 1", [])?;
            c.execute(
                "INSERT INTO deployments (id, created_ms, manifest, package_dir, previous, active) VALUES (?1, ?2, ?3, ?4, ?5, 1)",
                params![id, now_ms(), manifest, package_dir, previous],
            )?;
            Ok(())
        })
        .await
    }

    /// Makes an earlier deployment active again (rollback).
    pub async fn reactivate_deployment(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute("UPDATE deployments SET active = 0 WHERE active = 1", [])?;
            c.execute(
                "UPDATE deployments SET active = 1 WHERE id = ?1",
                params![id],
            )?;
            Ok(())
        })
        .await
    }

    pub fn active_deployment(&self) -> Result<Option<StoredDeployment>, StoreError> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM deployments WHERE active = 1"),
                [],
                row,
            )
            .optional()
        })
    }

    pub fn deployment(&self, id: i64) -> Result<Option<StoredDeployment>, StoreError> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM deployments WHERE id = ?1"),
                params![id],
                row,
            )
            .optional()
        })
    }

    /// Package folders of deployments that can never be rolled back to
    /// again: all but the newest `keep`, and never the active one's chain.
    pub fn stale_deployment_dirs(&self, keep: usize) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT package_dir FROM deployments WHERE active = 0 ORDER BY id DESC LIMIT -1 OFFSET ?1",
            )?;
            let rows = st.query_map(params![keep as i64], |r| r.get(0))?;
            rows.collect()
        })
    }
}
