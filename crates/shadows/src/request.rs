//! Parsing update, get and delete request payloads into typed requests,
//! with AWS's validation rules and error messages. Everything past this
//! module works on checked values.

use crate::error::ShadowError;
use crate::limits::Limits;
use crate::state::{self, Object};
use serde_json::{Map, Value};

const CLIENT_TOKEN_MAX_BYTES: usize = 64;

/// What an update does to one section (`desired` or `reported`).
#[derive(Debug, Clone, PartialEq)]
pub enum SectionUpdate {
    /// The section was not in the request: leave it alone.
    Absent,
    /// `null`: delete the whole section.
    Clear,
    /// An object to merge into the section.
    Merge(Map<String, Value>),
}

impl SectionUpdate {
    /// The section as the request gave it, for echoing back.
    fn as_given(&self) -> Option<Value> {
        match self {
            SectionUpdate::Absent => None,
            SectionUpdate::Clear => Some(Value::Null),
            SectionUpdate::Merge(m) => Some(Value::Object(m.clone())),
        }
    }
}

/// A checked update request.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateRequest {
    /// What to do to `state.desired`.
    pub desired: SectionUpdate,
    /// What to do to `state.reported`.
    pub reported: SectionUpdate,
    /// Echoed in every response to this request.
    pub client_token: Option<String>,
    /// When present, the update applies only if it equals the current version.
    pub version: Option<u64>,
}

impl UpdateRequest {
    /// The request's `state` as given, nulls included.
    pub(crate) fn state_as_given(&self) -> Object {
        self.sections()
            .filter_map(|(name, s)| Some((name.to_owned(), s.as_given()?)))
            .collect()
    }

    /// Metadata for every leaf the request wrote or deleted, per section.
    pub(crate) fn metadata(&self, now: u64) -> Object {
        self.sections()
            .filter_map(|(name, s)| {
                Some((name.to_owned(), state::metadata_for(&s.as_given()?, now)))
            })
            .collect()
    }

    fn sections(&self) -> impl Iterator<Item = (&'static str, &SectionUpdate)> {
        [("desired", &self.desired), ("reported", &self.reported)].into_iter()
    }

