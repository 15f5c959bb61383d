//! The deployment manifest: TOML in, a validated [`Manifest`] out.
//!
//! Validation looks at the whole document and reports every problem at
//! once (a [`Problem`] names the field, the value and why), so a user fixes
//! a manifest in one round. Paths are checked against the package folder the
//! manifest came in: `code` and `dir` may not leave it, not even through a
//! symlink; a resource's `source` must be an absolute path that exists on
//! the hub.

use roost_model::{
    Access, DeviceSpec, Grants, Limits, Resource, RouteDestination, RouteSource, RouteSpec,
    RuntimeKind, SecretSpec, TaskCode, TaskName, TaskSpec,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};
use toml::Value;

/// One thing wrong with a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub field: String,
    pub value: String,
    pub why: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.field, self.why)
        } else {
            write!(f, "{} = {}: {}", self.field, self.value, self.why)
        }
    }
}

/// A manifest that passed validation.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub tasks: Vec<TaskSpec>,
    pub devices: Vec<DeviceSpec>,
    pub routes: Vec<RouteSpec>,
    pub secrets: Vec<SecretSpec>,
}

pub const DEFAULT_MEMORY_MB: u32 = 64;
pub const DEFAULT_TIMEOUT_MS: u64 = 3000;
pub const DEFAULT_CONCURRENCY: u32 = 8;

const TASK_KEYS: &[&str] = &[
    "name",
    "runtime",
    "code",
    "memory_mb",
    "timeout_ms",
    "concurrency",
    "priority",
    "env",
    "resource",
    "dir",
    "command",
    "handler",
    "min_warm",
    "max_workers",
    "code_group",
    "allow",
];

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(
        &mut self,
        field: impl Into<String>,
        value: impl Into<String>,
        why: impl Into<String>,
    ) {
        self.problems.push(Problem {
            field: field.into(),
            value: value.into(),
            why: why.into(),
        });
    }
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(77).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

/// Parses and validates a manifest whose files were unpacked under `root`.
pub fn parse(text: &str, root: &Path) -> Result<Manifest, Vec<Problem>> {
    let doc: toml::Table = match text.parse() {
        Ok(d) => d,
        Err(e) => {
            return Err(vec![Problem {
                field: "manifest".into(),
                value: String::new(),
                why: format!("not valid TOML: {}", e.to_string().trim()),
            }])
        }
    };
    let mut c = Checker {
        problems: Vec::new(),
    };
    let root = match root.canonicalize() {
        Ok(r) => r,
        Err(e) => {
            c.problem(
                "manifest",
                root.display().to_string(),
                format!("package folder unreadable: {e}"),
            );
            return Err(c.problems);
        }
    };
    let mut tasks = Vec::new();
    let mut devices = Vec::new();
    let mut raw_routes: Vec<Value> = Vec::new();
    let mut secrets: Vec<SecretSpec> = Vec::new();
    for (key, value) in &doc {
        match key.as_str() {
            "task" => {
                let mut names = HashSet::new();
                for (field, t) in tables(&mut c, key, value) {
                    if let Some(spec) = task(&mut c, &field, t, &root) {
                        if !names.insert(spec.name.to_string()) {
                            c.problem(
                                format!("{field}.name"),
                                spec.name.to_string(),
                                "another task already has this name",
                            );
                        }
                        tasks.push(spec);
                    }
                }
            }
            "device" => {
                let mut names = HashSet::new();
                for (field, d) in tables(&mut c, key, value) {
                    if let Some(dev) = device(&mut c, &field, d) {
                        if !names.insert(dev.name.clone()) {
                            c.problem(
                                format!("{field}.name"),
                                dev.name.clone(),
                                "another device already has this name",
                            );
                        }
                        devices.push(dev);
                    }
                }
            }
            "route" => {
                let Some(list) = value.as_array() else {
                    c.problem("route", show(value), "write routes as [[route]] tables");
                    continue;
                };
                raw_routes = list.clone();
            }
            "secret" => {
                for (field, t) in tables(&mut c, key, value) {
                    if let Some(s) = secret(&mut c, &field, t) {
                        if secrets.iter().any(|o| o.name == s.name) {
                            c.problem(
                                format!("{field}.name"),
                                s.name.clone(),
                                "another secret already has this name",
                            );
                        }
                        secrets.push(s);
                    }
                }
            }
            other => c.problem(
                other,
                String::new(),
                "unknown section; expected [[task]], [[device]], [[route]] or [[secret]]",
            ),
        }
    }
    // Routes and grants last: they name the manifest's tasks and secrets.
    let task_names: HashSet<TaskName> = tasks.iter().map(|t| t.name.clone()).collect();
    for (i, t) in tasks.iter().enumerate() {
        check_grants(
            &mut c,
            &format!("task[{i}].allow"),
            &t.allow,
            &task_names,
            &secrets,
        );
    }
    let mut routes = Vec::new();
    for (i, r) in raw_routes.iter().enumerate() {
        if let Some(r) = route(&mut c, &format!("route[{i}]"), r, &task_names) {
            routes.push(r);
        }
    }
    if c.problems.is_empty() {
        Ok(Manifest {
            tasks,
            devices,
            routes,
            secrets,
        })
    } else {
        Err(c.problems)
    }
}

