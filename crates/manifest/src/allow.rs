//! A task's `allow` table: the rights it grants the task (invoke, shadows,
//! publish, secrets, retained), into `Grants`; names without a `*` must be
//! in the manifest.

use crate::names::{thing_name_ok, topic_filter_ok};
use crate::problem::{show, Checker};
use crate::secrets::secret_name_ok;
use roost_model::{Grants, SecretSpec, TaskName};
use std::collections::HashSet;

const GRANT_KEYS: &[&str] = &[
    "invoke",
    "shadow_read",
    "shadow_update",
    "publish",
    "secrets",
    "retained",
];

pub(crate) fn grants(c: &mut Checker, t: &toml::Table, field: &str) -> Option<Grants> {
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
pub(crate) fn check_grants(
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
