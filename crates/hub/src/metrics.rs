//! Prometheus metrics of the hub core, all prefixed `roost_`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub task: String,
    /// `succeeded`, or the failure code.
    pub outcome: String,
    /// `sync`, `async` or `nested`.
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabel {
    pub task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    /// `get`, `update` or `delete`.
    pub operation: String,
    /// `accepted` or `rejected`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `lambda`, `iot-data` or `secretsmanager`.
    pub service: String,
    /// The HTTP status answered.
    pub status: String,
}

/// Which listener a connection counter is for: `http`, `mqtt`, `mqtts`,
/// `mqtt_ws`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

pub struct Metrics {
    registry: Registry,
    pub connections_open: Family<ListenerLabel, Gauge>,
    pub connections_max: Family<ListenerLabel, Gauge>,
    pub connections_refused: Family<ListenerLabel, Counter>,
    pub accept_errors: Family<ListenerLabel, Counter>,
    pub calls: Family<CallLabels, Counter>,
    pub duration: Family<TaskLabel, Histogram>,
    pub queue_wait: Histogram,
    pub queue_depth: Gauge,
    pub queue_input_bytes: Gauge,
    pub running: Gauge,
    pub memory_reserved_mb: Gauge,
    pub memory_budget_mb: Gauge,
    pub rejected: Counter,
    pub retries: Counter,
    pub deployments: Counter,
    pub tasks_deployed: Gauge,
    pub pool_workers: Family<TaskLabel, Gauge>,
    pub pool_idle: Family<TaskLabel, Gauge>,
    pub pool_target: Family<TaskLabel, Gauge>,
    pub pool_cold_starts: Family<TaskLabel, Gauge>,
    pub pool_warm_hits: Family<TaskLabel, Gauge>,
    pub shadows: Gauge,
    pub shadow_requests: Family<ShadowLabels, Counter>,
    pub local_requests: Family<ServiceLabels, Counter>,
    /// The route table's delivery counters (each deployment's table counts
    /// into these).
    pub routes: roost_routes::RouteStats,
    /// Succeeded and failed calls per task, for `GET /v1/tasks`.
    totals: parking_lot::Mutex<std::collections::HashMap<String, (u64, u64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("roost");
        let calls = Family::<CallLabels, Counter>::default();
        let duration = Family::<TaskLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        });
        let queue_wait = Histogram::new([0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0]);
        let m = Self {
            connections_open: Family::default(),
            connections_max: Family::default(),
            connections_refused: Family::default(),
            accept_errors: Family::default(),
            calls,
            duration,
            queue_wait,
            queue_depth: Gauge::default(),
            queue_input_bytes: Gauge::default(),
            running: Gauge::default(),
            memory_reserved_mb: Gauge::default(),
            memory_budget_mb: Gauge::default(),
            rejected: Counter::default(),
            retries: Counter::default(),
            deployments: Counter::default(),
            tasks_deployed: Gauge::default(),
            totals: Default::default(),
            pool_workers: Family::default(),
            pool_idle: Family::default(),
            pool_target: Family::default(),
            pool_cold_starts: Family::default(),
            pool_warm_hits: Family::default(),
            shadows: Gauge::default(),
            shadow_requests: Family::default(),
            local_requests: Family::default(),
            routes: roost_routes::RouteStats::default(),
            registry: Registry::default(),
        };
        registry.register(
            "calls",
            "Calls finished, by task, outcome and mode",
            m.calls.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "Time a call ran (queue wait excluded), by task",
            m.duration.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time calls waited for admission",
            m.queue_wait.clone(),
        );
        registry.register(
            "queue_depth",
            "Calls waiting for admission",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_input_bytes",
            "Bytes of input the calls waiting for admission hold",
            m.queue_input_bytes.clone(),
        );
        registry.register("calls_running", "Calls running now", m.running.clone());
        registry.register(
            "memory_reserved_mb",
            "Memory reserved by running calls (sum of their tasks' memory_mb)",
            m.memory_reserved_mb.clone(),
        );
        registry.register(
            "memory_budget_mb",
            "The hub's memory budget for calls",
            m.memory_budget_mb.clone(),
        );
        registry.register(
            "queue_rejected",
            "Calls refused because the queue was full",
            m.rejected.clone(),
        );
        registry.register(
            "async_retries",
            "Async call attempts that failed and were retried",
            m.retries.clone(),
        );
        registry.register(
            "deployments",
            "Deployments applied (including rollbacks)",
            m.deployments.clone(),
        );
        registry.register(
            "tasks_deployed",
            "Tasks in the active deployment",
            m.tasks_deployed.clone(),
        );
        registry.register(
            "pool_workers",
            "Worker processes alive per process task",
            m.pool_workers.clone(),
        );
        registry.register(
            "pool_idle",
            "Idle (warm) workers per process task",
            m.pool_idle.clone(),
        );
        registry.register(
            "pool_target",
            "Workers the reservation policy asks for per process task",
            m.pool_target.clone(),
        );
        registry.register(
            "pool_cold_starts",
            "Calls that started a worker (since the task was deployed)",
            m.pool_cold_starts.clone(),
        );
        registry.register(
            "pool_warm_hits",
            "Calls served by a warm worker (since the task was deployed)",
            m.pool_warm_hits.clone(),
        );
        registry.register("shadows", "Shadows kept on the hub", m.shadows.clone());
        registry.register(
            "shadow_requests",
            "Shadow requests (MQTT, HTTP and routes), by operation and outcome",
            m.shadow_requests.clone(),
        );
        registry.register(
            "local_service_requests",
            "Requests to the local AWS service overrides, by service and status",
            m.local_requests.clone(),
        );
        registry.register(
            "route_deliveries",
            "Route deliveries by outcome",
            m.routes.deliveries.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open, by listener",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_max",
            "The cap on client connections, by listener",
            m.connections_max.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections refused at the listener's cap",
            m.connections_refused.clone(),
        );
        registry.register(
            "accept_errors",
            "Accepts that failed for want of resources (EMFILE...) and were retried",
            m.accept_errors.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn count(&self, task: &str, succeeded: bool) {
        let mut t = self.totals.lock();
        let e = t.entry(task.to_owned()).or_default();
        if succeeded {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    /// (succeeded, failed) calls of a task since the hub started.
    pub fn totals(&self, task: &str) -> (u64, u64) {
        self.totals.lock().get(task).copied().unwrap_or_default()
    }

    /// The counters of the listener named `listener`, for its accept loop.
    pub fn listener(&self, listener: &str) -> roost_listen::ListenerMetrics {
        let l = ListenerLabel {
            listener: listener.to_owned(),
        };
        roost_listen::ListenerMetrics {
            open: self.connections_open.get_or_create(&l).clone(),
            max: self.connections_max.get_or_create(&l).clone(),
            refused: self.connections_refused.get_or_create(&l).clone(),
            accept_errors: self.accept_errors.get_or_create(&l).clone(),
        }
    }

    /// The registry, for other components to register their own metrics
    /// in (the broker's, for one) before the hub starts serving.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
