//! One shadow as the store keeps it, and the get, update and delete
//! operations on it with the response documents AWS publishes for each.
//! Operations return a new record rather than mutating, so an error changes nothing.

use crate::error::{stamp, ShadowError, ShadowErrorKind, StoredRecordError};
use crate::limits::Limits;
use crate::names::ShadowId;
use crate::request::{SectionUpdate, UpdateRequest};
use crate::state::{self, Object};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One section (`desired` or `reported`): its state and the metadata
/// mirroring it, with a `{"timestamp"}` leaf for every value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// The section's values.
    pub state: Map<String, Value>,
    /// `{"timestamp"}` leaves mirroring `state`.
    pub metadata: Map<String, Value>,
}

/// An existing shadow's content. A section that would be empty is `None`,
/// as AWS drops empty sections; a shadow with neither still exists.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowDocument {
    /// What the shadow's owner asks the device to be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Section>,
    /// What the device says it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Section>,
}

impl ShadowDocument {
    fn sections(&self) -> impl Iterator<Item = (&'static str, &Section)> {
        [("desired", &self.desired), ("reported", &self.reported)]
            .into_iter()
            .filter_map(|(name, s)| Some((name, s.as_ref()?)))
    }

    /// `{"desired"?, "reported"?}`
    fn state(&self) -> Object {
        self.sections()
            .map(|(name, s)| (name.to_owned(), Value::Object(s.state.clone())))
            .collect()
    }

    /// `{"desired"?, "reported"?}` of metadata.
    fn metadata(&self) -> Object {
        self.sections()
            .map(|(name, s)| (name.to_owned(), Value::Object(s.metadata.clone())))
            .collect()
    }

    /// The delta and its desired metadata, if there is any difference.
    fn delta_with_metadata(&self) -> Option<(Object, Object)> {
        let desired = self.desired.as_ref()?;
        let reported = self.reported.as_ref().map(|r| &r.state);
        let (delta, metadata) = state::delta(&desired.state, &desired.metadata, reported);
        (!delta.is_empty()).then_some((delta, metadata))
    }

    /// `{"state", "metadata", "version"}` as used in `update/documents`.
    fn snapshot(&self, version: u64) -> Value {
        let mut doc = Map::new();
        doc.insert("state".into(), Value::Object(self.state()));
        doc.insert("metadata".into(), Value::Object(self.metadata()));
        doc.insert("version".into(), version.into());
        Value::Object(doc)
    }
}

/// What the store keeps for one shadow. The version outlives deletion: AWS
/// continues a re-created shadow's versions from the deleted one's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowRecord {
    /// Version of the last accepted update; 0 if there never was one.
    pub version: u64,
    /// `None` when the shadow was deleted or never existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<ShadowDocument>,
}

/// Everything an accepted update produces.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateOutcome {
    /// The record to store in place of the old one.
    pub record: ShadowRecord,
    /// For `.../update/accepted`.
    pub accepted: Value,
    /// For `.../update/delta`; only when the update touched `desired` and
    /// desired and reported now differ.
    pub delta: Option<Value>,
    /// For `.../update/documents`.
    pub documents: Value,
}

impl ShadowRecord {
    /// A shadow that has never existed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the shadow currently exists.
    pub fn exists(&self) -> bool {
        self.document.is_some()
    }

    /// The record as compact JSON, for storage.
    pub fn to_stored(&self) -> String {
        serde_json::to_string(self).expect("a shadow record always serializes")
    }

    /// Reads back a record written by [`ShadowRecord::to_stored`].
    pub fn from_stored(stored: &str) -> Result<Self, StoredRecordError> {
        Ok(serde_json::from_str(stored)?)
    }

