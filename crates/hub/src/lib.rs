//! The hub: wires the store, the scheduler and the runtimes into the
//! operations the edges (HTTP API, CLI) expose: deploy, call (sync, async,
//! nested), inspect, drain.
//!
//! Owns the active deployment (swapped atomically), the durable async call
//! lifecycle (persist → admit → run → record, retry with backoff, recover
//! after a crash), task logs and metrics. Knows nothing of HTTP, and no
//! runtime by name: the binary builds them and hands them over in [`Parts`].

mod broker_store;
mod calls;
pub mod credentials;
mod deploy;
mod health;
pub mod local;
pub mod logs;
pub mod metrics;
mod routing;
pub mod shadows;

pub use calls::{new_call_id, CallError, CallView, Caller, TaskView};
pub use deploy::{DeployError, DeployReport, PackageUpload, SECRETS_ENTRY};

use logs::LogBook;
use metrics::Metrics;
use parking_lot::RwLock;
use roost_bus::{BusState, MessageBus};
use roost_model::{RuntimeKind, TaskName};
use roost_runtime::{PreparedTask, Runtime};
use roost_scheduler::{Scheduler, SchedulerConfig};
use roost_store::Store;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Deepest chain of nested calls (a task calling a task calling ...).
pub const MAX_CALL_DEPTH: u32 = 8;

#[derive(Clone, Debug)]
pub struct HubConfig {
    pub data_dir: PathBuf,
    pub memory_budget_mb: u64,
    pub cpu_slots: u32,
    pub queue_limit: usize,
    pub max_sync_input: usize,
    pub max_async_input: usize,
    pub max_package_bytes: usize,
    /// Bytes of input that calls waiting in the queue may hold (a waiting
    /// sync call holds its input; an async call's waits in the store).
    pub queued_input_limit: usize,
    /// Messages one route may hold waiting for delivery.
    pub route_backlog: usize,
    /// Most entries (files and folders) a package may hold.
    pub package_max_entries: usize,
    /// Deepest path in a package, in folders and file.
    pub package_max_depth: usize,
    /// Packages being uploaded (and deployed) at once; past it, 429.
    pub max_concurrent_uploads: usize,
    /// Disk the packages of inactive deployments (kept for rollback) may
    /// use, in bytes; the oldest are removed past it (the one a rollback
    /// would go back to is always kept).
    pub deployments_disk_budget: u64,
    /// Attempts an async call gets before it is kept as failed.
    pub async_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub retry_backoff: Duration,
    /// How long finished async calls (and their outputs) are kept.
    pub retention: Duration,
    /// The AWS region the hub's Lambda-compatible environment reports.
    pub region: String,
    /// Shadow document limits (AWS's by default).
    pub shadow_limits: roost_shadows::Limits,
    /// The hub's HTTP API as tasks reach it (`AWS_ENDPOINT_URL_*`); none
    /// when the API is not served.
    pub api_url: Option<String>,
    /// The certificate tasks should trust for it, when it is served over TLS.
    pub api_ca_bundle: Option<PathBuf>,
    /// The fleet's control plane this hub is enrolled with: a local
    /// deploy or rollback is then refused unless forced (and reported to
    /// the cloud as drift).
    pub managed_by: Option<String>,
}

impl HubConfig {
    /// Defaults for a hub keeping its state in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            memory_budget_mb: default_memory_budget_mb(),
            cpu_slots: default_cpu_slots(),
            queue_limit: 1024,
            max_sync_input: 6 << 20,
            max_async_input: 1 << 20,
            max_package_bytes: 256 << 20,
            queued_input_limit: 128 << 20,
            route_backlog: 1000,
            package_max_entries: 65_536,
            package_max_depth: 32,
            max_concurrent_uploads: 2,
            deployments_disk_budget: 1 << 30,
            async_attempts: 3,
            retry_backoff: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            region: "us-east-1".into(),
            shadow_limits: roost_shadows::Limits::default(),
            api_url: None,
            api_ca_bundle: None,
            managed_by: None,
        }
    }
}

/// Whether only the hub may publish to `topic`: every `$aws/` topic but a
/// shadow's request topics.
pub fn reserved_topic(topic: &str) -> bool {
    topic.starts_with("$aws/") && roost_shadows::parse_request_topic(topic).is_none()
}

