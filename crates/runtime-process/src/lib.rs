//! The process runtime: any executable that speaks the AWS Lambda Runtime
//! API runs as a task (unmodified `awslambdaric` handlers, a `bootstrap`
//! shell script with curl, ...).
//!
//! Each task has a pool of long-lived worker processes. A call leases a warm
//! worker (or starts one: a cold start, whose start-up does not count toward
//! the call's timeout), hands it the call through the worker's own Runtime
//! API endpoint, and returns it to the pool afterwards. Workers run in their
//! own process group with their own memory limit (see `isolation`), die with
//! the hub, and are replaced when they crash, overrun or exceed memory.
//!
//! The pool is sized by a reservation policy from anticipated demand (see
//! [`pool::target_workers`]), within the task's `min_warm`/`max_workers`.

pub mod identity;
mod isolation;
mod listener;
pub mod pool;
mod runtime_api;
mod spawn;
mod worker;
mod zygote;

pub use isolation::Isolation;

use async_trait::async_trait;
use bytes::Bytes;
use roost_model::{Failure, FailureCode, RuntimeKind, TaskCode, TaskSpec};
use roost_runtime::{
    Demand, Instance, Invocation, LogSink, PoolStats, PrepareError, PreparedTask, Runtime,
    TaskIdentities, WorkerPool,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct ProcessConfig {
    /// Identifies this hub's workers and cgroups (derived from the data dir,
    /// see [`hub_id`]).
    pub hub_id: String,
    /// The region the Lambda environment reports (`AWS_REGION`).
    pub region: String,
    /// A folder for the runtime's FIFOs and sockets.
    pub run_dir: PathBuf,
    /// How worker pools are sized.
    pub pool_policy: pool::PoolPolicy,
    /// Whether each task's workers run under a user and group of their own.
    pub task_identities: identity::Mode,
    /// The hub's data dir, under which task folders are unpacked: the only
    /// folders whose modes the runtime changes.
    pub data_dir: PathBuf,
}

impl ProcessConfig {
    /// Defaults for the hub keeping its state in `data_dir` (which must
    /// exist, so its id is that of its canonical path): pools sized by
    /// demand, no task identities.
    pub fn new(data_dir: &Path, region: &str) -> Self {
        Self {
            hub_id: hub_id(data_dir),
            region: region.to_owned(),
            run_dir: data_dir.join("run"),
            pool_policy: pool::PoolPolicy::Demand,
            task_identities: identity::Mode::Off,
            data_dir: data_dir.to_owned(),
        }
    }
}

/// A short, stable id for the hub owning `data_dir`: names its worker
/// cgroups, so hubs sharing a machine never touch each other's workers.
pub fn hub_id(data_dir: &Path) -> String {
    use sha2::Digest;
    let canonical = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_owned());
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    hex::encode(&digest[..8])
}

pub struct ProcessRuntime {
    config: ProcessConfig,
    isolation: Isolation,
    logs: Arc<dyn LogSink>,
    worker_ids: Arc<std::sync::atomic::AtomicU64>,
    /// Live zygotes by (code group, python, identity); pools hold the
    /// strong refs.
    zygotes:
        tokio::sync::Mutex<std::collections::HashMap<ZygoteKey, std::sync::Weak<zygote::Zygote>>>,
    /// Which identity (and task) each task folder was opened to: a folder
    /// belongs to one identity.
    dir_identities: parking_lot::Mutex<DirIdentities>,
}

/// Why a task's own user cannot reach its folder, and what to do.
fn data_dir_problem(e: identity::AccessError) -> String {
    format!("cannot reach its folder: {e}. Give the hub a data dir other users can enter (such as /var/lib/roost, not under a private home), or run it with --task-identities off")
}

/// Task folders opened so far: the identity, its key and the task.
type DirIdentities = std::collections::HashMap<PathBuf, (identity::Identity, String, String)>;