/// The tables of an array of tables (`[[key]]`), each with its field name
/// (`key[i]`); anything else is a problem.
fn tables<'a>(c: &mut Checker, key: &str, value: &'a Value) -> Vec<(String, &'a toml::Table)> {
    let Some(list) = value.as_array() else {
        c.problem(key, show(value), format!("write these as [[{key}]] tables"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let field = format!("{key}[{i}]");
        match item.as_table() {
            Some(t) => out.push((field, t)),
            None => c.problem(field, show(item), format!("each [[{key}]] must be a table")),
        }
    }
    out
}

/// `5s`, `500ms`, `2m`, `1h` as milliseconds (at least 100 ms).
fn every_ms(s: &str) -> Option<u64> {
    let (n, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))?;
    let n: u64 = n.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    (ms >= 100).then_some(ms)
}

/// Records that route endpoint `s` (at `f`) is refused, and why.
fn refused<T>(c: &mut Checker, f: String, s: &str, why: &str) -> Option<T> {
    c.problem(f, format!("{s:?}"), why);
    None
}

fn route(c: &mut Checker, field: &str, r: &Value, tasks: &HashSet<TaskName>) -> Option<RouteSpec> {
    let Some(t) = r.as_table() else {
        c.problem(
            field,
            show(r),
            "each [[route]] must be a table with from and to",
        );
        return None;
    };
    for k in t.keys() {
        if k != "from" && k != "to" {
            c.problem(
                format!("{field}.{k}"),
                String::new(),
                "unknown field; a route has from and to",
            );
        }
    }
    let task = |c: &mut Checker, f: &str, name: &str| -> Option<TaskName> {
        match TaskName::parse(name) {
            Ok(n) if tasks.contains(&n) => Some(n),
            _ => {
                c.problem(
                    f,
                    format!("{name:?}"),
                    "no task of this name in the manifest",
                );
                None
            }
        }
    };
    let from = string(c, t, field, "from").and_then(|s| {
        let f = format!("{field}.from");
        match s.split_once(':') {
            Some(("device", filter)) if topic_filter_ok(filter) => {
                Some(RouteSource::Device(filter.to_owned()))
            }
            Some(("device", _)) => refused(c, f, s, "not a valid MQTT topic filter"),
            Some(("task", name)) => task(c, &f, name).map(RouteSource::Task),
            Some(("timer", every)) => match every_ms(every) {
                Some(ms) => Some(RouteSource::Timer(ms)),
                None => refused(
                    c,
                    f,
                    s,
                    "write the period like 500ms, 5s, 2m or 1h (at least 100ms)",
                ),
            },
            Some(("shadow", thing)) => thing_name(c, &f, thing).map(RouteSource::Shadow),
            Some(("cloud", _)) => refused(
                c,
                f,
                s,
                "cloud sources need the control plane, which this hub does not have yet",
            ),
            _ => refused(
                c,
                f,
                s,
                "a source is device:FILTER, task:NAME, shadow:THING or timer:EVERY",
            ),
        }
    });
    let to = string(c, t, field, "to").and_then(|s| {
        let f = format!("{field}.to");
        match s.split_once(':') {
            Some(("task", name)) => task(c, &f, name).map(RouteDestination::Task),
            Some(("device", topic)) if topic_filter_ok(topic) && !topic.contains(['+', '#']) => {
                Some(RouteDestination::Device(topic.to_owned()))
            }
            Some(("device", _)) => refused(
                c,
                f,
                s,
                "not a topic a message can be published to (no wildcards)",
            ),
            Some(("shadow", thing)) => thing_name(c, &f, thing).map(RouteDestination::Shadow),
            Some(("cloud", _)) => refused(
                c,
                f,
                s,
                "cloud destinations need the control plane, which this hub does not have yet",
            ),
            _ => refused(
                c,
                f,
                s,
                "a destination is task:NAME, device:TOPIC or shadow:THING",
            ),
        }
    });
    Some(RouteSpec {
        from: from?,
        to: to?,
    })
}

/// Variables the hub sets itself: each task's own credentials.
const HUB_CREDENTIAL_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// A thing name as the shadows accept it (AWS IoT's rule).
fn thing_name_ok(n: &str) -> bool {
    roost_shadows::ThingName::parse(n).is_ok()
}

fn thing_name(c: &mut Checker, field: &str, n: &str) -> Option<String> {
    if thing_name_ok(n) {
        Some(n.to_owned())
    } else {
        c.problem(
            field,
            format!("{n:?}"),
            "a thing name is 1 to 128 characters of A-Z, a-z, 0-9, ':', '_' and '-'",
        );
        None
    }
}

/// A secret name as Secrets Manager accepts it: 1 to 512 of
/// `[A-Za-z0-9/_+=.@-]`.
pub fn secret_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 512
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+=.@-".contains(&b))
}

