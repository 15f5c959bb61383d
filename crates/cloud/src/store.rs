//! The fleet's state and every rule that changes it, written once over
//! [`Tx`] so SQLite and PostgreSQL behave alike: hubs and their enrolment,
//! the fleet's keys, packages, deployments and their rollouts, and each
//! hub's `roost-deployment` shadow.
//!
//! A rollout is a pure function of what the database holds: [`advance`]
//! reads a deployment's rows and releases the next hubs, so a cloud killed
//! mid-rollout resumes where it was, and two replicas acting at once (each
//! under the deployment's row lock) release each hub once.

use crate::db::{one, Db, Row, Tx, Val};
use roost_shadows::{Limits, ShadowRecord};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the cloud's database failed: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the cloud's database failed: {0}")]
    Database(String),
    #[error("the cloud's database does not hold what this roost expects: {0}")]
    Schema(String),
    #[error("the database is at schema version {found}, newer than this roost ({known}); run a newer roost cloud")]
    TooNew { found: i64, known: i64 },
    #[error("a hub named {0:?} is already in the fleet")]
    HubExists(String),
    #[error("no hub named {0:?} is in the fleet")]
    UnknownHub(String),
    #[error("no package {0} is stored; upload it first (POST /v1/packages)")]
    UnknownPackage(String),
    #[error("{0}")]
    Refused(String),
}

/// Statuses a hub passes through in a deployment; the last five end it.
pub const STATUSES: &[&str] = &[
    "pending",
    "downloading",
    "applying",
    "checking",
    "succeeded",
    "failed",
    "rolled_back",
    "superseded",
    "cancelled",
];

/// Whether a hub's status in a deployment is final.
pub fn terminal(status: &str) -> bool {
    matches!(
        status,
        "succeeded" | "failed" | "rolled_back" | "superseded" | "cancelled" | "timed_out"
    )
}

/// The shadow that carries a hub's deployment.
pub const DEPLOYMENT_SHADOW: &str = "roost-deployment";

/// A hub as the fleet knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HubRecord {
    pub name: String,
    pub groups: Vec<String>,
    pub created_ms: i64,
    /// When it exchanged its enrolment token (none: not yet).
    pub enrolled_ms: Option<i64>,
    /// Since when it is connected to a replica (none: it is not).
    pub connected_ms: Option<i64>,
    /// When a replica last heard from it.
    pub last_seen_ms: Option<i64>,
}

const HUB_COLUMNS: &str = "name, groups, created_ms, enrolled_ms, connected_ms, last_seen_ms";

fn hub_record(r: &Row) -> Result<HubRecord, StoreError> {
    Ok(HubRecord {
        name: r.text(0)?,
        groups: serde_json::from_str(&r.text(1)?).unwrap_or_default(),
        created_ms: r.int(2)?,
        enrolled_ms: r.opt_int(3)?,
        connected_ms: r.opt_int(4)?,
        last_seen_ms: r.opt_int(5)?,
    })
}

/// Where a deployment goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Hub(String),
    Group(String),
}

impl Target {
    fn kind(&self) -> &'static str {
        match self {
            Target::Hub(_) => "hub",
            Target::Group(_) => "group",
        }
    }
    fn name(&self) -> &str {
        match self {
            Target::Hub(n) | Target::Group(n) => n,
        }
    }
}

/// A stored package: its hash, size, the fleet's signature and the
/// manifest it holds.
#[derive(Clone, Debug, Serialize)]
pub struct PackageRecord {
    pub sha256: String,
    pub size: i64,
    pub signature: String,
    pub manifest: String,
    pub created_ms: i64,
}

/// A deployment as asked for.
pub struct NewDeployment {
    pub target: Target,
    pub package: String,
    /// Its `[[secret]]` values, sealed with the fleet's key.
    pub secrets: Option<Vec<u8>>,
    pub rollout_batch: i64,
    pub max_failures_pct: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeploymentRecord {
    pub id: i64,
    pub target: Target,
    pub package: String,
    pub rollout_batch: i64,
    pub max_failures_pct: i64,
    /// `rolling_out`, `done` or `stopped`.
    pub state: String,
    pub reason: String,
    pub created_ms: i64,
}

const DEPLOYMENT_COLUMNS: &str =
    "id, target_kind, target, package, rollout_batch, max_failures_pct, state, reason, created_ms";

fn deployment_record(r: &Row) -> Result<DeploymentRecord, StoreError> {
    let name = r.text(2)?;
    Ok(DeploymentRecord {
        id: r.int(0)?,
        target: if r.text(1)? == "group" {
            Target::Group(name)
        } else {
            Target::Hub(name)
        },
        package: r.text(3)?,
        rollout_batch: r.int(4)?,
        max_failures_pct: r.int(5)?,
        state: r.text(6)?,
        reason: r.text(7)?,
        created_ms: r.int(8)?,
    })
}

/// One hub's place in a deployment.
#[derive(Clone, Debug, Serialize)]
pub struct HubStatus {
    pub hub: String,
    pub status: String,
    pub reason: String,
    /// When the rollout sent it the deployment (none: not yet).
    pub started_ms: Option<i64>,
    pub updated_ms: i64,
}

/// The fleet's state, in whichever database.
pub struct Store {
    pub db: Db,
}

impl Store {
    pub fn new(db: Db) -> Self {
        Store { db }
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.db.schema_version()
    }

    /// A fleet-wide value (the admin token, the signing key): the stored
    /// one, or `make()` stored now if there is none yet. Every replica
    /// reads the same one.
    pub fn fleet_value(
        &self,
        key: &str,
        make: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        let made = make();
        self.db.transaction(|tx| {
            tx.exec(
                "INSERT INTO fleet (key, value) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                &[key.into(), (&made).into()],
            )?;
            one(tx, "SELECT value FROM fleet WHERE key = ?1", &[key.into()])?
                .ok_or_else(|| StoreError::Schema("the fleet value vanished".into()))?
                .text(0)
        })
    }

