//! Deployments: unpack a package, validate the whole manifest, prepare every
//! task with its runtime, and only then switch to it in one step. A
//! deployment that fails anywhere leaves the running one untouched.

use crate::{ActiveDeployment, Hub};
use roost_manifest::Problem;
use roost_model::{TaskCode, TaskName, TaskSpec};
use roost_runtime::PreparedTask;
use serde::Serialize;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Inactive deployments whose packages are kept for rollback, at most
/// (within `deployments_disk_budget`).
const KEEP_DEPLOYMENTS: usize = 10;
/// Where packages being uploaded are written, under the data dir.
pub(crate) const UPLOADS_DIR: &str = "uploads";
pub use roost_manifest::package::MANIFEST_FILE;

#[derive(Debug, Serialize)]
pub struct DeployReport {
    pub deployment: i64,
    pub tasks: Vec<String>,
    pub devices: Vec<String>,
    pub routes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("invalid manifest: {} problem(s)", .0.len())]
    Invalid(Vec<Problem>),
    #[error("the deployment package is unusable: {0}")]
    BadPackage(String),
    #[error("the package is over the {limit} byte limit; send a smaller one")]
    TooLarge { limit: usize },
    #[error("{max} packages are being uploaded or deployed already (--max-concurrent-uploads); retry when one is done")]
    Busy { max: usize },
    #[error("there is no earlier deployment to roll back to")]
    NothingToRollBack,
    #[error("the hub could not record the deployment: {0}")]
    Store(#[from] roost_store::StoreError),
    #[error("the hub could not write the deployment to its data dir: {0}")]
    Io(#[from] std::io::Error),
}

type Tasks = HashMap<TaskName, Arc<dyn PreparedTask>>;
/// A validated, prepared deployment, ready to switch to.
type Prepared = (
    Tasks,
    Vec<roost_model::DeviceSpec>,
    Vec<roost_model::RouteSpec>,
    Vec<roost_model::SecretSpec>,
);

pub use roost_manifest::package::SECRETS_ENTRY;
use roost_manifest::package::{unpack, Bounds};

/// A package being received: written to a file under the data dir as it
/// arrives, within the size limit, so an upload costs disk rather than
/// memory. It holds one of the `max_concurrent_uploads` places until it is
/// deployed or dropped; dropping it removes the file.
pub struct PackageUpload {
    file: tokio::fs::File,
    path: PathBuf,
    written: u64,
    limit: usize,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl PackageUpload {
    /// Appends the next part of the package.
    pub async fn write(&mut self, part: &[u8]) -> Result<(), DeployError> {
        use tokio::io::AsyncWriteExt;
        if self.written + part.len() as u64 > self.limit as u64 {
            return Err(DeployError::TooLarge { limit: self.limit });
        }
        self.file.write_all(part).await?;
        self.written += part.len() as u64;
        Ok(())
    }
}

impl Drop for PackageUpload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Hub {
    /// Starts receiving a package, if fewer than `max_concurrent_uploads`
    /// are being received or deployed.
    pub fn begin_upload(&self) -> Result<PackageUpload, DeployError> {
        let cfg = &self.inner.config;
        let place = self
            .inner
            .uploads
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                tracing::warn!(
                    max = cfg.max_concurrent_uploads,
                    "package upload refused: too many at once"
                );
                DeployError::Busy {
                    max: cfg.max_concurrent_uploads,
                }
            })?;
        let mut name = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut name);
        let path = cfg
            .data_dir
            .join(UPLOADS_DIR)
            .join(format!("{}.tar.gz.partial", hex::encode(name)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(PackageUpload {
            file: tokio::fs::File::from_std(file),
            path,
            written: 0,
            limit: cfg.max_package_bytes,
            _place: place,
        })
    }

    /// Validates and applies an uploaded package.
    pub async fn deploy_upload(&self, upload: PackageUpload) -> Result<DeployReport, DeployError> {
        self.deploy_upload_with(upload, None).await
    }

    /// Validates and applies an uploaded package whose `[[secret]]` values
    /// came apart from it (`secrets`: a JSON object of strings, as the
    /// package's own secrets entry would hold): how a fleet deployment
    /// arrives, its package signed and free of secrets.
    pub async fn deploy_upload_with(
        &self,
        mut upload: PackageUpload,
        secrets: Option<Vec<u8>>,
    ) -> Result<DeployReport, DeployError> {
        use tokio::io::AsyncWriteExt;
        upload.file.flush().await?;
        let file = std::fs::File::open(&upload.path)?;
        self.deploy_from(std::io::BufReader::new(file), secrets)
            .await
    }

    /// The file an upload is being written to, and how many bytes it holds
    /// (to check a package's hash and signature before it is deployed).
    pub fn upload_path(upload: &PackageUpload) -> (&Path, u64) {
        (&upload.path, upload.written)
    }

    /// Validates and applies a deployment package (a gzipped tar holding
    /// `manifest.toml` and the files it names).
    pub async fn deploy_package(&self, package: &[u8]) -> Result<DeployReport, DeployError> {
        self.deploy_from(package, None).await
    }

    /// The active deployment's id as it changes.
    pub fn watch_deployment(&self) -> tokio::sync::watch::Receiver<Option<i64>> {
        self.inner.active_id.subscribe()
    }

    async fn deploy_from(
        &self,
        package: impl Read + Send,
        secrets: Option<Vec<u8>>,
    ) -> Result<DeployReport, DeployError> {
        let _guard = self.inner.deploy_lock.lock().await;
        let id = self.inner.store.next_deployment_id()?;
        let dir = self
            .inner
            .config
            .data_dir
            .join("deployments")
            .join(id.to_string());
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let result = async {
            let packed = unpack(package, &dir, &self.package_bounds())
                .map_err(|e| DeployError::BadPackage(e.0))?;
            let values = match (secrets, packed) {
                (Some(_), Some(_)) => {
                    return Err(DeployError::BadPackage(format!(
                        "it carries {SECRETS_ENTRY} although its secrets came apart from it"
                    )))
                }
                (given, packed) => given.or(packed),
            };
            let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).map_err(|_| {
                DeployError::BadPackage(format!(
                    "it has no {MANIFEST_FILE} (use `roost deploy MANIFEST`)"
                ))
            })?;
            let prepared = self.prepare(&text, &dir).await?;
            self.keep_secrets(id, &prepared.3, values).await?;
            self.inner
                .store
                .activate_new_deployment(id, text, dir.display().to_string())
                .await?;
            Ok(prepared)
        }
        .await;
        match result {
            Ok(prepared) => {
                let report = self.switch_to(Some(id), prepared).await;
                self.remove_stale_packages().await;
                tracing::info!(deployment = id, tasks = ?report.tasks, "deployment applied");
                Ok(report)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                tracing::warn!(error = %e, "deployment refused; the running one is unchanged");
                Err(e)
            }
        }
    }

    /// Goes back to the deployment that was active before the current one.
    pub async fn rollback(&self) -> Result<DeployReport, DeployError> {
        let _guard = self.inner.deploy_lock.lock().await;
        let current = self
            .inner
            .store
            .active_deployment()?
            .ok_or(DeployError::NothingToRollBack)?;
        let previous = current
            .previous
            .and_then(|id| self.inner.store.deployment(id).transpose())
            .transpose()?
            .ok_or(DeployError::NothingToRollBack)?;
        let prepared = self
            .prepare(&previous.manifest, Path::new(&previous.package_dir))
            .await?;
        self.inner.store.reactivate_deployment(previous.id).await?;
        let report = self.switch_to(Some(previous.id), prepared).await;
        tracing::info!(deployment = previous.id, "rolled back");
        Ok(report)
    }

    /// The manifest text of the active deployment, if any.
    pub fn active_manifest(&self) -> Option<(i64, String)> {
        self.inner
            .store
            .active_deployment()
            .ok()
            .flatten()
            .map(|d| (d.id, d.manifest))
    }

    pub(crate) async fn load_active_deployment(&self) {
        let stored = match self.inner.store.active_deployment() {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the active deployment; starting with none");
                return;
            }
        };
        match self
            .prepare(&stored.manifest, Path::new(&stored.package_dir))
            .await
        {
            Ok(prepared) => {
                let report = self.switch_to(Some(stored.id), prepared).await;
                tracing::info!(deployment = stored.id, tasks = ?report.tasks, "active deployment loaded");
            }
            Err(e) => {
                let detail = match &e {
                    DeployError::Invalid(p) => p
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                    other => other.to_string(),
                };
                tracing::error!(deployment = stored.id, %detail, "the active deployment no longer loads (a resource removed? a runtime its task's own user cannot reach, with task identities on?); no tasks are running: fix it and deploy again")
            }
        }
    }

    /// Seals each `[[secret]]`'s value into the store under the deployment;
    /// a secret whose value did not come with the package is a problem.
    async fn keep_secrets(
        &self,
        id: i64,
        specs: &[roost_model::SecretSpec],
        values: Option<Vec<u8>>,
    ) -> Result<(), DeployError> {
        let values: HashMap<String, String> = match values {
            None => HashMap::new(),
            Some(v) => serde_json::from_slice(&v).map_err(|e| {
                DeployError::BadPackage(format!(
                    "{SECRETS_ENTRY} is not a JSON object of strings: {e}"
                ))
            })?,
        };
        let mut problems = Vec::new();
        let mut sealed = Vec::new();
        let key = self.inner.key.sealing_key();
        for (i, s) in specs.iter().enumerate() {
            match values.get(&s.name) {
                Some(v) => {
                    let (nonce, ciphertext) = crate::credentials::sealing::seal(&key, &s.name, v.as_bytes());
                    sealed.push(roost_store::SealedSecret {
                        name: s.name.clone(),
                        nonce,
                        ciphertext,
                        created_ms: roost_store::now_ms(),
                    });
                }
                None => problems.push(Problem {
                    field: format!("secret[{i}].value_env"),
                    value: s.value_env.clone(),
                    why: "no value came with the deployment: set this variable in the shell that runs `roost deploy`".into(),
                }),
            }
        }
        if !problems.is_empty() {
            return Err(DeployError::Invalid(problems));
        }
        self.inner.store.put_secrets(id, sealed).await?;
        Ok(())
    }

    /// Validates a manifest and prepares each task with its runtime,
    /// collecting every problem.
    async fn prepare(&self, text: &str, dir: &Path) -> Result<Prepared, DeployError> {
        let manifest = roost_manifest::parse(text, dir).map_err(DeployError::Invalid)?;
        let mut problems = Vec::new();
        let mut tasks: Tasks = HashMap::new();
        for (i, spec) in manifest.tasks.into_iter().enumerate() {
            let budget = self.inner.config.memory_budget_mb;
            if spec.limits.memory_mb as u64 > budget {
                problems.push(Problem {
                    field: format!("task[{i}].memory_mb"),
                    value: spec.limits.memory_mb.to_string(),
                    why: format!("more than the hub's whole memory budget ({budget} MiB); lower it or start the hub with a larger --memory-budget-mb"),
                });
                continue;
            }
            let field = format!("task[{i}].code");
            let spec = self.with_local_services(spec);
            let spec = match self.store_code(spec) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(Problem {
                        field,
                        value: String::new(),
                        why: format!("cannot store the code: {e}"),
                    });
                    continue;
                }
            };
            let Some(runtime) = self.inner.runtimes.get(&spec.runtime) else {
                problems.push(Problem {
                    field: format!("task[{i}].runtime"),
                    value: spec.runtime.to_string(),
                    why: "this hub has no such runtime".into(),
                });
                continue;
            };
            match runtime.prepare(&spec).await {
                Ok(p) => {
                    tasks.insert(spec.name.clone(), p);
                }
                Err(e) => problems.push(Problem {
                    field,
                    value: code_value(&spec),
                    why: e.0,
                }),
            }
        }
        if problems.is_empty() {
            Ok((tasks, manifest.devices, manifest.routes, manifest.secrets))
        } else {
            Err(DeployError::Invalid(problems))
        }
    }

    /// Copies wasm code into the content-addressed code store, so the
    /// task no longer depends on its package folder.
    fn store_code(&self, mut spec: TaskSpec) -> std::io::Result<TaskSpec> {
        if let TaskCode::Wasm { sha256, path } = &mut spec.code {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("wasm");
            let target = self
                .inner
                .config
                .data_dir
                .join("code")
                .join(format!("{sha256}.{ext}"));
            if !target.exists() {
                let tmp = target.with_extension("partial");
                std::fs::copy(&*path, &tmp)?;
                std::fs::rename(&tmp, &target)?;
            }
            *path = target;
        }
        Ok(spec)
    }

    /// Adds what unmodified AWS SDK code needs to reach the hub's local
    /// services: the endpoints, the region and the task's own credentials.
    /// Endpoints and region the manifest already sets are left alone.
    fn with_local_services(&self, mut spec: TaskSpec) -> TaskSpec {
        let cfg = &self.inner.config;
        let cred = self.inner.key.task(&spec.name);
        let env = &mut spec.env;
        if let Some(url) = &cfg.api_url {
            for var in [
                "AWS_ENDPOINT_URL_LAMBDA",
                "AWS_ENDPOINT_URL_IOT_DATA_PLANE",
                "AWS_ENDPOINT_URL_SECRETS_MANAGER",
            ] {
                env.entry(var.into()).or_insert_with(|| url.clone());
            }
        }
        if let Some(ca) = &cfg.api_ca_bundle {
            env.entry("AWS_CA_BUNDLE".into())
                .or_insert_with(|| ca.display().to_string());
        }
        env.entry("AWS_REGION".into())
            .or_insert_with(|| cfg.region.clone());
        env.entry("AWS_DEFAULT_REGION".into())
            .or_insert_with(|| cfg.region.clone());
        env.insert("AWS_ACCESS_KEY_ID".into(), cred.access_key_id);
        env.insert("AWS_SECRET_ACCESS_KEY".into(), cred.secret_access_key);
        spec
    }

    async fn switch_to(
        &self,
        id: Option<i64>,
        (tasks, devices, routes, _secrets): Prepared,
    ) -> DeployReport {
        let table = roost_routes::RouteTable::build(
            &routes,
            Arc::new(crate::routing::HubHooks {
                hub: Arc::downgrade(&self.inner),
            }),
            self.inner.metrics.routes.clone(),
            roost_routes::RouteLimits {
                backlog: self.inner.config.route_backlog,
            },
        );
        *self.inner.routes.write() = Arc::new(table);
        // Half the queue is split among the tasks and routes, each its own.
        self.inner.scheduler.set_shares(tasks.len() + routes.len());
        self.inner.bus.set_devices(
            devices
                .iter()
                .map(|d| roost_bus::Device {
                    name: d.name.clone(),
                    password_hash: d.password_hash.clone(),
                    publish: d.publish.clone(),
                    subscribe: d.subscribe.clone(),
                })
                .collect(),
        );
        let mut names: Vec<String> = tasks.keys().map(|t| t.to_string()).collect();
        names.sort();
        let credentials = tasks
            .keys()
            .map(|t| {
                let c = self.inner.key.task(t);
                (c.access_key_id.clone(), (t.clone(), c))
            })
            .collect();
        let identities = self.task_identities_of(&tasks);
        let new = Arc::new(ActiveDeployment {
            id,
            tasks,
            credentials,
            identities,
        });
        let old = std::mem::replace(&mut *self.inner.active.write(), new.clone());
        self.inner.active_id.send_replace(id);
        for name in old.tasks.keys().filter(|n| !new.tasks.contains_key(*n)) {
            // Its waiting calls end now with unknown_task, not minutes later.
            let ended = self.inner.scheduler.remove_task(name);
            if ended > 0 {
                tracing::info!(task = %name, calls = ended, "the waiting calls of a task no longer deployed end with unknown_task");
            }
        }
        for (name, task) in &old.tasks {
            let same = new.tasks.get(name).is_some_and(|t| Arc::ptr_eq(t, task));
            if !same {
                task.retire().await;
            }
        }
        let live: Vec<&TaskSpec> = new.tasks.values().map(|t| t.spec()).collect();
        for runtime in self.inner.runtimes.values() {
            runtime.retain_only(&live);
        }
        for (name, task) in &new.tasks {
            if let Some(pool) = task.pool() {
                if let Ok(Some((rate, service_s))) = self.inner.store.load_demand(name.as_str()) {
                    pool.resume_demand(roost_runtime::Demand {
                        rate_per_s: rate,
                        service_s,
                    });
                }
            }
        }
        self.inner.metrics.deployments.inc();
        DeployReport {
            deployment: id.unwrap_or(0),
            tasks: names,
            devices: devices.into_iter().map(|d| d.name).collect(),
            routes: routes.len(),
        }
    }

    fn package_bounds(&self) -> Bounds {
        let c = &self.inner.config;
        Bounds {
            bytes: c.max_package_bytes,
            entries: c.package_max_entries,
            depth: c.package_max_depth,
        }
    }

    /// Keeps the packages of the newest inactive deployments, at most
    /// `KEEP_DEPLOYMENTS` of them within `deployments_disk_budget`, and the
    /// one a rollback would go back to whatever its size; removes the rest.
    async fn remove_stale_packages(&self) {
        let store = &self.inner.store;
        let rollback_dir = store
            .active_deployment()
            .ok()
            .flatten()
            .and_then(|a| a.previous)
            .and_then(|p| store.deployment(p).ok().flatten())
            .map(|d| d.package_dir);
        let budget = self.inner.config.deployments_disk_budget;
        if let Ok(dirs) = store.stale_deployment_dirs(0) {
            let mut used = rollback_dir
                .as_deref()
                .map_or(0, |d| disk_use(Path::new(d)));
            let mut kept = 0;
            // Newest first: the newest that fit are kept, and once one does
            // not, it and every older one go (an old small package is not
            // kept in place of a newer big one).
            let mut full = false;
            for d in dirs {
                let path = Path::new(&d);
                if Some(&d) == rollback_dir.as_ref() || !path.exists() {
                    continue;
                }
                let size = disk_use(path);
                if !full && kept < KEEP_DEPLOYMENTS && used + size <= budget {
                    used += size;
                    kept += 1;
                    continue;
                }
                full = true;
                if std::fs::remove_dir_all(path).is_ok() {
                    tracing::info!(package = %d, bytes = size, kept_bytes = used, budget, "removed an old deployment's package");
                }
            }
        }
        if let Err(e) = self.inner.store.drop_stale_secrets(KEEP_DEPLOYMENTS).await {
            tracing::warn!(error = %e, "cannot forget the secrets of old deployments");
        }
    }
}

fn code_value(spec: &TaskSpec) -> String {
    match &spec.code {
        TaskCode::Wasm { path, .. } => path
            .file_name()
            .map(|f| format!("{:?}", f.to_string_lossy()))
            .unwrap_or_default(),
        TaskCode::Process { dir, .. } => format!("{:?}", dir.display().to_string()),
    }
}

/// Disk used by a folder and all it holds, in bytes (blocks, so empty
/// folders count too).
fn disk_use(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                total += disk_use(&e.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_use_counts_empty_folders() {
        let dir = tempfile::tempdir().unwrap();
        let empty = disk_use(dir.path());
        for i in 0..10 {
            std::fs::create_dir(dir.path().join(i.to_string())).unwrap();
        }
        std::fs::write(dir.path().join("f"), vec![1u8; 100_000]).unwrap();
        assert!(disk_use(dir.path()) >= empty + 100_000);
    }
}
