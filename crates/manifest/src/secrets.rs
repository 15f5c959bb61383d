//! `[[secret]]`: a secret's name and the deploying shell's variable that
//! holds its value (never the value itself), into a `SecretSpec`.

use crate::names::env_name_ok;
use crate::problem::{string, Checker};
use roost_model::SecretSpec;

/// A secret name as Secrets Manager accepts it: 1 to 512 of
/// `[A-Za-z0-9/_+=.@-]`.
pub fn secret_name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 512
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+=.@-".contains(&b))
}

pub(crate) fn secret(c: &mut Checker, field: &str, t: &toml::Table) -> Option<SecretSpec> {
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
