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
    if !roost_broker::topic::valid_topic_name(&topic) {
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
        "qos": m.qos.min(1),
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
                "qos": m.qos.min(1),
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
    let mut props = roost_broker::Properties::new();
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
        if !roost_broker::topic::valid_topic_name(&t) {
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
    if !roost_broker::topic::valid_topic_name(&topic) {
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
