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
//!
//! Places in the queue, before admission:
//! - at most `queue_limit` calls wait, and their inputs at most
//!   `queued_input_limit` bytes (a waiting sync call holds its input);
//! - each call is charged to a [`Share`] (the task it calls or that makes
//!   it, or the route delivering it). Half the queue is split evenly among
//!   the deployment's shares, each share's own; the other half is common,
//!   first come. A noisy task or route fills its own part and the common
//!   part, never another share's.

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
    /// Bytes of input that waiting calls may hold at once; past it,
    /// submissions are refused.
    pub queued_input_limit: usize,
}

/// The fewest places a share has of its own, however many shares there
/// are (a deployment of many tasks still lets each queue a few calls).
pub const MIN_SHARE: usize = 4;

/// Whose part of the queue a waiting call takes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Share {
    /// A task's: the calls made to it from outside (HTTP, Lambda `Invoke`)
    /// and the calls it makes itself (nested, or on `/v1`).
    Task(TaskName),
    /// A route's deliveries, by the route's place in the deployment.
    Route(u32),
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Share::Task(t) => write!(f, "task {t}"),
            Share::Route(r) => write!(f, "route {r}"),
        }
    }
}

/// Which bound refused a place in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueBound {
    /// `queue_limit` calls wait.
    Calls,
    /// This share's own places and the common ones are taken.
    Share(Share),
    /// Waiting calls hold `queued_input_limit` bytes of input.
    InputBytes,
}

impl std::fmt::Display for QueueBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueBound::Calls => write!(f, "the hub's queue is full"),
            QueueBound::Share(s) => write!(f, "the queue share of {s} is full"),
            QueueBound::InputBytes => {
                write!(
                    f,
                    "the waiting calls hold the most input bytes the hub queues"
                )
            }
        }
    }
}

/// What one call needs.
#[derive(Clone, Debug)]
pub struct Demand {
    pub task: TaskName,
    pub memory_mb: u32,
    pub concurrency: u32,
    pub priority: i32,
    /// Whose part of the queue it waits in.
    pub share: Share,
    /// Bytes of input it holds while it waits.
    pub input_bytes: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejected {
    #[error("{bound} ({queued} calls waiting); retry after {retry_after:?}")]
    QueueFull {
        bound: QueueBound,
        queued: usize,
        retry_after: Duration,
    },
    #[error("the task needs {need_mb} MiB but the hub's memory budget is {budget_mb} MiB; lower memory_mb or raise --memory-budget-mb")]
    TooLarge { need_mb: u32, budget_mb: u64 },
    #[error("the hub is shutting down")]
    Closed,
    #[error("the task left the deployment while the call waited")]
    Removed,
}

/// Counters for metrics and `/v1/tasks`.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub queued: usize,
    /// Bytes of input the waiting calls hold.
    pub queued_input_bytes: usize,
    pub running: u32,
    pub reserved_mb: u64,
    pub per_task: Vec<(TaskName, usize, u32)>,
}

struct Waiter {
    seq: u64,
    since: Instant,
    demand: Demand,
    tx: oneshot::Sender<Result<Permit, Rejected>>,
}

#[derive(Default)]
struct TaskQueue {
    running: u32,
    waiting: VecDeque<Waiter>,
}

struct State {
    queues: HashMap<TaskName, TaskQueue>,
    places: Places,
    running: u32,
    reserved_mb: u64,
    seq: u64,
    closed: bool,
    /// Recent mean run time, for the Retry-After estimate.
    mean_run: Duration,
}

/// Who holds the places in the queue (kept apart from `queues`, so it can
/// be updated while a task's queue is borrowed).
#[derive(Default)]
struct Places {
    /// Calls waiting.
    queued: usize,
    queued_bytes: usize,
    per_share: HashMap<Share, usize>,
    /// Places of its own each share has.
    own: usize,
    /// Places any share may take once its own are taken.
    common: usize,
    /// Common places taken (a share's waiting calls beyond its own).
    common_used: usize,
}

impl Places {
    fn joined(&mut self, d: &Demand) {
        self.queued += 1;
        self.queued_bytes += d.input_bytes;
        let n = self.per_share.entry(d.share.clone()).or_default();
        if *n >= self.own {
            self.common_used += 1;
        }
        *n += 1;
    }