    /// Applies `request` at `now`, creating the shadow if needed.
    ///
    /// Errors: 400 for nesting deeper than `limits` allow, 409 when the
    /// request's version is not the current one, 413 when the merged state
    /// exceeds `limits.max_state_bytes`.
    pub fn update(
        &self,
        request: &UpdateRequest,
        limits: &Limits,
        now: u64,
    ) -> Result<UpdateOutcome, ShadowError> {
        // Checked again here because an UpdateRequest can be built by hand.
        request.check_depth(limits)?;
        if request.version.is_some_and(|v| v != self.version) {
            return Err(ShadowError::conflict());
        }
        let mut document = self.document.clone().unwrap_or_default();
        apply(&mut document.desired, &request.desired, now);
        apply(&mut document.reported, &request.reported, now);
        if Value::Object(document.state()).to_string().len() > limits.max_state_bytes {
            return Err(ShadowError::too_large());
        }
        let version = self
            .version
            .checked_add(1)
            .ok_or_else(ShadowError::conflict)?;
        let token = request.client_token.as_deref();

        let mut accepted = Map::new();
        accepted.insert("state".into(), Value::Object(request.state_as_given()));
        accepted.insert("metadata".into(), Value::Object(request.metadata(now)));
        let accepted = stamp(accepted, Some(version), token, now);

        let delta = match request.desired {
            SectionUpdate::Absent => None,
            _ => document.delta_with_metadata().map(|(delta, metadata)| {
                let mut doc = Map::new();
                doc.insert("state".into(), Value::Object(delta));
                doc.insert("metadata".into(), Value::Object(metadata));
                stamp(doc, Some(version), token, now)
            }),
        };

        let mut documents = Map::new();
        if let Some(previous) = &self.document {
            documents.insert("previous".into(), previous.snapshot(self.version));
        }
        documents.insert("current".into(), document.snapshot(version));
        let documents = stamp(documents, None, token, now);

        Ok(UpdateOutcome {
            record: ShadowRecord {
                version,
                document: Some(document),
            },
            accepted,
            delta,
            documents,
        })
    }

    /// The `get/accepted` document:
    /// `{"state": {"desired"?, "reported"?, "delta"?}, "metadata", "version", "timestamp", "clientToken"?}`.
    /// 404 when the shadow does not exist.
    pub fn get(
        &self,
        id: &ShadowId,
        client_token: Option<&str>,
        now: u64,
    ) -> Result<Value, ShadowError> {
        let document = self.document.as_ref().ok_or_else(|| not_found(id))?;
        let mut state = document.state();
        if let Some((delta, _)) = document.delta_with_metadata() {
            state.insert("delta".into(), Value::Object(delta));
        }
        let mut doc = Map::new();
        doc.insert("state".into(), Value::Object(state));
        doc.insert("metadata".into(), Value::Object(document.metadata()));
        Ok(stamp(doc, Some(self.version), client_token, now))
    }

    /// Deletes the shadow, keeping its version for the next update. Returns
    /// the record to store and the `delete/accepted` document
    /// `{"version", "timestamp", "clientToken"?}`. 404 when it does not exist.
    pub fn delete(
        &self,
        id: &ShadowId,
        client_token: Option<&str>,
        now: u64,
    ) -> Result<(ShadowRecord, Value), ShadowError> {
        if self.document.is_none() {
            return Err(not_found(id));
        }
        let record = ShadowRecord {
            version: self.version,
            document: None,
        };
        let accepted = stamp(Map::new(), Some(self.version), client_token, now);
        Ok((record, accepted))
    }

    /// What desired asks for that reported does not show yet; `None` when
    /// they agree or the shadow does not exist.
    pub fn delta(&self) -> Option<Map<String, Value>> {
        let (delta, _) = self.document.as_ref()?.delta_with_metadata()?;
        Some(delta)
    }
}

fn apply(section: &mut Option<Section>, update: &SectionUpdate, now: u64) {
    match update {
        SectionUpdate::Absent => {}
        SectionUpdate::Clear => *section = None,
        SectionUpdate::Merge(patch) => {
            let mut s = section.take().unwrap_or_default();
            state::merge(&mut s.state, &mut s.metadata, patch, now);
            *section = (!s.state.is_empty()).then_some(s);
        }
    }
}

