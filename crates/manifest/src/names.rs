//! Name rules more than one table checks: MQTT topic filters (devices,
//! routes, grants), thing names (routes, grants) and environment variable
//! names (task env, secrets).

use crate::problem::Checker;

/// An MQTT topic filter (MQTT 4.7): `+` a whole level, `#` the whole last.
pub(crate) fn topic_filter_ok(f: &str) -> bool {
    roost_topic::valid_filter(f)
}

/// A thing name as the shadows accept it (AWS IoT's rule).
pub(crate) fn thing_name_ok(n: &str) -> bool {
    roost_shadows::ThingName::parse(n).is_ok()
}

pub(crate) fn thing_name(c: &mut Checker, field: &str, n: &str) -> Option<String> {
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

pub(crate) fn env_name_ok(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