    fn left(&mut self, d: &Demand) {
        self.queued -= 1;
        self.queued_bytes -= d.input_bytes;
        if let Some(n) = self.per_share.get_mut(&d.share) {
            *n -= 1;
            if *n >= self.own {
                self.common_used -= 1;
            }
            if *n == 0 {
                self.per_share.remove(&d.share);
            }
        }
    }

    /// Splits half of `limit` among `shares` and recounts the common part.
    fn set_shares(&mut self, limit: usize, shares: usize) {
        let shares = shares.max(1);
        self.own = ((limit / 2) / shares).max(MIN_SHARE).min(limit);
        self.common = limit.saturating_sub(self.own * shares);
        let own = self.own;
        self.common_used = self.per_share.values().map(|n| n.saturating_sub(own)).sum();
    }

    /// Whether `bytes` more input would pass the bound (one holder alone
    /// may hold more: the input limits decide what one call may hold).
    fn input_full(&self, cfg: &SchedulerConfig, bytes: usize) -> bool {
        self.queued_bytes > 0 && self.queued_bytes + bytes > cfg.queued_input_limit
    }

    /// Which bound, if any, refuses one more call of `d`.
    fn refuses(&self, cfg: &SchedulerConfig, d: &Demand) -> Option<QueueBound> {
        if self.queued >= cfg.queue_limit {
            return Some(QueueBound::Calls);
        }
        if self.input_full(cfg, d.input_bytes) {
            return Some(QueueBound::InputBytes);
        }
        let mine = self.per_share.get(&d.share).copied().unwrap_or(0);
        if mine >= self.own && self.common_used >= self.common {
            return Some(QueueBound::Share(d.share.clone()));
        }
        None
    }
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
    rx: oneshot::Receiver<Result<Permit, Rejected>>,
}

impl Ticket {
    /// Waits until the call is admitted. Fails only if the hub shuts down
    /// or the task leaves the deployment.
    pub async fn admitted(self) -> Result<Permit, Rejected> {
        self.rx.await.unwrap_or(Err(Rejected::Closed))
    }
}

/// Input bytes counted before the call that carries them is queued;
/// released on drop.
pub struct InputHold {
    inner: Option<Arc<Inner>>,
    bytes: usize,
}

impl Drop for InputHold {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.state.lock().places.queued_bytes -= self.bytes;
        }
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

