//! The JSON tree rules of a shadow section: merging an update with its
//! metadata, nesting depth, and the desired-versus-reported delta. The
//! metadata tree always mirrors the state tree, so both are walked together.

use serde_json::{json, Map, Value};

pub(crate) type Object = Map<String, Value>;

/// Object nesting depth of a section's content: `{"a": 1}` is 1. Arrays add
/// no level of their own, but objects inside them do.
pub(crate) fn depth(object: &Object) -> usize {
    1 + object.values().map(value_depth).max().unwrap_or(0)
}

fn value_depth(value: &Value) -> usize {
    match value {
        Value::Object(o) => depth(o),
        Value::Array(items) => items.iter().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Metadata for a value written at `now`: objects mirror their keys, arrays
/// get one entry per element, anything else (null included, for deletions
/// echoed in the accepted document) is a `{"timestamp"}` leaf.
pub(crate) fn metadata_for(value: &Value, now: u64) -> Value {
    match value {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), metadata_for(v, now)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| metadata_for(v, now)).collect()),
        _ => json!({ "timestamp": now }),
    }
}

/// Merges `patch` into `state`, keeping `metadata` in step: null deletes,
/// objects merge, anything else replaces. Objects left empty are removed.
pub(crate) fn merge(state: &mut Object, metadata: &mut Object, patch: &Object, now: u64) {
    for (key, new) in patch {
        match new {
            Value::Null => {
                state.remove(key);
                metadata.remove(key);
            }
            Value::Object(sub) => {
                // Merging into a scalar replaces it; its leaf metadata must go
                // too, or it would be mistaken for a `timestamp` key.
                if !state.get(key).is_some_and(Value::is_object) {
                    state.insert(key.clone(), Value::Object(Map::new()));
                    metadata.insert(key.clone(), Value::Object(Map::new()));
                }
                let emptied = {
                    let child = object_at(state, key);
                    merge(child, object_at(metadata, key), sub, now);
                    child.is_empty()
                };
                if emptied {
                    state.remove(key);
                    metadata.remove(key);
                }
            }
            _ => {
                state.insert(key.clone(), new.clone());
                metadata.insert(key.clone(), metadata_for(new, now));
            }
        }
    }
}

/// The object under `key`, made one if it is missing or (in metadata that
/// drifted out of shape) not an object.
fn object_at<'a>(map: &'a mut Object, key: &str) -> &'a mut Object {
    let slot = map.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut().expect("slot was just made an object")
}