    /// Adds a hub with an enrolment token (kept only as its hash). A hub
    /// joining a group gets the group's current deployment.
    pub fn add_hub(
        &self,
        hub: &HubRecord,
        token_hash: &str,
        expires_ms: i64,
    ) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
            let added = tx.exec(
                "INSERT INTO hubs (name, groups, created_ms) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                &[
                    (&hub.name).into(),
                    serde_json::to_string(&hub.groups).unwrap_or_default().into(),
                    hub.created_ms.into(),
                ],
            )?;
            if added == 0 {
                return Err(StoreError::HubExists(hub.name.clone()));
            }
            tx.exec(
                "INSERT INTO enrolment_tokens (token_hash, hub, expires_ms) VALUES (?1, ?2, ?3)",
                &[token_hash.into(), (&hub.name).into(), expires_ms.into()],
            )?;
            lock_membership(tx)?;
            // The newest deployment to any of its groups that is not stopped.
            let mut current: Option<i64> = None;
            for g in &hub.groups {
                let row = one(
                    tx,
                    "SELECT MAX(id) FROM deployments WHERE target_kind = 'group' AND target = ?1 AND state <> 'stopped'",
                    &[g.into()],
                )?;
                if let Some(id) = row.map(|r| r.opt_int(0)).transpose()?.flatten() {
                    current = current.max(Some(id));
                }
            }
            if let Some(id) = current {
                tx.lock_row("deployments", "id", id.into())?;
                let seq = one(
                    tx,
                    "SELECT COALESCE(MAX(seq), -1) + 1 FROM deployment_hubs WHERE deployment = ?1",
                    &[id.into()],
                )?
                .map(|r| r.int(0))
                .transpose()?
                .unwrap_or(0);
                tx.exec(
                    "INSERT INTO deployment_hubs (deployment, hub, seq, status, reason, updated_ms)
                     VALUES (?1, ?2, ?3, 'pending', 'joined the group; waiting for its turn in the rollout', ?4)",
                    &[id.into(), (&hub.name).into(), seq.into(), hub.created_ms.into()],
                )?;
                tx.exec(
                    "UPDATE deployments SET state = 'rolling_out', reason = '' WHERE id = ?1",
                    &[id.into()],
                )?;
                advance(tx, id, hub.created_ms)?;
            }
            Ok(())
        })
    }

    /// Every hub, by name.
    pub fn hubs(&self) -> Result<Vec<HubRecord>, StoreError> {
        self.db.transaction(|tx| {
            tx.query(
                &format!("SELECT {HUB_COLUMNS} FROM hubs ORDER BY name"),
                &[],
            )?
            .iter()
            .map(hub_record)
            .collect()
        })
    }

    /// One hub.
    pub fn hub(&self, name: &str) -> Result<Option<HubRecord>, StoreError> {
        self.db.transaction(|tx| {
            one(
                tx,
                &format!("SELECT {HUB_COLUMNS} FROM hubs WHERE name = ?1"),
                &[name.into()],
            )?
            .as_ref()
            .map(hub_record)
            .transpose()
        })
    }

    /// Removes a hub (its tokens, shadows and places in deployments go
    /// with it); whether it was there. The replica holding its connection
    /// closes it.
    pub fn remove_hub(&self, name: &str) -> Result<bool, StoreError> {
        self.db.transaction(|tx| {
            let affected: Vec<i64> = tx
                .query(
                    "SELECT deployment FROM deployment_hubs WHERE hub = ?1",
                    &[name.into()],
                )?
                .iter()
                .map(|r| r.int(0))
                .collect::<Result<_, _>>()?;
            let removed = tx.exec("DELETE FROM hubs WHERE name = ?1", &[name.into()])? > 0;
            if removed {
                tx.notify(&format!("removed:{name}"));
                for id in affected {
                    advance(tx, id, crate::now_ms())?;
                }
            }
            Ok(removed)
        })
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
        self.db.transaction(|tx| {
            let hub = one(
                tx,
                "UPDATE enrolment_tokens SET used_ms = ?2
                 WHERE token_hash = ?1 AND used_ms IS NULL AND expires_ms > ?2
                 RETURNING hub",
                &[token_hash.into(), now_ms.into()],
            )?;
            let Some(name) = hub.map(|r| r.text(0)).transpose()? else {
                return Ok(None);
            };
            tx.exec(
                "UPDATE hubs SET enrolled_ms = ?2, public_key = ?3 WHERE name = ?1",
                &[(&name).into(), now_ms.into(), public_key.into()],
            )?;
            one(
                tx,
                &format!("SELECT {HUB_COLUMNS} FROM hubs WHERE name = ?1"),
                &[name.into()],
            )?
            .as_ref()
            .map(hub_record)
            .transpose()
        })
    }

    /// The public key a hub enrolled with, if it has.
    pub fn public_key(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.db.transaction(|tx| {
            Ok(one(
                tx,
                "SELECT public_key FROM hubs WHERE name = ?1",
                &[name.into()],
            )?
            .map(|r| r.opt_text(0))
            .transpose()?
            .flatten())
        })
    }

    /// Records that a hub connected to (or left) this replica.
    /// Marks a hub disconnected, unless a newer session (on any replica)
    /// has connected it since the one that connected it at `since_ms`.
    pub fn set_disconnected(
        &self,
        name: &str,
        since_ms: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
            tx.exec(
                "UPDATE hubs SET connected_ms = NULL, last_seen_ms = ?3 WHERE name = ?1 AND connected_ms = ?2",
                &[name.into(), since_ms.into(), now_ms.into()],
            )?;
            tx.notify(&format!("hub:{name}"));
            Ok(())
        })
    }

    pub fn set_connected(
        &self,
        name: &str,
        connected: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
            tx.exec(
                "UPDATE hubs SET connected_ms = ?2, last_seen_ms = ?3 WHERE name = ?1",
                &[
                    name.into(),
                    if connected {
                        Val::Int(now_ms)
                    } else {
                        Val::Null
                    },
                    now_ms.into(),
                ],
            )?;
            tx.notify(&format!("hub:{name}"));
            Ok(())
        })
    }

    /// Records that these hubs were heard from (one statement each, one
    /// transaction for all).
    pub fn touch(&self, names: &[String], now_ms: i64) -> Result<(), StoreError> {
        if names.is_empty() {
            return Ok(());
        }
        self.db.transaction(|tx| {
            for n in names {
                tx.exec(
                    "UPDATE hubs SET last_seen_ms = ?2 WHERE name = ?1",
                    &[n.into(), now_ms.into()],
                )?;
            }
            Ok(())
        })
    }

    /// Stores a package once, however many deployments use it; whether it
    /// was new.
    pub fn put_package(&self, p: &PackageRecord, bytes: &[u8]) -> Result<bool, StoreError> {
        self.db.transaction(|tx| {
            Ok(tx.exec(
                "INSERT INTO packages (sha256, bytes, size, signature, manifest, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                &[
                    (&p.sha256).into(),
                    bytes.to_vec().into(),
                    p.size.into(),
                    (&p.signature).into(),
                    (&p.manifest).into(),
                    p.created_ms.into(),
                ],
            )? > 0)
        })
    }

    /// A stored package's record.
    pub fn package(&self, sha256: &str) -> Result<Option<PackageRecord>, StoreError> {
        self.db.transaction(|tx| package_record(tx, sha256))
    }

    /// A package's bytes, for `hub` only if a deployment sent to it uses
    /// the package: a hub cannot fetch what is not its own.
    pub fn package_for_hub(&self, hub: &str, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.transaction(|tx| {
            Ok(one(
                tx,
                "SELECT p.bytes FROM packages p WHERE p.sha256 = ?1 AND EXISTS (
                    SELECT 1 FROM deployment_hubs dh JOIN deployments d ON d.id = dh.deployment
                    WHERE dh.hub = ?2 AND d.package = ?1 AND dh.started_ms IS NOT NULL)",
                &[sha256.into(), hub.into()],
            )?
            .map(|r| r.opt_blob(0))
            .transpose()?
            .flatten())
        })
    }

    /// A deployment's sealed secrets, for `hub` only if it was sent that
    /// deployment. Outer None: not its deployment; inner: it has none.
    pub fn secrets_for_hub(
        &self,
        hub: &str,
        id: i64,
    ) -> Result<Option<Option<Vec<u8>>>, StoreError> {
        self.db.transaction(|tx| {
            one(
                tx,
                "SELECT d.secrets FROM deployments d JOIN deployment_hubs dh ON dh.deployment = d.id
                 WHERE d.id = ?1 AND dh.hub = ?2 AND dh.started_ms IS NOT NULL",
                &[id.into(), hub.into()],
            )?
            .map(|r| r.opt_blob(0))
            .transpose()
        })
    }

    /// Records a deployment and starts its rollout; its id.
    pub fn create_deployment(&self, d: &NewDeployment, now_ms: i64) -> Result<i64, StoreError> {
        self.db.transaction(|tx| {
            if package_record(tx, &d.package)?.is_none() {
                return Err(StoreError::UnknownPackage(d.package.clone()));
            }
            let hubs: Vec<String> = match &d.target {
                Target::Hub(name) => {
                    if one(tx, "SELECT name FROM hubs WHERE name = ?1", &[name.into()])?.is_none() {
                        return Err(StoreError::UnknownHub(name.clone()));
                    }
                    vec![name.clone()]
                }
                Target::Group(g) => {
                    lock_membership(tx)?;
                    tx
                    .query(&format!("SELECT {HUB_COLUMNS} FROM hubs ORDER BY name"), &[])?
                    .iter()
                    .map(hub_record)
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .filter(|h| h.groups.contains(g))
                    .map(|h| h.name)
                    .collect()
                }
            };
            let id = one(
                tx,
                "INSERT INTO deployments (target_kind, target, package, secrets, rollout_batch, max_failures_pct, state, reason, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'rolling_out', '', ?7) RETURNING id",
                &[
                    d.target.kind().into(),
                    d.target.name().into(),
                    (&d.package).into(),
                    d.secrets.clone().into(),
                    d.rollout_batch.into(),
                    d.max_failures_pct.into(),
                    now_ms.into(),
                ],
            )?
            .ok_or_else(|| StoreError::Schema("INSERT returned no id".into()))?
            .int(0)?;
            for (seq, hub) in hubs.iter().enumerate() {
                tx.exec(
                    "INSERT INTO deployment_hubs (deployment, hub, seq, status, reason, updated_ms)
                     VALUES (?1, ?2, ?3, 'pending', 'waiting for its turn in the rollout', ?4)",
                    &[id.into(), hub.into(), (seq as i64).into(), now_ms.into()],
                )?;
            }
            advance(tx, id, now_ms)?;
            Ok(id)
        })
    }

    /// Deployments, newest first, at most `limit`.
    pub fn deployments(&self, limit: i64) -> Result<Vec<DeploymentRecord>, StoreError> {
        self.db.transaction(|tx| {
            tx.query(
                &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY id DESC LIMIT ?1"),
                &[limit.into()],
            )?
            .iter()
            .map(deployment_record)
            .collect()
        })
    }

    /// One deployment and every hub's place in it.
    pub fn deployment(
        &self,
        id: i64,
    ) -> Result<Option<(DeploymentRecord, Vec<HubStatus>)>, StoreError> {
        self.db.transaction(|tx| {
            let Some(d) = one(
                tx,
                &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ?1"),
                &[id.into()],
            )?
            else {
                return Ok(None);
            };
            let d = deployment_record(&d)?;
            let hubs = hub_statuses(tx, id)?;
            Ok(Some((d, hubs)))
        })
    }

    /// Ends the turn of every hub of deployment `id` that was sent it and
    /// has not moved for `timeout_ms` (away, or stuck): `timed_out`,
    /// counted as a failure, its batch place given to the next hub. A late
    /// report from it is still taken. Then the rollout steps.
    pub fn time_out(&self, id: i64, timeout_ms: i64, now_ms: i64) -> Result<usize, StoreError> {
        self.db.transaction(|tx| {
            tx.lock_row("deployments", "id", id.into())?;
            let n = tx.exec(
                "UPDATE deployment_hubs SET status = 'timed_out', reason = ?3, updated_ms = ?4
                 WHERE deployment = ?1 AND started_ms IS NOT NULL AND updated_ms < ?2
                   AND status IN ('pending', 'downloading', 'applying', 'checking')",
                &[
                    id.into(),
                    (now_ms - timeout_ms).into(),
                    format!(
                        "no word from the hub for {} s (--rollout-hub-timeout-s): its place in the rollout went to the next hub; it applies the deployment when it returns",
                        timeout_ms / 1000
                    )
                    .into(),
                    now_ms.into(),
                ],
            )? as usize;
            if n > 0 {
                tracing::warn!(deployment = id, hubs = n, "hubs timed out in a rollout");
                tx.notify(&format!("deployment:{id}"));
            }
            advance(tx, id, now_ms)?;
            Ok(n)
        })
    }

    /// The ids of deployments still rolling out (resumed at start).
    pub fn rolling_out(&self) -> Result<Vec<i64>, StoreError> {
        self.db.transaction(|tx| {
            tx.query(
                "SELECT id FROM deployments WHERE state = 'rolling_out'",
                &[],
            )?
            .iter()
            .map(|r| r.int(0))
            .collect()
        })
    }

    /// Runs one step of a deployment's rollout.
    pub fn advance(&self, id: i64, now_ms: i64) -> Result<(), StoreError> {
        self.db.transaction(|tx| advance(tx, id, now_ms))
    }

    /// A hub's report of where it is: merged into its shadow's `reported`
    /// and, when it names a deployment the hub is in, that hub's status
    /// there (a final status is not changed again); the rollout then moves
    /// on.
    pub fn report(&self, hub: &str, reported: &Value, now_ms: i64) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
            if one(tx, "SELECT name FROM hubs WHERE name = ?1", &[hub.into()])?.is_none() {
                return Err(StoreError::UnknownHub(hub.to_owned()));
            }
            let reported = &sanitize_report(reported);
            update_shadow(tx, hub, json!({"state": {"reported": reported}}), now_ms)?;
            let (Some(id), Some(status)) = (reported["deployment"].as_i64(), reported["status"].as_str())
            else {
                return Ok(());
            };
            if !STATUSES.contains(&status) {
                return Err(StoreError::Refused(format!("{status:?} is not a deployment status")));
            }
            let reason: String = reported["reason"].as_str().unwrap_or("").chars().take(2000).collect();
            tx.lock_row("deployments", "id", id.into())?;
            let changed = tx.exec(
                "UPDATE deployment_hubs SET status = ?3, reason = ?4, updated_ms = ?5
                 WHERE deployment = ?1 AND hub = ?2 AND started_ms IS NOT NULL
                   AND status NOT IN ('succeeded', 'failed', 'rolled_back', 'superseded', 'cancelled')",
                &[id.into(), hub.into(), status.into(), reason.into(), now_ms.into()],
            )?;
            if changed > 0 {
                tx.notify(&format!("deployment:{id}"));
                // Only a hub finishing frees a place in its batch or counts
                // against the failure bound: the rollout step (which reads
                // every row of the deployment) is for those reports alone.
                if terminal(status) {
                    advance(tx, id, now_ms)?;
                }
            }
            Ok(())
        })
    }

    /// A hub's shadow record (`roost-deployment` and, later, others).
    pub fn shadow(&self, hub: &str, name: &str) -> Result<ShadowRecord, StoreError> {
        self.db.transaction(|tx| load_shadow(tx, hub, name))
    }

    /// Every hub's `roost-deployment` shadow, by hub.
    pub fn deployment_shadows(&self) -> Result<Vec<(String, ShadowRecord)>, StoreError> {
        self.db.transaction(|tx| {
            tx.query(
                "SELECT hub, record FROM shadows WHERE name = ?1 ORDER BY hub",
                &[DEPLOYMENT_SHADOW.into()],
            )?
            .iter()
            .map(|r| {
                let rec = ShadowRecord::from_stored(&r.text(1)?)
                    .map_err(|e| StoreError::Schema(e.to_string()))?;
                Ok((r.text(0)?, rec))
            })
            .collect()
        })
    }
}

