//! The route table (event flow): each input — a device message, a task's
//! output, a shadow delta, a timer tick — goes to every destination whose
//! route matches it.
//!
//! Sources and destinations are one scheme: the closed enums the manifest
//! parses a `[[route]]` into, `RouteSource` and `RouteDestination`
//! (`roost_model`), each handled by one `match` here (`RouteTable::attach`
//! for sources, `Route::deliver` for destinations). We chose enums over a
//! `Source`/`Destination` trait pair because the endpoints are a set the
//! manifest syntax closes (`device:`, `task:`, `shadow:`, `timer:`), not
//! plug-ins; every destination acts through the hub's `Hooks` anyway (a
//! trait impl per kind only forwarded to it); and each source needs an index
//! only the table keeps (the device trie, the task and thing maps, a timer
//! task), which a trait would have to reach into. A new endpoint such as
//! `cloud:` is one variant in each model enum, and the compiler points at
//! the one arm to add here.
//!
//! Device sources are matched with a topic trie, so a message costs the
//! depth of its topic, not the number of routes. Each route has a lane: a
//! bounded backlog and a few deliveries in flight, each retrying with
//! backoff, so a failing or busy destination never holds up the others and
//! a flood into one route costs bounded memory. A delivery the hub is too
//! busy to take (the route's queue share is full) waits, with backoff, for
//! as long as the route is deployed; a message that finds the backlog full
//! is dropped and counted.

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use roost_model::{RouteDestination, RouteSource, RouteSpec, TaskName};
use roost_topic::Trie;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Attempts a delivery gets before it is given up (and logged); waits for a
/// busy destination do not count.
pub const MAX_ATTEMPTS: u32 = 8;

/// Deliveries of one route in flight at once.
pub const IN_FLIGHT: usize = 16;

/// The longest wait between two tries of a busy destination.
const BUSY_WAIT_MAX: Duration = Duration::from_secs(5);

/// How much each route may hold.
#[derive(Clone, Copy, Debug)]
pub struct RouteLimits {
    /// Messages waiting in one route's backlog (besides the `IN_FLIGHT`
    /// being delivered); past it, new messages are dropped and counted.
    pub backlog: usize,
}

impl Default for RouteLimits {
    fn default() -> Self {
        Self { backlog: 1000 }
    }
}

/// A message on its way through a route.
#[derive(Clone, Debug)]
pub struct Routed {
    /// The device topic it came from, if any (a task sees it as
    /// `ROOST_TOPIC` or the client context's `custom.topic`).
    pub topic: Option<String>,
    pub payload: Bytes,
}

/// What a destination's own cause of failure is, kept as the error's source.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why one attempt at a delivery failed; the route table retries it.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the hub is shutting down")]
    ShuttingDown,
    #[error("the task call was not queued: {0}")]
    Call(#[source] Cause),
    /// The destination cannot take it now (the route's share of the hub's
    /// queue is full): the delivery waits and tries again, without limit.
    #[error("the destination is busy: {0}")]
    Busy(#[source] Cause),
    #[error("the message was not published: {0}")]
    Publish(#[source] Cause),
    #[error("the shadow was not updated: {0}")]
    Shadow(#[source] Cause),
}

/// What the hub lends the route table to act with.
#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Queues a durable async call of `task` with `input`, charged to
    /// route `route`'s share of the queue (its place in the deployment).
    async fn call_task(
        &self,
        route: u32,
        task: &TaskName,
        input: Bytes,
        topic: Option<String>,
    ) -> Result<(), DeliveryError>;
    /// Publishes to a device topic through the broker.
    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), DeliveryError>;
    /// Applies an UpdateThingShadow document to a thing's classic shadow;
    /// resolves once it is stored (or refused).
    async fn update_shadow(&self, thing: &str, document: Bytes) -> Result<(), DeliveryError>;
}

/// One route's destination, with the hooks it acts through.
struct Route {
    /// Its place in the deployment's routes.
    id: u32,
    to: RouteDestination,
    hooks: Arc<dyn Hooks>,
    /// When a dropped message was last logged (ms since the table was
    /// built), so a flood logs once a second, not once a message.
    last_drop_log_ms: AtomicU64,
}

impl Route {
    /// How the manifest names the destination, for logs.
    fn describe(&self) -> String {
        match &self.to {
            RouteDestination::Task(task) => format!("task:{task}"),
            RouteDestination::Device(topic) => format!("device:{topic}"),
            RouteDestination::Shadow(thing) => format!("shadow:{thing}"),
        }
    }

    async fn deliver(&self, m: &Routed) -> Result<(), DeliveryError> {
        match &self.to {
            RouteDestination::Task(task) => {
                self.hooks
                    .call_task(self.id, task, m.payload.clone(), m.topic.clone())
                    .await
            }
            RouteDestination::Device(topic) => self.hooks.publish(topic, m.payload.clone()),
            RouteDestination::Shadow(thing) => {
                self.hooks.update_shadow(thing, m.payload.clone()).await
            }
        }
    }
}

/// What became of a delivery attempt: the `outcome` label of
/// `roost_route_deliveries_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// An attempt failed and will be tried again.
    Retried,
    /// The destination was busy; the delivery waits and tries again.
    Waited,
    /// The route's backlog was full: the message was not kept.
    Dropped,
    Failed,
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Outcome::Delivered => "delivered",
            Outcome::Retried => "retried",
            Outcome::Waited => "waited",
            Outcome::Dropped => "dropped",
            Outcome::Failed => "failed",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub outcome: Outcome,
}

