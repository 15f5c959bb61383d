//! The route table (event flow): each input — a device message, a task's
//! output, a timer tick — goes to every destination whose route matches it.
//!
//! Sources and destinations are components behind one trait per kind,
//! assembled from the deployment's `[[route]]`s. Device sources are matched
//! with a topic trie, so a message costs the depth of its topic, not the
//! number of routes. Each delivery runs on its own and retries with
//! backoff, so a failing destination never holds up the others.

use async_trait::async_trait;
use bytes::Bytes;
use roost_model::{RouteDestination, RouteSource, RouteSpec, TaskName};
use roost_topic::Trie;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// What the hub lends the route table to act with.
#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Queues a durable async call of `task` with `input`.
    async fn call_task(
        &self,
        task: &TaskName,
        input: Bytes,
        topic: Option<String>,
    ) -> Result<(), String>;
    /// Publishes to a device topic through the broker.
    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), String>;
    /// Applies an UpdateThingShadow document to a thing's classic shadow;
    /// resolves once it is stored (or refused).
    async fn update_shadow(&self, thing: &str, document: Bytes) -> Result<(), String>;
}

/// One kind of destination.
#[async_trait]
pub trait Destination: Send + Sync + 'static {
    fn describe(&self) -> String;
    async fn deliver(&self, message: &Routed) -> Result<(), String>;
}

struct TaskDestination {
    task: TaskName,
    hooks: Arc<dyn Hooks>,
}

#[async_trait]
impl Destination for TaskDestination {
    fn describe(&self) -> String {
        format!("task:{}", self.task)
    }
    async fn deliver(&self, m: &Routed) -> Result<(), String> {
        self.hooks
            .call_task(&self.task, m.payload.clone(), m.topic.clone())
            .await
    }
}

struct DeviceDestination {
    topic: String,
    hooks: Arc<dyn Hooks>,
}

#[async_trait]
impl Destination for DeviceDestination {
    fn describe(&self) -> String {
        format!("device:{}", self.topic)
    }
    async fn deliver(&self, m: &Routed) -> Result<(), String> {
        self.hooks.publish(&self.topic, m.payload.clone())
    }
}

struct ShadowDestination {
    thing: String,
    hooks: Arc<dyn Hooks>,
}

#[async_trait]
impl Destination for ShadowDestination {
    fn describe(&self) -> String {
        format!("shadow:{}", self.thing)
    }
    async fn deliver(&self, m: &Routed) -> Result<(), String> {
        self.hooks
            .update_shadow(&self.thing, m.payload.clone())
            .await
    }
}

/// Delivery counters, for metrics.
#[derive(Default)]
pub struct RouteStats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
}

/// The routes of the active deployment. Dropping it stops its timers.
pub struct RouteTable {
    devices: Trie<usize>,
    destinations: Vec<Arc<dyn Destination>>,
    /// Per device-route index: its destination.
    device_routes: Vec<usize>,
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
    pub fn empty(stats: Arc<RouteStats>) -> Self {
        Self {
            devices: Trie::default(),
            destinations: Vec::new(),
            device_routes: Vec::new(),
            by_task: HashMap::new(),
            by_thing: HashMap::new(),
            timers: Vec::new(),
            stats,
        }
    }