/// Gives back the places (and input bytes) of callers that gave up.
fn purge_abandoned(st: &mut State) {
    for q in st.queues.values_mut() {
        let mut kept = VecDeque::with_capacity(q.waiting.len());
        for w in q.waiting.drain(..) {
            if w.tx.is_closed() {
                st.places.left(&w.demand);
            } else {
                kept.push_back(w);
            }
        }
        q.waiting = kept;
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
                if let Some(w) = q.waiting.pop_front() {
                    st.places.left(&w.demand);
                }
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
        st.places.left(&w.demand);
        st.running += 1;
        st.reserved_mb += need;
        let permit = Permit {
            inner: Some(inner.clone()),
            task: name.clone(),
            memory_mb: w.demand.memory_mb,
            started: now,
            waited: now.duration_since(w.since),
        };
        if let Err(Ok(mut permit)) = w.tx.send(Ok(permit)) {
            // The caller went away between the check and the send.
            permit.inner = None;
            release(st, &name, w.demand.memory_mb);
        }
    }
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let mut places = Places::default();
        places.set_shares(config.queue_limit, 1);
        Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State {
                    queues: HashMap::new(),
                    places,
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
        self.submit_holding(demand, bounded, None)
    }

    /// Counts `bytes` of input against the waiting calls' bound before
    /// they are read (a request body on its way in), so a flood of large
    /// uploads is refused before it is in memory. Released on drop, or
    /// moved into the call's place by [`Scheduler::submit_holding`].
    pub fn hold_input(&self, bytes: usize) -> Result<InputHold, Rejected> {
        let cfg = &self.inner.config;
        let mut st = self.inner.state.lock();
        if st.closed {
            return Err(Rejected::Closed);
        }
        if st.places.input_full(cfg, bytes) {
            purge_abandoned(&mut st);
        }
        let p = &mut st.places;
        if p.input_full(cfg, bytes) {
            let retry_after = st.mean_run.max(Duration::from_millis(1)) * 2;
            return Err(Rejected::QueueFull {
                bound: QueueBound::InputBytes,
                queued: st.places.queued,
                retry_after: retry_after.clamp(Duration::from_secs(1), Duration::from_secs(60)),
            });
        }
        p.queued_bytes += bytes;
        Ok(InputHold {
            inner: Some(self.inner.clone()),
            bytes,
        })
    }

    /// [`Scheduler::submit`], with the bytes `hold` counted while the input
    /// was read handed over to the call's place (counted once, as the
    /// demand's `input_bytes`).
    pub fn submit_holding(
        &self,
        demand: Demand,
        bounded: bool,
        hold: Option<InputHold>,
    ) -> Result<Ticket, Rejected> {
        if let Some(mut h) = hold {
            if h.inner.take().is_some() {
                self.inner.state.lock().places.queued_bytes -= h.bytes;
            }
        }
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
        if bounded && st.places.refuses(cfg, &demand).is_some() {
            // Callers that gave up still hold places; count them out first.
            purge_abandoned(&mut st);
            if let Some(bound) = st.places.refuses(cfg, &demand) {
                let per_slot = st.mean_run.max(Duration::from_millis(1));
                let wait = per_slot * (st.places.queued as u32 / cfg.cpu_slots.max(1) + 1);
                return Err(Rejected::QueueFull {
                    bound,
                    queued: st.places.queued,
                    retry_after: wait.clamp(Duration::from_secs(1), Duration::from_secs(60)),
                });
            }
        }
        let (tx, rx) = oneshot::channel();
        st.seq += 1;
        let seq = st.seq;
        st.places.joined(&demand);
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
            queued: st.places.queued,
            queued_input_bytes: st.places.queued_bytes,
            running: st.running,
            reserved_mb: st.reserved_mb,
            per_task,
        }
    }

    /// Stops admitting: waiting calls are dropped (their tickets fail with
    /// `Closed`), running ones keep their permits.
    pub fn close(&self) {
        let mut st = self.inner.state.lock();
        let st = &mut *st;
        st.closed = true;
        for q in st.queues.values_mut() {
            for w in q.waiting.drain(..) {
                st.places.left(&w.demand);
            }
        }
        st.queues.retain(|_, q| q.running > 0);
    }

    /// The calls waiting for `task` end with [`Rejected::Removed`] (it left
    /// the deployment); its running calls keep their permits.
    pub fn remove_task(&self, task: &TaskName) -> usize {
        let mut st = self.inner.state.lock();
        let st = &mut *st;
        let Some(q) = st.queues.get_mut(task) else {
            return 0;
        };
        let removed = q.waiting.len();
        for w in q.waiting.drain(..) {
            st.places.left(&w.demand);
            let _ = w.tx.send(Err(Rejected::Removed));
        }
        if q.running == 0 {
            st.queues.remove(task);
        }
        removed
    }

    /// How many shares the deployment has (its tasks and routes): half the
    /// queue is split evenly among them.
    pub fn set_shares(&self, shares: usize) {
        let mut st = self.inner.state.lock();
        st.places.set_shares(self.inner.config.queue_limit, shares);
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
            queued_input_limit: usize::MAX,
        })
    }

    fn demand(task: &str, mem: u32, conc: u32, prio: i32) -> Demand {
        Demand {
            task: TaskName::parse(task).unwrap(),
            memory_mb: mem,
            concurrency: conc,
            priority: prio,
            share: Share::Task(TaskName::parse(task).unwrap()),
            input_bytes: 0,
        }
    }

    fn ready(t: &mut Ticket) -> Option<Permit> {
        t.rx.try_recv().ok().and_then(Result::ok)
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
            queued_input_limit: usize::MAX,
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
    fn charged(task: &str, share: Share, bytes: usize) -> Demand {
        Demand {
            share,
            input_bytes: bytes,
            ..demand(task, 1, 1, 0)
        }
    }

    fn route(n: u32) -> Share {
        Share::Route(n)
    }

    #[test]
    fn a_noisy_share_fills_its_own_places_and_the_common_ones_never_anothers() {
        // 40 places: 20 common, and 4 shares with 5 of their own each.
        let s = sched(1000, 1, 40);
        s.set_shares(4);
        let _run = s.submit(demand("busy", 1, 1, 0), true).unwrap();
        let mut noisy = Vec::new();
        let refused = loop {
            match s.submit(charged("t", route(0), 0), true) {
                Ok(t) => noisy.push(t),
                Err(e) => break e,
            }
            assert!(noisy.len() <= 40, "the noisy route was never refused");
        };
        assert_eq!(noisy.len(), 25, "its own 5 places and the 20 common ones");
        match refused {
            Rejected::QueueFull { bound, .. } => assert_eq!(bound, QueueBound::Share(route(0))),
            other => panic!("expected a full share, got {other:?}"),
        }
        // Every other share still has its own places.
        let mut quiet = Vec::new();
        for _ in 0..5 {
            quiet.push(
                s.submit(charged("t", route(1), 0), true)
                    .expect("its own place"),
            );
        }
        assert!(s.submit(charged("t", route(1), 0), true).is_err());
        let task = Share::Task(TaskName::parse("other").unwrap());
        assert!(s.submit(charged("other", task, 0), true).is_ok());
        // A call that waits in the common part gives its place back.
        drop(noisy.pop());
        assert!(s.submit(charged("t", route(1), 0), true).is_ok());
    }

    #[test]
    fn the_queued_input_bytes_are_bounded() {
        let s = Scheduler::new(SchedulerConfig {
            memory_budget_mb: 1000,
            cpu_slots: 1,
            queue_limit: 100,
            aging: Duration::from_secs(1),
            queued_input_limit: 10 << 20,
        });
        let a = || Share::Task(TaskName::parse("a").unwrap());
        let _run = s.submit(charged("a", a(), 0), true).unwrap();
        let mut waiting = Vec::new();
        for _ in 0..3 {
            waiting.push(s.submit(charged("a", a(), 3 << 20), true).unwrap());
        }
        assert_eq!(s.snapshot().queued_input_bytes, 9 << 20);
        match s.submit(charged("a", a(), 3 << 20), true) {
            Err(Rejected::QueueFull { bound, .. }) => assert_eq!(bound, QueueBound::InputBytes),
            other => panic!("expected the input bound, got {:?}", other.err()),
        }
        // Acknowledged calls are never refused, and a freed place frees bytes.
        assert!(s.submit(charged("a", a(), 3 << 20), false).is_ok());
        drop(waiting.pop());
        drop(waiting.pop());
        assert!(s.submit(charged("a", a(), 3 << 20), true).is_ok());
        // One call alone may hold more than the bound (the input limits
        // decide what one call may hold).
        let s = Scheduler::new(SchedulerConfig {
            queued_input_limit: 1,
            ..s.config().clone()
        });
        let _run = s.submit(charged("a", a(), 0), true).unwrap();
        assert!(s.submit(charged("a", a(), 5), true).is_ok());
    }

    #[tokio::test]
    async fn the_waiting_calls_of_a_removed_task_end_at_once() {
        let s = sched(1000, 1, 10);
        let mut run = s.submit(demand("gone", 1, 1, 0), true).unwrap();
        let p = ready(&mut run).unwrap();
        let waiting: Vec<Ticket> = (0..3)
            .map(|_| s.submit(demand("gone", 1, 1, 0), true).unwrap())
            .collect();
        let mut other = s.submit(demand("kept", 1, 1, 0), true).unwrap();
        assert_eq!(s.remove_task(&TaskName::parse("gone").unwrap()), 3);
        for t in waiting {
            assert_eq!(t.admitted().await.err(), Some(Rejected::Removed));
        }
        assert_eq!(s.snapshot().queued, 1);
        drop(p);
        assert!(
            ready(&mut other).is_some(),
            "the other task's call runs next"
        );
    }

    #[test]
    fn input_held_while_it_is_read_counts_once_and_goes_when_dropped() {
        let s = Scheduler::new(SchedulerConfig {
            memory_budget_mb: 1000,
            cpu_slots: 1,
            queue_limit: 100,
            aging: Duration::from_secs(1),
            queued_input_limit: 10,
        });
        let a = || Share::Task(TaskName::parse("a").unwrap());
        let _run = s.submit(charged("a", a(), 0), true).unwrap();
        let h1 = s.hold_input(6).unwrap();
        assert!(matches!(
            s.hold_input(6),
            Err(Rejected::QueueFull {
                bound: QueueBound::InputBytes,
                ..
            })
        ));
        // Handed to its call: still 6 bytes, not 12.
        let t = s
            .submit_holding(charged("a", a(), 6), true, Some(h1))
            .unwrap();
        assert_eq!(s.snapshot().queued_input_bytes, 6);
        let h2 = s.hold_input(4).unwrap();
        assert_eq!(s.snapshot().queued_input_bytes, 10);
        drop(h2);
        drop(t);
        let _run2 = s.submit(charged("a", a(), 0), true).unwrap();
        assert_eq!(s.snapshot().queued_input_bytes, 0);
    }
}
