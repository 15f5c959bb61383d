//! A deployment's health check, run after it is applied: every process
//! task with `min_warm` has that many workers ready, and every task that
//! declares `health_check` answers its input successfully, all within a
//! deadline. The fleet uplink rolls the hub back when it fails.

use crate::Hub;
use roost_model::TaskCode;
use std::time::{Duration, Instant};

impl Hub {
    /// Checks the active deployment; what passed, or why it failed (for a
    /// person: which task, what it answered or that it did not).
    pub async fn health_check(&self, deadline: Duration) -> Result<String, String> {
        let active = self.inner.active.read().clone();
        let mut names: Vec<_> = active.tasks.keys().cloned().collect();
        names.sort();
        let started = Instant::now();
        let checks = async {
            let mut warm = 0;
            let mut called = 0;
            for name in &names {
                let task = &active.tasks[name];
                let TaskCode::Process { min_warm, .. } = &task.spec().code else {
                    continue;
                };
                let (want, Some(pool)) = (*min_warm, task.pool()) else {
                    continue;
                };
                if want == 0 {
                    continue;
                }
                while pool.stats().idle < want {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                warm += 1;
            }
            for name in &names {
                let Some(check) = active.tasks[name].spec().health_check.clone() else {
                    continue;
                };
                let call =
                    self.call_sync(name.as_str(), check.input.into_bytes().into(), Vec::new());
                match tokio::time::timeout(Duration::from_millis(check.timeout_ms), call).await {
                    Ok(Ok(_)) => called += 1,
                    Ok(Err(e)) => return Err(format!("task {name}'s health check failed: {e}")),
                    Err(_) => {
                        return Err(format!(
                            "task {name}'s health check did not answer within its timeout_ms ({})",
                            check.timeout_ms
                        ))
                    }
                }
            }
            Ok(format!(
                "{warm} task(s) warm, {called} health check(s) answered in {} ms",
                started.elapsed().as_millis()
            ))
        };
        match tokio::time::timeout(deadline, checks).await {
            Ok(r) => r,
            Err(_) => {
                let cold: Vec<String> = names
                    .iter()
                    .filter(|n| {
                        let t = &active.tasks[*n];
                        match (&t.spec().code, t.pool()) {
                            (TaskCode::Process { min_warm, .. }, Some(p)) => {
                                p.stats().idle < *min_warm
                            }
                            _ => false,
                        }
                    })
                    .map(|n| n.to_string())
                    .collect();
                Err(if cold.is_empty() {
                    format!(
                        "the health check did not finish within {} s",
                        deadline.as_secs()
                    )
                } else {
                    format!(
                        "task(s) {} did not get their min_warm workers ready within {} s (does the command start? see `roost logs`)",
                        cold.join(", "),
                        deadline.as_secs()
                    )
                })
            }
        }
    }
}