/// Closes what the hub keeps in its data dir to everyone but its own user:
/// the store (with its WAL), the hub key, the owner's credentials, the
/// compiled code and the unpacked deployments (a process task's own folder
/// is opened to that task alone when it is prepared). Files made later are
/// private too (the hub runs with umask 077). The data dir's own mode is
/// left alone here (it may be a folder the hub does not own alone); with
/// task identities on, preparing a process task adds `o+x` to it and to the
/// folders down to the task's.
fn make_private(data_dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let set = |name: &str, mode: u32| {
        let p = data_dir.join(name);
        if p.exists() {
            if let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)) {
                tracing::warn!(path = %p.display(), error = %e, "cannot make this private");
            }
        }
    };
    for f in [
        "roost.db",
        "roost.db-wal",
        "roost.db-shm",
        credentials::KEY_FILE,
        "aws-credentials",
    ] {
        set(f, 0o600);
    }
    for d in ["code", "cache", "deployments", "run"] {
        set(d, 0o700);
    }
}

/// Half of the machine's memory: the rest is for the OS, the hub itself and
/// whatever else the gateway runs.
pub fn default_memory_budget_mb() -> u64 {
    let total_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                })
        })
        .unwrap_or(1 << 20);
    (total_kb / 1024 / 2).max(64)
}

/// Calls running at once: a few per core, since many calls wait on I/O or
/// sleep; busy guests are time-sliced at every epoch tick.
pub fn default_cpu_slots() -> u32 {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    cores * 8
}

/// The deployment calls run against; replaced whole by a new deployment.
pub struct ActiveDeployment {
    pub id: Option<i64>,
    pub tasks: HashMap<TaskName, Arc<dyn PreparedTask>>,
    /// Each task's credentials, by access key id.
    pub credentials: HashMap<String, (TaskName, credentials::Credential)>,
    /// The process tasks running under each task identity (a code group's
    /// tasks share one), by uid; empty when identities are off.
    pub identities: HashMap<u32, Vec<TaskName>>,
}

pub(crate) struct HubInner {
    pub config: HubConfig,
    pub store: Arc<Store>,
    pub scheduler: Scheduler,
    pub runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
    pub active: RwLock<Arc<ActiveDeployment>>,
    pub deploy_lock: tokio::sync::Mutex<()>,
    /// Places for packages being uploaded (`max_concurrent_uploads`).
    pub uploads: Arc<tokio::sync::Semaphore>,
    pub logs: Arc<LogBook>,
    pub metrics: Metrics,
    pub bus: Arc<dyn MessageBus>,
    pub routes: RwLock<Arc<roost_routes::RouteTable>>,
    pub key: credentials::HubKey,
    /// Derived from `key` once: asked for on every signed request.
    pub owner: credentials::Credential,
    pub shadows: shadows::Shadows,
    /// The active deployment's id, for whoever watches it change (the
    /// fleet uplink, to notice a forced local deploy).
    pub active_id: tokio::sync::watch::Sender<Option<i64>>,
}

/// What the hub is given rather than builds: the runtimes that run task
/// code (at most one per kind), the log book they write task lines to (a
/// runtime with long-lived workers is given it when it is built), and how
/// to make its message bus once the store it keeps its state in is open.
pub struct Parts {
    pub runtimes: Vec<Arc<dyn Runtime>>,
    pub logs: Arc<LogBook>,
    pub bus: BusFactory,
    /// Registers metrics of parts built beside the hub (the fleet uplink)
    /// in the hub's registry, so `/metrics` shows them.
    pub extra_metrics: Vec<MetricsRegistrar>,
}

/// Registers a part's metrics in the hub's registry (see `Parts::extra_metrics`).
pub type MetricsRegistrar = Box<dyn FnOnce(&mut prometheus_client::registry::Registry) + Send>;

/// Makes the hub's message bus from the durable state the hub restored
/// from its store (called once, at start).
pub type BusFactory = Box<dyn FnOnce(BusState) -> Arc<dyn MessageBus> + Send>;

