//! A task's worker pool and the reservation policy that sizes it.
//!
//! The policy anticipates demand with Little's law: the number of workers
//! busy on average is the arrival rate times the service time, so the pool
//! keeps
//!
//! ```text
//! target = clamp( ceil( λ · S · (1 + HEADROOM) ), min_warm, max_workers )
//! ```
//!
//! warm, where λ is the smoothed arrival rate (calls/s, an exponentially
//! weighted moving average over 1 s windows, α = 0.5) and S the smoothed
//! service time (EWMA per call, α = 0.2), with HEADROOM = 0.5 for bursts;
//! while anything arrives the target is at least 1. Every tick the pool
//! starts workers up to the target in the background and retires idle
//! workers beyond it once they have been idle for IDLE_TTL.

use crate::isolation::Isolation;
use crate::worker::{Launcher, Worker, WorkerSpec};
use parking_lot::Mutex;
use roost_model::{Failure, FailureCode, TaskSpec};
use roost_runtime::{LogSink, PoolStats};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub const HEADROOM: f64 = 0.5;
pub const TICK: Duration = Duration::from_secs(1);
pub const IDLE_TTL: Duration = Duration::from_secs(30);
const RATE_ALPHA: f64 = 0.5;
const SERVICE_ALPHA: f64 = 0.2;

/// The reservation policy's formula (see the module comment).
pub fn target_workers(rate: f64, service_s: f64, min_warm: u32, max_workers: u32) -> u32 {
    let busy = rate * service_s * (1.0 + HEADROOM);
    let mut t = busy.ceil() as u32;
    if rate > 0.01 {
        t = t.max(1);
    }
    t.clamp(min_warm, max_workers.max(min_warm))
}

struct Demand {
    arrivals: u64,
    rate: f64,
    service_s: f64,
}

/// How a pool is sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolPolicy {
    /// The reservation policy above (the default).
    Demand,
    /// Exactly `min_warm` warm workers; a call beyond them starts a worker
    /// that is retired as soon as it is idle (the baseline the policy is
    /// measured against).
    Fixed,
}

/// Everything needed to start a worker of one task.
pub struct WorkerFactory {
    pub wspec: WorkerSpec,
    pub isolation: Isolation,
    pub logs: Arc<dyn LogSink>,
    pub hub_id: String,
    pub launcher: Launcher,
    pub policy: PoolPolicy,
    /// Worker ids, unique across every pool of the runtime: they name the
    /// workers' cgroups, which must never be shared between pools.
    pub ids: Arc<AtomicU64>,
}

pub struct Pool {
    spec: TaskSpec,
    factory: WorkerFactory,
    min_warm: u32,
    max_workers: u32,
    idle: Mutex<Vec<Worker>>,
    slots: Arc<Semaphore>,
    live: AtomicU32,
    target: AtomicU32,
    cold_starts: AtomicU64,
    warm_hits: AtomicU64,
    demand: Mutex<Demand>,
    retired: AtomicBool,
}

/// A worker leased for one call; returned to the pool when dropped.
pub struct Lease {
    pub(crate) worker: Option<Worker>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
    pub(crate) service: Option<Duration>,
    pub(crate) memory_mb: u32,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(s) = self.service {
            let mut d = self.pool.demand.lock();
            d.service_s = d.service_s * (1.0 - SERVICE_ALPHA) + s.as_secs_f64() * SERVICE_ALPHA;
        }
        if let Some(w) = self.worker.take() {
            let over_fixed = self.pool.factory.policy == PoolPolicy::Fixed
                && self.pool.idle.lock().len() as u32 >= self.pool.min_warm.max(1);
            if w.is_alive() && !self.pool.retired.load(Ordering::Relaxed) && !over_fixed {
                self.pool.idle.lock().push(w);
            } else {
                self.pool.live.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Pool {
    pub fn new(
        spec: TaskSpec,
        factory: WorkerFactory,
        min_warm: u32,
        max_workers: u32,
    ) -> Arc<Self> {
        Arc::new(Self {
            spec,
            factory,
            min_warm,
            max_workers,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max_workers as usize)),
            live: AtomicU32::new(0),
            target: AtomicU32::new(min_warm),
            cold_starts: AtomicU64::new(0),
            warm_hits: AtomicU64::new(0),
            demand: Mutex::new(Demand {
                arrivals: 0,
                rate: 0.0,
                service_s: 0.0,
            }),
            retired: AtomicBool::new(false),
        })
    }

    async fn start_worker(&self) -> Result<Worker, Failure> {
        let id = self.factory.ids.fetch_add(1, Ordering::Relaxed);
        let f = &self.factory;
        let group = f
            .isolation
            .worker_group(
                &format!("{}-{id}", self.spec.name),
                self.spec.limits.memory_mb,
            )
            .map_err(|e| {
                Failure::new(
                    FailureCode::Crashed,
                    format!("cannot create the worker's cgroup: {e}"),
                )
            })?;
        self.live.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        match Worker::start(id, &f.wspec, group, f.logs.clone(), &f.hub_id, &f.launcher).await {
            Ok(w) => {
                tracing::info!(task = %self.spec.name, worker = id, ms = started.elapsed().as_millis() as u64, cgroup = w.in_cgroup(), "worker ready");
                Ok(w)
            }
            Err(f) => {
                self.live.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(task = %self.spec.name, worker = id, error = %f, "worker failed to start");
                Err(f)
            }
        }
    }

    /// Starts `n` workers and keeps them idle; fails on the first that
    /// cannot start.
    pub async fn prewarm(&self, n: u32) -> Result<(), Failure> {
        for _ in 0..n {
            let w = self.start_worker().await?;
            self.idle.lock().push(w);
        }
        Ok(())
    }

    /// A worker for one call: a warm one if any, else a new one (a cold start).
    pub async fn lease(self: &Arc<Self>) -> Result<Lease, Failure> {
        self.demand.lock().arrivals += 1;
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Failure::new(FailureCode::Unavailable, "the task was retired"))?;
        let warm = loop {
            let w = self.idle.lock().pop();
            match w {
                Some(w) if w.is_alive() => break Some(w),
                Some(_dead) => {
                    self.live.fetch_sub(1, Ordering::Relaxed);
                }
                None => break None,
            }
        };
        let worker = match warm {
            Some(w) => {
                self.warm_hits.fetch_add(1, Ordering::Relaxed);
                w
            }
            None => {
                self.cold_starts.fetch_add(1, Ordering::Relaxed);
                self.start_worker().await?
            }
        };
        Ok(Lease {
            worker: Some(worker),
            pool: self.clone(),
            _permit: permit,
            service: None,
            memory_mb: self.spec.limits.memory_mb,
        })
    }