/// The part of `desired` that `reported` does not match, with the desired
/// metadata of exactly those parts. Nested objects recurse and count only if
/// something inside differs; arrays and scalars compare as whole values.
pub(crate) fn delta(
    desired: &Object,
    desired_metadata: &Object,
    reported: Option<&Object>,
) -> (Object, Object) {
    let no_metadata = Map::new();
    let mut state = Map::new();
    let mut metadata = Map::new();
    for (key, want) in desired {
        let have = reported.and_then(|r| r.get(key));
        match (want, have) {
            (Value::Object(want), Some(Value::Object(have))) => {
                let child_metadata = desired_metadata
                    .get(key)
                    .and_then(Value::as_object)
                    .unwrap_or(&no_metadata);
                let (d, m) = delta(want, child_metadata, Some(have));
                if !d.is_empty() {
                    state.insert(key.clone(), Value::Object(d));
                    metadata.insert(key.clone(), Value::Object(m));
                }
            }
            _ if have == Some(want) => {}
            _ => {
                state.insert(key.clone(), want.clone());
                if let Some(m) = desired_metadata.get(key) {
                    metadata.insert(key.clone(), m.clone());
                }
            }
        }
    }
    (state, metadata)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn obj(v: Value) -> Object {
        match v {
            Value::Object(o) => o,
            other => panic!("not an object: {other}"),
        }
    }

    /// True when `metadata` has exactly the shape `metadata_for` would give
    /// `state`, whatever the timestamps.
    pub(crate) fn mirrors(state: &Value, metadata: &Value) -> bool {
        match (state, metadata) {
            (Value::Object(s), Value::Object(m)) => {
                s.len() == m.len()
                    && s.iter()
                        .all(|(k, v)| m.get(k).is_some_and(|mv| mirrors(v, mv)))
            }
            (Value::Array(s), Value::Array(m)) => {
                s.len() == m.len() && s.iter().zip(m).all(|(v, mv)| mirrors(v, mv))
            }
            (_, Value::Object(m)) => m.len() == 1 && m.get("timestamp").is_some_and(Value::is_u64),
            _ => false,
        }
    }

    fn merged(state: Value, patch: Value) -> (Object, Object) {
        let mut s = obj(state);
        let mut m = obj(metadata_for(&Value::Object(s.clone()), 1));
        merge(&mut s, &mut m, &obj(patch), 2);
        (s, m)
    }

    #[test]
    fn depth_counts_object_levels() {
        assert_eq!(depth(&obj(json!({}))), 1);
        assert_eq!(depth(&obj(json!({"a": 1}))), 1);
        assert_eq!(depth(&obj(json!({"a": {"b": 1}}))), 2);
        assert_eq!(depth(&obj(json!({"a": [1, [2]]}))), 1);
        assert_eq!(depth(&obj(json!({"a": [{"b": 1}]}))), 2);
        let seven = json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}});
        assert_eq!(depth(&obj(seven)), 7);
    }

    #[test]
    fn merge_is_recursive_and_null_deletes() {
        let (s, m) = merged(
            json!({"a": 1, "b": {"x": 1, "y": 2}, "c": 3}),
            json!({"a": null, "b": {"x": null, "z": 9}, "d": "new"}),
        );
        assert_eq!(
            Value::Object(s.clone()),
            json!({"b": {"y": 2, "z": 9}, "c": 3, "d": "new"})
        );
        assert_eq!(
            Value::Object(m.clone()),
            json!({"b": {"y": {"timestamp": 1}, "z": {"timestamp": 2}}, "c": {"timestamp": 1}, "d": {"timestamp": 2}})
        );
        assert!(mirrors(&Value::Object(s), &Value::Object(m)));
    }

    #[test]
    fn emptied_objects_are_removed() {
        let (s, m) = merged(
            json!({"a": {"b": {"c": 1}}, "k": 1}),
            json!({"a": {"b": {"c": null}}}),
        );
        assert_eq!(Value::Object(s), json!({"k": 1}));
        assert_eq!(Value::Object(m), json!({"k": {"timestamp": 1}}));
        // An object made only of deletions never appears.
        let (s, _) = merged(json!({}), json!({"a": {"b": null}}));
        assert!(s.is_empty());
    }

    #[test]
    fn object_replaces_scalar_and_scalar_replaces_object() {
        let (s, m) = merged(
            json!({"a": 5, "b": {"x": 1}}),
            json!({"a": {"timestamp": 3}, "b": 7}),
        );
        assert_eq!(Value::Object(s), json!({"a": {"timestamp": 3}, "b": 7}));
        assert_eq!(
            Value::Object(m),
            json!({"a": {"timestamp": {"timestamp": 2}}, "b": {"timestamp": 2}})
        );
    }

    #[test]
    fn arrays_replace_and_get_per_element_metadata() {
        let (s, m) = merged(json!({"a": [1, 2, 3]}), json!({"a": [4, {"k": true}, [5]]}));
        assert_eq!(Value::Object(s), json!({"a": [4, {"k": true}, [5]]}));
        assert_eq!(
            Value::Object(m),
            json!({"a": [{"timestamp": 2}, {"k": {"timestamp": 2}}, [{"timestamp": 2}]]})
        );
    }

    #[test]
    fn delta_recurses_and_compares_arrays_whole() {
        let desired = obj(json!({"same": 1, "diff": 2, "missing": 3, "arr": [1, 2],
            "nested": {"same": 1, "diff": 2}, "allsame": {"x": 1}, "vs_scalar": {"y": 1}}));
        let reported = obj(json!({"same": 1, "diff": 20, "arr": [2, 1],
            "nested": {"same": 1, "diff": 3}, "allsame": {"x": 1}, "vs_scalar": 4, "extra": 1}));
        let meta = obj(metadata_for(&Value::Object(desired.clone()), 9));
        let (d, m) = delta(&desired, &meta, Some(&reported));
        assert_eq!(
            Value::Object(d.clone()),
            json!({"diff": 2, "missing": 3, "arr": [1, 2], "nested": {"diff": 2}, "vs_scalar": {"y": 1}})
        );
        assert!(mirrors(&Value::Object(d), &Value::Object(m)));
        let (d, _) = delta(&desired, &meta, None);
        assert_eq!(d, desired);
    }
}