/// Delivery counters, for metrics: the hub registers `deliveries` in its
/// registry. Clones count into the same counters.
#[derive(Clone)]
pub struct RouteStats {
    pub deliveries: Family<DeliveryLabels, Counter>,
    // The family's own counters, kept so a delivery counts without a lookup.
    delivered: Counter,
    retried: Counter,
    waited: Counter,
    dropped: Counter,
    failed: Counter,
}

impl Default for RouteStats {
    fn default() -> Self {
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        // Created up front, so every outcome is exposed from the start (at 0).
        let counter = |outcome| {
            deliveries
                .get_or_create(&DeliveryLabels { outcome })
                .clone()
        };
        Self {
            delivered: counter(Outcome::Delivered),
            retried: counter(Outcome::Retried),
            waited: counter(Outcome::Waited),
            dropped: counter(Outcome::Dropped),
            failed: counter(Outcome::Failed),
            deliveries,
        }
    }
}

impl RouteStats {
    fn counter(&self, outcome: Outcome) -> &Counter {
        match outcome {
            Outcome::Delivered => &self.delivered,
            Outcome::Retried => &self.retried,
            Outcome::Waited => &self.waited,
            Outcome::Dropped => &self.dropped,
            Outcome::Failed => &self.failed,
        }
    }

    /// Deliveries with `outcome` so far.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.counter(outcome).get()
    }
}

/// One route and the sending end of its lane.
struct Lane {
    route: Arc<Route>,
    tx: mpsc::Sender<Routed>,
}

/// The routes of the active deployment. Dropping it stops its timers and
/// the waits for busy destinations (what its lanes hold is still tried).
pub struct RouteTable {
    /// One per `[[route]]`, in manifest order.
    routes: Vec<Lane>,
    // The sources' indexes, each naming routes by their place in `routes`.
    devices: Trie<usize>,
    by_task: HashMap<TaskName, Vec<usize>>,
    by_thing: HashMap<String, Vec<usize>>,
    timers: Vec<tokio::task::JoinHandle<()>>,
    stats: Arc<RouteStats>,
    /// Cancelled when the table is replaced: busy waits give up.
    retired: CancellationToken,
    built: std::time::Instant,
}

impl Drop for RouteTable {
    fn drop(&mut self) {
        for t in &self.timers {
            t.abort();
        }
        self.retired.cancel();
    }
}

impl RouteTable {
    pub fn empty(stats: RouteStats) -> Self {
        Self {
            routes: Vec::new(),
            devices: Trie::default(),
            by_task: HashMap::new(),
            by_thing: HashMap::new(),
            timers: Vec::new(),
            stats: Arc::new(stats),
            retired: CancellationToken::new(),
            built: std::time::Instant::now(),
        }
    }

    /// Assembles the table from a deployment's routes; timers and lanes
    /// start now.
    pub fn build(
        specs: &[RouteSpec],
        hooks: Arc<dyn Hooks>,
        stats: RouteStats,
        limits: RouteLimits,
    ) -> Self {
        let mut t = Self::empty(stats);
        for spec in specs {
            let r = t.routes.len();
            let route = Arc::new(Route {
                id: r as u32,
                to: spec.to.clone(),
                hooks: hooks.clone(),
                last_drop_log_ms: AtomicU64::new(0),
            });
            let tx = lane(
                route.clone(),
                limits.backlog.max(1),
                t.stats.clone(),
                t.retired.clone(),
            );
            t.routes.push(Lane { route, tx });
            t.attach(&spec.from, r);
        }
        t
    }

