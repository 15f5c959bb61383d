//! Task log lines: what tasks write to stderr, kept per task in a bounded
//! ring for `roost logs`, streamed live to followers, and echoed to the
//! hub's own structured log under the task's name.

use parking_lot::Mutex;
use roost_model::TaskName;
use roost_runtime::LogSink;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use tokio::sync::broadcast;

/// Lines kept per task.
pub const LINES_PER_TASK: usize = 1000;
/// Longest line kept; longer lines are cut.
const MAX_LINE: usize = 8 << 10;

#[derive(Clone, Debug, Serialize)]
pub struct LogLine {
    pub time_ms: i64,
    pub task: String,
    pub call_id: String,
    pub line: String,
}

pub struct LogBook {
    lines: Mutex<HashMap<TaskName, VecDeque<LogLine>>>,
    live: broadcast::Sender<LogLine>,
}

impl Default for LogBook {
    fn default() -> Self {
        Self {
            lines: Mutex::new(HashMap::new()),
            live: broadcast::channel(4096).0,
        }
    }
}

impl LogBook {
    /// Recent lines of one task, or of all tasks interleaved by time.
    pub fn recent(&self, task: Option<&TaskName>) -> Vec<LogLine> {
        let lines = self.lines.lock();
        let mut out: Vec<LogLine> = match task {
            Some(t) => lines
                .get(t)
                .map(|q| q.iter().cloned().collect())
                .unwrap_or_default(),
            None => lines.values().flat_map(|q| q.iter().cloned()).collect(),
        };
        out.sort_by_key(|l| l.time_ms);
        out
    }

    /// The lines one call of `task` wrote, oldest first.
    pub fn of_call(&self, task: &TaskName, call_id: &str) -> Vec<LogLine> {
        self.lines
            .lock()
            .get(task)
            .map(|q| q.iter().filter(|l| l.call_id == call_id).cloned().collect())
            .unwrap_or_default()
    }

    pub fn follow(&self) -> broadcast::Receiver<LogLine> {
        self.live.subscribe()
    }
}

impl LogSink for LogBook {
    fn line(&self, task: &TaskName, call_id: &str, line: &str) {
        let mut line = line.to_owned();
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        tracing::info!(target: "roost::task", task = %task, call_id, "{line}");
        let entry = LogLine {
            time_ms: roost_store::now_ms(),
            task: task.to_string(),
            call_id: call_id.to_owned(),
            line,
        };
        {
            let mut lines = self.lines.lock();
            let q = lines.entry(task.clone()).or_default();
            if q.len() == LINES_PER_TASK {
                q.pop_front();
            }
            q.push_back(entry.clone());
        }
        let _ = self.live.send(entry);
    }
}
