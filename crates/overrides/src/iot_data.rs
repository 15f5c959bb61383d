//! The IoT data plane: `GetThingShadow`, `UpdateThingShadow`,
//! `DeleteThingShadow` (`/things/{thing}/shadow[?name=]`),
//! `ListNamedShadowsForThing` and `Publish` (`/topics/{topic}`), with AWS's
//! paths, documents and errors, on the hub's own shadows and broker.

use crate::service::{decode, json, query_param, AwsError, LocalService, Protocol, Signed};
use crate::{LocalHub, PublishOptions, Right, Rights};
use async_trait::async_trait;
use axum::http::{request::Parts, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use roost_model::Principal;
use roost_shadows::{Operation, ShadowErrorKind, ShadowFailure, ShadowId, ShadowName, ThingName};

pub struct IotData;

const LIST_PREFIX: &str = "/api/things/shadow/ListNamedShadowsForThing/";
const RETAINED: &str = "/retainedMessage";
const RETAINED_PREFIX: &str = "/retainedMessage/";
const CONTENT_TYPE: &str = "application/json";

fn invalid(message: impl Into<String>) -> AwsError {
    AwsError::new(StatusCode::BAD_REQUEST, "InvalidRequestException", message)
}

fn method_not_allowed(what: &str) -> AwsError {
    AwsError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowedException",
        what.to_owned(),
    )
}

fn forbidden(caller: &Principal, action: &str, what: &str) -> AwsError {
    AwsError::new(
        StatusCode::FORBIDDEN,
        "ForbiddenException",
        format!(
            "{} is not authorized to perform: iot:{action} on {what}; grant it in the task's manifest `allow`",
            caller.describe()
        ),
    )
}

fn thing(raw: &str) -> Result<ThingName, AwsError> {
    let name = decode(raw).ok_or_else(|| invalid("The thing name is not valid UTF-8"))?;
    ThingName::parse(&name).map_err(|e| invalid(format!("Invalid thing name: {}", e.message())))
}

/// A shadow failure in the data plane's terms.
fn shadow_error(e: ShadowFailure) -> AwsError {
    match e {
        ShadowFailure::Rejected(e) => {
            let (status, code) = match e.kind() {
                ShadowErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "InvalidRequestException"),
                ShadowErrorKind::NotFound => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
                ShadowErrorKind::Conflict => (StatusCode::CONFLICT, "ConflictException"),
                ShadowErrorKind::TooLarge => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLargeException",
                ),
                ShadowErrorKind::Throttled => {
                    (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException")
                }
                ShadowErrorKind::Internal => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalFailureException",
                ),
            };
            AwsError::new(status, code, e.message())
        }
        ShadowFailure::Throttled => {
            let mut e = AwsError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "ThrottlingException",
                "Rate exceeded for this shadow",
            );
            e.retry_after = Some(1);
            e
        }
        ShadowFailure::Store(m) => AwsError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailureException",
            m,
        ),
    }
}

#[async_trait]
impl LocalService for IotData {
    fn name(&self) -> &'static str {
        "iot-data"
    }
    fn signing_name(&self) -> &'static str {
        "iotdata"
    }
    fn protocol(&self) -> Protocol {
        Protocol::RestJson
    }
    fn claims(&self, uri: &Uri, _headers: &HeaderMap) -> bool {
        let p = uri.path();
        p.starts_with("/things/")
            || p.starts_with("/topics/")
            || p.starts_with(LIST_PREFIX)
            || p == RETAINED
            || p.starts_with(RETAINED_PREFIX)
    }
    fn max_body(&self, hub: &dyn LocalHub) -> (usize, AwsError) {
        // Publish takes MQTT-sized payloads; shadow documents are checked
        // against their own limit by the shadow service.
        let s = hub.settings();
        let limit = s.max_publish_bytes.max(s.max_shadow_request_bytes);
        (
            limit,
            AwsError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLargeException",
                "The payload exceeds the maximum size allowed",
            ),
        )
    }

    async fn serve(
        &self,
        hub: &dyn LocalHub,
        caller: &Principal,
        req: Signed,
    ) -> Result<Response, AwsError> {
        let path = req.parts.uri.path().to_owned();
        let method = req.parts.method.clone();
        if let Some(raw) = path.strip_prefix(LIST_PREFIX) {
            return list(hub, caller, &req.parts, raw);
        }
        if path == RETAINED {
            return list_retained(hub, caller, &req.parts);
        }
        if let Some(raw) = path.strip_prefix(RETAINED_PREFIX) {
            return get_retained(hub, caller, &req.parts, raw);
        }
        if let Some(raw) = path.strip_prefix("/topics/") {
            if method != Method::POST {
                return Err(method_not_allowed("Publish takes POST"));
            }
            return publish(hub, caller, &req, raw).await;
        }
        let raw = path
            .strip_prefix("/things/")
            .and_then(|p| p.strip_suffix("/shadow"))
            .filter(|t| !t.contains('/'))
            .ok_or_else(|| {
                AwsError::new(
                    StatusCode::NOT_FOUND,
                    "ResourceNotFoundException",
                    "No such operation: shadows are at /things/{thingName}/shadow",
                )
            })?;
        let thing = thing(raw)?;
        let name = match query_param(&req.parts, "name") {
            None => None,
            Some(n) => Some(
                ShadowName::parse(&n)
                    .map_err(|e| invalid(format!("Invalid shadow name: {}", e.message())))?,
            ),
        };
        let (op, right, action) = match method {
            Method::GET => (Operation::Get, Right::ShadowRead, "GetThingShadow"),
            Method::POST => (Operation::Update, Right::ShadowUpdate, "UpdateThingShadow"),
            Method::DELETE => (Operation::Delete, Right::ShadowUpdate, "DeleteThingShadow"),
            _ => return Err(method_not_allowed("Shadows take GET, POST or DELETE")),
        };
        if !caller.may(right, thing.as_str()) {
            return Err(forbidden(
                caller,
                action,
                &format!("thing {}", thing.as_str()),
            ));
        }
        let body = if op == Operation::Update {
            req.body
        } else {
            bytes::Bytes::new()
        };
        let doc = hub
            .shadow(ShadowId { thing, name }, op, body)
            .await
            .map_err(shadow_error)?;
        Ok(json(&doc, CONTENT_TYPE))
    }
}

