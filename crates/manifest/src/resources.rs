//! `[[task.resource]]`: a host path a wasm task sees at a guest path, read
//! only or read-write.

use crate::problem::{show, string, Checker};
use roost_model::{Access, Resource};
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

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

pub(crate) fn resources(c: &mut Checker, t: &toml::Table, field: &str) -> Option<Vec<Resource>> {
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