/// Records that `dir` is opened to `id` (derived from `key`): refused when
/// another identity has it, a folder inside it, or a folder around it
/// (opening one would regroup the other), or when two keys hash to one uid.
fn claim(
    owners: &mut DirIdentities,
    dir: &Path,
    id: identity::Identity,
    key: &str,
    task: &str,
) -> Result<(), PrepareError> {
    for (path, (other_id, other_key, other)) in owners.iter() {
        if *other_id == id && other_key != key {
            return Err(PrepareError(format!(
                "tasks {other} and {task} would run as the same user (uid {}: their identities hash alike); rename one of them",
                id.uid
            )));
        }
        let overlaps = path.starts_with(dir) || dir.starts_with(path);
        if overlaps && *other_id != id {
            return Err(PrepareError(format!(
                "tasks {other} and {task} run as different users but their folders {} and {} overlap; give each its own `dir`, or put them in one code_group",
                path.display(),
                dir.display()
            )));
        }
    }
    owners.insert(dir.to_path_buf(), (id, key.to_owned(), task.to_owned()));
    Ok(())
}

impl ProcessRuntime {
    /// Detects how worker limits can be enforced and sweeps up whatever an
    /// earlier run of this hub left behind.
    pub fn new(config: ProcessConfig, logs: Arc<dyn LogSink>) -> Self {
        let isolation = Isolation::detect(&config.hub_id);
        let swept = isolation.sweep();
        isolation.tidy_others();
        tracing::info!(limits = isolation.describe(), "process runtime ready");
        if swept > 0 {
            tracing::warn!(
                processes = swept,
                "killed workers left behind by an earlier run of this hub"
            );
        }
        let _ = std::fs::remove_dir_all(config.run_dir.join("zygotes"));
        Self {
            config,
            isolation,
            logs,
            zygotes: Default::default(),
            dir_identities: Default::default(),
            worker_ids: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        }
    }
}

/// Finds `command[0]`: absolute, relative to the task folder (`./bootstrap`),
/// or on the hub's PATH.
fn resolve_command(cmd: &str, dir: &Path) -> Option<PathBuf> {
    let p = Path::new(cmd);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_owned());
    }
    if cmd.contains('/') {
        let full = dir.join(p);
        return full.is_file().then_some(full);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|f| f.is_file())
    })
}

type ZygoteKey = (String, String, Option<identity::Identity>);

impl ProcessRuntime {
    /// The identity a task's workers run as: its own (derived from `key`,
    /// its code group's or its name) when identities are on and that user
    /// can reach the data dir and the task's runtime. Otherwise none: with
    /// `auto` the task runs as the hub's user, with a warning; with `on` it
    /// is refused, with the reason.
    fn identity_for(
        &self,
        spec: &TaskSpec,
        dir: &Path,
        program: &Path,
        key: &str,
    ) -> Result<Option<identity::Identity>, PrepareError> {
        let mode = self.config.task_identities;
        if mode == identity::Mode::Off {
            return Ok(None);
        }
        let id = identity::Identity::derive(&self.config.hub_id, key);
        let usable = identity::check_data_dir(&self.config.data_dir)
            .map_err(data_dir_problem)
            .and_then(|()| {
                // A program in the task's own folder (`./bootstrap`) is
                // opened to it with the folder.
                if program.starts_with(dir) {
                    return Ok(());
                }
                identity::reachable(program, id, true).map_err(|e| {
                    format!("cannot run its command: {e}. Install the runtime where other users can read it (not under a private home), or run the hub with --task-identities off")
                })
            });
        match (usable, mode) {
            (Ok(()), _) => Ok(Some(id)),
            (Err(why), identity::Mode::Auto) => {
                tracing::warn!(task = %spec.name, uid = id.uid, reason = %why, "this task runs as the hub's user: its own user could not use it (--task-identities on would refuse it instead)");
                Ok(None)
            }
            (Err(why), _) => Err(PrepareError(format!(
                "task {} runs as its own user (uid {}), which {why}",
                spec.name, id.uid
            ))),
        }
    }

