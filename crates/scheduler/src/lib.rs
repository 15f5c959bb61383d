//! The scheduler: one queue of calls and the admission decision.
//!
//! A call asks for a [`Demand`] (its task, the memory it reserves, its
//! task's concurrency and priority) and gets a [`Ticket`]; the ticket turns
//! into a [`Permit`] when the hub can run it, and the permit gives the
//! resources back when dropped. Calls that do not fit wait, never fail for
//! being early. The scheduler knows nothing of what a call runs, of HTTP or
//! of the store.
//!
//! Admission, in order:
//! 1. Each task's queue is FIFO; only its head competes.
//! 2. A head whose task already runs `concurrency` calls is passed over
//!    (it blocks only its own task).
//! 3. Among the rest, the highest *effective* priority wins:
//!    `priority + waited / aging` (one level per `aging` of waiting), so a
//!    low priority is never starved; ties go to the older call.
//! 4. The winner runs if its memory fits in the budget and a CPU slot is
//!    free; if not, nothing behind it is admitted either (a big call is not
//!    starved by a stream of small ones).

use parking_lot::Mutex;
use roost_model::TaskName;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Memory the hub lets running calls reserve, in MiB.
    pub memory_budget_mb: u64,
    /// Calls that may run at once (the CPU bound).
    pub cpu_slots: u32,
    /// Calls that may wait at once; past it, submissions are refused.
    pub queue_limit: usize,
    /// Waiting this long is worth one priority level.
    pub aging: Duration,
}

/// What one call needs.
#[derive(Clone, Debug)]
pub struct Demand {
    pub task: TaskName,
    pub memory_mb: u32,
    pub concurrency: u32,
    pub priority: i32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejected {
    #[error("the hub's queue is full ({queued} calls waiting); retry after {retry_after:?}")]
    QueueFull {
        queued: usize,
        retry_after: Duration,
    },
    #[error("the task needs {need_mb} MiB but the hub's memory budget is {budget_mb} MiB; lower memory_mb or raise --memory-budget-mb")]
    TooLarge { need_mb: u32, budget_mb: u64 },
    #[error("the hub is shutting down")]
    Closed,
}

/// Counters for metrics and `/v1/tasks`.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub queued: usize,
    pub running: u32,
    pub reserved_mb: u64,
    pub per_task: Vec<(TaskName, usize, u32)>,
}

struct Waiter {
    seq: u64,
    since: Instant,
    demand: Demand,
    tx: oneshot::Sender<Permit>,
}

#[derive(Default)]
struct TaskQueue {
    running: u32,
    waiting: VecDeque<Waiter>,
}

struct State {
    queues: HashMap<TaskName, TaskQueue>,
    queued: usize,
    running: u32,
    reserved_mb: u64,
    seq: u64,
    closed: bool,
    /// Recent mean run time, for the Retry-After estimate.
    mean_run: Duration,
}

struct Inner {
    config: SchedulerConfig,
    state: Mutex<State>,
    idle: Notify,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

/// A place in the queue. Dropping it gives the place up.
pub struct Ticket {
    rx: oneshot::Receiver<Permit>,
}

impl Ticket {
    /// Waits until the call is admitted. Fails only if the hub shuts down.
    pub async fn admitted(self) -> Result<Permit, Rejected> {
        self.rx.await.map_err(|_| Rejected::Closed)
    }
}

/// Resources held by one running call; released on drop.
pub struct Permit {
    inner: Option<Arc<Inner>>,
    task: TaskName,
    memory_mb: u32,
    started: Instant,
    waited: Duration,
}

impl Permit {
    /// How long the call waited in the queue.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let mut st = inner.state.lock();
            release(&mut st, &self.task, self.memory_mb);
            let ran = self.started.elapsed();
            st.mean_run = (st.mean_run * 7 + ran) / 8;
            dispatch(&inner, &mut st);
            if st.running == 0 {
                inner.idle.notify_waiters();
            }
        }
    }
}

fn release(st: &mut State, task: &TaskName, memory_mb: u32) {
    st.running -= 1;
    st.reserved_mb -= memory_mb as u64;
    if let Some(q) = st.queues.get_mut(task) {
        q.running -= 1;
        if q.running == 0 && q.waiting.is_empty() {
            st.queues.remove(task);
        }
    }
}