fn list(
    hub: &dyn LocalHub,
    caller: &Principal,
    parts: &Parts,
    raw: &str,
) -> Result<Response, AwsError> {
    if parts.method != Method::GET {
        return Err(method_not_allowed("ListNamedShadowsForThing takes GET"));
    }
    let thing = thing(raw)?;
    if !caller.may(Right::ShadowRead, thing.as_str()) {
        return Err(forbidden(
            caller,
            "ListNamedShadowsForThing",
            &format!("thing {}", thing.as_str()),
        ));
    }
    let page = match query_param(parts, "pageSize") {
        None => 25,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => return Err(invalid("pageSize must be between 1 and 100")),
        },
    };
    let after = match query_param(parts, "nextToken") {
        None => String::new(),
        Some(t) => ShadowName::parse(&t)
            .map_err(|_| invalid("The nextToken is not one this hub gave"))?
            .as_str()
            .to_owned(),
    };
    let mut names = hub
        .shadow_names(thing.as_str(), &after, page + 1)
        .map_err(shadow_error)?;
    let more = names.len() > page;
    names.truncate(page);
    let mut doc = serde_json::json!({
        "results": names,
        "timestamp": hub.now_s(),
    });
    if more {
        doc["nextToken"] = serde_json::Value::from(names.last().cloned().unwrap_or_default());
    }
    Ok(json(&doc, CONTENT_TYPE))
}

/// `GetRetainedMessage`: the retained message of one topic.
fn get_retained(
    hub: &dyn LocalHub,
    caller: &Principal,
    parts: &Parts,
    raw: &str,
) -> Result<Response, AwsError> {
    use base64::Engine;
    if parts.method != Method::GET {
        return Err(method_not_allowed("GetRetainedMessage takes GET"));
    }
    let topic = decode(raw).ok_or_else(|| invalid("The topic is not valid UTF-8"))?;
    if !roost_topic::valid_topic_name(&topic) {
        return Err(invalid(format!(
            "Invalid topic {topic:?}: a topic name has no wildcards (+, #) and is 1 to 65535 bytes"
        )));
    }
    if !caller.may(Right::ReadRetained, &topic) {
        return Err(forbidden(
            caller,
            "GetRetainedMessage",
            &format!("topic {topic}"),
        ));
    }
    let m = hub.retained_message(&topic).ok_or_else(|| {
        AwsError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            format!("No retained message for topic {topic}"),
        )
    })?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut doc = serde_json::json!({
        "topic": m.topic,
        "payload": b64.encode(&m.payload),
        // AWS's QoS is 0 or 1; an MQTT client may have retained at 2.
        "qos": u8::from(m.qos).min(1),
        "lastModifiedTime": m.modified_ms,
    });
    if !m.user_properties.is_empty() {
        // As AWS shows them: a JSON array of one-key objects, base64.
        let props: Vec<serde_json::Value> = m
            .user_properties
            .iter()
            .map(|(k, v)| serde_json::json!({ k: v }))
            .collect();
        doc["userProperties"] = b64
            .encode(serde_json::to_vec(&props).unwrap_or_default())
            .into();
    }
    Ok(json(&doc, CONTENT_TYPE))
}