/// A running hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    pub(crate) inner: Arc<HubInner>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create the data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] roost_store::StoreError),
    #[error("two runtimes were given for {0} tasks")]
    TwoRuntimes(RuntimeKind),
    #[error("cannot use the hub key: {0}")]
    Key(std::io::Error),
}

impl Hub {
    /// Opens the data dir, loads the active deployment and requeues every
    /// async call that was acknowledged but not finished.
    pub async fn start(config: HubConfig, parts: Parts) -> Result<Self, StartError> {
        // An upload a crash cut short is never resumed.
        let _ = std::fs::remove_dir_all(config.data_dir.join(deploy::UPLOADS_DIR));
        for d in ["", "code", "cache", "deployments", deploy::UPLOADS_DIR] {
            let p = config.data_dir.join(d);
            std::fs::create_dir_all(&p).map_err(|e| StartError::DataDir(p, e))?;
        }
        let store = Arc::new(Store::open(&config.data_dir.join("roost.db"))?);
        let key = credentials::HubKey::load_or_create(&config.data_dir).map_err(StartError::Key)?;
        make_private(&config.data_dir);
        let Parts {
            runtimes: given,
            logs,
            bus,
            extra_metrics,
        } = parts;
        let mut runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>> = HashMap::new();
        for r in given {
            let kind = r.kind();
            if runtimes.insert(kind, r).is_some() {
                return Err(StartError::TwoRuntimes(kind));
            }
        }
        let scheduler = Scheduler::new(SchedulerConfig {
            memory_budget_mb: config.memory_budget_mb,
            cpu_slots: config.cpu_slots,
            queue_limit: config.queue_limit,
            aging: Duration::from_millis(250),
            queued_input_limit: config.queued_input_limit,
        });
        let mut metrics = Metrics::default();
        metrics.memory_budget_mb.set(config.memory_budget_mb as i64);
        let restored = broker_store::restore(&store)?;
        if !restored.sessions.is_empty() || !restored.retained.is_empty() {
            tracing::info!(
                sessions = restored.sessions.len(),
                queued = restored.queue.len(),
                retained = restored.retained.len(),
                "restored the broker's persistent sessions and retained messages"
            );
        }
        let bus = bus(BusState {
            persistence: Arc::new(broker_store::BrokerStore(store.clone())),
            restore: restored,
        });
        bus.register_metrics(metrics.registry());
        for register in extra_metrics {
            register(metrics.registry());
        }
        let uploads = Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_uploads.max(1),
        ));
        let hub = Hub {
            inner: Arc::new(HubInner {
                bus,
                routes: RwLock::new(Arc::new(roost_routes::RouteTable::empty(
                    metrics.routes.clone(),
                ))),
                config,
                store,
                scheduler,
                runtimes,
                active: RwLock::new(Arc::new(ActiveDeployment {
                    id: None,
                    tasks: HashMap::new(),
                    credentials: HashMap::new(),
                    identities: HashMap::new(),
                })),
                owner: key.owner(),
                key,
                shadows: shadows::Shadows::new(),
                active_id: tokio::sync::watch::channel(None).0,
                deploy_lock: tokio::sync::Mutex::new(()),
                uploads,
                logs,
                metrics,
            }),
        };
        {
            // AWS's reserved topics: clients may publish shadow requests,
            // never the hub's answers (`/accepted`, `/delta`, ...).
            hub.inner
                .bus
                .set_reserved(Arc::new(|topic: &str| reserved_topic(topic)));
            // Messages devices publish go to the shadows (their request
            // topics) or through the route table.
            let weak = Arc::downgrade(&hub.inner);
            hub.inner
                .bus
                .set_tap(Arc::new(move |topic: &str, payload: &bytes::Bytes| {
                    let Some(inner) = weak.upgrade() else { return };
                    if topic.starts_with("$aws/things/") {
                        if let Some((id, op)) = roost_shadows::parse_request_topic(topic) {
                            shadows::submit(&inner, id, op, payload.clone(), shadows::Origin::Mqtt);
                        }
                        return;
                    }
                    let routes = inner.routes.read().clone();
                    routes.on_device_message(topic, payload);
                }));
        }
        hub.load_active_deployment().await;
        hub.recover_async_calls().await?;
        hub.spawn_retention_sweeper();
        hub.spawn_demand_keeper();
        Ok(hub)
    }

    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// The hub's message bus (the binary serves its broker on `--mqtt`).
    pub fn bus(&self) -> &dyn MessageBus {
        &*self.inner.bus
    }

    pub fn logs(&self) -> &LogBook {
        &self.inner.logs
    }

    /// The connection counters of one listener (`http`, `mqtt`, ...), kept
    /// in the hub's registry.
    pub fn listener_metrics(&self, listener: &str) -> roost_listen::ListenerMetrics {
        self.inner.metrics.listener(listener)
    }

    /// Prometheus text exposition of every hub metric.
    pub fn metrics_text(&self) -> String {
        let m = &self.inner.metrics;
        let s = self.inner.scheduler.snapshot();
        m.queue_depth.set(s.queued as i64);
        m.queue_input_bytes.set(s.queued_input_bytes as i64);
        m.running.set(s.running as i64);
        m.memory_reserved_mb.set(s.reserved_mb as i64);
        let active = self.inner.active.read().clone();
        m.tasks_deployed.set(active.tasks.len() as i64);
        for (name, task) in &active.tasks {
            if let Some(p) = task.pool().map(|p| p.stats()) {
                let l = metrics::TaskLabel {
                    task: name.to_string(),
                };
                m.pool_workers.get_or_create(&l).set(p.workers as i64);
                m.pool_idle.get_or_create(&l).set(p.idle as i64);
                m.pool_target.get_or_create(&l).set(p.target as i64);
                m.pool_cold_starts
                    .get_or_create(&l)
                    .set(p.cold_starts as i64);
                m.pool_warm_hits.get_or_create(&l).set(p.warm_hits as i64);
            }
        }
        if let Ok(n) = self.inner.store.shadow_count() {
            m.shadows.set(n as i64);
        }
        m.encode()
    }

    /// Stops taking calls, lets running ones finish within `grace`, and
    /// leaves queued async calls on disk for the next start.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.inner.scheduler.close();
        let finished = tokio::time::timeout(grace, self.inner.scheduler.idle())
            .await
            .is_ok();
        if !finished {
            tracing::warn!(
                "grace period over with calls still running; they will run again after restart"
            );
        }
        // Every finished call's outcome is written before its permit goes,
        // so closing the store now flushes the last of them.
        self.inner.store.close();
        finished
    }

    /// Saves each pool's measured demand every few seconds, so a restarted
    /// hub pre-warms what it needed before.
    fn spawn_demand_keeper(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut last: HashMap<TaskName, roost_runtime::Demand> = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let active = inner.active.read().clone();
                for (name, task) in &active.tasks {
                    let Some(d) = task.pool().map(|p| p.demand()) else {
                        continue;
                    };
                    if last.get(name) == Some(&d) {
                        continue;
                    }
                    if inner
                        .store
                        .save_demand(name.as_str(), d.rate_per_s, d.service_s)
                        .await
                        .is_ok()
                    {
                        last.insert(name.clone(), d);
                    }
                }
            }
        });
    }

    fn spawn_retention_sweeper(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let before = roost_store::now_ms() - inner.config.retention.as_millis() as i64;
                match inner.store.purge_finished(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(purged = n, "removed finished calls past retention"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge finished calls"),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    /// The hub names no runtime and no broker: the crates that implement
    /// them are not among its dependencies (the broker may be a
    /// dev-dependency, for the hub's own tests), so a change inside one of
    /// them recompiles no hub.
    #[test]
    fn the_hub_depends_on_the_traits_not_their_implementations() {
        let manifest = include_str!("../Cargo.toml");
        let deps = manifest
            .split("[dependencies]")
            .nth(1)
            .and_then(|s| s.split("\n[").next())
            .expect("a [dependencies] table");
        for forbidden in [
            "roost-broker",
            "roost-runtime-wasm",
            "roost-runtime-process",
        ] {
            assert!(
                !deps.lines().any(|l| l.trim_start().starts_with(forbidden)),
                "roost-hub depends on {forbidden}: go through roost-bus / roost-runtime instead"
            );
        }
        for trait_crate in ["roost-bus", "roost-runtime"] {
            assert!(deps
                .lines()
                .any(|l| l.trim_start().starts_with(trait_crate)));
        }
    }
}