fn dispatch(inner: &Arc<Inner>, st: &mut State) {
    let cfg = &inner.config;
    loop {
        let now = Instant::now();
        let mut best: Option<(&TaskName, f64, u64)> = None;
        for (name, q) in st.queues.iter_mut() {
            while q.waiting.front().is_some_and(|w| w.tx.is_closed()) {
                q.waiting.pop_front();
                st.queued -= 1;
            }
            let Some(head) = q.waiting.front() else {
                continue;
            };
            if q.running >= head.demand.concurrency {
                continue;
            }
            let waited = now.duration_since(head.since).as_secs_f64();
            let effective = head.demand.priority as f64 + waited / cfg.aging.as_secs_f64();
            let better = match best {
                None => true,
                Some((_, e, seq)) => effective > e || (effective == e && head.seq < seq),
            };
            if better {
                best = Some((name, effective, head.seq));
            }
        }
        let Some((name, _, _)) = best else { return };
        let name = name.clone();
        let q = st.queues.get_mut(&name).expect("chosen queue exists");
        let need = q
            .waiting
            .front()
            .expect("chosen head exists")
            .demand
            .memory_mb as u64;
        if st.reserved_mb + need > cfg.memory_budget_mb || st.running >= cfg.cpu_slots {
            return;
        }
        let w = q.waiting.pop_front().expect("chosen head exists");
        q.running += 1;
        st.queued -= 1;
        st.running += 1;
        st.reserved_mb += need;
        let permit = Permit {
            inner: Some(inner.clone()),
            task: name.clone(),
            memory_mb: w.demand.memory_mb,
            started: now,
            waited: now.duration_since(w.since),
        };
        if let Err(mut permit) = w.tx.send(permit) {
            // The caller went away between the check and the send.
            permit.inner = None;
            release(st, &name, w.demand.memory_mb);
        }
    }
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State {
                    queues: HashMap::new(),
                    queued: 0,
                    running: 0,
                    reserved_mb: 0,
                    seq: 0,
                    closed: false,
                    mean_run: Duration::from_millis(50),
                }),
                idle: Notify::new(),
            }),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.inner.config
    }

    /// Queues a call. `bounded = false` is for calls the hub already
    /// acknowledged (async calls reloaded after a restart or retried): they
    /// are never refused for a full queue.
    pub fn submit(&self, demand: Demand, bounded: bool) -> Result<Ticket, Rejected> {
        let cfg = &self.inner.config;
        if demand.memory_mb as u64 > cfg.memory_budget_mb {
            return Err(Rejected::TooLarge {
                need_mb: demand.memory_mb,
                budget_mb: cfg.memory_budget_mb,
            });
        }
        let mut st = self.inner.state.lock();
        if st.closed {
            return Err(Rejected::Closed);
        }
        if bounded && st.queued >= cfg.queue_limit {
            // Callers that gave up still hold places; count them out first.
            let mut freed = 0;
            for q in st.queues.values_mut() {
                let before = q.waiting.len();
                q.waiting.retain(|w| !w.tx.is_closed());
                freed += before - q.waiting.len();
            }
            st.queued -= freed;
            if st.queued >= cfg.queue_limit {
                let per_slot = st.mean_run.max(Duration::from_millis(1));
                let wait = per_slot * (st.queued as u32 / cfg.cpu_slots.max(1) + 1);
                return Err(Rejected::QueueFull {
                    queued: st.queued,
                    retry_after: wait.clamp(Duration::from_secs(1), Duration::from_secs(60)),
                });
            }
        }
        let (tx, rx) = oneshot::channel();
        st.seq += 1;
        let seq = st.seq;
        st.queued += 1;
        st.queues
            .entry(demand.task.clone())
            .or_default()
            .waiting
            .push_back(Waiter {
                seq,
                since: Instant::now(),
                demand,
                tx,
            });
        dispatch(&self.inner, &mut st);
        Ok(Ticket { rx })
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = self.inner.state.lock();
        let mut per_task: Vec<_> = st
            .queues
            .iter()
            .map(|(n, q)| (n.clone(), q.waiting.len(), q.running))
            .collect();
        per_task.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot {
            queued: st.queued,
            running: st.running,
            reserved_mb: st.reserved_mb,
            per_task,
        }
    }

    /// Stops admitting: waiting calls are dropped (their tickets fail with
    /// `Closed`), running ones keep their permits.
    pub fn close(&self) {
        let mut st = self.inner.state.lock();
        st.closed = true;
        for q in st.queues.values_mut() {
            q.waiting.clear();
        }
        st.queued = 0;
        st.queues.retain(|_, q| q.running > 0);
    }

    /// Resolves once no call is running.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.state.lock().running == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(budget: u64, slots: u32, limit: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            memory_budget_mb: budget,
            cpu_slots: slots,
            queue_limit: limit,
            aging: Duration::from_secs(1),
        })
    }

    fn demand(task: &str, mem: u32, conc: u32, prio: i32) -> Demand {
        Demand {
            task: TaskName::parse(task).unwrap(),
            memory_mb: mem,
            concurrency: conc,
            priority: prio,
        }
    }

    fn ready(t: &mut Ticket) -> Option<Permit> {
        t.rx.try_recv().ok()
    }

    #[test]
    fn calls_wait_for_memory_and_run_when_it_frees() {
        let s = sched(100, 10, 10);
        let mut a = s.submit(demand("a", 60, 10, 0), true).unwrap();
        let mut b = s.submit(demand("a", 60, 10, 0), true).unwrap();
        let pa = ready(&mut a).expect("first fits");
        assert!(ready(&mut b).is_none(), "second must wait");
        assert_eq!(s.snapshot().reserved_mb, 60);
        drop(pa);
        assert!(ready(&mut b).is_some(), "second runs once memory frees");
    }

    #[test]
    fn concurrency_blocks_only_its_own_task() {
        let s = sched(1000, 10, 10);
        let mut a1 = s.submit(demand("a", 1, 1, 0), true).unwrap();
        let mut a2 = s.submit(demand("a", 1, 1, 0), true).unwrap();
        let mut b = s.submit(demand("b", 1, 1, 0), true).unwrap();
        let _p = ready(&mut a1).unwrap();
        assert!(ready(&mut a2).is_none());
        assert!(ready(&mut b).is_some());
    }

    #[test]
    fn higher_priority_runs_first_and_low_priority_ages_in() {
        let s = sched(1000, 1, 10);
        let mut hold = s.submit(demand("x", 1, 1, 0), true).unwrap();
        let p = ready(&mut hold).unwrap();
        let mut low = s.submit(demand("low", 1, 1, 0), true).unwrap();
        let mut high = s.submit(demand("high", 1, 1, 5), true).unwrap();
        drop(p);
        let ph = ready(&mut high).expect("high priority first");
        assert!(ready(&mut low).is_none());
        drop(ph);
        assert!(ready(&mut low).is_some());

        // Aging: a low-priority call that waited long enough beats a newcomer.
        let s = Scheduler::new(SchedulerConfig {
            memory_budget_mb: 1000,
            cpu_slots: 1,
            queue_limit: 10,
            aging: Duration::from_millis(1),
        });
        let mut hold = s.submit(demand("x", 1, 1, 0), true).unwrap();
        let p = ready(&mut hold).unwrap();
        let mut old_low = s.submit(demand("low", 1, 1, 0), true).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let mut new_high = s.submit(demand("high", 1, 1, 10), true).unwrap();
        drop(p);
        let _pl = ready(&mut old_low).expect("aged call must not starve");
        assert!(ready(&mut new_high).is_none());
    }

    #[test]
    fn a_full_queue_refuses_with_retry_after_but_never_acknowledged_calls() {
        let s = sched(1000, 1, 2);
        let _run = s.submit(demand("a", 1, 1, 0), true).unwrap();
        let _w1 = s.submit(demand("a", 1, 1, 0), true).unwrap();
        let _w2 = s.submit(demand("a", 1, 1, 0), true).unwrap();
        match s.submit(demand("a", 1, 1, 0), true) {
            Err(Rejected::QueueFull { retry_after, .. }) => {
                assert!(retry_after >= Duration::from_secs(1))
            }
            other => panic!("expected QueueFull, got {:?}", other.err()),
        }
        assert!(s.submit(demand("a", 1, 1, 0), false).is_ok());
    }

    #[test]
    fn abandoned_tickets_free_their_place() {
        let s = sched(1000, 1, 1);
        let mut run = s.submit(demand("a", 1, 1, 0), true).unwrap();
        let p = ready(&mut run).unwrap();
        let waiting = s.submit(demand("a", 1, 1, 0), true).unwrap();
        drop(waiting);
        let mut next = s
            .submit(demand("a", 1, 1, 0), true)
            .expect("place was freed");
        drop(p);
        let _pn = ready(&mut next).expect("runs");
        assert_eq!(s.snapshot().running, 1);
    }

    #[test]
    fn a_call_larger_than_the_budget_is_refused_at_once() {
        let s = sched(10, 1, 1);
        assert!(matches!(
            s.submit(demand("a", 11, 1, 0), true),
            Err(Rejected::TooLarge { .. })
        ));
    }

    #[test]
    fn a_big_call_is_not_starved_by_small_ones() {
        let s = sched(100, 10, 10);
        let mut small1 = s.submit(demand("s", 50, 10, 0), true).unwrap();
        let p1 = ready(&mut small1).unwrap();
        let mut big = s.submit(demand("b", 100, 10, 0), true).unwrap();
        let mut small2 = s.submit(demand("s", 50, 10, 0), true).unwrap();
        assert!(
            ready(&mut small2).is_none(),
            "small call must not jump the big one"
        );
        drop(p1);
        let pb = ready(&mut big).expect("big runs once memory frees");
        drop(pb);
        assert!(ready(&mut small2).is_some());
    }

    #[tokio::test]
    async fn close_drops_waiting_calls_and_idle_waits_for_running_ones() {
        let s = sched(1000, 1, 10);
        let mut run = s.submit(demand("a", 1, 1, 0), true).unwrap();
        let p = ready(&mut run).unwrap();
        let waiting = s.submit(demand("a", 1, 1, 0), true).unwrap();
        s.close();
        assert_eq!(waiting.admitted().await.err(), Some(Rejected::Closed));
        assert!(s.submit(demand("a", 1, 1, 0), true).is_err());
        let idle = tokio::spawn({
            let s = s.clone();
            async move { s.idle().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!idle.is_finished());
        drop(p);
        idle.await.unwrap();
    }
}
