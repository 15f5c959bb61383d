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
}

/// Where a route sends them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteDestination {
    /// A durable async call of the task, the message as its input.
    Task(crate::TaskName),
    /// A publish to a device topic.
    Device(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    pub from: RouteSource,
    pub to: RouteDestination,
}
