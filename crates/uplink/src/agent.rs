//! The deployment agent: takes the latest desired deployment, fetches its
//! package, checks its hash and the fleet's signature before anything is
//! unpacked, applies it through the same code path as a local `roost
//! deploy` (atomic: all of it or none), runs its health check and, when
//! that fails, rolls the hub back by itself. Each step is reported:
//! `downloading → applying → checking → succeeded`, or `failed` /
//! `rolled_back` with a reason a person can act on.
//!
//! Never wedged: only the latest desired deployment is worked on, and a
//! newer one arriving mid-download or mid-check ends the older one there.
//! What the agent applied is kept in `DATA_DIR/cloud-deployment.json`
//! (written atomically), with the attempt under way, so a hub killed
//! mid-apply knows on restart whether it came back on the old deployment
//! or the new one, says which, and finishes the job.

use crate::{Desired, Link};
use anyhow::Result;
use roost_hub::DeployError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;

const STATE_FILE: &str = "cloud-deployment.json";

/// A fleet deployment as this hub runs it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
struct Applied {
    /// The cloud's deployment id.
    deployment: i64,
    /// The hub's own deployment id for it.
    local: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
struct State {
    /// The fleet deployment running now, if any.
    applied: Option<Applied>,
    /// The one before it: what a rollback returns to.
    previous: Option<Applied>,
    /// A deployment being applied: recorded before the switch, cleared
    /// once it is applied or refused.
    attempt: Option<Attempt>,
    /// The last desired deployment this hub finished with (whatever the
    /// outcome): not tried again unless the cloud asks anew.
    done: Option<i64>,
    /// The last report, sent again after every reconnect.
    reported: Value,
    /// A local deployment forced past the fleet (`roost deploy --force`).
    drift: Option<Value>,
    /// The local deployment the agent itself last put in place (by apply
    /// or rollback): any other is drift.
    #[serde(default)]
    expected_local: Option<i64>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Attempt {
    deployment: i64,
    /// The hub's active deployment before it.
    local_before: Option<i64>,
}

pub(crate) struct Agent {
    link: Arc<Link>,
    state: State,
}

/// Why an attempt ended early.
enum Stop {
    /// A newer deployment is desired: drop this one.
    Superseded,
    /// It failed; the running deployment is unchanged.
    Failed(String),
    /// The cloud could not be reached or answered 5xx/429: try again.
    Retry(String),
}

/// The longest wait between two tries of a fetch the network failed.
const MAX_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

impl Agent {
    pub fn load(link: Arc<Link>) -> Result<Agent> {
        let path = link.options.data_dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cloud-deployment.json is damaged; starting afresh (the cloud's desired deployment is applied again)");
                State::default()
            }),
            Err(_) => State::default(),
        };
        Ok(Agent { link, state })
    }

