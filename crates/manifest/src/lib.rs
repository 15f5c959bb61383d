//! The deployment manifest: TOML in, a validated [`Manifest`] out.
//!
//! Validation looks at the whole document and reports every problem at
//! once (a [`Problem`] names the field, the value and why), so a user fixes
//! a manifest in one round. Paths are checked against the package folder the
//! manifest came in: `code` and `dir` may not leave it, not even through a
//! symlink; a resource's `source` must be an absolute path that exists on
//! the hub.
//!
//! One module per manifest table (`tasks`, `resources`, `devices`,
//! `routes`, `secrets`, `allow`); `problem` holds what they report with and
//! `paths` and `names` the rules they share.

mod allow;
mod devices;
mod names;
pub mod package;
mod paths;
mod problem;
mod resources;
mod routes;
mod secrets;
mod tasks;

pub use paths::inside;
pub use problem::Problem;
pub use secrets::secret_name_ok;
pub use tasks::{DEFAULT_CONCURRENCY, DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_MS};

use problem::{show, tables, Checker};
use roost_model::{DeviceSpec, RouteSpec, SecretSpec, TaskName, TaskSpec};
use std::collections::HashSet;
use std::path::Path;
use toml::Value;

/// A manifest that passed validation.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub tasks: Vec<TaskSpec>,
    pub devices: Vec<DeviceSpec>,
    pub routes: Vec<RouteSpec>,
    pub secrets: Vec<SecretSpec>,
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
                    if let Some(spec) = tasks::task(&mut c, &field, t, &root) {
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
                    if let Some(dev) = devices::device(&mut c, &field, d) {
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
                    if let Some(s) = secrets::secret(&mut c, &field, t) {
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
        allow::check_grants(
            &mut c,
            &format!("task[{i}].allow"),
            &t.allow,
            &task_names,
            &secrets,
        );
    }
    let mut routes = Vec::new();
    for (i, r) in raw_routes.iter().enumerate() {
        if let Some(r) = routes::route(&mut c, &format!("route[{i}]"), r, &task_names) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use roost_model::{RouteDestination, RouteSource};

    pub(crate) fn pkg(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (p, body) in files {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        d
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
}
