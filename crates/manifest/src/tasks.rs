//! `[[task]]`: a task's name, runtime, limits, env and code (a wasm module,
//! or a process's folder and command), into a `TaskSpec`.

use crate::allow::grants;
use crate::names::env_name_ok;
use crate::paths::inside;
use crate::problem::{int_in, show, string, Checker};
use crate::resources::resources;
use roost_model::{HealthCheck, Limits, RuntimeKind, TaskCode, TaskName, TaskSpec};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use toml::Value;

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
    "health_check",
];

/// Variables the hub sets itself: each task's own credentials.
const HUB_CREDENTIAL_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

pub(crate) fn task(c: &mut Checker, field: &str, t: &toml::Table, root: &Path) -> Option<TaskSpec> {
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
    let health_check = health_check(c, t, field);
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
        health_check: health_check?,
    })
}

/// `health_check = { input = "...", timeout_ms = N }`: the call a
/// deployment must answer once applied.
fn health_check(c: &mut Checker, t: &toml::Table, field: &str) -> Option<Option<HealthCheck>> {
    let f = format!("{field}.health_check");
    let Some(v) = t.get("health_check") else {
        return Some(None);
    };
    let Some(table) = v.as_table() else {
        c.problem(
            f,
            show(v),
            "write it as health_check = { input = \"...\", timeout_ms = N }",
        );
        return None;
    };
    let before = c.problems.len();
    for k in table.keys() {
        if k != "input" && k != "timeout_ms" {
            c.problem(
                format!("{f}.{k}"),
                String::new(),
                "unknown field; known fields are input, timeout_ms",
            );
        }
    }
    let input = string(c, table, &f, "input");
    let timeout_ms = int_in(
        c,
        table,
        &f,
        "timeout_ms",
        HealthCheck::DEFAULT_TIMEOUT_MS,
        (1, HealthCheck::MAX_TIMEOUT_MS as i64),
    );
    if c.problems.len() > before {
        return None;
    }
    Some(Some(HealthCheck {
        input: input?.to_owned(),
        timeout_ms: timeout_ms?,
    }))
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
    use crate::parse;
    use crate::tests::pkg;

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