/// `ListRetainedMessages`: topics with a retained message, in topic order,
/// paged (`maxResults` 1–200, default 50; `nextToken` names where to go on).
/// A task sees the topics its `allow.retained` covers.
fn list_retained(
    hub: &dyn LocalHub,
    caller: &Principal,
    parts: &Parts,
) -> Result<Response, AwsError> {
    use base64::Engine;
    if parts.method != Method::GET {
        return Err(method_not_allowed("ListRetainedMessages takes GET"));
    }
    if let Principal::Task(_, g) = caller {
        if g.retained.is_empty() {
            return Err(forbidden(
                caller,
                "ListRetainedMessages",
                "retained messages",
            ));
        }
    }
    let limit = match query_param(parts, "maxResults") {
        None => 50,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=200).contains(&n) => n,
            _ => return Err(invalid("maxResults must be between 1 and 200")),
        },
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let after = match query_param(parts, "nextToken") {
        None => None,
        Some(t) => Some(
            b64.decode(t.as_bytes())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| invalid("The nextToken is not one this hub gave"))?,
        ),
    };
    let (page, next) = hub.retained_page(after.as_deref(), limit, &|t| {
        caller.may(Right::ReadRetained, t)
    });
    let topics: Vec<serde_json::Value> = page
        .iter()
        .map(|m| {
            serde_json::json!({
                "topic": m.topic,
                "payloadSize": m.payload_size,
                "qos": u8::from(m.qos).min(1),
                "lastModifiedTime": m.modified_ms,
            })
        })
        .collect();
    let mut doc = serde_json::json!({ "retainedTopics": topics });
    if let Some(next) = next {
        doc["nextToken"] = b64.encode(next.as_bytes()).into();
    }
    Ok(json(&doc, CONTENT_TYPE))
}

/// The MQTT 5 side of `Publish`: user properties, payload format, content
/// type, response topic, correlation data and message expiry, where botocore
/// puts them (headers `x-amz-mqtt5-*`, base64; query parameters).
fn publish_options(
    parts: &Parts,
    body: &[u8],
    qos: u8,
    retain: bool,
) -> Result<PublishOptions, AwsError> {
    use base64::Engine;
    let b64 = |name: &str| -> Result<Option<Vec<u8>>, AwsError> {
        match parts.headers.get(name) {
            None => Ok(None),
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map(Some)
                .map_err(|_| invalid(format!("{name} must be base64"))),
        }
    };
    let mut props = roost_bus::Properties::new();
    if let Some(raw) = b64("x-amz-mqtt5-user-properties")? {
        let bad = || {
            invalid("userProperties must be a JSON array of objects with string values, e.g. [{\"site\": \"plant-7\"}]")
        };
        // botocore JSON-encodes the caller's JSON string once more, so
        // the array may arrive as a JSON string holding it.
        let value: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
        let value = match value {
            serde_json::Value::String(inner) => serde_json::from_str(&inner).map_err(|_| bad())?,
            v => v,
        };
        let list: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_value(value).map_err(|_| bad())?;
        for entry in list {
            for (k, v) in entry {
                let serde_json::Value::String(v) = v else {
                    return Err(bad());
                };
                props.add_user_property(k, v);
            }
        }
    }
    match parts
        .headers
        .get("x-amz-mqtt5-payload-format-indicator")
        .map(|v| v.as_bytes())
    {
        None | Some(b"UNSPECIFIED_BYTES") => {}
        Some(b"UTF8_DATA") => {
            if std::str::from_utf8(body).is_err() {
                return Err(invalid(
                    "payloadFormatIndicator is UTF8_DATA but the payload is not UTF-8",
                ));
            }
            props.set_payload_format_indicator(true);
        }
        Some(_) => {
            return Err(invalid(
                "payloadFormatIndicator must be UNSPECIFIED_BYTES or UTF8_DATA",
            ))
        }
    }
    if let Some(data) = b64("x-amz-mqtt5-correlation-data")? {
        props.set_correlation_data(bytes::Bytes::from(data));
    }
    if let Some(ct) = query_param(parts, "contentType") {
        props.set_content_type(ct);
    }
    if let Some(t) = query_param(parts, "responseTopic") {
        if !roost_topic::valid_topic_name(&t) {
            return Err(invalid(format!("responseTopic {t:?} is not a topic name")));
        }
        props.set_response_topic(t);
    }
    let expiry = match query_param(parts, "messageExpiry") {
        None => None,
        Some(s) => match s.parse::<u32>() {
            Ok(n) if n > 0 => Some(std::time::Duration::from_secs(n as u64)),
            _ => {
                return Err(invalid(
                    "messageExpiry must be a positive number of seconds",
                ))
            }
        },
    };
    Ok(PublishOptions {
        qos,
        retain,
        properties: props,
        expiry,
        feeds_routes: false,
    })
}