    pub fn demand(&self) -> roost_runtime::Demand {
        let d = self.demand.lock();
        roost_runtime::Demand {
            rate_per_s: d.rate,
            service_s: d.service_s,
        }
    }

    /// Takes over demand measured before a restart and grows the pool to
    /// match it right away.
    pub fn resume_demand(self: &Arc<Self>, demand: roost_runtime::Demand) {
        {
            let mut d = self.demand.lock();
            d.rate = demand.rate_per_s.max(0.0);
            d.service_s = demand.service_s.max(0.0);
        }
        let target = target_workers(
            demand.rate_per_s,
            demand.service_s,
            self.min_warm,
            self.max_workers,
        );
        if self.factory.policy == PoolPolicy::Demand {
            self.target.store(target, Ordering::Relaxed);
            let pool = self.clone();
            tokio::spawn(async move {
                let live = pool.live.load(Ordering::Relaxed);
                for _ in live..target {
                    match pool.start_worker().await {
                        Ok(w) => pool.idle.lock().push(w),
                        Err(_) => break,
                    }
                }
                tracing::info!(task = %pool.spec.name, workers = target, "pre-warmed from the demand measured before the restart");
            });
        }
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            workers: self.live.load(Ordering::Relaxed),
            idle: self.idle.lock().len() as u32,
            target: self.target.load(Ordering::Relaxed),
            cold_starts: self.cold_starts.load(Ordering::Relaxed),
            warm_hits: self.warm_hits.load(Ordering::Relaxed),
        }
    }

    /// Stops the policy and kills idle workers; leased ones are killed when
    /// their call ends.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.slots.close();
        let idle: Vec<Worker> = std::mem::take(&mut *self.idle.lock());
        self.live.fetch_sub(idle.len() as u32, Ordering::Relaxed);
        drop(idle);
    }

    /// Runs the reservation policy every TICK until the pool is retired.
    pub fn start_policy(self: &Arc<Self>) {
        let weak: Weak<Pool> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                if pool.retired.load(Ordering::Relaxed) {
                    return;
                }
                pool.adjust().await;
            }
        });
    }

    async fn adjust(self: &Arc<Self>) {
        let fixed = self.factory.policy == PoolPolicy::Fixed;
        let target = {
            let mut d = self.demand.lock();
            let window_rate = d.arrivals as f64 / TICK.as_secs_f64();
            d.arrivals = 0;
            d.rate = d.rate * (1.0 - RATE_ALPHA) + window_rate * RATE_ALPHA;
            if fixed {
                self.min_warm
            } else {
                target_workers(d.rate, d.service_s, self.min_warm, self.max_workers)
            }
        };
        self.target.store(target, Ordering::Relaxed);
        // Grow: start the missing workers (in the background of this tick).
        let live = self.live.load(Ordering::Relaxed);
        for _ in live..target {
            match self.start_worker().await {
                Ok(w) => self.idle.lock().push(w),
                Err(_) => break,
            }
        }
        // Shrink: retire workers idle past the TTL while above the target.
        let mut idle = self.idle.lock();
        idle.retain(|w| {
            w.is_alive() || {
                self.live.fetch_sub(1, Ordering::Relaxed);
                false
            }
        });
        while self.live.load(Ordering::Relaxed) > target {
            let Some(pos) = idle.iter().position(|w| w.last_used.elapsed() > IDLE_TTL) else {
                break;
            };
            let w = idle.swap_remove(pos);
            self.live.fetch_sub(1, Ordering::Relaxed);
            tracing::info!(task = %self.spec.name, worker = w.id, "retiring an idle worker");
            drop(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_follows_littles_law_with_headroom_within_bounds() {
        // 10 calls/s of 200 ms keep 2 workers busy; with 50 % headroom, 3.
        assert_eq!(target_workers(10.0, 0.2, 0, 8), 3);
        assert_eq!(target_workers(10.0, 0.2, 0, 2), 2, "max_workers caps");
        assert_eq!(target_workers(0.0, 0.2, 1, 8), 1, "min_warm floors");
        assert_eq!(target_workers(0.0, 0.0, 0, 8), 0, "no demand, no workers");
        assert_eq!(
            target_workers(0.5, 0.01, 0, 8),
            1,
            "any demand keeps one warm"
        );
    }
}