/// What a hub's report may put in its shadow: the agent's fields, each
/// of its type and bounded, so a hostile hub cannot fill the shadow (and
/// so block the desired state the fleet writes there) or plant other keys.
fn sanitize_report(reported: &Value) -> Value {
    let text = |v: &Value, max: usize| -> Value {
        v.as_str().map_or(Value::Null, |s| {
            Value::String(s.chars().take(max).collect())
        })
    };
    let int = |v: &Value| v.as_i64().map_or(Value::Null, Value::from);
    let drift = match &reported["drift"] {
        Value::Object(d) => json!({
            "local_deployment": int(d.get("local_deployment").unwrap_or(&Value::Null)),
            "at_ms": int(d.get("at_ms").unwrap_or(&Value::Null)),
            "reason": text(d.get("reason").unwrap_or(&Value::Null), 500),
        }),
        _ => Value::Null,
    };
    json!({
        "deployment": int(&reported["deployment"]),
        "status": text(&reported["status"], 32),
        "reason": text(&reported["reason"], 2000),
        "applied": int(&reported["applied"]),
        "local_deployment": int(&reported["local_deployment"]),
        "drift": drift,
    })
}

/// Serializes who is in which group against deployments to groups, so a
/// hub added while a group deployment is made is in it either way.
fn lock_membership(tx: &mut dyn Tx) -> Result<(), StoreError> {
    tx.exec(
        "INSERT INTO fleet (key, value) VALUES ('membership', '') ON CONFLICT DO NOTHING",
        &[],
    )?;
    tx.lock_row("fleet", "key", "membership".into())
}