    /// Makes `source` feed route `r`.
    fn attach(&mut self, source: &RouteSource, r: usize) {
        match source {
            RouteSource::Device(filter) => {
                self.devices.insert(filter, &r.to_string(), r);
            }
            RouteSource::Task(task) => self.by_task.entry(task.clone()).or_default().push(r),
            RouteSource::Shadow(thing) => self.by_thing.entry(thing.clone()).or_default().push(r),
            RouteSource::Timer(ms) => {
                let (route, tx) = (self.routes[r].route.clone(), self.routes[r].tx.clone());
                let (stats, built) = (self.stats.clone(), self.built);
                let every = Duration::from_millis(*ms);
                self.timers.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis())
                            .unwrap_or(0);
                        dispatch(
                            &route,
                            &tx,
                            Routed {
                                topic: None,
                                payload: Bytes::from(format!("{{\"time_ms\":{now}}}")),
                            },
                            &stats,
                            built,
                        );
                    }
                }));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Sends `m` to each of `routes`.
    fn send(&self, routes: impl IntoIterator<Item = usize>, m: Routed) {
        for r in routes {
            let lane = &self.routes[r];
            dispatch(&lane.route, &lane.tx, m.clone(), &self.stats, self.built);
        }
    }

    /// A device published `payload` to `topic`.
    pub fn on_device_message(&self, topic: &str, payload: &Bytes) {
        if self.devices.is_empty() {
            return;
        }
        let mut hits = Vec::new();
        self.devices.matching(topic, &mut hits);
        self.send(
            hits.into_iter().map(|(_, r)| r),
            Routed {
                topic: Some(topic.to_owned()),
                payload: payload.clone(),
            },
        );
    }

    /// A shadow of `thing` has a new delta (`delta` is the `/update/delta`
    /// document, published on `topic`).
    pub fn on_shadow_delta(&self, thing: &str, topic: &str, delta: &Bytes) {
        self.send(
            self.by_thing.get(thing).into_iter().flatten().copied(),
            Routed {
                topic: Some(topic.to_owned()),
                payload: delta.clone(),
            },
        );
    }

    /// `task` succeeded with `output`.
    pub fn on_task_output(&self, task: &TaskName, output: &Bytes) {
        self.send(
            self.by_task.get(task).into_iter().flatten().copied(),
            Routed {
                topic: None,
                payload: output.clone(),
            },
        );
    }
}

/// Hands `m` to a route's lane, or drops it (counted, and logged at most
/// once a second per route) when the lane's backlog is full.
fn dispatch(
    route: &Route,
    tx: &mpsc::Sender<Routed>,
    m: Routed,
    stats: &RouteStats,
    built: std::time::Instant,
) {
    match tx.try_send(m) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            stats.counter(Outcome::Dropped).inc();
            let now = built.elapsed().as_millis() as u64;
            let last = route.last_drop_log_ms.load(Ordering::Relaxed);
            if (last == 0 || now.saturating_sub(last) >= 1000)
                && route
                    .last_drop_log_ms
                    .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(to = %route.describe(), dropped_total = stats.count(Outcome::Dropped), "a route's backlog is full: messages are dropped (see roost_route_deliveries_total{{outcome=\"dropped\"}}; raise --route-backlog or the destination's capacity)");
            }
        }
        // The table was replaced: the message goes nowhere.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Starts a route's lane: up to `backlog` messages wait, `IN_FLIGHT` are
/// delivered at a time. It ends once its table is gone and it is empty.
fn lane(
    route: Arc<Route>,
    backlog: usize,
    stats: Arc<RouteStats>,
    retired: CancellationToken,
) -> mpsc::Sender<Routed> {
    let (tx, mut rx) = mpsc::channel::<Routed>(backlog);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        while let Some(m) = rx.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (route, stats, retired) = (route.clone(), stats.clone(), retired.clone());
            tokio::spawn(async move {
                deliver(&route, &m, &stats, &retired).await;
                drop(slot);
            });
        }
    });
    tx
}