async fn publish(
    hub: &dyn LocalHub,
    caller: &Principal,
    req: &Signed,
    raw: &str,
) -> Result<Response, AwsError> {
    let topic = decode(raw).ok_or_else(|| invalid("The topic is not valid UTF-8"))?;
    if !roost_topic::valid_topic_name(&topic) {
        return Err(invalid(format!(
            "Invalid topic {topic:?}: a topic to publish to has no wildcards (+, #) and is 1 to 65535 bytes"
        )));
    }
    let qos = match query_param(&req.parts, "qos").as_deref() {
        None | Some("0") => 0,
        Some("1") => 1,
        Some(q) => return Err(invalid(format!("qos={q}: QoS must be 0 or 1"))),
    };
    let retain = match query_param(&req.parts, "retain").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(r) => return Err(invalid(format!("retain={r}: must be true or false"))),
    };
    if !caller.may(Right::Publish, &topic) || hub.reserved_topic(&topic) {
        return Err(forbidden(caller, "Publish", &format!("topic {topic}")));
    }
    // A publish to a shadow's request topic is that shadow request, as
    // on AWS; it also needs the shadow right.
    if let Some((id, op)) = roost_shadows::parse_request_topic(&topic) {
        let right = match op {
            Operation::Get => Right::ShadowRead,
            _ => Right::ShadowUpdate,
        };
        if !caller.may(right, id.thing.as_str()) {
            return Err(forbidden(caller, "Publish", &format!("topic {topic}")));
        }
        hub.shadow_over_mqtt(id, op, req.body.clone());
        return Ok(json(&serde_json::json!({}), CONTENT_TYPE));
    }
    let mut options = publish_options(&req.parts, &req.body, qos, retain)?;
    // Like an MQTT client's message, the owner's reaches `device:` routes;
    // a task's does not (a topic routed back to it would loop).
    options.feeds_routes = matches!(caller, Principal::Owner);
    hub.publish(&topic, req.body.clone(), options)
        .await
        .map_err(|e| {
            AwsError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalFailureException",
                format!("The message could not be stored: {e}"),
            )
        })?;
    Ok(json(&serde_json::json!({}), CONTENT_TYPE))
}

