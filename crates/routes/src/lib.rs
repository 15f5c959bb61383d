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
//! depth of its topic, not the number of routes. Each delivery runs on its
//! own and retries with backoff, so a failing destination never holds up
//! the others.

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use roost_model::{RouteDestination, RouteSource, RouteSpec, TaskName};
use roost_topic::Trie;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Attempts a delivery gets before it is given up (and logged).
pub const MAX_ATTEMPTS: u32 = 8;

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
    #[error("the message was not published: {0}")]
    Publish(#[source] Cause),
    #[error("the shadow was not updated: {0}")]
    Shadow(#[source] Cause),
}

/// What the hub lends the route table to act with.
#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Queues a durable async call of `task` with `input`.
    async fn call_task(
        &self,
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
    to: RouteDestination,
    hooks: Arc<dyn Hooks>,
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
                    .call_task(task, m.payload.clone(), m.topic.clone())
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
    Retried,
    Failed,
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Outcome::Delivered => "delivered",
            Outcome::Retried => "retried",
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
            Outcome::Failed => &self.failed,
        }
    }

    /// Deliveries with `outcome` so far.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.counter(outcome).get()
    }
}

/// The routes of the active deployment. Dropping it stops its timers.
pub struct RouteTable {
    /// One per `[[route]]`, in manifest order.
    routes: Vec<Arc<Route>>,
    // The sources' indexes, each naming routes by their place in `routes`.
    devices: Trie<usize>,
    by_task: HashMap<TaskName, Vec<usize>>,
    by_thing: HashMap<String, Vec<usize>>,
    timers: Vec<tokio::task::JoinHandle<()>>,
    stats: Arc<RouteStats>,
}

impl Drop for RouteTable {
    fn drop(&mut self) {
        for t in &self.timers {
            t.abort();
        }
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
        }
    }

    /// Assembles the table from a deployment's routes; timers start now.
    pub fn build(specs: &[RouteSpec], hooks: Arc<dyn Hooks>, stats: RouteStats) -> Self {
        let mut t = Self::empty(stats);
        for spec in specs {
            let r = t.routes.len();
            t.routes.push(Arc::new(Route {
                to: spec.to.clone(),
                hooks: hooks.clone(),
            }));
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
                let route = self.routes[r].clone();
                let stats = self.stats.clone();
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
                            route.clone(),
                            Routed {
                                topic: None,
                                payload: Bytes::from(format!("{{\"time_ms\":{now}}}")),
                            },
                            stats.clone(),
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
            dispatch(self.routes[r].clone(), m.clone(), self.stats.clone());
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

/// Delivers on its own task, retrying with exponential backoff.
fn dispatch(route: Arc<Route>, m: Routed, stats: Arc<RouteStats>) {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=MAX_ATTEMPTS {
            match route.deliver(&m).await {
                Ok(()) => {
                    stats.counter(Outcome::Delivered).inc();
                    return;
                }
                Err(e) if attempt < MAX_ATTEMPTS => {
                    stats.counter(Outcome::Retried).inc();
                    tracing::debug!(to = %route.describe(), attempt, error = %e, "route delivery failed; will retry");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                Err(e) => {
                    stats.counter(Outcome::Failed).inc();
                    tracing::warn!(to = %route.describe(), attempts = attempt, error = %e, "route delivery given up");
                }
            }
        }
    });
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
    }

    #[async_trait]
    impl Hooks for Recorder {
        async fn call_task(
            &self,
            task: &TaskName,
            input: Bytes,
            topic: Option<String>,
        ) -> Result<(), DeliveryError> {
            if self.fail_first.load(Ordering::Relaxed) > 0 {
                self.fail_first.fetch_sub(1, Ordering::Relaxed);
                return Err(DeliveryError::Call("busy".into()));
            }
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
        let t = RouteTable::build(&specs, rec.clone(), RouteStats::default());
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
        let table = RouteTable::build(&specs, rec.clone(), stats.clone());
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
        let table = RouteTable::build(&specs, rec.clone(), RouteStats::default());
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
}