fn env_name_ok(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn secret(c: &mut Checker, field: &str, t: &toml::Table) -> Option<SecretSpec> {
    let before = c.problems.len();
    for k in t.keys() {
        if k != "name" && k != "value_env" {
            c.problem(
                format!("{field}.{k}"),
                String::new(),
                "unknown field; a secret has name and value_env (never the value itself)",
            );
        }
    }
    let name = string(c, t, field, "name");
    if let Some(n) = name.filter(|n| !secret_name_ok(n)) {
        c.problem(
            format!("{field}.name"),
            format!("{n:?}"),
            "use 1 to 512 characters of A-Z, a-z, 0-9 and /_+=.@-",
        );
    }
    let value_env = string(c, t, field, "value_env");
    if let Some(v) = value_env.filter(|v| !env_name_ok(v)) {
        c.problem(
            format!("{field}.value_env"),
            format!("{v:?}"),
            "must name an environment variable of the deploying shell",
        );
    }
    if c.problems.len() > before {
        return None;
    }
    Some(SecretSpec {
        name: name?.to_owned(),
        value_env: value_env?.to_owned(),
    })
}

const GRANT_KEYS: &[&str] = &[
    "invoke",
    "shadow_read",
    "shadow_update",
    "publish",
    "secrets",
    "retained",
];

fn grants(c: &mut Checker, t: &toml::Table, field: &str) -> Option<Grants> {
    let Some(v) = t.get("allow") else {
        return Some(Grants::default());
    };
    let f = format!("{field}.allow");
    let Some(table) = v.as_table() else {
        c.problem(
            f,
            show(v),
            "must be a table, e.g. allow = { invoke = [\"echo\"], shadow_read = [\"*\"] }",
        );
        return None;
    };
    let before = c.problems.len();
    let mut g = Grants::default();
    for (k, v) in table {
        let list = match k.as_str() {
            "invoke" => &mut g.invoke,
            "shadow_read" => &mut g.shadow_read,
            "shadow_update" => &mut g.shadow_update,
            "publish" => &mut g.publish,
            "secrets" => &mut g.secrets,
            "retained" => &mut g.retained,
            _ => {
                c.problem(
                    format!("{f}.{k}"),
                    String::new(),
                    format!("unknown right; known rights are {}", GRANT_KEYS.join(", ")),
                );
                continue;
            }
        };
        let Some(items) = v.as_array() else {
            c.problem(format!("{f}.{k}"), show(v), "must be a list of strings");
            continue;
        };
        for item in items {
            let Some(p) = item.as_str() else {
                c.problem(format!("{f}.{k}"), show(item), "must be a string");
                continue;
            };
            let ok = match k.as_str() {
                "publish" | "retained" => topic_filter_ok(p),
                "invoke" => p == "*" || p.contains('*') || TaskName::parse(p).is_ok(),
                "secrets" => secret_name_ok(&p.replace('*', "x")),
                _ => thing_name_ok(&p.replace('*', "x")),
            };
            if ok {
                list.push(p.to_owned());
            } else {
                c.problem(
                    format!("{f}.{k}"),
                    format!("{p:?}"),
                    match k.as_str() {
                        "publish" | "retained" => "not a valid MQTT topic filter",
                        "invoke" => "not a task name or pattern",
                        "secrets" => "not a secret name or pattern",
                        _ => "not a thing name or pattern ('*' matches any run of characters)",
                    },
                );
            }
        }
    }
    (c.problems.len() == before).then_some(g)
}

/// Names without a `*` must exist in the manifest, so a typo is caught at
/// deploy time rather than as a denied request later.
fn check_grants(
    c: &mut Checker,
    field: &str,
    g: &Grants,
    tasks: &HashSet<TaskName>,
    secrets: &[SecretSpec],
) {
    for p in g.invoke.iter().filter(|p| !p.contains('*')) {
        if !TaskName::parse(p).is_ok_and(|n| tasks.contains(&n)) {
            c.problem(
                format!("{field}.invoke"),
                format!("{p:?}"),
                "no task of this name in the manifest",
            );
        }
    }
    for p in g.secrets.iter().filter(|p| !p.contains('*')) {
        if !secrets.iter().any(|s| &s.name == p) {
            c.problem(
                format!("{field}.secrets"),
                format!("{p:?}"),
                "no [[secret]] of this name in the manifest",
            );
        }
    }
}

/// A device name: its MQTT user name and client id.
fn device_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An MQTT topic filter (MQTT 4.7): `+` a whole level, `#` the whole last.
fn topic_filter_ok(f: &str) -> bool {
    roost_topic::valid_filter(f)
}

fn device(c: &mut Checker, field: &str, t: &toml::Table) -> Option<DeviceSpec> {
    let before = c.problems.len();
    for k in t.keys() {
        if !["name", "password_hash", "publish", "subscribe"].contains(&k.as_str()) {
            c.problem(
                format!("{field}.{k}"),
                String::new(),
                "unknown field; known fields are name, password_hash, publish, subscribe",
            );
        }
    }
    let name = string(c, t, field, "name").and_then(|n| {
        if device_name_ok(n) {
            Some(n.to_owned())
        } else {
            c.problem(
                format!("{field}.name"),
                format!("{n:?}"),
                "use 1 to 128 characters of A-Z, a-z, 0-9, '-', '_' and '.'",
            );
            None
        }
    });
    let hash = match t.get("password_hash") {
        None => Some(None),
        Some(Value::String(h)) => match argon2::password_hash::PasswordHash::new(h) {
            Ok(p) if p.algorithm.as_str().starts_with("argon2") => Some(Some(h.to_owned())),
            _ => {
                c.problem(
                    format!("{field}.password_hash"),
                    String::new(),
                    "not an argon2 hash; make one with `roost passwd`",
                );
                None
            }
        },
        Some(v) => {
            c.problem(
                format!("{field}.password_hash"),
                show(v),
                "must be a string from `roost passwd`",
            );
            None
        }
    };
    let mut filters = |key: &str| -> Option<Vec<String>> {
        match t.get(key) {
            None => Some(Vec::new()),
            Some(Value::Array(a)) => {
                let mut out = Vec::new();
                for v in a {
                    match v.as_str() {
                        Some(f) if topic_filter_ok(&f.replace("{device}", "x")) => {
                            out.push(f.to_owned())
                        }
                        _ => c.problem(
                            format!("{field}.{key}"),
                            show(v),
                            "not a valid MQTT topic filter",
                        ),
                    }
                }
                Some(out)
            }
            Some(v) => {
                c.problem(
                    format!("{field}.{key}"),
                    show(v),
                    "must be a list of topic filters",
                );
                None
            }
        }
    };
    let publish = filters("publish");
    let subscribe = filters("subscribe");
    if c.problems.len() > before {
        return None;
    }
    Some(DeviceSpec {
        name: name?,
        password_hash: hash?,
        publish: publish?,
        subscribe: subscribe?,
    })
}

fn int_in<T: TryFrom<i64> + Copy>(
    c: &mut Checker,
    t: &toml::Table,
    field: &str,
    key: &str,
    default: T,
    range: (i64, i64),
) -> Option<T> {
    let f = format!("{field}.{key}");
    match t.get(key) {
        None => Some(default),
        Some(Value::Integer(n)) if (range.0..=range.1).contains(n) => T::try_from(*n).ok(),
        Some(v @ Value::Integer(_)) => {
            c.problem(
                f,
                show(v),
                format!("must be between {} and {}", range.0, range.1),
            );
            None
        }
        Some(v) => {
            c.problem(f, show(v), "must be an integer");
            None
        }
    }
}

fn string<'a>(c: &mut Checker, t: &'a toml::Table, field: &str, key: &str) -> Option<&'a str> {
    match t.get(key) {
        None => {
            c.problem(format!("{field}.{key}"), String::new(), "is required");
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(v) => {
            c.problem(format!("{field}.{key}"), show(v), "must be a string");
            None
        }
    }
}

