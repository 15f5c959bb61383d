//! `[[route]]`: a route's `from` and `to` endpoints (`device:`, `task:`,
//! `shadow:`, `timer:`), into a `RouteSpec`. Routes name the manifest's
//! tasks, so they are checked once every task is read.

use crate::names::{thing_name, topic_filter_ok};
use crate::problem::{show, string, Checker};
use roost_model::{RouteDestination, RouteSource, RouteSpec, TaskName};
use std::collections::HashSet;
use toml::Value;

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

pub(crate) fn route(
    c: &mut Checker,
    field: &str,
    r: &Value,
    tasks: &HashSet<TaskName>,
) -> Option<RouteSpec> {
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