fn not_found(id: &ShadowId) -> ShadowError {
    ShadowError::new(
        ShadowErrorKind::NotFound,
        format!("No shadow exists with name: '{id}'"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_update;
    use crate::state::tests::mirrors;
    use proptest::prelude::*;
    use serde_json::json;

    fn lamp() -> ShadowId {
        ShadowId::parse("lamp", None).unwrap()
    }

    fn req(v: Value) -> UpdateRequest {
        parse_update(v.to_string().as_bytes(), &Limits::default()).unwrap()
    }

    fn update(record: &ShadowRecord, v: Value, now: u64) -> UpdateOutcome {
        record.update(&req(v), &Limits::default(), now).unwrap()
    }

    /// A shadow made by one update at time 1.
    fn created(v: Value) -> ShadowRecord {
        update(&ShadowRecord::new(), v, 1).record
    }

    #[test]
    fn first_update_creates_version_one_with_metadata() {
        let body = json!({"on": true, "dims": [1, 2]});
        let out = update(
            &ShadowRecord::new(),
            json!({"state": {"desired": body}, "clientToken": "c"}),
            9,
        );
        let t = json!({"timestamp": 9});
        let meta = json!({"on": t, "dims": [t, t]});
        assert_eq!(out.record.version, 1);
        let accepted = json!({"state": {"desired": body}, "metadata": {"desired": meta},
            "version": 1, "timestamp": 9, "clientToken": "c"});
        assert_eq!(out.accepted, accepted);
        let delta = json!({"state": body, "metadata": meta, "version": 1, "timestamp": 9, "clientToken": "c"});
        assert_eq!(out.delta, Some(delta));
        // No "previous": the shadow did not exist.
        let current =
            json!({"state": {"desired": body}, "metadata": {"desired": meta}, "version": 1});
        let documents = json!({"current": current, "timestamp": 9, "clientToken": "c"});
        assert_eq!(out.documents, documents);
    }

    #[test]
    fn later_update_merges_and_reports_previous() {
        let one = created(json!({"state": {"desired": {"a": 1, "b": 2}}}));
        let out = update(
            &one,
            json!({"state": {"reported": {"a": 1}, "desired": {"b": null}}}),
            2,
        );
        let doc = out.record.document.as_ref().unwrap();
        assert_eq!(
            Value::Object(doc.state()),
            json!({"desired": {"a": 1}, "reported": {"a": 1}})
        );
        let t = |n: u64| json!({ "timestamp": n });
        let meta = json!({"desired": {"a": t(1)}, "reported": {"a": t(2)}});
        assert_eq!(Value::Object(doc.metadata()), meta);
        // Deletions are echoed as given, with a timestamp, as AWS does.
        assert_eq!(
            out.accepted["state"],
            json!({"desired": {"b": null}, "reported": {"a": 1}})
        );
        let meta = json!({"desired": {"b": t(2)}, "reported": {"a": t(2)}});
        assert_eq!(out.accepted["metadata"], meta);
        let previous = json!({"state": {"desired": {"a": 1, "b": 2}},
            "metadata": {"desired": {"a": t(1), "b": t(1)}}, "version": 1});
        assert_eq!(out.documents["previous"], previous);
        assert_eq!(out.documents["current"]["version"], json!(2));
        // Desired now matches reported: nothing to publish on delta.
        assert_eq!((out.delta, out.record.delta()), (None, None));
    }

    #[test]
    fn delta_only_when_desired_was_touched() {
        let one = created(json!({"state": {"desired": {"on": true}}}));
        let out = update(&one, json!({"state": {"reported": {"temp": 20}}}), 2);
        assert_eq!(out.delta, None);
        assert_eq!(
            out.record.delta(),
            Some(state::tests::obj(json!({"on": true})))
        );
    }

    #[test]
    fn nested_delta_carries_only_differing_leaves() {
        let rec = created(json!({"state": {"reported": {"light": {"on": true, "level": 3}}}}));
        let out = update(
            &rec,
            json!({"state": {"desired": {"light": {"on": true, "level": 5}}}}),
            2,
        );
        let delta = out.delta.unwrap();
        assert_eq!(delta["state"], json!({"light": {"level": 5}}));
        assert_eq!(
            delta["metadata"],
            json!({"light": {"level": {"timestamp": 2}}})
        );
    }

    #[test]
    fn section_null_deletes_whole_section() {
        let rec = created(json!({"state": {"desired": {"a": 1}, "reported": {"b": 2}}}));
        let out = update(&rec, json!({"state": {"desired": null}}), 2);
        assert_eq!(out.record.document.as_ref().unwrap().desired, None);
        assert_eq!(out.delta, None);
        // Emptying every section leaves an existing, empty shadow.
        let out = update(&out.record, json!({"state": {"reported": {"b": null}}}), 3);
        let got = out.record.get(&lamp(), None, 4).unwrap();
        assert_eq!(
            got,
            json!({"state": {}, "metadata": {}, "version": 3, "timestamp": 4})
        );
    }

    #[test]
    fn version_conflict_is_409() {
        let rec = created(json!({"state": {"desired": {"a": 1}}}));
        let stale = req(json!({"state": {"desired": {"a": 2}}, "version": 7}));
        let e = rec.update(&stale, &Limits::default(), 2).unwrap_err();
        assert_eq!((e.code(), e.message()), (409, "Version conflict"));
        let ok = update(
            &rec,
            json!({"state": {"desired": {"a": 2}}, "version": 1}),
            2,
        );
        assert_eq!(ok.record.version, 2);
    }

    #[test]
    fn version_continues_after_delete() {
        let mut rec = ShadowRecord::new();
        for now in 1..=3 {
            rec = update(&rec, json!({"state": {"reported": {"n": now}}}), now).record;
        }
        let (deleted, accepted) = rec.delete(&lamp(), Some("d"), 9).unwrap();
        assert_eq!(
            accepted,
            json!({"version": 3, "timestamp": 9, "clientToken": "d"})
        );
        assert_eq!((deleted.version, deleted.exists()), (3, false));
        let e = deleted.get(&lamp(), Some("g"), 10).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (404, "No shadow exists with name: 'lamp'")
        );
        assert_eq!(deleted.delete(&lamp(), None, 10).unwrap_err().code(), 404);
        let again = update(
            &deleted,
            json!({"state": {"reported": {"n": 0}}, "version": 3}),
            11,
        );
        assert_eq!(again.record.version, 4);
        assert!(again.documents.get("previous").is_none());
    }

    #[test]
    fn named_shadow_not_found_message() {
        let id = ShadowId::parse("lamp", Some("cfg")).unwrap();
        let e = ShadowRecord::new().get(&id, None, 1).unwrap_err();
        assert_eq!(e.message(), "No shadow exists with name: 'lamp~cfg'");
    }

    #[test]
    fn get_includes_delta_and_metadata() {
        let rec = created(json!({"state": {"desired": {"a": 1, "b": 2}, "reported": {"a": 1}}}));
        let t = json!({"timestamp": 1});
        let expected = json!({
            "state": {"desired": {"a": 1, "b": 2}, "reported": {"a": 1}, "delta": {"b": 2}},
            "metadata": {"desired": {"a": t, "b": t}, "reported": {"a": t}},
            "version": 1, "timestamp": 6, "clientToken": "t"
        });
        assert_eq!(rec.get(&lamp(), Some("t"), 6).unwrap(), expected);
    }

    #[test]
    fn state_size_limit_is_413() {
        let limits = Limits {
            max_state_bytes: 40,
            ..Limits::default()
        };
        let rec = created(json!({"state": {"desired": {"a": "x"}}}));
        let big = req(json!({"state": {"reported": {"b": "y".repeat(40)}}}));
        let e = rec.update(&big, &limits, 2).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (413, "The payload exceeds the maximum size allowed")
        );
        // The limit is on the result: an update that lands under it passes
        // even if the shadow was over.
        let tight = Limits {
            max_state_bytes: 10,
            ..limits
        };
        let shrink = req(json!({"state": {"desired": {"a": null}}}));
        assert!(rec.update(&shrink, &tight, 3).is_ok());
    }

    #[test]
    fn depth_limit_applies_to_hand_built_requests() {
        let seven = json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}});
        let request = UpdateRequest {
            desired: SectionUpdate::Merge(state::tests::obj(seven)),
            reported: SectionUpdate::Absent,
            client_token: None,
            version: None,
        };
        let e = ShadowRecord::new().update(&request, &Limits::default(), 1);
        assert_eq!(e.unwrap_err().code(), 400);
    }

    #[test]
    fn stored_form_round_trips_and_is_compact() {
        let rec = created(json!({"state": {"desired": {"a": [1, {"b": null}]}}}));
        let stored = rec.to_stored();
        assert!(!stored.contains('\n') && !stored.contains(": "));
        assert_eq!(ShadowRecord::from_stored(&stored).unwrap(), rec);
        let deleted = ShadowRecord {
            version: 4,
            document: None,
        };
        assert_eq!(deleted.to_stored(), r#"{"version":4}"#);
        assert!(ShadowRecord::from_stored("{").is_err());
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (0i64..4).prop_map(Value::from),
            proptest::collection::vec((0i64..3).prop_map(Value::from), 0..3).prop_map(Value::from),
        ]
    }

    fn patch() -> impl Strategy<Value = Value> {
        let key = prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(String::from);
        leaf().prop_recursive(3, 24, 3, move |inner| {
            proptest::collection::btree_map(key.clone(), inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    fn section_update() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            2 => Just(None),
            1 => Just(Some(Value::Null)),
            4 => patch().prop_map(|p| Some(if p.is_object() { p } else { json!({ "k": p }) })),
        ]
    }

    #[derive(Debug, Clone)]
    enum Step {
        Update(Option<Value>, Option<Value>),
        Delete,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (section_update(), section_update()).prop_map(|(d, r)| Step::Update(d, r)),
            1 => Just(Step::Delete),
        ]
    }

    fn subset(delta: &Object, desired: &Object) -> bool {
        delta.iter().all(|(k, v)| match (v, desired.get(k)) {
            (Value::Object(d), Some(Value::Object(w))) => subset(d, w),
            (v, Some(w)) => v == w,
            _ => false,
        })
    }

    proptest! {
        #[test]
        fn any_sequence_keeps_shadow_invariants(steps in proptest::collection::vec(step(), 1..20)) {
            let mut rec = ShadowRecord::new();
            let mut accepted = 0u64;
            for (now, step) in (1u64..).zip(steps) {
                match step {
                    Step::Delete => {
                        if let Ok((next, _)) = rec.delete(&lamp(), None, now) {
                            rec = next;
                        }
                    }
                    Step::Update(desired, reported) => {
                        let mut state = Map::new();
                        if let Some(d) = desired { state.insert("desired".into(), d); }
                        if let Some(r) = reported { state.insert("reported".into(), r); }
                        if state.is_empty() { continue; }
                        let request = req(json!({ "state": state }));
                        rec = rec.update(&request, &Limits::default(), now).unwrap().record;
                        accepted += 1;
                    }
                }
                prop_assert_eq!(rec.version, accepted);
                if let Some(doc) = &rec.document {
                    for (_, section) in doc.sections() {
                        prop_assert!(!section.state.is_empty());
                        prop_assert!(mirrors(&Value::Object(section.state.clone()), &Value::Object(section.metadata.clone())));
                    }
                    if let Some(delta) = rec.delta() {
                        prop_assert!(subset(&delta, &doc.desired.as_ref().unwrap().state));
                    }
                }
                prop_assert_eq!(&ShadowRecord::from_stored(&rec.to_stored()).unwrap(), &rec);
            }
        }
    }
}
