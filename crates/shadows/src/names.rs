//! Thing names, shadow names and the identity of one shadow. Names are
//! checked once here, so a topic built from them can never carry an MQTT
//! wildcard, a level separator or a `$` prefix.

use crate::error::ShadowError;
use std::fmt;

const THING_NAME_MAX: usize = 128;
const SHADOW_NAME_MAX: usize = 64;

/// AWS's alphabet for both names; it excludes `/`, `+`, `#` and `$`, which is
/// what keeps names safe inside topics.
fn is_valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

/// A thing's name: 1 to 128 characters of `[a-zA-Z0-9:_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThingName(String);

impl ThingName {
    /// Checks `s` against AWS's rules for thing names.
    pub fn parse(s: &str) -> Result<Self, ShadowError> {
        if is_valid_name(s, THING_NAME_MAX) {
            Ok(ThingName(s.to_owned()))
        } else {
            Err(ShadowError::bad_request("Invalid thing name"))
        }
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ThingName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A named shadow's name: 1 to 64 characters of `[a-zA-Z0-9:_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShadowName(String);

impl ShadowName {
    /// Checks `s` against AWS's rules for shadow names.
    pub fn parse(s: &str) -> Result<Self, ShadowError> {
        if is_valid_name(s, SHADOW_NAME_MAX) {
            Ok(ShadowName(s.to_owned()))
        } else {
            Err(ShadowError::bad_request("Invalid shadow name"))
        }
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShadowName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which shadow: a thing's classic (unnamed) shadow, or one of its named ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShadowId {
    /// The thing the shadow belongs to.
    pub thing: ThingName,
    /// `None` is the classic shadow.
    pub name: Option<ShadowName>,
}

impl ShadowId {
    /// Parses the parts as they arrive over HTTP: the thing from the path,
    /// the shadow name from `?name=` (absent for the classic shadow).
    pub fn parse(thing: &str, name: Option<&str>) -> Result<Self, ShadowError> {
        Ok(ShadowId {
            thing: ThingName::parse(thing)?,
            name: name.map(ShadowName::parse).transpose()?,
        })
    }
}

/// `thing` for the classic shadow, `thing~name` for a named one; the form
/// used in "No shadow exists" messages and handy as a storage key, since `~`
/// cannot occur in either name.
impl fmt::Display for ShadowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            None => write!(f, "{}", self.thing),
            Some(n) => write!(f, "{}~{}", self.thing, n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_aws_alphabet() {
        for ok in ["a", "Thing-1", "my:thing_2", "A-Z:0-9_"] {
            assert_eq!(ThingName::parse(ok).unwrap().as_str(), ok);
            assert_eq!(ShadowName::parse(ok).unwrap().as_str(), ok);
        }
        assert!(ThingName::parse(&"t".repeat(128)).is_ok());
        assert!(ShadowName::parse(&"s".repeat(64)).is_ok());
    }

    #[test]
    fn rejects_hostile_and_malformed_names() {
        let bad = [
            "", "../x", "a/b", "+", "#", "$foo", "a b", "thing.1", "tëst", "名前", "a\0b", "a~b",
        ];
        for s in bad {
            assert!(ThingName::parse(s).is_err(), "thing {s:?}");
            assert!(ShadowName::parse(s).is_err(), "shadow {s:?}");
        }
        assert!(ThingName::parse(&"t".repeat(129)).is_err());
        assert!(ShadowName::parse(&"s".repeat(65)).is_err());
        assert_eq!(ThingName::parse("+").unwrap_err().code(), 400);
    }

    #[test]
    fn id_from_http_parts() {
        let classic = ShadowId::parse("lamp", None).unwrap();
        assert_eq!(classic.name, None);
        assert_eq!(classic.to_string(), "lamp");
        let named = ShadowId::parse("lamp", Some("config")).unwrap();
        assert_eq!(named.to_string(), "lamp~config");
        assert!(ShadowId::parse("lamp", Some("")).is_err());
        assert!(ShadowId::parse("la/mp", None).is_err());
    }
}