#[cfg(test)]
mod tests {
    use super::*;
    /// A hostile publish: what it tries, path, headers, body.
    type HostileCase<'a> = (&'a str, &'a str, Vec<(&'a str, String)>, &'a [u8]);
    use crate::fake::FakeHub;
    use base64::Engine;
    use roost_model::{Grants, TaskName};
    use serde_json::{json, Value};

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn task(grants: Grants) -> Principal {
        Principal::Task(TaskName::parse("sensor").unwrap(), grants)
    }

    fn grants() -> Grants {
        Grants {
            shadow_read: vec!["pump-*".into()],
            shadow_update: vec!["pump-1".into()],
            publish: vec!["alerts/#".into(), "$aws/things/pump-1/shadow/#".into()],
            retained: vec!["state/+".into()],
            ..Grants::default()
        }
    }

    /// What the service answered: status, error code (if any) and body.
    struct Answer {
        status: u16,
        code: Option<String>,
        body: Value,
    }

    async fn serve_as(
        hub: &FakeHub,
        caller: &Principal,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        let mut b = axum::http::Request::builder().method(method).uri(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        assert!(IotData.claims(&parts.uri, &parts.headers), "{target}");
        let req = Signed {
            parts,
            body: bytes::Bytes::copy_from_slice(body),
        };
        let r = match IotData.serve(hub, caller, req).await {
            Ok(r) => r,
            Err(e) => e.response(Protocol::RestJson),
        };
        let status = r.status().as_u16();
        let code = r
            .headers()
            .get("x-amzn-ErrorType")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer { status, code, body }
    }

    async fn serve(hub: &FakeHub, method: &str, target: &str, body: &[u8]) -> Answer {
        serve_as(hub, &Principal::Owner, method, target, &[], body).await
    }

    fn refused(a: &Answer, status: u16, code: &str, what: &str) {
        assert_eq!(
            (a.status, a.code.as_deref()),
            (status, Some(code)),
            "{what}: {}",
            a.body
        );
    }

    #[test]
    fn the_body_limit_is_the_larger_of_a_publish_and_a_shadow_request() {
        let hub = FakeHub::default();
        let (limit, e) = IotData.max_body(&hub);
        assert_eq!(limit, 8192);
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.code, "RequestEntityTooLargeException");
    }

    #[tokio::test]
    async fn the_owners_publish_reaches_the_hub_with_its_mqtt5_properties() {
        let hub = FakeHub::default();
        let props = b64(br#"[{"site": "plant-7"}, {"line": "3"}]"#);
        let corr = b64(b"req-42");
        let a = serve_as(
            &hub,
            &Principal::Owner,
            "POST",
            "/topics/plant%2F7%2Ftemp?qos=1&retain=true&contentType=text%2Fplain&responseTopic=replies%2F7&messageExpiry=60",
            &[
                ("x-amz-mqtt5-user-properties", &props),
                ("x-amz-mqtt5-payload-format-indicator", "UTF8_DATA"),
                ("x-amz-mqtt5-correlation-data", &corr),
            ],
            b"21.5",
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        let published = hub.published.lock().unwrap();
        let (topic, payload, o) = &published[0];
        assert_eq!(
            (topic.as_str(), &payload[..]),
            ("plant/7/temp", &b"21.5"[..])
        );
        assert_eq!((o.qos, o.retain), (1, true));
        assert_eq!(o.expiry, Some(std::time::Duration::from_secs(60)));
        // The owner is a local program: its messages reach device: routes.
        assert!(o.feeds_routes);
        let p = format!("{:?}", o.properties);
        for part in ["plant-7", "line", "text/plain", "replies/7"] {
            assert!(p.contains(part), "{part} in {p}");
        }
    }

    #[tokio::test]
    async fn botocore_double_encoded_user_properties_are_taken() {
        let hub = FakeHub::default();
        let inner = serde_json::to_string(r#"[{"k": "v"}]"#).unwrap();
        let props = b64(inner.as_bytes());
        let a = serve_as(
            &hub,
            &Principal::Owner,
            "POST",
            "/topics/a",
            &[("x-amz-mqtt5-user-properties", &props)],
            b"",
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        let published = hub.published.lock().unwrap();
        assert!(format!("{:?}", published[0].2.properties).contains("\"k\""));
        assert_eq!((published[0].2.qos, published[0].2.retain), (0, false));
    }

    #[tokio::test]
    async fn a_tasks_publish_stays_within_its_grants_and_feeds_no_routes() {
        let hub = FakeHub::default();
        let t = task(grants());
        let a = serve_as(&hub, &t, "POST", "/topics/alerts%2Ffire", &[], b"!").await;
        assert_eq!(a.status, 200);
        assert!(!hub.published.lock().unwrap()[0].2.feeds_routes);
        let a = serve_as(&hub, &t, "POST", "/topics/commands%2Fx", &[], b"!").await;
        refused(&a, 403, "ForbiddenException", "outside the grant");
        assert!(a.body["message"].as_str().unwrap().contains("task sensor"));
        assert_eq!(hub.published.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn nobody_publishes_to_the_hubs_own_topics() {
        let hub = FakeHub::default();
        for topic in [
            "%24aws%2Fthings%2Fpump-1%2Fshadow%2Fupdate%2Faccepted",
            "%24aws%2Fevents%2Fpresence",
        ] {
            let a = serve(&hub, "POST", &format!("/topics/{topic}"), b"{}").await;
            refused(&a, 403, "ForbiddenException", topic);
        }
        assert!(hub.published.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_publish_to_a_shadow_request_topic_is_that_shadow_request() {
        let hub = FakeHub::default();
        let t = task(grants());
        let a = serve_as(
            &hub,
            &t,
            "POST",
            "/topics/%24aws%2Fthings%2Fpump-1%2Fshadow%2Fupdate",
            &[],
            br#"{"state":{}}"#,
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        {
            let done = hub.over_mqtt.lock().unwrap();
            assert_eq!(done[0].0.thing.as_str(), "pump-1");
            assert_eq!(done[0].1, Operation::Update);
            assert!(hub.published.lock().unwrap().is_empty());
        }
        // The publish grant alone is not enough: the shadow right is needed.
        let mut g = grants();
        g.shadow_update.clear();
        let a = serve_as(
            &hub,
            &task(g),
            "POST",
            "/topics/%24aws%2Fthings%2Fpump-1%2Fshadow%2Fupdate",
            &[],
            b"{}",
        )
        .await;
        refused(&a, 403, "ForbiddenException", "no shadow right");
    }

    #[tokio::test]
    async fn hostile_publishes_are_refused_before_the_hub_sees_them() {
        let hub = FakeHub::default();
        let cases: Vec<HostileCase> = vec![
            ("wildcard +", "/topics/a%2F%2B", vec![], b""),
            ("wildcard #", "/topics/a%2F%23", vec![], b""),
            ("raw wildcard", "/topics/a+b", vec![], b""),
            ("NUL", "/topics/a%00b", vec![], b""),
            ("empty topic", "/topics/", vec![], b""),
            ("not UTF-8", "/topics/%FF%FE", vec![], b""),
            ("qos 2", "/topics/a?qos=2", vec![], b""),
            ("qos word", "/topics/a?qos=one", vec![], b""),
            ("retain word", "/topics/a?retain=yes", vec![], b""),
            ("expiry 0", "/topics/a?messageExpiry=0", vec![], b""),
            ("expiry negative", "/topics/a?messageExpiry=-5", vec![], b""),
            (
                "expiry huge",
                "/topics/a?messageExpiry=99999999999",
                vec![],
                b"",
            ),
            (
                "response topic wildcard",
                "/topics/a?responseTopic=r%2F%23",
                vec![],
                b"",
            ),
            (
                "properties not base64",
                "/topics/a",
                vec![("x-amz-mqtt5-user-properties", "%%%".into())],
                b"",
            ),
            (
                "properties not JSON",
                "/topics/a",
                vec![("x-amz-mqtt5-user-properties", b64(b"[{oops"))],
                b"",
            ),
            (
                "properties not strings",
                "/topics/a",
                vec![("x-amz-mqtt5-user-properties", b64(br#"[{"n": 1}]"#))],
                b"",
            ),
            (
                "properties an object",
                "/topics/a",
                vec![("x-amz-mqtt5-user-properties", b64(br#"{"k": "v"}"#))],
                b"",
            ),
            (
                "correlation data not base64",
                "/topics/a",
                vec![("x-amz-mqtt5-correlation-data", "!!".into())],
                b"",
            ),
            (
                "UTF8_DATA that is not",
                "/topics/a",
                vec![("x-amz-mqtt5-payload-format-indicator", "UTF8_DATA".into())],
                &[0xff, 0xfe],
            ),
            (
                "unknown payload format",
                "/topics/a",
                vec![("x-amz-mqtt5-payload-format-indicator", "TEXT".into())],
                b"",
            ),
        ];
        for (what, target, headers, body) in cases {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let a = serve_as(&hub, &Principal::Owner, "POST", target, &headers, body).await;
            refused(&a, 400, "InvalidRequestException", what);
        }
        let a = serve(&hub, "GET", "/topics/a", b"").await;
        refused(&a, 405, "MethodNotAllowedException", "GET");
        assert!(hub.published.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_publish_the_hub_cannot_store_is_a_server_error() {
        let hub = FakeHub {
            broken: true,
            ..FakeHub::default()
        };
        let a = serve(&hub, "POST", "/topics/a?qos=1", b"x").await;
        refused(&a, 500, "InternalFailureException", "broken store");
        assert!(a.body["message"].as_str().unwrap().contains("disk is full"));
    }

    #[tokio::test]
    async fn shadows_are_updated_read_and_deleted() {
        let hub = FakeHub::default();
        let a = serve(&hub, "GET", "/things/pump-1/shadow", b"").await;
        refused(&a, 404, "ResourceNotFoundException", "before any update");
        let doc = br#"{"state":{"reported":{"rpm":900}}}"#;
        let a = serve(&hub, "POST", "/things/pump-1/shadow", doc).await;
        assert_eq!(a.status, 200);
        let a = serve(&hub, "GET", "/things/pump-1/shadow", b"").await;
        assert_eq!(a.body["state"]["reported"]["rpm"], 900);
        // A named shadow is another shadow.
        let a = serve(&hub, "GET", "/things/pump-1/shadow?name=config", b"").await;
        assert_eq!(a.status, 404);
        let a = serve(&hub, "POST", "/things/pump-1/shadow?name=config", b"{}").await;
        assert_eq!(a.status, 200);
        assert!(hub.shadows.lock().unwrap().contains_key("pump-1~config"));
        let a = serve(&hub, "DELETE", "/things/pump-1/shadow", b"ignored").await;
        assert_eq!(a.status, 200);
        let a = serve(&hub, "DELETE", "/things/pump-1/shadow", b"").await;
        assert_eq!(a.status, 404);
    }

    #[tokio::test]
    async fn a_get_or_delete_carries_no_body_to_the_shadow() {
        // The fake would reject a non-JSON body on update only; a GET with
        // one must not be taken for an update.
        let hub = FakeHub::default();
        serve(&hub, "POST", "/things/pump-1/shadow", b"{}").await;
        let a = serve(&hub, "GET", "/things/pump-1/shadow", b"not json").await;
        assert_eq!(a.status, 200);
    }

    #[tokio::test]
    async fn a_task_reads_and_updates_only_the_shadows_it_was_granted() {
        let hub = FakeHub::default();
        serve(&hub, "POST", "/things/pump-2/shadow", b"{}").await;
        let t = task(grants());
        let a = serve_as(&hub, &t, "GET", "/things/pump-2/shadow", &[], b"").await;
        assert_eq!(a.status, 200);
        let a = serve_as(&hub, &t, "POST", "/things/pump-2/shadow", &[], b"{}").await;
        refused(&a, 403, "ForbiddenException", "update without the grant");
        let a = serve_as(&hub, &t, "DELETE", "/things/pump-2/shadow", &[], b"").await;
        refused(&a, 403, "ForbiddenException", "delete without the grant");
        let a = serve_as(&hub, &t, "GET", "/things/valve/shadow", &[], b"").await;
        refused(&a, 403, "ForbiddenException", "read without the grant");
        let a = serve_as(&hub, &t, "POST", "/things/pump-1/shadow", &[], b"{}").await;
        assert_eq!(a.status, 200);
    }

    #[tokio::test]
    async fn hostile_shadow_requests_are_refused() {
        let hub = FakeHub::default();
        let long_thing = format!("/things/{}/shadow", "t".repeat(129));
        let long_name = format!("/things/t/shadow?name={}", "n".repeat(65));
        for (what, method, target, code, status) in [
            (
                "thing with a space",
                "GET",
                "/things/a%20b/shadow",
                "InvalidRequestException",
                400,
            ),
            (
                "thing with a slash",
                "GET",
                "/things/a%2Fb/shadow",
                "InvalidRequestException",
                400,
            ),
            (
                "thing with $",
                "GET",
                "/things/%24aws/shadow",
                "InvalidRequestException",
                400,
            ),
            (
                "thing with +",
                "GET",
                "/things/a%2B/shadow",
                "InvalidRequestException",
                400,
            ),
            (
                "thing not UTF-8",
                "GET",
                "/things/%C3%28/shadow",
                "InvalidRequestException",
                400,
            ),
            (
                "thing too long",
                "GET",
                &long_thing,
                "InvalidRequestException",
                400,
            ),
            (
                "empty thing",
                "GET",
                "/things//shadow",
                "InvalidRequestException",
                400,
            ),
            (
                "bad shadow name",
                "GET",
                "/things/t/shadow?name=a%23b",
                "InvalidRequestException",
                400,
            ),
            (
                "empty shadow name",
                "GET",
                "/things/t/shadow?name=",
                "InvalidRequestException",
                400,
            ),
            (
                "shadow name too long",
                "GET",
                &long_name,
                "InvalidRequestException",
                400,
            ),
            (
                "deeper path",
                "GET",
                "/things/a/b/shadow",
                "ResourceNotFoundException",
                404,
            ),
            (
                "no shadow suffix",
                "GET",
                "/things/a",
                "ResourceNotFoundException",
                404,
            ),
            (
                "PUT",
                "PUT",
                "/things/t/shadow",
                "MethodNotAllowedException",
                405,
            ),
            (
                "PATCH",
                "PATCH",
                "/things/t/shadow",
                "MethodNotAllowedException",
                405,
            ),
        ] {
            let a = serve(&hub, method, target, b"").await;
            refused(&a, status, code, what);
        }
        let a = serve(&hub, "POST", "/things/t/shadow", b"{not json").await;
        refused(&a, 400, "InvalidRequestException", "bad JSON");
        let huge = vec![b'['; 1 << 20];
        let a = serve(&hub, "POST", "/things/t/shadow", &huge).await;
        refused(&a, 400, "InvalidRequestException", "deep JSON");
        assert!(hub.shadows.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_shadow_the_hub_cannot_store_is_a_server_error() {
        let hub = FakeHub {
            broken: true,
            ..FakeHub::default()
        };
        let a = serve(&hub, "POST", "/things/t/shadow", b"{}").await;
        refused(&a, 500, "InternalFailureException", "broken store");
        let a = serve(
            &hub,
            "GET",
            "/api/things/shadow/ListNamedShadowsForThing/t",
            b"",
        )
        .await;
        refused(&a, 500, "InternalFailureException", "broken store, list");
    }

    #[tokio::test]
    async fn named_shadows_are_listed_in_pages() {
        let hub = FakeHub {
            names: vec!["a".into(), "b".into(), "c".into()],
            ..FakeHub::default()
        };
        let list = "/api/things/shadow/ListNamedShadowsForThing/pump-1";
        let a = serve(&hub, "GET", list, b"").await;
        assert_eq!(a.body["results"], json!(["a", "b", "c"]));
        assert!(a.body.get("nextToken").is_none());
        assert_eq!(a.body["timestamp"], 1_795_514_400u64);
        let a = serve(&hub, "GET", &format!("{list}?pageSize=2"), b"").await;
        assert_eq!(a.body["results"], json!(["a", "b"]));
        assert_eq!(a.body["nextToken"], "b");
        let a = serve(&hub, "GET", &format!("{list}?pageSize=2&nextToken=b"), b"").await;
        assert_eq!(a.body["results"], json!(["c"]));
        for bad in [
            "pageSize=0",
            "pageSize=101",
            "pageSize=x",
            "pageSize=-1",
            "nextToken=a%2Fb",
            "nextToken=",
        ] {
            let a = serve(&hub, "GET", &format!("{list}?{bad}"), b"").await;
            refused(&a, 400, "InvalidRequestException", bad);
        }
        let a = serve(&hub, "POST", list, b"").await;
        refused(&a, 405, "MethodNotAllowedException", "POST");
        let a = serve(
            &hub,
            "GET",
            "/api/things/shadow/ListNamedShadowsForThing/a%20b",
            b"",
        )
        .await;
        refused(&a, 400, "InvalidRequestException", "bad thing");
        let mut g = grants();
        g.shadow_read.clear();
        let a = serve_as(&hub, &task(g), "GET", list, &[], b"").await;
        refused(&a, 403, "ForbiddenException", "no read grant");
    }

    #[tokio::test]
    async fn a_retained_message_is_read_as_aws_shows_it() {
        let mut hub = FakeHub::default();
        hub.retain("state/mode", b"eco", 2);
        let a = serve(&hub, "GET", "/retainedMessage/state%2Fmode", b"").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body["topic"], "state/mode");
        assert_eq!(a.body["payload"], b64(b"eco"));
        // AWS's QoS is 0 or 1.
        assert_eq!(a.body["qos"], 1);
        assert_eq!(a.body["lastModifiedTime"], 1_000);
        let props = base64::engine::general_purpose::STANDARD
            .decode(a.body["userProperties"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&props).unwrap(),
            json!([{ "site": "plant-7" }])
        );
        let a = serve(&hub, "GET", "/retainedMessage/state%2Fother", b"").await;
        refused(&a, 404, "ResourceNotFoundException", "none retained");
        for (what, target) in [
            ("wildcard", "/retainedMessage/state%2F%2B"),
            ("hash", "/retainedMessage/%23"),
            ("NUL", "/retainedMessage/a%00"),
            ("not UTF-8", "/retainedMessage/%FF"),
            ("empty", "/retainedMessage/"),
        ] {
            let a = serve(&hub, "GET", target, b"").await;
            refused(&a, 400, "InvalidRequestException", what);
        }
        let a = serve(&hub, "DELETE", "/retainedMessage/state%2Fmode", b"").await;
        refused(&a, 405, "MethodNotAllowedException", "DELETE");
        let t = task(grants());
        let a = serve_as(&hub, &t, "GET", "/retainedMessage/state%2Fmode", &[], b"").await;
        assert_eq!(a.status, 200);
        hub.retain("private/key", b"k", 0);
        let a = serve_as(&hub, &t, "GET", "/retainedMessage/private%2Fkey", &[], b"").await;
        refused(&a, 403, "ForbiddenException", "outside allow.retained");
    }

    #[tokio::test]
    async fn retained_messages_are_listed_in_pages_a_task_seeing_its_own() {
        let mut hub = FakeHub::default();
        for t in [
            "private/key",
            "state/a",
            "state/b",
            "state/c",
            "state/d/deep",
        ] {
            hub.retain(t, b"xy", 1);
        }
        let a = serve(&hub, "GET", "/retainedMessage", b"").await;
        let topics: Vec<&str> = a.body["retainedTopics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["topic"].as_str().unwrap())
            .collect();
        assert_eq!(topics.len(), 5);
        assert_eq!(a.body["retainedTopics"][0]["payloadSize"], 2);
        // A task sees what its allow.retained covers (state/+), page by page.
        let t = task(grants());
        let mut seen = Vec::new();
        let mut target = "/retainedMessage?maxResults=2".to_owned();
        loop {
            let a = serve_as(&hub, &t, "GET", &target, &[], b"").await;
            assert_eq!(a.status, 200, "{}", a.body);
            for m in a.body["retainedTopics"].as_array().unwrap() {
                seen.push(m["topic"].as_str().unwrap().to_owned());
            }
            match a.body["nextToken"].as_str() {
                Some(next) => target = format!("/retainedMessage?maxResults=2&nextToken={next}"),
                None => break,
            }
        }
        assert_eq!(seen, ["state/a", "state/b", "state/c"]);
        for bad in [
            "maxResults=0",
            "maxResults=201",
            "maxResults=ten",
            "nextToken=%%%",
            "nextToken=_w",
        ] {
            let a = serve(&hub, "GET", &format!("/retainedMessage?{bad}"), b"").await;
            refused(&a, 400, "InvalidRequestException", bad);
        }
        let a = serve(&hub, "POST", "/retainedMessage", b"").await;
        refused(&a, 405, "MethodNotAllowedException", "POST");
        let mut g = grants();
        g.retained.clear();
        let a = serve_as(&hub, &task(g), "GET", "/retainedMessage", &[], b"").await;
        refused(&a, 403, "ForbiddenException", "no allow.retained");
    }
}