/// One delivery: retried with exponential backoff up to `MAX_ATTEMPTS`
/// when it fails, and waited for without limit while the destination is
/// busy (until the route leaves the deployment).
async fn deliver(route: &Route, m: &Routed, stats: &RouteStats, retired: &CancellationToken) {
    let mut delay = Duration::from_millis(100);
    let mut busy_delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        match route.deliver(m).await {
            Ok(()) => {
                stats.counter(Outcome::Delivered).inc();
                return;
            }
            Err(DeliveryError::Busy(e)) => {
                stats.counter(Outcome::Waited).inc();
                tracing::debug!(to = %route.describe(), error = %e, "route destination busy; the delivery waits");
                tokio::select! {
                    _ = tokio::time::sleep(busy_delay) => {}
                    _ = retired.cancelled() => {
                        stats.counter(Outcome::Failed).inc();
                        tracing::warn!(to = %route.describe(), "a delivery waiting for a busy destination was given up: its route left the deployment");
                        return;
                    }
                }
                busy_delay = (busy_delay * 2).min(BUSY_WAIT_MAX);
            }
            Err(e) => {
                attempt += 1;
                if attempt >= MAX_ATTEMPTS {
                    stats.counter(Outcome::Failed).inc();
                    tracing::warn!(to = %route.describe(), attempts = attempt, error = %e, "route delivery given up");
                    return;
                }
                stats.counter(Outcome::Retried).inc();
                tracing::debug!(to = %route.describe(), attempt, error = %e, "route delivery failed; will retry");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(String, String, Option<String>)>>,
        publishes: Mutex<Vec<(String, String)>>,
        fail_first: AtomicU64,
        /// While set, task calls answer "busy".
        busy: std::sync::atomic::AtomicBool,
        /// When set, task calls wait on it before they are recorded.
        gate: Option<Arc<Semaphore>>,
        routes_seen: Mutex<Vec<u32>>,
    }

    #[async_trait]
    impl Hooks for Recorder {
        async fn call_task(
            &self,
            _route: u32,
            task: &TaskName,
            input: Bytes,
            topic: Option<String>,
        ) -> Result<(), DeliveryError> {
            if self.fail_first.load(Ordering::Relaxed) > 0 {
                self.fail_first.fetch_sub(1, Ordering::Relaxed);
                return Err(DeliveryError::Call("busy".into()));
            }
            if self.busy.load(Ordering::Relaxed) {
                return Err(DeliveryError::Busy("the share is full".into()));
            }
            if let Some(g) = &self.gate {
                let _ = g.acquire().await.map(|p| p.forget());
            }
            self.routes_seen.lock().unwrap().push(_route);
            self.calls.lock().unwrap().push((
                task.to_string(),
                String::from_utf8_lossy(&input).into(),
                topic,
            ));
            Ok(())
        }
        fn publish(&self, topic: &str, payload: Bytes) -> Result<(), DeliveryError> {
            self.publishes
                .lock()
                .unwrap()
                .push((topic.into(), String::from_utf8_lossy(&payload).into()));
            Ok(())
        }
        async fn update_shadow(&self, thing: &str, document: Bytes) -> Result<(), DeliveryError> {
            self.publishes.lock().unwrap().push((
                format!("shadow:{thing}"),
                String::from_utf8_lossy(&document).into(),
            ));
            Ok(())
        }
    }

    fn name(s: &str) -> TaskName {
        TaskName::parse(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_deltas_feed_their_thing_routes_and_shadows_take_documents() {
        let rec = Arc::new(Recorder::default());
        let specs = vec![
            RouteSpec {
                from: RouteSource::Shadow("lamp".into()),
                to: RouteDestination::Task(name("ctl")),
            },
            RouteSpec {
                from: RouteSource::Task(name("ctl")),
                to: RouteDestination::Shadow("lamp".into()),
            },
        ];
        let t = RouteTable::build(
            &specs,
            rec.clone(),
            RouteStats::default(),
            RouteLimits::default(),
        );
        let topic = "$aws/things/lamp/shadow/update/delta";
        t.on_shadow_delta("lamp", topic, &Bytes::from_static(b"{\"state\":{}}"));
        t.on_shadow_delta("other", topic, &Bytes::from_static(b"x"));
        t.on_task_output(
            &name("ctl"),
            &Bytes::from_static(b"{\"state\":{\"reported\":{}}}"),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let calls = rec.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].2.as_deref(), Some(topic));
        let p = rec.publishes.lock().unwrap().clone();
        assert_eq!(
            p,
            [("shadow:lamp".into(), "{\"state\":{\"reported\":{}}}".into())]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_goes_to_every_matching_route_and_failures_retry() {
        let rec = Arc::new(Recorder::default());
        rec.fail_first.store(2, Ordering::Relaxed);
        let specs = vec![
            RouteSpec {
                from: RouteSource::Device("sensors/+/temp".into()),
                to: RouteDestination::Task(name("thermo")),
            },
            RouteSpec {
                from: RouteSource::Device("sensors/#".into()),
                to: RouteDestination::Device("audit/all".into()),
            },
            RouteSpec {
                from: RouteSource::Device("other/#".into()),
                to: RouteDestination::Device("never".into()),
            },
            RouteSpec {
                from: RouteSource::Task(name("thermo")),
                to: RouteDestination::Device("commands/heater".into()),
            },
        ];
        let stats = RouteStats::default();
        let table = RouteTable::build(&specs, rec.clone(), stats.clone(), RouteLimits::default());
        table.on_device_message("sensors/s1/temp", &Bytes::from_static(b"21"));
        table.on_task_output(&name("thermo"), &Bytes::from_static(b"on"));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            *rec.calls.lock().unwrap(),
            vec![("thermo".into(), "21".into(), Some("sensors/s1/temp".into()))]
        );
        let mut p = rec.publishes.lock().unwrap().clone();
        p.sort();
        assert_eq!(
            p,
            vec![
                ("audit/all".into(), "21".into()),
                ("commands/heater".into(), "on".into())
            ]
        );
        assert_eq!(stats.count(Outcome::Retried), 2);
        assert_eq!(stats.count(Outcome::Delivered), 3);
    }

    // The paused clock moves only when every task waits, so each tick's
    // delivery has run before the next instant: the count is exact.
    #[tokio::test(start_paused = true)]
    async fn timers_tick_until_the_table_is_dropped() {
        let rec = Arc::new(Recorder::default());
        let specs = vec![RouteSpec {
            from: RouteSource::Timer(100),
            to: RouteDestination::Device("tick".into()),
        }];
        let table = RouteTable::build(
            &specs,
            rec.clone(),
            RouteStats::default(),
            RouteLimits::default(),
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        drop(table);
        let n = rec.publishes.lock().unwrap().len();
        assert_eq!(n, 3, "ticks at 100, 200 and 300 ms");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            rec.publishes.lock().unwrap().len(),
            n,
            "no ticks after drop"
        );
    }

    fn to_task(n: usize) -> Vec<RouteSpec> {
        (0..n)
            .map(|i| RouteSpec {
                from: RouteSource::Device(format!("in/{i}")),
                to: RouteDestination::Task(name("worker")),
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_destination_is_waited_for_not_given_up() {
        let rec = Arc::new(Recorder::default());
        rec.busy.store(true, Ordering::Relaxed);
        let stats = RouteStats::default();
        let table = RouteTable::build(
            &to_task(2),
            rec.clone(),
            stats.clone(),
            RouteLimits::default(),
        );
        table.on_device_message("in/1", &Bytes::from_static(b"m"));
        // Far longer than MAX_ATTEMPTS retries would last.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(rec.calls.lock().unwrap().is_empty());
        assert_eq!(
            stats.count(Outcome::Failed),
            0,
            "a busy wait never fails for good"
        );
        assert!(stats.count(Outcome::Waited) > MAX_ATTEMPTS as u64);
        rec.busy.store(false, Ordering::Relaxed);
        tokio::time::sleep(BUSY_WAIT_MAX * 2).await;
        assert_eq!(stats.count(Outcome::Delivered), 1);
        assert_eq!(
            *rec.routes_seen.lock().unwrap(),
            vec![1],
            "charged to its route"
        );
        // A wait for a busy destination ends when the route leaves.
        rec.busy.store(true, Ordering::Relaxed);
        table.on_device_message("in/0", &Bytes::from_static(b"m"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(table);
        tokio::time::sleep(BUSY_WAIT_MAX * 2).await;
        assert_eq!(stats.count(Outcome::Failed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_into_one_route_is_bounded_by_its_backlog_and_spares_the_others() {
        let gate = Arc::new(Semaphore::new(0));
        let rec = Arc::new(Recorder {
            gate: Some(gate.clone()),
            ..Recorder::default()
        });
        let stats = RouteStats::default();
        let mut specs = to_task(1);
        specs.push(RouteSpec {
            from: RouteSource::Device("quiet".into()),
            to: RouteDestination::Device("out".into()),
        });
        let table = RouteTable::build(
            &specs,
            rec.clone(),
            stats.clone(),
            RouteLimits { backlog: 10 },
        );
        for _ in 0..1000 {
            table.on_device_message("in/0", &Bytes::from_static(b"flood"));
            tokio::task::yield_now().await;
        }
        table.on_device_message("quiet", &Bytes::from_static(b"q"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        // IN_FLIGHT wait at the gate, at most 10 more in the backlog (one
        // more may be between the two), every other message was dropped.
        let dropped = stats.count(Outcome::Dropped);
        assert!(
            (1000 - IN_FLIGHT as u64 - 11..=1000 - IN_FLIGHT as u64 - 10).contains(&dropped),
            "dropped {dropped}"
        );
        assert_eq!(
            *rec.publishes.lock().unwrap(),
            vec![("out".into(), "q".into())]
        );
        gate.add_permits(1000);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            rec.calls.lock().unwrap().len() as u64,
            1000 - dropped,
            "what was kept is delivered"
        );
    }
}