    /// Assembles the table from a deployment's routes; timers start now.
    pub fn build(specs: &[RouteSpec], hooks: Arc<dyn Hooks>, stats: Arc<RouteStats>) -> Self {
        let mut t = Self::empty(stats);
        for spec in specs {
            let dest: Arc<dyn Destination> = match &spec.to {
                RouteDestination::Task(task) => Arc::new(TaskDestination {
                    task: task.clone(),
                    hooks: hooks.clone(),
                }),
                RouteDestination::Device(topic) => Arc::new(DeviceDestination {
                    topic: topic.clone(),
                    hooks: hooks.clone(),
                }),
                RouteDestination::Shadow(thing) => Arc::new(ShadowDestination {
                    thing: thing.clone(),
                    hooks: hooks.clone(),
                }),
            };
            let d = t.destinations.len();
            t.destinations.push(dest.clone());
            match &spec.from {
                RouteSource::Device(filter) => {
                    let r = t.device_routes.len();
                    t.device_routes.push(d);
                    t.devices.insert(filter, &r.to_string(), r);
                }
                RouteSource::Task(task) => t.by_task.entry(task.clone()).or_default().push(d),
                RouteSource::Shadow(thing) => t.by_thing.entry(thing.clone()).or_default().push(d),
                RouteSource::Timer(ms) => {
                    let stats = t.stats.clone();
                    let every = Duration::from_millis(*ms);
                    t.timers.push(tokio::spawn(async move {
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
                                dest.clone(),
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
        t
    }

    pub fn len(&self) -> usize {
        self.destinations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.destinations.is_empty()
    }

    /// A device published `payload` to `topic`.
    pub fn on_device_message(&self, topic: &str, payload: &Bytes) {
        if self.device_routes.is_empty() {
            return;
        }
        let mut hits = Vec::new();
        self.devices.matching(topic, &mut hits);
        for (_, r) in hits {
            dispatch(
                self.destinations[self.device_routes[r]].clone(),
                Routed {
                    topic: Some(topic.to_owned()),
                    payload: payload.clone(),
                },
                self.stats.clone(),
            );
        }
    }

    /// A shadow of `thing` has a new delta (`delta` is the `/update/delta`
    /// document, published on `topic`).
    pub fn on_shadow_delta(&self, thing: &str, topic: &str, delta: &Bytes) {
        for &d in self.by_thing.get(thing).into_iter().flatten() {
            dispatch(
                self.destinations[d].clone(),
                Routed {
                    topic: Some(topic.to_owned()),
                    payload: delta.clone(),
                },
                self.stats.clone(),
            );
        }
    }

    /// `task` succeeded with `output`.
    pub fn on_task_output(&self, task: &TaskName, output: &Bytes) {
        for &d in self.by_task.get(task).into_iter().flatten() {
            dispatch(
                self.destinations[d].clone(),
                Routed {
                    topic: None,
                    payload: output.clone(),
                },
                self.stats.clone(),
            );
        }
    }
}

/// Delivers on its own task, retrying with exponential backoff.
fn dispatch(dest: Arc<dyn Destination>, m: Routed, stats: Arc<RouteStats>) {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=MAX_ATTEMPTS {
            match dest.deliver(&m).await {
                Ok(()) => {
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) if attempt < MAX_ATTEMPTS => {
                    stats.retried.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(to = %dest.describe(), attempt, error = %e, "route delivery failed; will retry");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(to = %dest.describe(), attempts = attempt, error = %e, "route delivery given up");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
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
        ) -> Result<(), String> {
            if self.fail_first.load(Ordering::Relaxed) > 0 {
                self.fail_first.fetch_sub(1, Ordering::Relaxed);
                return Err("busy".into());
            }
            self.calls.lock().unwrap().push((
                task.to_string(),
                String::from_utf8_lossy(&input).into(),
                topic,
            ));
            Ok(())
        }
        fn publish(&self, topic: &str, payload: Bytes) -> Result<(), String> {
            self.publishes
                .lock()
                .unwrap()
                .push((topic.into(), String::from_utf8_lossy(&payload).into()));
            Ok(())
        }
        async fn update_shadow(&self, thing: &str, document: Bytes) -> Result<(), String> {
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

    #[tokio::test]
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
        let t = RouteTable::build(&specs, rec.clone(), Arc::default());
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

    #[tokio::test]
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
        let stats = Arc::new(RouteStats::default());
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
        assert_eq!(stats.retried.load(Ordering::Relaxed), 2);
        assert_eq!(stats.delivered.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn timers_tick_until_the_table_is_dropped() {
        let rec = Arc::new(Recorder::default());
        let specs = vec![RouteSpec {
            from: RouteSource::Timer(100),
            to: RouteDestination::Device("tick".into()),
        }];
        let table = RouteTable::build(&specs, rec.clone(), Arc::new(RouteStats::default()));
        tokio::time::sleep(Duration::from_millis(350)).await;
        drop(table);
        let n = rec.publishes.lock().unwrap().len();
        assert!((2..=4).contains(&n), "{n} ticks");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            rec.publishes.lock().unwrap().len(),
            n,
            "no ticks after drop"
        );
    }
}