    /// Rejects sections nested deeper than `limits` allow.
    pub(crate) fn check_depth(&self, limits: &Limits) -> Result<(), ShadowError> {
        for (_, section) in self.sections() {
            if let SectionUpdate::Merge(m) = section {
                if state::depth(m) > limits.max_depth {
                    return Err(ShadowError::bad_request(format!(
                        "JSON contains too many levels of nesting; maximum is {}",
                        limits.max_depth
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Parses an update payload:
/// `{"state": {"desired": {..}|null, "reported": {..}|null}, "clientToken"?, "version"?}`.
/// Other top-level keys are ignored.
pub fn parse_update(payload: &[u8], limits: &Limits) -> Result<UpdateRequest, ShadowError> {
    if payload.len() > limits.max_request_bytes {
        return Err(ShadowError::too_large());
    }
    let mut doc = match serde_json::from_slice(payload) {
        Ok(Value::Object(doc)) => doc,
        Ok(_) => return Err(ShadowError::bad_request("Missing required node: state")),
        Err(_) => return Err(ShadowError::bad_request("Payload contains invalid json")),
    };
    let client_token = match doc.remove("clientToken") {
        None => None,
        Some(Value::String(t)) if t.len() <= CLIENT_TOKEN_MAX_BYTES => Some(t),
        Some(_) => return Err(ShadowError::bad_request("Invalid clientToken")),
    };
    let version = match doc.remove("version") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| ShadowError::bad_request("Invalid version"))?,
        ),
    };
    let mut state = match doc.remove("state") {
        None => return Err(ShadowError::bad_request("Missing required node: state")),
        Some(Value::Object(s)) => s,
        Some(_) => return Err(ShadowError::bad_request("State node must be an object")),
    };
    if let Some(other) = state.keys().find(|k| *k != "desired" && *k != "reported") {
        return Err(ShadowError::bad_request(format!(
            "State contains an invalid node: '{other}'"
        )));
    }
    let request = UpdateRequest {
        desired: section(state.remove("desired"), "Desired")?,
        reported: section(state.remove("reported"), "Reported")?,
        client_token,
        version,
    };
    if request.desired == SectionUpdate::Absent && request.reported == SectionUpdate::Absent {
        return Err(ShadowError::bad_request(
            "State node must contain desired or reported",
        ));
    }
    request.check_depth(limits)?;
    Ok(request)
}

fn section(value: Option<Value>, label: &str) -> Result<SectionUpdate, ShadowError> {
    match value {
        None => Ok(SectionUpdate::Absent),
        Some(Value::Null) => Ok(SectionUpdate::Clear),
        Some(Value::Object(m)) => Ok(SectionUpdate::Merge(m)),
        Some(_) => Err(ShadowError::bad_request(format!(
            "{label} node must be an object"
        ))),
    }
}

/// The `clientToken` of any request payload, if it has a valid one. Get and
/// delete payloads may be empty; for a rejected update this recovers the
/// token to echo even when the rest of the payload is bad.
pub fn parse_client_token(payload: &[u8]) -> Option<String> {
    let Ok(Value::Object(mut doc)) = serde_json::from_slice(payload) else {
        return None;
    };
    match doc.remove("clientToken")? {
        Value::String(t) if t.len() <= CLIENT_TOKEN_MAX_BYTES => Some(t),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<UpdateRequest, ShadowError> {
        parse_update(v.to_string().as_bytes(), &Limits::default())
    }

    fn message(v: Value) -> String {
        parse(v).unwrap_err().message().to_owned()
    }

    #[test]
    fn parses_sections_token_and_version() {
        let r = parse(json!({"state": {"desired": {"a": 1}, "reported": null}, "clientToken": "t", "version": 3}))
            .unwrap();
        assert_eq!(
            r.desired,
            SectionUpdate::Merge(crate::state::tests::obj(json!({"a": 1})))
        );
        assert_eq!(r.reported, SectionUpdate::Clear);
        assert_eq!(r.client_token.as_deref(), Some("t"));
        assert_eq!(r.version, Some(3));
        assert_eq!(
            Value::Object(r.state_as_given()),
            json!({"desired": {"a": 1}, "reported": null})
        );
        assert_eq!(
            Value::Object(r.metadata(5)),
            json!({"desired": {"a": {"timestamp": 5}}, "reported": {"timestamp": 5}})
        );
    }

    #[test]
    fn rejects_malformed_documents() {
        let bad = parse_update(b"{nope", &Limits::default()).unwrap_err();
        assert_eq!(
            (bad.code(), bad.message()),
            (400, "Payload contains invalid json")
        );
        assert_eq!(
            parse_update(&[0xff, 0xfe], &Limits::default())
                .unwrap_err()
                .code(),
            400
        );
        assert_eq!(message(json!({})), "Missing required node: state");
        assert_eq!(message(json!([1])), "Missing required node: state");
        assert_eq!(message(json!({"state": 1})), "State node must be an object");
        assert_eq!(
            message(json!({"state": null})),
            "State node must be an object"
        );
        assert_eq!(
            message(json!({"state": {"desired": {}, "delta": {}}})),
            "State contains an invalid node: 'delta'"
        );
        assert_eq!(parse(json!({"state": {}})).unwrap_err().code(), 400);
        assert_eq!(
            message(json!({"state": {"desired": [1]}})),
            "Desired node must be an object"
        );
        assert_eq!(
            message(json!({"state": {"reported": 1}})),
            "Reported node must be an object"
        );
    }

    #[test]
    fn rejects_bad_token_and_version() {
        let ok = "x".repeat(64);
        assert!(parse(json!({"state": {"desired": {}}, "clientToken": ok})).is_ok());
        let long = "x".repeat(65);
        for bad in [json!(long), json!(5), json!(null)] {
            assert_eq!(
                message(json!({"state": {"desired": {}}, "clientToken": bad})),
                "Invalid clientToken"
            );
        }
        for bad in [json!(-1), json!(1.5), json!("3"), json!(null)] {
            assert_eq!(
                message(json!({"state": {"desired": {}}, "version": bad})),
                "Invalid version"
            );
        }
    }

    #[test]
    fn enforces_depth_and_request_size() {
        let six = json!({"a":{"b":{"c":{"d":{"e":{"f":1}}}}}});
        assert!(parse(json!({"state": {"reported": six}})).is_ok());
        let seven = json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}});
        let e = parse(json!({"state": {"reported": seven}})).unwrap_err();
        assert_eq!(
            e.message(),
            "JSON contains too many levels of nesting; maximum is 6"
        );
        let tight = Limits {
            max_depth: 2,
            ..Limits::default()
        };
        let e = parse_update(br#"{"state":{"desired":{"a":{"b":{"c":1}}}}}"#, &tight).unwrap_err();
        assert_eq!(
            e.message(),
            "JSON contains too many levels of nesting; maximum is 2"
        );
        let tiny = Limits {
            max_request_bytes: 10,
            ..Limits::default()
        };
        let e = parse_update(br#"{"state":{"desired":{}}}"#, &tiny).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (413, "The payload exceeds the maximum size allowed")
        );
    }

    #[test]
    fn client_token_from_any_payload() {
        assert_eq!(parse_client_token(b""), None);
        assert_eq!(parse_client_token(b"{}"), None);
        assert_eq!(
            parse_client_token(br#"{"clientToken":"abc"}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(
            parse_client_token(br#"{"clientToken":"abc","state":7}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(parse_client_token(br#"{"clientToken":1}"#), None);
        assert_eq!(parse_client_token(b"{broken"), None);
    }
}