fn package_record(tx: &mut dyn Tx, sha256: &str) -> Result<Option<PackageRecord>, StoreError> {
    one(
        tx,
        "SELECT sha256, size, signature, manifest, created_ms FROM packages WHERE sha256 = ?1",
        &[sha256.into()],
    )?
    .map(|r| {
        Ok(PackageRecord {
            sha256: r.text(0)?,
            size: r.int(1)?,
            signature: r.text(2)?,
            manifest: r.text(3)?,
            created_ms: r.int(4)?,
        })
    })
    .transpose()
}

fn hub_statuses(tx: &mut dyn Tx, id: i64) -> Result<Vec<HubStatus>, StoreError> {
    tx.query(
        "SELECT hub, status, reason, started_ms, updated_ms FROM deployment_hubs WHERE deployment = ?1 ORDER BY seq",
        &[id.into()],
    )?
    .iter()
    .map(|r| {
        Ok(HubStatus {
            hub: r.text(0)?,
            status: r.text(1)?,
            reason: r.text(2)?,
            started_ms: r.opt_int(3)?,
            updated_ms: r.int(4)?,
        })
    })
    .collect()
}

fn shadow_limits() -> Limits {
    Limits {
        max_state_bytes: 64 * 1024,
        ..Limits::default()
    }
}