    /// The zygote of a code group, started on first use.
    async fn zygote(
        &self,
        group: &str,
        python: &str,
        run_as: Option<identity::Identity>,
    ) -> Result<Arc<zygote::Zygote>, PrepareError> {
        let key = (group.to_owned(), python.to_owned(), run_as);
        let mut map = self.zygotes.lock().await;
        if let Some(z) = map.get(&key).and_then(|w| w.upgrade()) {
            return Ok(z);
        }
        let n = map.len();
        let dir = self
            .config
            .run_dir
            .join("zygotes")
            .join(format!("{group}-{n}"));
        let z = zygote::Zygote::start(python, dir, group, run_as)
            .await
            .map_err(|e| PrepareError(e.to_string()))?;
        map.insert(key, Arc::downgrade(&z));
        Ok(z)
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    async fn prepare(&self, spec: &TaskSpec) -> Result<Arc<dyn PreparedTask>, PrepareError> {
        let TaskCode::Process {
            dir,
            command,
            handler,
            min_warm,
            max_workers,
            code_group,
        } = &spec.code
        else {
            return Err(PrepareError("not a process task".into()));
        };
        let Some(program) = resolve_command(&command[0], dir) else {
            return Err(PrepareError(format!(
                "command {:?} was not found (give an absolute path, ./name in the task folder, or a program on the hub's PATH)",
                command[0]
            )));
        };
        // Its own identity: the code group's when it has one (its workers
        // share one pre-loaded parent), else the task's.
        let key = identity::key_for(spec.name.as_str(), code_group.as_deref());
        let run_as = self.identity_for(spec, dir, &program, &key)?;
        let mut env: Vec<(String, String)> = Vec::new();
        if let Some(id) = run_as {
            claim(
                &mut self.dir_identities.lock(),
                dir,
                id,
                &key,
                spec.name.as_str(),
            )?;
            identity::open_task_dir(dir, &self.config.data_dir, id).map_err(|e| {
                PrepareError(format!(
                    "task {} runs as its own user (uid {}), which {}",
                    spec.name,
                    id.uid,
                    data_dir_problem(e)
                ))
            })?;
            // A home and temp folder of its own (HOME=/root is of no use to
            // it): kept across restarts, private to it.
            let home = identity::home_dir(&self.config.data_dir, id)
                .map_err(|e| PrepareError(format!("cannot make task {}'s home: {e}", spec.name)))?;
            let home = home.display().to_string();
            env.push(("HOME".into(), home.clone()));
            env.push(("TMPDIR".into(), home));
        }
        // The task's own variables win.
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut command = command.clone();
        command[0] = program.display().to_string();
        let wspec = worker::WorkerSpec {
            task: spec.name.clone(),
            dir: dir.clone(),
            command: command.clone(),
            handler: handler.clone(),
            env,
            memory_mb: spec.limits.memory_mb,
            region: self.config.region.clone(),
            version: "$LATEST".into(),
            run_as,
        };
        let launcher = match code_group {
            Some(group) if zygote::can_preload(&command) => {
                let z = self.zygote(group, &command[0], run_as).await?;
                if let Err(e) = z.preload(dir, handler).await {
                    tracing::warn!(task = %spec.name, error = %e, "the handler could not be pre-loaded; its workers will report the error");
                }
                tracing::info!(task = %spec.name, group = %group, zygote = z.pid(), "workers fork from the code group's zygote");
                worker::Launcher::Zygote(z)
            }
            Some(group) => {
                tracing::warn!(task = %spec.name, group = %group, command = ?command, "code_group can pre-load only [python, \"-m\", \"awslambdaric\"]; these workers start as separate processes");
                worker::Launcher::Direct
            }
            None => worker::Launcher::Direct,
        };
        let pool = pool::Pool::new(
            spec.clone(),
            pool::WorkerFactory {
                wspec,
                isolation: self.isolation.clone(),
                logs: self.logs.clone(),
                hub_id: self.config.hub_id.clone(),
                launcher,
                policy: self.config.pool_policy,
                ids: self.worker_ids.clone(),
            },
            *min_warm,
            *max_workers,
        );
        // Pre-warm now, so a command that fails at start fails the deployment.
        pool.prewarm(*min_warm)
            .await
            .map_err(|f| PrepareError(f.message))?;
        pool.start_policy();
        Ok(Arc::new(ProcessTask {
            spec: spec.clone(),
            pool,
            uid: run_as.map(|id| id.uid),
        }))
    }

    fn task_identities(&self) -> Option<&dyn TaskIdentities> {
        (self.config.task_identities != identity::Mode::Off).then_some(self)
    }
}

impl TaskIdentities for ProcessRuntime {
    fn is_task_uid(&self, uid: u32) -> bool {
        identity::is_task_uid(uid)
    }
}

pub struct ProcessTask {
    spec: TaskSpec,
    pool: Arc<pool::Pool>,
    uid: Option<u32>,
}

#[async_trait]
impl PreparedTask for ProcessTask {
    fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    async fn instance(&self) -> Result<Box<dyn Instance>, Failure> {
        Ok(Box::new(self.pool.lease().await?))
    }

