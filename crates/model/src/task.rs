//! A validated task: what a deployment says one task is, in the form the
//! runtimes consume. Only the manifest crate builds these from user input.

use crate::{Limits, RuntimeKind, TaskName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Ro,
    Rw,
}

/// A data resource the task's environment is provisioned with: a folder (or
/// device file) on the hub, visible to the task at `path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Absolute, existing path on the hub.
    pub source: PathBuf,
    /// Absolute path the task sees, without `..` or `.` components.
    pub path: String,
    pub access: Access,
}

/// The code a task runs, by runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskCode {
    /// A WebAssembly module (binary, or text already converted to binary),
    /// stored content-addressed under the hub's data dir.
    Wasm { sha256: String, path: PathBuf },
    /// A worker process speaking the AWS Lambda Runtime API.
    Process {
        /// The task's code folder (its working directory), inside the
        /// unpacked deployment package.
        dir: PathBuf,
        /// `command[0]` is looked up on PATH unless absolute.
        command: Vec<String>,
        handler: String,
        /// Workers kept ready at least.
        min_warm: u32,
        /// Workers at most.
        max_workers: u32,
        /// Tasks naming the same group fork their workers from one
        /// pre-loaded parent, sharing its memory.
        code_group: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: TaskName,
    pub runtime: RuntimeKind,
    pub limits: Limits,
    pub env: BTreeMap<String, String>,
    pub resources: Vec<Resource>,
    pub code: TaskCode,
    /// What the task's credentials may do on the hub's local AWS APIs.
    #[serde(default)]
    pub allow: Grants,
    /// The call a deployment makes after it is applied; failing it rolls
    /// the hub back (`health_check = { input = "...", timeout_ms = N }`).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// A task's health check: this input must get a successful answer within
/// the timeout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub input: String,
    pub timeout_ms: u64,
}

impl HealthCheck {
    /// The default timeout when the manifest gives none.
    pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
    /// The longest a health check may take.
    pub const MAX_TIMEOUT_MS: u64 = 600_000;
}

/// A task's rights on the hub's local service overrides (the manifest's
/// `allow`). Each list holds patterns where `*` stands for any run of
/// characters; `publish` holds MQTT topic filters. Empty: nothing allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// Tasks it may invoke through the Lambda API.
    pub invoke: Vec<String>,
    /// Things whose shadows (classic and named) it may read or list.
    pub shadow_read: Vec<String>,
    /// Things whose shadows it may update or delete.
    pub shadow_update: Vec<String>,
    /// Topic filters it may publish to through the IoT data plane.
    pub publish: Vec<String>,
    /// Secrets it may read through Secrets Manager.
    pub secrets: Vec<String>,
    /// Topic filters whose retained messages it may read through the IoT
    /// data plane (`GetRetainedMessage`, `ListRetainedMessages`).
    #[serde(default)]
    pub retained: Vec<String>,
}

impl Grants {
    /// Whether `name` matches one of `patterns` (`*` matches any run of
    /// characters, everything else itself).
    pub fn matches(patterns: &[String], name: &str) -> bool {
        patterns.iter().any(|p| glob(p.as_bytes(), name.as_bytes()))
    }
}

/// `*`-only glob matching, iterative with one backtrack point, so hostile
/// patterns cannot make it exponential.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// A secret deployed with the manifest (`[[secret]]`); its value travels
/// beside the manifest, never in it, and is kept encrypted on the hub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSpec {
    pub name: String,
    /// The variable of the deploying shell the CLI read the value from.
    pub value_env: String,
}

/// A device from the manifest: its MQTT identity and topic policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Its MQTT user name and client id.
    pub name: String,
    /// argon2 PHC string from `roost passwd`; without one, the device can
    /// only log in with a client certificate over TLS.
    pub password_hash: Option<String>,
    /// Topic filters it may publish to; `{device}` is its own name.
    pub publish: Vec<String>,
    /// Topic filters it may subscribe to.
    pub subscribe: Vec<String>,
}

/// Where a route takes its messages from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteSource {
    /// Messages devices publish to topics matching a filter.
    Device(String),
    /// Each succeeded output of a task.
    Task(crate::TaskName),
    /// A tick every so many milliseconds.
    Timer(u64),
    /// Each delta of a thing's shadows (the `/update/delta` document).
    Shadow(String),
}

/// Where a route sends them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteDestination {
    /// A durable async call of the task, the message as its input.
    Task(crate::TaskName),
    /// A publish to a device topic.
    Device(String),
    /// An UpdateThingShadow document applied to the thing's classic shadow.
    Shadow(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    pub from: RouteSource,
    pub to: RouteDestination,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_patterns_match_with_stars_only() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(Grants::matches(&p(&["*"]), "anything"));
        assert!(Grants::matches(&p(&["thermo*"]), "thermostat"));
        assert!(Grants::matches(&p(&["a*c*e"]), "abcde"));
        assert!(!Grants::matches(&p(&["a*c*e"]), "abcdef"));
        assert!(!Grants::matches(&p(&["echo"]), "echo2"));
        assert!(!Grants::matches(&p(&[]), "echo"));
        assert!(Grants::matches(&p(&["db-?"]), "db-?"));
        // Many stars against a long miss stays linear.
        let hostile = "*a".repeat(50);
        assert!(!Grants::matches(
            &[hostile],
            &format!("{}b", "a".repeat(10_000))
        ));
    }
}
