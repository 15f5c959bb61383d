//! The shape every local service shares: the `LocalService` trait, AWS's
//! error documents for the two wire protocols in use (REST-JSON for Lambda
//! and the IoT data plane, JSON 1.1 for Secrets Manager) and responses
//! carrying a request id.

use crate::LocalHub;
use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use roost_model::Principal;
use serde_json::Value;

/// The account id in the ARNs the hub makes up for its resources.
pub const ACCOUNT: &str = "000000000000";

/// A request that passed its signature check.
pub struct Signed {
    pub parts: Parts,
    pub body: Bytes,
}

/// How a service writes its errors on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `x-amzn-ErrorType` header, `{"message": ...}` body.
    RestJson,
    /// `{"__type": ..., "Message": ...}` body, `application/x-amz-json-1.1`.
    Json11,
}

/// An AWS error: status, error code (the exception's name) and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds to wait before retrying (429s).
    pub retry_after: Option<u64>,
}

impl AwsError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn response(&self, protocol: Protocol) -> Response {
        let (body, content_type) = match protocol {
            Protocol::RestJson => (
                serde_json::json!({ "message": self.message, "Type": "User" }),
                "application/json",
            ),
            Protocol::Json11 => (
                serde_json::json!({ "__type": self.code, "Message": self.message }),
                "application/x-amz-json-1.1",
            ),
        };
        let mut r = with_request_id(self.status, content_type, Body::from(body.to_string()));
        if protocol == Protocol::RestJson {
            r.headers_mut()
                .insert("x-amzn-ErrorType", HeaderValue::from_static(self.code));
        }
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// A response with the `x-amzn-RequestId` every AWS answer carries.
pub fn with_request_id(status: StatusCode, content_type: &str, body: Body) -> Response {
    let mut id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
    let id = hex::encode(id);
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{}-{}-{}-{}-{}",
        &id[..8],
        &id[8..12],
        &id[12..16],
        &id[16..20],
        &id[20..]
    )) {
        h.insert("x-amzn-RequestId", v);
    }
    r
}

/// A 200 JSON answer.
pub fn json(value: &Value, content_type: &str) -> Response {
    with_request_id(StatusCode::OK, content_type, Body::from(value.to_string()))
}

/// One AWS service the hub answers locally. Each is one implementation;
/// the dispatcher checks signatures and finds the caller before `serve`.
#[async_trait]
pub trait LocalService: Send + Sync + 'static {
    /// Its name in metrics and logs.
    fn name(&self) -> &'static str;
    /// The signing name in a request's credential scope.
    fn signing_name(&self) -> &'static str;
    fn protocol(&self) -> Protocol;
    /// Whether a request is meant for this service (by its path or its
    /// headers, before the body is read).
    fn claims(&self, uri: &Uri, headers: &HeaderMap) -> bool;
    /// The largest request body it takes, and the error past it.
    fn max_body(&self, hub: &dyn LocalHub) -> (usize, AwsError);
    /// Serves a signed request from `caller`.
    async fn serve(
        &self,
        hub: &dyn LocalHub,
        caller: &Principal,
        req: Signed,
    ) -> Result<Response, AwsError>;
}

/// Percent-decodes one path segment or query value; `None` if it is not
/// UTF-8 after decoding.
pub fn decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The value of a query parameter, decoded.
pub fn query_param(parts: &Parts, key: &str) -> Option<String> {
    parts.uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (decode(k)? == key).then(|| decode(v)).flatten()
    })
}