    async fn retire(&self) {
        self.pool.retire();
    }

    fn pool(&self) -> Option<&dyn WorkerPool> {
        Some(self)
    }

    fn run_as_uid(&self) -> Option<u32> {
        self.uid
    }
}

impl WorkerPool for ProcessTask {
    fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    fn demand(&self) -> Demand {
        self.pool.demand()
    }

    fn resume_demand(&self, demand: Demand) {
        self.pool.resume_demand(demand);
    }
}

#[async_trait]
impl Instance for pool::Lease {
    async fn invoke(&mut self, inv: Invocation) -> Result<Bytes, Failure> {
        // A Lambda Invoke's ClientContext, else the routed topic.
        let client_context = inv
            .env
            .iter()
            .find(|(k, _)| k == roost_model::CLIENT_CONTEXT_VAR)
            .map(|(_, cc)| cc.clone())
            .or_else(|| {
                inv.env
                    .iter()
                    .find(|(k, _)| k == "ROOST_TOPIC")
                    .map(|(_, topic)| {
                        serde_json::json!({ "custom": { "topic": topic } }).to_string()
                    })
            });
        let Some(worker) = self.worker.as_mut() else {
            return Err(Failure::new(FailureCode::Crashed, "no worker"));
        };
        let started = std::time::Instant::now();
        let r = worker
            .invoke(
                inv.call_id.to_string(),
                inv.input,
                inv.timeout,
                client_context,
                self.memory_mb,
            )
            .await;
        self.service = Some(started.elapsed());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use identity::Identity;

    #[test]
    fn folders_and_uids_are_claimed_by_one_identity_each() {
        let mut owners = DirIdentities::new();
        let (a, b) = (
            Identity::derive("h", "task:a"),
            Identity::derive("h", "task:b"),
        );
        let d = Path::new("/data/deployments/1");
        claim(&mut owners, &d.join("a"), a, "task:a", "a").unwrap();
        // The same identity again (a code group, a restart): fine.
        claim(&mut owners, &d.join("a"), a, "task:a", "a").unwrap();
        // Another identity on the same, an inner or an outer folder: refused.
        for dir in [d.join("a"), d.join("a/inner"), d.to_path_buf()] {
            let e = claim(&mut owners, &dir, b, "task:b", "b").unwrap_err();
            assert!(e.0.contains("overlap"), "{}", e.0);
        }
        claim(&mut owners, &d.join("b"), b, "task:b", "b").unwrap();
        // Two keys whose uids collide (found by search): refused.
        let mut seen = std::collections::HashMap::new();
        let (k1, k2) = (0u32..)
            .find_map(|i| {
                let k = format!("task:t{i}");
                let uid = Identity::derive("h", &k).uid;
                seen.insert(uid, k.clone()).map(|other| (other, k))
            })
            .unwrap();
        let id = Identity::derive("h", &k1);
        assert_eq!(id, Identity::derive("h", &k2));
        claim(&mut owners, &d.join("c"), id, &k1, "c").unwrap();
        let e = claim(&mut owners, &d.join("d"), id, &k2, "d").unwrap_err();
        assert!(e.0.contains("hash alike"), "{}", e.0);
    }
}
