//! What validation reports: a [`Problem`] per thing wrong, gathered by a
//! `Checker` so a manifest's every problem comes back at once, and the field
//! readers every table uses (each records a problem instead of failing).

use serde::Serialize;
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

pub(crate) struct Checker {
    pub(crate) problems: Vec<Problem>,
}

impl Checker {
    pub(crate) fn problem(
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

pub(crate) fn show(v: &Value) -> String {
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

/// The tables of an array of tables (`[[key]]`), each with its field name
/// (`key[i]`); anything else is a problem.
pub(crate) fn tables<'a>(
    c: &mut Checker,
    key: &str,
    value: &'a Value,
) -> Vec<(String, &'a toml::Table)> {
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

pub(crate) fn int_in<T: TryFrom<i64> + Copy>(
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

pub(crate) fn string<'a>(
    c: &mut Checker,
    t: &'a toml::Table,
    field: &str,
    key: &str,
) -> Option<&'a str> {
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