fn load_shadow(tx: &mut dyn Tx, hub: &str, name: &str) -> Result<ShadowRecord, StoreError> {
    match one(
        tx,
        "SELECT record FROM shadows WHERE hub = ?1 AND name = ?2",
        &[hub.into(), name.into()],
    )? {
        None => Ok(ShadowRecord::new()),
        Some(r) => {
            ShadowRecord::from_stored(&r.text(0)?).map_err(|e| StoreError::Schema(e.to_string()))
        }
    }
}

/// Applies a shadow update document to a hub's `roost-deployment`.
fn update_shadow(
    tx: &mut dyn Tx,
    hub: &str,
    update: Value,
    now_ms: i64,
) -> Result<ShadowRecord, StoreError> {
    tx.lock_row("hubs", "name", hub.into())?;
    let old = load_shadow(tx, hub, DEPLOYMENT_SHADOW)?;
    let limits = shadow_limits();
    let request = roost_shadows::parse_update(update.to_string().as_bytes(), &limits)
        .map_err(|e| StoreError::Refused(format!("not a shadow update: {}", e.message())))?;
    let outcome = old
        .update(&request, &limits, (now_ms / 1000) as u64)
        .map_err(|e| {
            StoreError::Refused(format!("the shadow refused the update: {}", e.message()))
        })?;
    tx.exec(
        "INSERT INTO shadows (hub, name, record) VALUES (?1, ?2, ?3)
         ON CONFLICT (hub, name) DO UPDATE SET record = excluded.record",
        &[
            hub.into(),
            DEPLOYMENT_SHADOW.into(),
            outcome.record.to_stored().into(),
        ],
    )?;
    Ok(outcome.record)
}

/// The deployment id a hub's shadow desires, if any.
fn desired_deployment(tx: &mut dyn Tx, hub: &str) -> Result<Option<i64>, StoreError> {
    let rec = load_shadow(tx, hub, DEPLOYMENT_SHADOW)?;
    Ok(rec
        .document
        .as_ref()
        .and_then(|d| d.desired.as_ref())
        .and_then(|s| s.state.get("deployment"))
        .and_then(|v| v.as_i64()))
}