    fn save(&self) {
        let path = self.link.options.data_dir.join(STATE_FILE);
        match serde_json::to_vec_pretty(&self.state) {
            Ok(b) => {
                if let Err(e) = roost_fleet::write_private(&path, &b) {
                    tracing::error!(error = %e, "cannot write cloud-deployment.json");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode the agent's state"),
        }
    }

    fn active_local(&self) -> Option<i64> {
        self.link.hub.active_manifest().map(|(id, _)| id)
    }

    /// Sends (and keeps) a report for deployment `id`.
    fn report(&mut self, id: i64, status: &str, reason: impl Into<String>) {
        let reason = reason.into();
        match status {
            "failed" | "rolled_back" => {
                tracing::warn!(deployment = id, status, %reason, "fleet deployment")
            }
            _ => tracing::info!(deployment = id, status, %reason, "fleet deployment"),
        }
        self.state.reported = json!({
            "deployment": id,
            "status": status,
            "reason": reason,
            "applied": self.state.applied.map(|a| a.deployment),
            "local_deployment": self.active_local(),
            "drift": self.state.drift,
        });
        self.save();
        self.link.reported.send_replace(self.state.reported.clone());
    }

    pub async fn run(mut self) {
        self.recover().await;
        if !self.state.reported.is_null() {
            self.link.reported.send_replace(self.state.reported.clone());
        }
        let mut desired = self.link.desired.subscribe();
        let mut local = self.link.hub.watch_deployment();
        local.borrow_and_update();
        loop {
            let want = desired.borrow_and_update().clone();
            if let Some(d) = want {
                if self.state.done != Some(d.deployment) {
                    self.apply(d, &mut desired).await;
                    continue;
                }
            }
            tokio::select! {
                r = desired.changed() => if r.is_err() { return },
                r = local.changed() => {
                    if r.is_err() { return }
                    let now = *local.borrow_and_update();
                    self.check_drift(now);
                }
            }
        }
    }

    /// A local deployment the agent did not make is drift: reported, and
    /// left alone until the cloud sends a new deployment.
    fn check_drift(&mut self, now: Option<i64>) {
        let ours = self
            .state
            .expected_local
            .or(self.state.applied.map(|a| a.local));
        if now.is_none() || now == ours || self.state.attempt.is_some() {
            return;
        }
        tracing::warn!(local_deployment = ?now, "a local deployment was forced on this fleet hub; the cloud is told (drift)");
        self.state.drift = Some(json!({
            "local_deployment": now,
            "at_ms": now_ms(),
            "reason": "a local `roost deploy --force` replaced the fleet's deployment",
        }));
        let (id, status, reason) = (
            self.state.reported["deployment"].as_i64().unwrap_or(0),
            self.state.reported["status"]
                .as_str()
                .unwrap_or("succeeded")
                .to_owned(),
            "drift: a local deployment was forced on this hub".to_owned(),
        );
        self.report(id, &status, reason);
    }

    /// After a restart: finish what a kill interrupted.
    async fn recover(&mut self) {
        let Some(attempt) = self.state.attempt else {
            return;
        };
        let active = self.active_local();
        self.state.attempt = None;
        if active == attempt.local_before {
            self.state.done = None;
            self.report(
                attempt.deployment,
                "pending",
                format!(
                    "the hub restarted while applying deployment {} and came back on the one before it (local deployment {:?}); it tries again",
                    attempt.deployment, attempt.local_before
                ),
            );
        } else if let Some(local) = active {
            // The switch happened: it runs the new one, not yet checked
            // (killed while applying or while checking). Check it now,
            // without applying it again, and roll back if it fails.
            if self.state.applied.map(|a| a.deployment) != Some(attempt.deployment) {
                self.state.previous = self.state.applied;
            }
            self.state.applied = Some(Applied {
                deployment: attempt.deployment,
                local,
            });
            self.state.expected_local = Some(local);
            self.state.attempt = Some(attempt);
            self.report(
                attempt.deployment,
                "checking",
                format!("the hub restarted while applying deployment {} and came back on it (local deployment {local}); checking its health", attempt.deployment),
            );
            self.check(attempt.deployment, &mut self.link.desired.subscribe())
                .await;
        }
    }

    async fn apply(
        &mut self,
        d: Desired,
        desired: &mut tokio::sync::watch::Receiver<Option<Desired>>,
    ) {
        let id = d.deployment;
        if self.state.drift.is_some() {
            // A new fleet deployment replaces what was forced locally.
            self.state.drift = None;
        }
        self.report(
            id,
            "downloading",
            format!("fetching package {}", short(&d.package)),
        );
        let mut wait = std::time::Duration::from_secs(1);
        let (upload, secrets) = loop {
            let got = match self.fetch(&d, desired).await {
                Ok(u) => self.secrets(id).await.map(|s| (u, s)),
                Err(e) => Err(e),
            };
            match got {
                Ok(v) => break v,
                Err(Stop::Superseded) => return,
                Err(Stop::Failed(why)) => return self.finish(id, "failed", why),
                Err(Stop::Retry(why)) => {
                    // The network, or a cloud restarting: not the
                    // deployment's fault. Wait and try again, unless a
                    // newer deployment comes first.
                    self.report(
                        id,
                        "downloading",
                        format!("{why}; trying again in {} s", wait.as_secs()),
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = newer_than(desired, id) => return,
                    }
                    wait = (wait * 2).min(MAX_RETRY);
                }
            }
        };
        self.report(
            id,
            "applying",
            "the package's hash and the fleet's signature match; applying it",
        );
        self.state.attempt = Some(Attempt {
            deployment: id,
            local_before: self.active_local(),
        });
        self.save();
        let result = self.link.hub.deploy_upload_with(upload, secrets).await;
        match result {
            Ok(report) => {
                // The attempt stays recorded through the check: a hub
                // killed while checking checks again at start (and rolls
                // back if it fails), never applies it twice.
                self.state.previous = self.state.applied;
                self.state.applied = Some(Applied {
                    deployment: id,
                    local: report.deployment,
                });
                self.state.expected_local = Some(report.deployment);
                self.save();
                self.report(
                    id,
                    "checking",
                    format!(
                        "applied as local deployment {}; checking its health",
                        report.deployment
                    ),
                );
                self.check(id, desired).await;
            }
            Err(e) => {
                self.state.attempt = None;
                let why =
                    match &e {
                        DeployError::Invalid(problems) => format!(
                        "this hub refused the manifest ({}); the running deployment is unchanged",
                        problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")
                    ),
                        other => format!("{other}; the running deployment is unchanged"),
                    };
                self.finish(id, "failed", why);
            }
        }
    }

    fn finish(&mut self, id: i64, status: &str, why: String) {
        self.state.done = Some(id);
        self.state.attempt = None;
        match status {
            "succeeded" => self.link.metrics.deployments_applied.inc(),
            _ => self.link.metrics.deployments_failed.inc(),
        };
        self.report(id, status, why);
    }

    /// The health check of the deployment just applied; rolls back when
    /// it fails. A newer desired deployment ends the check (it replaces
    /// this one anyway).
    async fn check(
        &mut self,
        id: i64,
        desired: &mut tokio::sync::watch::Receiver<Option<Desired>>,
    ) {
        let deadline = self.link.options.health_deadline;
        let hub = self.link.hub.clone();
        let outcome = tokio::select! {
            r = hub.health_check(deadline) => r,
            _ = newer_than(desired, id) => {
                self.state.done = Some(id);
                self.state.attempt = None;
                self.save();
                return;
            }
        };
        match outcome {
            Ok(passed) => self.finish(
                id,
                "succeeded",
                format!(
                    "running as local deployment {}; {passed}",
                    self.active_local().unwrap_or(0)
                ),
            ),
            Err(why) => match self.link.hub.rollback().await {
                Ok(r) => {
                    self.state.applied = self.state.previous.filter(|p| p.local == r.deployment);
                    self.state.previous = None;
                    self.state.expected_local = Some(r.deployment);
                    let back = match self.state.applied {
                        Some(a) => format!("fleet deployment {} (local {})", a.deployment, a.local),
                        None => format!("local deployment {}", r.deployment),
                    };
                    self.finish(id, "rolled_back", format!("{why}; rolled back to {back}"));
                }
                Err(DeployError::NothingToRollBack) => self.finish(
                    id,
                    "failed",
                    format!("{why}; there is no earlier deployment to roll back to, so it stays"),
                ),
                Err(e) => self.finish(
                    id,
                    "failed",
                    format!(
                        "{why}; rolling back failed too ({e}): fix the deployment and deploy again"
                    ),
                ),
            },
        }
    }

    /// Fetches the package into an upload, hashing as it arrives, and
    /// checks hash and signature before anything is unpacked.
    async fn fetch(
        &self,
        d: &Desired,
        desired: &mut tokio::sync::watch::Receiver<Option<Desired>>,
    ) -> Result<roost_hub::PackageUpload, Stop> {
        let Some(signing) = self.link.credential.signing_key.as_deref() else {
            return Err(Stop::Failed("this hub's credential holds no fleet signing key (enrolled with an older roost): enrol it again".into()));
        };
        if !roost_fleet::verify(
            signing,
            &roost_fleet::package_text(&d.package),
            &d.signature,
        ) {
            return Err(Stop::Failed(format!(
                "the signature of package {} is not the fleet's: nothing was fetched or applied; the running deployment is unchanged",
                short(&d.package)
            )));
        }
        let path = format!("/v1/hub/packages/{}", d.package);
        let fail = |e: String| {
            Stop::Failed(format!(
                "cannot fetch package {}: {e}; the running deployment is unchanged",
                short(&d.package)
            ))
        };
        let retry =
            |e: String| Stop::Retry(format!("cannot fetch package {}: {e}", short(&d.package)));
        let mut resp = self
            .link
            .signed_get(&path)
            .send()
            .await
            .map_err(|e| retry(format!("{e:#}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            let why = format!(
                "{} ({status})",
                body["error"]["message"]
                    .as_str()
                    .unwrap_or("the cloud refused")
            );
            return Err(if transient(status) {
                retry(why)
            } else {
                fail(why)
            });
        }
        let mut upload = self
            .link
            .hub
            .begin_upload()
            .map_err(|e| fail(e.to_string()))?;
        let mut hash = Sha256::new();
        loop {
            if newer(desired, d.deployment) {
                return Err(Stop::Superseded);
            }
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    hash.update(&chunk);
                    upload
                        .write(&chunk)
                        .await
                        .map_err(|e| fail(e.to_string()))?;
                }
                Ok(None) => break,
                Err(e) => return Err(retry(format!("{e:#}"))),
            }
        }
        let got = hex::encode(hash.finalize());
        if got != d.package {
            return Err(Stop::Failed(format!(
                "the package fetched hashes to {}, not {} as the deployment says: nothing was applied; the running deployment is unchanged",
                short(&got),
                short(&d.package)
            )));
        }
        Ok(upload)
    }

    /// The deployment's secret values, over the authenticated channel.
    async fn secrets(&self, id: i64) -> Result<Option<Vec<u8>>, Stop> {
        let resp = self
            .link
            .signed_get(&format!("/v1/hub/deployments/{id}/secrets"))
            .send()
            .await
            .map_err(|e| Stop::Retry(format!("cannot fetch deployment {id}'s secrets: {e:#}")))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let why = format!(
                "cannot fetch deployment {id}'s secrets: {} ({status})",
                body["error"]["message"].as_str().unwrap_or("refused")
            );
            return Err(if transient(status) {
                Stop::Retry(why)
            } else {
                Stop::Failed(format!("{why}; the running deployment is unchanged"))
            });
        }
        match &body["values"] {
            Value::Null => Ok(None),
            v => Ok(Some(serde_json::to_vec(v).unwrap_or_default())),
        }
    }
}

/// An answer worth trying again later: the cloud overloaded, restarting
/// or its database away. Anything else 4xx is final.
fn transient(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

/// Whether a deployment other than `id` is desired now.
fn newer(desired: &tokio::sync::watch::Receiver<Option<Desired>>, id: i64) -> bool {
    desired
        .borrow()
        .as_ref()
        .is_some_and(|d| d.deployment != id)
}

/// Resolves once a deployment other than `id` is desired.
async fn newer_than(desired: &mut tokio::sync::watch::Receiver<Option<Desired>>, id: i64) {
    loop {
        if newer(desired, id) {
            return;
        }
        if desired.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