fn task(c: &mut Checker, field: &str, t: &toml::Table, root: &Path) -> Option<TaskSpec> {
    let before = c.problems.len();
    for k in t.keys() {
        if !TASK_KEYS.contains(&k.as_str()) {
            c.problem(
                format!("{field}.{k}"),
                String::new(),
                format!("unknown field; known fields are {}", TASK_KEYS.join(", ")),
            );
        }
    }
    let name = string(c, t, field, "name").and_then(|n| match TaskName::parse(n) {
        Ok(n) => Some(n),
        Err(e) => {
            c.problem(format!("{field}.name"), format!("{n:?}"), e.to_string());
            None
        }
    });
    let runtime = match string(c, t, field, "runtime") {
        Some("wasm") => Some(RuntimeKind::Wasm),
        Some("process") => Some(RuntimeKind::Process),
        Some(other) => {
            c.problem(
                format!("{field}.runtime"),
                format!("{other:?}"),
                "must be \"wasm\" or \"process\"",
            );
            None
        }
        None => None,
    };
    let memory_mb = int_in(
        c,
        t,
        field,
        "memory_mb",
        DEFAULT_MEMORY_MB,
        (1, Limits::MAX_MEMORY_MB as i64),
    );
    let timeout_ms = int_in(
        c,
        t,
        field,
        "timeout_ms",
        DEFAULT_TIMEOUT_MS,
        (1, Limits::MAX_TIMEOUT_MS as i64),
    );
    let concurrency = int_in(
        c,
        t,
        field,
        "concurrency",
        DEFAULT_CONCURRENCY,
        (1, Limits::MAX_CONCURRENCY as i64),
    );
    let priority = int_in(
        c,
        t,
        field,
        "priority",
        0i32,
        (
            *Limits::PRIORITY_RANGE.start() as i64,
            *Limits::PRIORITY_RANGE.end() as i64,
        ),
    );
    let env = env(c, t, field);
    let resources = resources(c, t, field);
    let allow = grants(c, t, field);
    let code = match runtime {
        Some(RuntimeKind::Wasm) => {
            for k in [
                "dir",
                "command",
                "handler",
                "min_warm",
                "max_workers",
                "code_group",
            ] {
                if t.contains_key(k) {
                    c.problem(
                        format!("{field}.{k}"),
                        String::new(),
                        "only process tasks take this field",
                    );
                }
            }
            string(c, t, field, "code")
                .and_then(|p| wasm_code(c, &format!("{field}.code"), p, root))
        }
        Some(RuntimeKind::Process) => process_code(c, field, t, root, concurrency),
        _ => None,
    };
    if c.problems.len() > before {
        return None;
    }
    Some(TaskSpec {
        name: name?,
        runtime: runtime?,
        limits: Limits {
            memory_mb: memory_mb?,
            timeout_ms: timeout_ms?,
            concurrency: concurrency?,
            priority: priority?,
        },
        env: env?,
        resources: resources?,
        code: code?,
        allow: allow?,
    })
}