/// One step of a deployment's rollout, under its row lock: stop it if its
/// failures are past its bound, release hubs while fewer than its batch
/// are in progress, and mark it done once every hub has finished. A hub
/// whose shadow already desires a newer deployment is `superseded` here
/// rather than sent back in time; a hub released here supersedes its
/// older unfinished deployments.
pub(crate) fn advance(tx: &mut dyn Tx, id: i64, now_ms: i64) -> Result<(), StoreError> {
    let mut work = vec![id];
    let mut seen = BTreeSet::new();
    while let Some(id) = work.pop() {
        if !seen.insert(id) {
            continue;
        }
        tx.lock_row("deployments", "id", id.into())?;
        let Some(d) = one(
            tx,
            &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ?1"),
            &[id.into()],
        )?
        else {
            continue;
        };
        let d = deployment_record(&d)?;
        if d.state != "rolling_out" {
            continue;
        }
        let rows = hub_statuses(tx, id)?;
        let total = rows.len() as i64;
        let failed = rows
            .iter()
            .filter(|r| matches!(r.status.as_str(), "failed" | "rolled_back" | "timed_out"))
            .count() as i64;
        if total > 0 && failed * 100 > d.max_failures_pct * total {
            let reason = format!(
                "stopped: {failed} of {total} hubs failed, more than --max-failures {}%; the hubs already done keep their state",
                d.max_failures_pct
            );
            tx.exec(
                "UPDATE deployments SET state = 'stopped', reason = ?2 WHERE id = ?1",
                &[id.into(), (&reason).into()],
            )?;
            tx.exec(
                "UPDATE deployment_hubs SET status = 'cancelled', reason = ?2, updated_ms = ?3
                 WHERE deployment = ?1 AND started_ms IS NULL",
                &[
                    id.into(),
                    format!("not sent: the rollout {reason}").into(),
                    now_ms.into(),
                ],
            )?;
            tracing::warn!(deployment = id, failed, total, "rollout stopped");
            tx.notify(&format!("deployment:{id}"));
            continue;
        }
        let in_flight = rows
            .iter()
            .filter(|r| r.started_ms.is_some() && !terminal(&r.status))
            .count() as i64;
        let mut slots = (d.rollout_batch - in_flight).max(0);
        let signature = package_record(tx, &d.package)?
            .map(|p| p.signature)
            .unwrap_or_default();
        let mut changed = false;
        let mut waiting: Vec<&HubStatus> = rows
            .iter()
            .filter(|r| r.started_ms.is_none() && r.status == "pending")
            .collect();
        if slots > 0 && waiting.len() as i64 > slots {
            // Connected hubs first: a batch place given to a hub that is
            // away waits for it to come back.
            let connected: BTreeSet<String> = tx
                .query("SELECT name FROM hubs WHERE connected_ms IS NOT NULL", &[])?
                .iter()
                .map(|r| r.text(0))
                .collect::<Result<_, _>>()?;
            waiting.sort_by_key(|r| !connected.contains(&r.hub));
        }
        for r in waiting {
            if slots == 0 {
                break;
            }
            changed = true;
            // Locked before its desired state is read, so a newer
            // deployment committed meanwhile is seen, never overwritten.
            tx.lock_row("hubs", "name", (&r.hub).into())?;
            if desired_deployment(tx, &r.hub)?.is_some_and(|newer| newer > id) {
                tx.exec(
                    "UPDATE deployment_hubs SET status = 'superseded', reason = 'the hub already has a newer deployment', updated_ms = ?3
                     WHERE deployment = ?1 AND hub = ?2",
                    &[id.into(), (&r.hub).into(), now_ms.into()],
                )?;
                continue;
            }
            slots -= 1;
            let sent = update_shadow(
                tx,
                &r.hub,
                json!({"state": {"desired": {"deployment": id, "package": d.package, "signature": signature}}}),
                now_ms,
            );
            if let Err(StoreError::Refused(why)) = &sent {
                // The hub's shadow cannot take it (the shadow logic refused
                // before anything was written): this hub fails, the
                // rollout goes on.
                tx.exec(
                    "UPDATE deployment_hubs SET status = 'failed', reason = ?3, started_ms = ?4, updated_ms = ?4
                     WHERE deployment = ?1 AND hub = ?2",
                    &[
                        id.into(),
                        (&r.hub).into(),
                        format!("not sent: the hub's {DEPLOYMENT_SHADOW} shadow refused it ({why})").into(),
                        now_ms.into(),
                    ],
                )?;
                // It took no place in the batch; step again to count it
                // against the bound.
                slots += 1;
                work.push(id);
                seen.remove(&id);
                continue;
            }
            sent?;
            tx.exec(
                "UPDATE deployment_hubs SET reason = 'sent; waiting for the hub to take it', started_ms = ?3, updated_ms = ?3
                 WHERE deployment = ?1 AND hub = ?2",
                &[id.into(), (&r.hub).into(), now_ms.into()],
            )?;
            // Its older unfinished deployments end here.
            let older: Vec<i64> = tx
                .query(
                    "SELECT deployment FROM deployment_hubs WHERE hub = ?1 AND deployment < ?2
                     AND status NOT IN ('succeeded', 'failed', 'rolled_back', 'superseded', 'cancelled')",
                    &[(&r.hub).into(), id.into()],
                )?
                .iter()
                .map(|r| r.int(0))
                .collect::<Result<_, _>>()?;
            for old in older {
                tx.exec(
                    "UPDATE deployment_hubs SET status = 'superseded', reason = ?3, updated_ms = ?4
                     WHERE deployment = ?1 AND hub = ?2",
                    &[
                        old.into(),
                        (&r.hub).into(),
                        format!("superseded by deployment {id}").into(),
                        now_ms.into(),
                    ],
                )?;
                tx.notify(&format!("deployment:{old}"));
                work.push(old);
            }
            tx.notify(&format!("desired:{}", r.hub));
        }
        let rows = if changed { hub_statuses(tx, id)? } else { rows };
        if rows.iter().all(|r| terminal(&r.status)) {
            let ok = rows.iter().filter(|r| r.status == "succeeded").count();
            tx.exec(
                "UPDATE deployments SET state = 'done', reason = ?2 WHERE id = ?1",
                &[
                    id.into(),
                    format!("{ok} of {} hubs succeeded", rows.len()).into(),
                ],
            )?;
            changed = true;
        }
        if changed {
            tx.notify(&format!("deployment:{id}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("cloud.db")).unwrap();
        (dir, Store::new(db))
    }

    /// Runs each named test (a `fn(&Store)`) twice: `NAME::sqlite` on a
    /// fresh SQLite file, and `NAME::postgres` on a fresh database of the
    /// server `ROOST_TEST_POSTGRES` names (with `CI=true` and no server,
    /// that half fails rather than skips).
    macro_rules! on_both {
        ($($name:ident),* $(,)?) => {$(
            mod $name {
                #[test]
                fn sqlite() {
                    let (_dir, s) = super::sqlite_store();
                    super::$name(&s);
                }
                #[test]
                fn postgres() {
                    let Some(db) = crate::db::testpg::TestDb::new() else {
                        return;
                    };
                    let s = super::Store::new(crate::db::Db::open_postgres(&db.url).unwrap());
                    super::$name(&s);
                }
            }
        )*};
    }

    on_both!(
        a_token_works_once_and_not_after_it_expires,
        a_rollout_goes_batch_by_batch_and_finishes,
        failures_past_the_bound_stop_the_rollout,
        a_newer_deployment_supersedes_and_an_older_one_never_goes_back,
        a_hub_that_joins_a_group_gets_its_current_deployment,
        a_removed_hub_leaves_its_rollouts_and_is_announced,
        the_fleet_values_are_made_once,
        a_hostile_report_cannot_fill_the_shadow_or_block_the_next_deployment,
        a_batch_goes_to_connected_hubs_first_and_a_stale_session_does_not_disconnect,
        a_hub_silent_past_the_timeout_gives_up_its_place_and_is_still_heard,
    );

    fn a_hub_silent_past_the_timeout_gives_up_its_place_and_is_still_heard(s: &Store) {
        s.add_hub(&hub("a", &["g"]), "ta", 100).unwrap();
        s.add_hub(&hub("b", &["g"]), "tb", 100).unwrap();
        package(s, "p1");
        let id = deploy(s, Target::Group("g".into()), "p1", 1, 100);
        let first = s
            .deployment(id)
            .unwrap()
            .unwrap()
            .1
            .into_iter()
            .find(|h| h.started_ms.is_some())
            .unwrap()
            .hub;
        let second = if first == "a" { "b" } else { "a" };
        // Not yet past the timeout: nothing moves.
        assert_eq!(s.time_out(id, 1000, 500).unwrap(), 0);
        assert_eq!(started(s, id), 1);
        // Past it: the silent hub is timed out, the next one is sent it.
        assert_eq!(s.time_out(id, 1000, 5000).unwrap(), 1);
        assert_eq!(started(s, id), 2);
        report(s, second, id, "succeeded");
        let d = s.deployment(id).unwrap().unwrap();
        assert_eq!(d.0.state, "done");
        // The late hub's success is still recorded.
        report(s, &first, id, "succeeded");
        let st = statuses(s, id);
        assert!(st.iter().all(|(_, x)| x == "succeeded"), "{st:?}");
    }

    fn a_batch_goes_to_connected_hubs_first_and_a_stale_session_does_not_disconnect(s: &Store) {
        for h in ["a", "b", "c"] {
            s.add_hub(&hub(h, &["g"]), &format!("t{h}"), 100).unwrap();
        }
        s.set_connected("c", true, 5).unwrap();
        package(s, "p1");
        let id = deploy(s, Target::Group("g".into()), "p1", 1, 100);
        let sent: Vec<String> = s
            .deployment(id)
            .unwrap()
            .unwrap()
            .1
            .into_iter()
            .filter(|h| h.started_ms.is_some())
            .map(|h| h.hub)
            .collect();
        assert_eq!(sent, ["c"], "the connected hub takes the batch's place");
        // c reconnects (another session, at 7); the old one's end at 5
        // leaves it connected.
        s.set_connected("c", true, 7).unwrap();
        s.set_disconnected("c", 5, 8).unwrap();
        let c = s
            .hubs()
            .unwrap()
            .into_iter()
            .find(|h| h.name == "c")
            .unwrap();
        assert_eq!(c.connected_ms, Some(7));
        s.set_disconnected("c", 7, 9).unwrap();
        let c = s
            .hubs()
            .unwrap()
            .into_iter()
            .find(|h| h.name == "c")
            .unwrap();
        assert_eq!(c.connected_ms, None);
    }

    fn a_hostile_report_cannot_fill_the_shadow_or_block_the_next_deployment(s: &Store) {
        s.add_hub(&hub("a", &["g"]), "ta", 100).unwrap();
        s.add_hub(&hub("b", &["g"]), "tb", 100).unwrap();
        package(s, "p1");
        let id = deploy(s, Target::Group("g".into()), "p1", 1, 100);
        // Batch 1: one hub was sent it; that one turns hostile.
        let hostile = s
            .deployment(id)
            .unwrap()
            .unwrap()
            .1
            .into_iter()
            .find(|h| h.started_ms.is_some())
            .unwrap()
            .hub;
        // Huge, and with keys of its own: only the agent's fields, bounded.
        let blob = "x".repeat(60_000);
        s.report(
            &hostile,
            &json!({"deployment": id, "status": "downloading", "reason": blob,
                    "junk": blob, "applied": "not a number", "drift": {"reason": blob, "x": 1}}),
            20,
        )
        .unwrap();
        let doc = s.shadow(&hostile, DEPLOYMENT_SHADOW).unwrap().to_stored();
        assert!(doc.len() < 8_000, "the shadow holds {} bytes", doc.len());
        assert!(!doc.contains("junk"));
        // The fleet can still write the next desired state there.
        package(s, "p2");
        let next = deploy(s, Target::Hub(hostile.clone()), "p2", 1, 100);
        assert_eq!(started(s, next), 1);
    }

    fn hub(name: &str, groups: &[&str]) -> HubRecord {
        HubRecord {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            created_ms: 1,
            enrolled_ms: None,
            connected_ms: None,
            last_seen_ms: None,
        }
    }

    fn package(s: &Store, sha: &str) {
        s.put_package(
            &PackageRecord {
                sha256: sha.into(),
                size: 3,
                signature: "sig".into(),
                manifest: String::new(),
                created_ms: 1,
            },
            b"pkg",
        )
        .unwrap();
    }

    fn deploy(s: &Store, target: Target, sha: &str, batch: i64, pct: i64) -> i64 {
        s.create_deployment(
            &NewDeployment {
                target,
                package: sha.into(),
                secrets: None,
                rollout_batch: batch,
                max_failures_pct: pct,
            },
            10,
        )
        .unwrap()
    }

    fn statuses(s: &Store, id: i64) -> Vec<(String, String)> {
        s.deployment(id)
            .unwrap()
            .unwrap()
            .1
            .into_iter()
            .map(|h| (h.hub, h.status))
            .collect()
    }

    fn started(s: &Store, id: i64) -> usize {
        s.deployment(id)
            .unwrap()
            .unwrap()
            .1
            .iter()
            .filter(|h| h.started_ms.is_some())
            .count()
    }

    fn report(s: &Store, hub: &str, id: i64, status: &str) {
        s.report(
            hub,
            &json!({"deployment": id, "status": status, "reason": "r"}),
            20,
        )
        .unwrap();
    }

    #[test]
    fn migrations_run_once_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let s = Store::new(Db::open_sqlite(&path).unwrap());
        assert_eq!(s.schema_version().unwrap(), crate::db::known_version());
        s.add_hub(&hub("a", &[]), "h1", 100).unwrap();
        drop(s);
        let s = Store::new(Db::open_sqlite(&path).unwrap());
        assert_eq!(s.hubs().unwrap().len(), 1);
        s.db.force_schema_version(99);
        drop(s);
        assert!(matches!(
            Db::open_sqlite(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    fn a_token_works_once_and_not_after_it_expires(s: &Store) {
        s.add_hub(&hub("a", &["eu"]), "ta", 100).unwrap();
        s.add_hub(&hub("b", &["eu"]), "tb", 100).unwrap();
        assert!(matches!(
            s.add_hub(&hub("a", &[]), "tc", 100),
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
        assert_eq!(s.public_key("a").unwrap().as_deref(), Some("key"));
        assert!(s.remove_hub("a").unwrap());
        assert!(!s.remove_hub("a").unwrap());
        assert_eq!(s.hubs().unwrap().len(), 1);
    }

    fn a_rollout_goes_batch_by_batch_and_finishes(s: &Store) {
        for n in ["a", "b", "c"] {
            s.add_hub(&hub(n, &["eu"]), n, 100).unwrap();
        }
        package(s, "p1");
        let id = deploy(s, Target::Group("eu".into()), "p1", 2, 100);
        assert_eq!(started(s, id), 2);
        // Each released hub's shadow desires the deployment.
        let rec = s.shadow("a", DEPLOYMENT_SHADOW).unwrap();
        assert_eq!(rec.delta().unwrap()["deployment"], id);
        assert!(s.package_for_hub("a", "p1").unwrap().is_some());
        assert!(
            s.package_for_hub("c", "p1").unwrap().is_none(),
            "not released to c yet"
        );
        report(s, "a", id, "downloading");
        assert_eq!(started(s, id), 2);
        report(s, "a", id, "succeeded");
        assert_eq!(started(s, id), 3);
        report(s, "b", id, "succeeded");
        report(s, "c", id, "succeeded");
        let (d, _) = s.deployment(id).unwrap().unwrap();
        assert_eq!(d.state, "done");
        // A final status is not changed again.
        report(s, "c", id, "failed");
        assert_eq!(statuses(s, id)[2].1, "succeeded");
    }

    fn failures_past_the_bound_stop_the_rollout(s: &Store) {
        for n in ["a", "b", "c", "d"] {
            s.add_hub(&hub(n, &["eu"]), n, 100).unwrap();
        }
        package(s, "p1");
        let id = deploy(s, Target::Group("eu".into()), "p1", 1, 25);
        report(s, "a", id, "succeeded");
        report(s, "b", id, "rolled_back");
        // 1 of 4 is 25 %, not past it: the rollout goes on.
        assert_eq!(s.deployment(id).unwrap().unwrap().0.state, "rolling_out");
        report(s, "c", id, "failed");
        let (d, hubs) = s.deployment(id).unwrap().unwrap();
        assert_eq!(d.state, "stopped");
        assert_eq!(hubs[3].status, "cancelled");
        assert_eq!(hubs[0].status, "succeeded", "done hubs keep their state");
        assert!(s.shadow("d", DEPLOYMENT_SHADOW).unwrap().document.is_none());
    }

    fn a_newer_deployment_supersedes_and_an_older_one_never_goes_back(s: &Store) {
        s.add_hub(&hub("a", &["eu"]), "a", 100).unwrap();
        s.add_hub(&hub("b", &["eu"]), "b", 100).unwrap();
        package(s, "p1");
        package(s, "p2");
        let old = deploy(s, Target::Group("eu".into()), "p1", 1, 100);
        let new = deploy(s, Target::Hub("b".into()), "p2", 1, 100);
        // b gets the new one now; when the old rollout reaches b it is
        // superseded there rather than sent back.
        report(s, "a", old, "succeeded");
        assert_eq!(
            statuses(s, old),
            vec![
                ("a".into(), "succeeded".into()),
                ("b".into(), "superseded".into())
            ]
        );
        assert_eq!(s.deployment(old).unwrap().unwrap().0.state, "done");
        let rec = s.shadow("b", DEPLOYMENT_SHADOW).unwrap();
        assert_eq!(rec.delta().unwrap()["deployment"], new);
        // A newer one to a hub whose older one is in progress ends it.
        let newest = deploy(s, Target::Hub("a".into()), "p2", 1, 100);
        report(s, "a", newest, "downloading");
        let third = deploy(s, Target::Hub("a".into()), "p1", 1, 100);
        assert_eq!(statuses(s, newest)[0].1, "superseded");
        assert_eq!(s.deployment(newest).unwrap().unwrap().0.state, "done");
        assert_eq!(
            s.shadow("a", DEPLOYMENT_SHADOW).unwrap().delta().unwrap()["deployment"],
            third
        );
    }

    fn a_hub_that_joins_a_group_gets_its_current_deployment(s: &Store) {
        s.add_hub(&hub("a", &["eu"]), "a", 100).unwrap();
        package(s, "p1");
        let id = deploy(s, Target::Group("eu".into()), "p1", 5, 100);
        report(s, "a", id, "succeeded");
        assert_eq!(s.deployment(id).unwrap().unwrap().0.state, "done");
        s.add_hub(&hub("late", &["eu", "us"]), "late", 100).unwrap();
        let (d, hubs) = s.deployment(id).unwrap().unwrap();
        assert_eq!(d.state, "rolling_out");
        assert_eq!(hubs[1].hub, "late");
        assert!(hubs[1].started_ms.is_some());
        assert!(s.package_for_hub("late", "p1").unwrap().is_some());
    }

    fn a_removed_hub_leaves_its_rollouts_and_is_announced(s: &Store) {
        s.add_hub(&hub("a", &["eu"]), "a", 100).unwrap();
        s.add_hub(&hub("b", &["eu"]), "b", 100).unwrap();
        package(s, "p1");
        let mut events = s.db.events();
        let id = deploy(s, Target::Group("eu".into()), "p1", 1, 100);
        report(s, "b", id, "downloading"); // not released to b: ignored
        assert_eq!(statuses(s, id)[1].1, "pending");
        assert!(s.remove_hub("a").unwrap());
        // b is released once a is gone.
        assert!(s.package_for_hub("b", "p1").unwrap().is_some());
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(e);
        }
        assert!(seen.contains(&"removed:a".to_string()), "{seen:?}");
        assert!(seen.contains(&"desired:b".to_string()), "{seen:?}");
        assert!(matches!(
            s.create_deployment(
                &NewDeployment {
                    target: Target::Hub("a".into()),
                    package: "p1".into(),
                    secrets: None,
                    rollout_batch: 1,
                    max_failures_pct: 100
                },
                1
            ),
            Err(StoreError::UnknownHub(_))
        ));
        assert!(matches!(
            s.create_deployment(
                &NewDeployment {
                    target: Target::Hub("b".into()),
                    package: "nope".into(),
                    secrets: None,
                    rollout_batch: 1,
                    max_failures_pct: 100
                },
                1
            ),
            Err(StoreError::UnknownPackage(_))
        ));
    }

    fn the_fleet_values_are_made_once(s: &Store) {
        let a = s.fleet_value("k", || "first".into()).unwrap();
        let b = s.fleet_value("k", || "second".into()).unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("first", "first"));
    }
}
