//! `[[device]]`: a device's name, password hash and the topic filters it
//! may publish and subscribe to, into a `DeviceSpec`.

use crate::names::topic_filter_ok;
use crate::problem::{show, string, Checker};
use roost_model::DeviceSpec;
use toml::Value;

/// A device name: its MQTT user name and client id.
fn device_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(crate) fn device(c: &mut Checker, field: &str, t: &toml::Table) -> Option<DeviceSpec> {
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