fn env(c: &mut Checker, t: &toml::Table, field: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let Some(v) = t.get("env") else {
        return Some(out);
    };
    let Some(table) = v.as_table() else {
        c.problem(
            format!("{field}.env"),
            show(v),
            "must be a table of strings, e.g. env = { GREETING = \"hi\" }",
        );
        return None;
    };
    let mut ok = true;
    for (k, v) in table {
        let f = format!("{field}.env.{k}");
        if !env_name_ok(k) {
            c.problem(
                &f,
                String::new(),
                "environment variable names use A-Z, a-z, 0-9 and _, not starting with a digit",
            );
            ok = false;
        } else if k.starts_with("ROOST_") {
            c.problem(
                &f,
                String::new(),
                "names starting with ROOST_ are set by the hub",
            );
            ok = false;
        } else if HUB_CREDENTIAL_VARS.contains(&k.as_str()) {
            c.problem(
                &f,
                String::new(),
                "the hub gives each task its own credentials; grant rights with `allow` instead",
            );
            ok = false;
        }
        match v {
            Value::String(s) if !s.contains('\0') => {
                out.insert(k.clone(), s.clone());
            }
            v => {
                c.problem(f, show(v), "must be a string without NUL bytes");
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// A path as the task sees it: absolute, normalised, no `.` or `..`.
fn guest_path_ok(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && !p.contains('\0')
        && Path::new(p)
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
}

fn resources(c: &mut Checker, t: &toml::Table, field: &str) -> Option<Vec<Resource>> {
    let Some(v) = t.get("resource") else {
        return Some(Vec::new());
    };
    let Some(list) = v.as_array() else {
        c.problem(
            format!("{field}.resource"),
            show(v),
            "write resources as [[task.resource]] tables",
        );
        return None;
    };
    let before = c.problems.len();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, r) in list.iter().enumerate() {
        let f = format!("{field}.resource[{i}]");
        let Some(r) = r.as_table() else {
            c.problem(f, show(r), "must be a table with source, path and access");
            continue;
        };
        for k in r.keys() {
            if !["source", "path", "access"].contains(&k.as_str()) {
                c.problem(
                    format!("{f}.{k}"),
                    String::new(),
                    "unknown field; use source, path and access",
                );
            }
        }
        let source = string(c, r, &f, "source").and_then(|s| {
            let p = PathBuf::from(s);
            if !p.is_absolute() {
                c.problem(
                    format!("{f}.source"),
                    format!("{s:?}"),
                    "must be an absolute path on the hub",
                );
                None
            } else if !p.exists() {
                c.problem(
                    format!("{f}.source"),
                    format!("{s:?}"),
                    "does not exist on the hub; create it first",
                );
                None
            } else {
                Some(p)
            }
        });
        let path = string(c, r, &f, "path").and_then(|s| {
            if !guest_path_ok(s) {
                c.problem(
                    format!("{f}.path"),
                    format!("{s:?}"),
                    "must be an absolute path without . or .. parts, e.g. \"/data\"",
                );
                None
            } else if !seen.insert(s.to_owned()) {
                c.problem(
                    format!("{f}.path"),
                    format!("{s:?}"),
                    "another resource of this task already uses this path",
                );
                None
            } else {
                Some(s.to_owned())
            }
        });
        let access = match r.get("access").map(|v| (v, v.as_str())) {
            None => Some(Access::Ro),
            Some((_, Some("ro"))) => Some(Access::Ro),
            Some((_, Some("rw"))) => Some(Access::Rw),
            Some((v, _)) => {
                c.problem(format!("{f}.access"), show(v), "must be \"ro\" or \"rw\"");
                None
            }
        };
        if let (Some(source), Some(path), Some(access)) = (source, path, access) {
            out.push(Resource {
                source,
                path,
                access,
            });
        }
    }
    (c.problems.len() == before).then_some(out)
}

/// Resolves a path from the manifest inside the package folder, refusing
/// anything that leaves it (absolute paths, `..`, symlinks pointing out).
pub fn inside(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    if rel.is_empty() || p.is_absolute() || rel.contains('\0') {
        return Err("must be a path relative to the manifest's folder".into());
    }
    let mut depth = 0i32;
    for comp in p.components() {
        match comp {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(
                        "leaves the manifest's folder; keep code beside the manifest".into(),
                    );
                }
            }
            _ => return Err("must be a path relative to the manifest's folder".into()),
        }
    }
    let full = root.join(p);
    let real = full
        .canonicalize()
        .map_err(|_| "not found in the deployment package (is the path right?)".to_string())?;
    if !real.starts_with(root) {
        return Err("leaves the manifest's folder (through a symlink)".into());
    }
    Ok(real)
}

fn process_code(
    c: &mut Checker,
    field: &str,
    t: &toml::Table,
    root: &Path,
    concurrency: Option<u32>,
) -> Option<TaskCode> {
    let before = c.problems.len();
    if t.contains_key("code") {
        c.problem(
            format!("{field}.code"),
            String::new(),
            "a process task names its folder with `dir`, not `code`",
        );
    }
    if t.contains_key("resource") {
        // A wasm task sees only what is preopened for it; a process sees
        // the machine's filesystem with its user's rights, so a resource
        // could not be enforced (and was silently ignored before).
        c.problem(
            format!("{field}.resource"),
            String::new(),
            "resources are for wasm tasks: a process task sees the machine's files with its own user's rights (its uid is in `roost tasks`); grant that user access to what it needs",
        );
    }
    let dir = string(c, t, field, "dir").and_then(|rel| match inside(root, rel) {
        Ok(p) if p.is_dir() => Some(p),
        Ok(_) => {
            c.problem(
                format!("{field}.dir"),
                format!("{rel:?}"),
                "must be a folder",
            );
            None
        }
        Err(why) => {
            c.problem(format!("{field}.dir"), format!("{rel:?}"), why);
            None
        }
    });
    let command = match t.get("command") {
        None => {
            c.problem(
                format!("{field}.command"),
                String::new(),
                "is required, e.g. command = [\"python3\", \"-m\", \"awslambdaric\"]",
            );
            None
        }
        Some(Value::Array(a))
            if !a.is_empty()
                && a.iter().all(|v| {
                    v.as_str()
                        .is_some_and(|s| !s.is_empty() && !s.contains('\0'))
                }) =>
        {
            Some(
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect::<Vec<_>>(),
            )
        }
        Some(v) => {
            c.problem(
                format!("{field}.command"),
                show(v),
                "must be a non-empty list of non-empty strings",
            );
            None
        }
    };
    let handler = match t.get("handler") {
        None => Some(String::new()),
        Some(Value::String(s)) if !s.contains('\0') => Some(s.clone()),
        Some(v) => {
            c.problem(
                format!("{field}.handler"),
                show(v),
                "must be a string, e.g. \"app.handler\"",
            );
            None
        }
    };
    let code_group = match t.get("code_group") {
        None => Some(None),
        Some(Value::String(g)) if TaskName::parse(g).is_ok() => Some(Some(g.clone())),
        Some(v) => {
            c.problem(
                format!("{field}.code_group"),
                show(v),
                "must be a name like a task's: a-z, 0-9 and '-'",
            );
            None
        }
    };
    let conc = concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    let max_workers = int_in(
        c,
        t,
        field,
        "max_workers",
        conc,
        (1, Limits::MAX_CONCURRENCY as i64),
    );
    let min_warm = int_in(
        c,
        t,
        field,
        "min_warm",
        0u32,
        (0, Limits::MAX_CONCURRENCY as i64),
    );
    if let (Some(lo), Some(hi)) = (min_warm, max_workers) {
        if lo > hi {
            c.problem(
                format!("{field}.min_warm"),
                lo.to_string(),
                format!("is more than max_workers ({hi})"),
            );
        }
    }
    if c.problems.len() > before {
        return None;
    }
    Some(TaskCode::Process {
        dir: dir?,
        command: command?,
        handler: handler?,
        min_warm: min_warm?,
        max_workers: max_workers?,
        code_group: code_group?,
    })
}

fn wasm_code(c: &mut Checker, field: &str, rel: &str, root: &Path) -> Option<TaskCode> {
    let value = format!("{rel:?}");
    if !(rel.ends_with(".wasm") || rel.ends_with(".wat")) {
        c.problem(
            field,
            value,
            "a wasm task's code must be a .wasm or .wat file",
        );
        return None;
    }
    let path = match inside(root, rel) {
        Ok(p) => p,
        Err(why) => {
            c.problem(field, value, why);
            return None;
        }
    };
    match std::fs::read(&path) {
        Ok(bytes) if path.is_file() => Some(TaskCode::Wasm {
            sha256: hex::encode(Sha256::digest(&bytes)),
            path,
        }),
        Ok(_) | Err(_) => {
            c.problem(field, value, "is not a readable file");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, body) in files {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        d
    }

    #[test]
    fn a_good_manifest_yields_typed_tasks_with_defaults() {
        let d = pkg(&[("echo.wat", "(module)")]);
        let m = parse(
            "[[task]]\nname = \"echo\"\nruntime = \"wasm\"\ncode = \"echo.wat\"\nenv = { GREETING = \"hi\" }\n",
            d.path(),
        )
        .unwrap();
        let t = &m.tasks[0];
        assert_eq!(t.name.as_str(), "echo");
        assert_eq!(t.limits.memory_mb, DEFAULT_MEMORY_MB);
        assert_eq!(t.env["GREETING"], "hi");
        assert!(matches!(&t.code, TaskCode::Wasm { sha256, .. } if sha256.len() == 64));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let d = pkg(&[("a.wasm", "x")]);
        let problems = parse(
            r#"
[[task]]
name = "Bad Name"
runtime = "wasm"
code = "../outside.wasm"
memory_mb = 0
timeout_ms = "soon"
colour = "blue"

[[task]]
name = "b"
runtime = "jvm"
priority = 1000

[[task.resource]]
source = "relative/path"
path = "/../etc"
access = "rwx"
"#,
            d.path(),
        )
        .unwrap_err();
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "task[0].name",
            "task[0].code",
            "task[0].memory_mb",
            "task[0].timeout_ms",
            "task[0].colour",
            "task[1].runtime",
            "task[1].priority",
            "task[1].resource[0].source",
            "task[1].resource[0].path",
            "task[1].resource[0].access",
        ] {
            assert!(fields.contains(&f), "missing {f} in {fields:?}");
        }
    }

    #[test]
    fn code_may_not_leave_the_package() {
        let outer = pkg(&[("secret.wasm", "x"), ("pkg/ok.wasm", "x")]);
        let root = outer.path().join("pkg").canonicalize().unwrap();
        assert!(inside(&root, "ok.wasm").is_ok());
        assert!(inside(&root, "../secret.wasm").is_err());
        assert!(inside(&root, "/etc/passwd").is_err());
        assert!(inside(&root, "a/../../secret.wasm").is_err());
        std::os::unix::fs::symlink(outer.path().join("secret.wasm"), root.join("link.wasm"))
            .unwrap();
        assert!(inside(&root, "link.wasm").unwrap_err().contains("symlink"));
    }

    #[test]
    fn grants_secrets_and_shadow_routes_are_typed() {
        let d = pkg(&[("a.wat", "(module)")]);
        let m = parse(
            r#"
[[task]]
name = "a"
runtime = "wasm"
code = "a.wat"
allow = { invoke = ["a", "b*"], shadow_read = ["*"], shadow_update = ["thermostat"], publish = ["alerts/#"], secrets = ["db-password"] }

[[secret]]
name = "db-password"
value_env = "DB_PASSWORD"

[[route]]
from = "shadow:thermostat"
to = "task:a"

[[route]]
from = "task:a"
to = "shadow:heater-1"
"#,
            d.path(),
        )
        .unwrap();
        let g = &m.tasks[0].allow;
        assert_eq!(g.invoke, ["a", "b*"]);
        assert_eq!(g.publish, ["alerts/#"]);
        assert_eq!(m.secrets[0].value_env, "DB_PASSWORD");
        assert_eq!(m.routes[0].from, RouteSource::Shadow("thermostat".into()));
        assert_eq!(m.routes[1].to, RouteDestination::Shadow("heater-1".into()));
    }

    #[test]
    fn bad_grants_and_secrets_are_problems() {
        let d = pkg(&[("a.wat", "(module)")]);
        let p = parse(
            r#"
[[task]]
name = "a"
runtime = "wasm"
code = "a.wat"
env = { AWS_SECRET_ACCESS_KEY = "x" }
allow = { invoke = ["ghost"], shadow_read = ["../x"], publish = ["a/#/b"], secrets = ["nope"], root = ["*"] }

[[secret]]
name = "bad name"
value = "plaintext"
value_env = "1X"

[[route]]
from = "shadow:a/b"
to = "cloud:up"
"#,
            d.path(),
        )
        .unwrap_err();
        let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "task[0].env.AWS_SECRET_ACCESS_KEY",
            "task[0].allow.root",
            "task[0].allow.shadow_read",
            "task[0].allow.publish",
            "secret[0].value",
            "secret[0].name",
            "secret[0].value_env",
            "route[0].from",
            "route[0].to",
        ] {
            assert!(fields.contains(&f), "{f} missing from {p:#?}");
        }
        // Names checked against the manifest only once the grants parse.
        let p = parse(
            "[[task]]\nname=\"a\"\nruntime=\"wasm\"\ncode=\"a.wat\"\nallow={invoke=[\"ghost\"],secrets=[\"nope\"]}\n",
            d.path(),
        )
        .unwrap_err();
        assert_eq!(p.len(), 2, "{p:#?}");
    }

    #[test]
    fn duplicate_names_and_bad_toml_are_problems() {
        let d = pkg(&[("a.wat", "(module)")]);
        let dup = "[[task]]\nname=\"a\"\nruntime=\"wasm\"\ncode=\"a.wat\"\n".repeat(2);
        let p = parse(&dup, d.path()).unwrap_err();
        assert_eq!(p.len(), 1);
        assert!(p[0].why.contains("already"));
        let p = parse("[[task]\nname=", d.path()).unwrap_err();
        assert!(p[0].why.contains("TOML"));
    }

    #[test]
    fn hostile_env_and_resource_paths_are_refused() {
        let d = pkg(&[("a.wat", "(module)")]);
        let m = format!(
            "[[task]]\nname=\"a\"\nruntime=\"wasm\"\ncode=\"a.wat\"\nenv = {{ \"A=B\" = \"x\", ROOST_X = \"y\", OK = 3 }}\n[[task.resource]]\nsource = {:?}\npath = \"/x/../..\"\n",
            d.path().display()
        );
        let p = parse(&m, d.path()).unwrap_err();
        assert_eq!(p.len(), 4, "{p:?}");
    }

    #[test]
    fn a_process_task_with_resources_is_refused_not_silently_ignored() {
        let d = pkg(&[("app/run.sh", "")]);
        let m = format!(
            "[[task]]\nname=\"p\"\nruntime=\"process\"\ndir=\"app\"\ncommand=[\"./run.sh\"]\n[[task.resource]]\nsource = {:?}\npath = \"/data\"\n",
            d.path().display()
        );
        let p = parse(&m, d.path()).unwrap_err();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].field, "task[0].resource");
        assert!(p[0].why.contains("wasm tasks"), "{p:?}");
    }
}
