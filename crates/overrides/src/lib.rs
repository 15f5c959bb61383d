//! Local service overrides: the AWS APIs the hub answers itself, so
//! unmodified SDK code (boto3, the AWS CLI, any SDK) pointed at the hub
//! talks to it as if it were the cloud: Lambda `Invoke`, the IoT data plane
//! (shadows and `Publish`) and Secrets Manager `GetSecretValue`.
//!
//! Each service is one [`LocalService`]; [`dispatch`] finds the service a
//! request is for, checks its SigV4 signature (no unsigned request is ever
//! served), finds the caller (the owner or a task) and hands it over. The
//! services know the wire shapes; the hub, behind [`LocalHub`], does the
//! work.

#[cfg(test)]
mod fake;
mod iot_data;
mod lambda;
mod local_hub;
mod rights;
mod secrets;
mod service;

use roost_sigv4 as sigv4;

pub use local_hub::{CallRefused, HubFailure, LocalHub, PublishOptions, SecretValue, Settings};
pub use rights::{Right, Rights};

pub use service::{AwsError, LocalService, Protocol, Signed};

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use std::sync::Arc;

/// Every service the hub answers.
pub fn services() -> Vec<Arc<dyn LocalService>> {
    vec![
        Arc::new(lambda::Lambda),
        Arc::new(iot_data::IotData),
        Arc::new(secrets::SecretsManager),
    ]
}

/// Serves `req` if one of `services` claims it; gives it back otherwise.
pub async fn dispatch(
    hub: &dyn LocalHub,
    services: &[Arc<dyn LocalService>],
    req: Request,
) -> Result<Response, Request> {
    let Some(service) = services.iter().find(|s| s.claims(req.uri(), req.headers())) else {
        return Err(req);
    };
    let response = match serve(hub, service.as_ref(), req).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::error!(service = service.name(), code = e.code, message = %e.message, "local service failed");
            } else if e.status == StatusCode::FORBIDDEN || e.code == "AccessDeniedException" {
                // Denials are what an operator audits: who was refused what.
                tracing::warn!(service = service.name(), code = e.code, message = %e.message, "local service request refused");
            } else {
                tracing::debug!(service = service.name(), code = e.code, message = %e.message, "local service refused a request");
            }
            e.response(service.protocol())
        }
    };
    hub.count_request(service.name(), response.status().as_u16());
    Ok(response)
}

/// Bodies being read at once by the local services: unsigned or slow
/// clients cannot make the hub hold more than this many request bodies.
static BODIES_IN_FLIGHT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(64);

/// botocore never sends `//`, `.` or `..` path segments to these services;
/// the signature covers the normalised path, so a path that is not already
/// normal could be replayed to name another resource.
fn path_is_normal(path: &str) -> bool {
    !path.contains("//") && !path.split('/').any(|seg| seg == "." || seg == "..")
}

/// The first query parameter or `x-amz-*` header given more than once.
/// Every parameter and header the services read takes one value, and the
/// signature cannot tell which copy a service would read (AWS sorts repeated
/// query parameters by value), so repeats are refused rather than guessed.
fn repeated(parts: &axum::http::request::Parts) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    for pair in parts.uri.query().unwrap_or("").split('&') {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if key.is_empty() {
            continue;
        }
        // Compared decoded, so `n%61me` repeats `name`.
        let key: Vec<u8> = percent_encoding::percent_decode_str(key).collect();
        if !seen.insert(key.clone()) {
            return Some(format!(
                "query parameter {:?}",
                String::from_utf8_lossy(&key)
            ));
        }
    }
    parts
        .headers
        .keys()
        .filter(|n| n.as_str().starts_with("x-amz-"))
        .find(|n| parts.headers.get_all(*n).iter().nth(1).is_some())
        .map(|n| format!("header {}", n.as_str()))
}

/// Reads the body (bounded), verifies the signature and the scope, finds
/// the caller and serves.
async fn serve(
    hub: &dyn LocalHub,
    service: &dyn LocalService,
    req: Request,
) -> Result<Response, AwsError> {
    let (parts, body) = req.into_parts();
    if !path_is_normal(parts.uri.path()) {
        return Err(AwsError::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestException",
            "The request path has empty, '.' or '..' segments",
        ));
    }
    if let Some(what) = repeated(&parts) {
        return Err(AwsError::new(
            StatusCode::BAD_REQUEST,
            "ValidationException",
            format!("{what} is given more than once; this API takes one value"),
        ));
    }
    // Before reading any body: a request that cannot be signed by a key
    // this hub issued is refused at once.
    let key = sigv4::access_key_id(&parts.headers)
        .map_err(sig_error)?
        .to_owned();
    let (caller, secret) = hub
        .principal(&key)
        .ok_or_else(|| sig_error(sigv4::SigError::UnknownKey))?;
    let (limit, too_large) = service.max_body(hub);
    let body = {
        let _permit = BODIES_IN_FLIGHT.acquire().await.map_err(|_| {
            AwsError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
                "the hub is shutting down",
            )
        })?;
        read_body(body, &parts.headers, limit)
            .await
            .map_err(|e| e.unwrap_or(too_large))?
    };
    let signed = sigv4::Request::from_http(&parts.method, &parts.uri, &parts.headers, &body);
    let now = hub.now_s();
    let verified =
        sigv4::verify(&signed, |k| (k == key).then_some(secret), now).map_err(sig_error)?;
    if verified.service != service.signing_name() {
        return Err(AwsError::new(
            StatusCode::FORBIDDEN,
            "InvalidSignatureException",
            format!(
                "Credential should be scoped to correct service: '{}'.",
                service.signing_name()
            ),
        ));
    }
    let region = &hub.settings().region;
    if &verified.region != region {
        return Err(AwsError::new(
            StatusCode::FORBIDDEN,
            "InvalidSignatureException",
            format!(
                "Credential should be scoped to a valid region: this hub is '{region}' (set AWS_REGION={region})."
            ),
        ));
    }
    service.serve(hub, &caller, Signed { parts, body }).await
}

fn sig_error(e: sigv4::SigError) -> AwsError {
    AwsError::new(
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN),
        e.aws_code(),
        e.to_string(),
    )
}

/// The body up to `limit` bytes; `Err(None)` past it, `Err(Some)` when it
/// could not be read.
async fn read_body(
    body: Body,
    headers: &axum::http::HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, Option<AwsError>> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(None);
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            // axum reports both an over-limit and a cut-off body here.
            if std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            {
                Err(None)
            } else {
                Err(Some(AwsError::new(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestException",
                    "The request body was cut off",
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_normal_paths_are_served() {
        assert!(path_is_normal("/things/a/shadow"));
        assert!(path_is_normal("/topics/a%2F..%2Fb"));
        for bad in [
            "/topics//a",
            "/things/a/../b/shadow",
            "/things/./a",
            "/a/..",
        ] {
            assert!(!path_is_normal(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod dispatch_tests {
    use super::*;
    use crate::fake::FakeHub;
    use roost_model::Principal;

    const KEY: &str = "AKIDOWNER00000000001";
    const SECRET: &str = "owner-secret";

    fn hub() -> FakeHub {
        let mut hub = FakeHub::default();
        hub.keys
            .insert(KEY.into(), (Principal::Owner, SECRET.into()));
        hub
    }

    /// A request signed as botocore would, for `service` in `region`.
    fn signed(
        method: &str,
        target: &str,
        body: &[u8],
        region: &str,
        service: &str,
        at: u64,
    ) -> Request {
        signed_with(method, target, &[], body, region, service, at)
    }

    fn signed_with(
        method: &str,
        target: &str,
        extra: &[(&'static str, &'static str)],
        body: &[u8],
        region: &str,
        service: &str,
        at: u64,
    ) -> Request {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("host", "localhost".parse().unwrap());
        for (k, v) in extra {
            headers.insert(*k, v.parse().unwrap());
        }
        let m: axum::http::Method = method.parse().unwrap();
        let uri: axum::http::Uri = target.parse().unwrap();
        let auth = sigv4::sign(
            &sigv4::Request::from_http(&m, &uri, &headers, body),
            KEY,
            SECRET,
            region,
            service,
            at,
        )
        .unwrap();
        headers.extend(auth);
        let mut req = Request::new(Body::from(body.to_vec()));
        *req.method_mut() = m;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req
    }

    async fn status(hub: &FakeHub, req: Request) -> (u16, String) {
        let Ok(r) = dispatch(hub, &services(), req).await else {
            panic!("no service claimed the request")
        };
        let code = r
            .headers()
            .get("x-amzn-ErrorType")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (r.status().as_u16(), code)
    }

    #[tokio::test]
    async fn a_signed_publish_is_served_and_counted() {
        let hub = hub();
        let req = signed("POST", "/topics/a", b"hi", "us-east-1", "iotdata", hub.now);
        assert_eq!(status(&hub, req).await, (200, String::new()));
        assert_eq!(hub.published.lock().unwrap().len(), 1);
        assert_eq!(hub.counted.lock().unwrap()[0], ("iot-data".into(), 200));
    }

    #[tokio::test]
    async fn unsigned_stale_misscoped_and_oversized_requests_are_refused() {
        let hub = hub();
        let mut unsigned = Request::new(Body::from("x"));
        *unsigned.method_mut() = axum::http::Method::POST;
        *unsigned.uri_mut() = "/topics/a".parse().unwrap();
        assert_eq!(status(&hub, unsigned).await.0, 403);
        let stale = signed(
            "POST",
            "/topics/a",
            b"x",
            "us-east-1",
            "iotdata",
            hub.now - 3600,
        );
        assert_eq!(
            status(&hub, stale).await,
            (403, "InvalidSignatureException".into())
        );
        let region = signed("POST", "/topics/a", b"x", "eu-west-1", "iotdata", hub.now);
        assert_eq!(
            status(&hub, region).await,
            (403, "InvalidSignatureException".into())
        );
        let service = signed("POST", "/topics/a", b"x", "us-east-1", "lambda", hub.now);
        assert_eq!(
            status(&hub, service).await,
            (403, "InvalidSignatureException".into())
        );
        let big = vec![b'x'; 8193];
        let huge = signed("POST", "/topics/a", &big, "us-east-1", "iotdata", hub.now);
        assert_eq!(
            status(&hub, huge).await,
            (413, "RequestEntityTooLargeException".into())
        );
        let dotted = signed(
            "GET",
            "/things/a/../b/shadow",
            b"",
            "us-east-1",
            "iotdata",
            hub.now,
        );
        assert_eq!(status(&hub, dotted).await.0, 400);
        assert!(hub.published.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn unsigned_action_headers_and_repeated_parameters_are_refused() {
        let mut hub = hub();
        hub.tasks.push("echo".into());
        let invoke = "/2015-03-31/functions/echo/invocations";
        // A captured Invoke replayed with a header that would make it an
        // Event call, a dry run, or return the caller's log.
        for (name, value) in [
            ("x-amz-invocation-type", "Event"),
            ("x-amz-invocation-type", "DryRun"),
            ("x-amz-log-type", "Tail"),
        ] {
            let mut req = signed("POST", invoke, b"{}", "us-east-1", "lambda", hub.now);
            req.headers_mut().insert(name, value.parse().unwrap());
            assert_eq!(
                status(&hub, req).await,
                (403, "InvalidSignatureException".into()),
                "{name}: {value}"
            );
        }
        assert!(hub.calls.lock().unwrap().is_empty());
        // Signed, the same headers are served.
        let req = signed_with(
            "POST",
            invoke,
            &[("x-amz-invocation-type", "DryRun")],
            b"{}",
            "us-east-1",
            "lambda",
            hub.now,
        );
        assert_eq!(status(&hub, req).await.0, 204);
        // Repeated query parameters (in any spelling) and repeated action
        // headers, even signed, are refused: which one would count?
        for target in [
            "/topics/a?qos=0&qos=1",
            "/topics/a?qos=1&q%6Fs=0",
            "/2015-03-31/functions/echo/invocations?Qualifier=%24LATEST&Qualifier=x",
        ] {
            let service = if target.starts_with("/topics") {
                "iotdata"
            } else {
                "lambda"
            };
            let req = signed("POST", target, b"{}", "us-east-1", service, hub.now);
            assert_eq!(
                status(&hub, req).await,
                (400, "ValidationException".into()),
                "{target}"
            );
        }
        let mut req = signed_with(
            "POST",
            invoke,
            &[("x-amz-invocation-type", "RequestResponse")],
            b"{}",
            "us-east-1",
            "lambda",
            hub.now,
        );
        req.headers_mut()
            .append("x-amz-invocation-type", "Event".parse().unwrap());
        assert_eq!(status(&hub, req).await, (400, "ValidationException".into()));
        assert!(hub.calls.lock().unwrap().is_empty());
        assert!(hub.published.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_unknown_key_is_refused_before_the_body_is_read() {
        let hub = FakeHub::default();
        let req = signed("POST", "/topics/a", b"x", "us-east-1", "iotdata", hub.now);
        assert_eq!(
            status(&hub, req).await,
            (403, "UnrecognizedClientException".into())
        );
    }

    #[tokio::test]
    async fn lambda_invoke_and_secrets_go_through_the_hub() {
        let mut hub = hub();
        hub.tasks.push("echo".into());
        hub.secrets.insert(
            "db".into(),
            SecretValue {
                value: "hunter2".into(),
                created_ms: 1,
                deployment: 3,
            },
        );
        let req = signed(
            "POST",
            "/2015-03-31/functions/echo/invocations",
            b"{}",
            "us-east-1",
            "lambda",
            hub.now,
        );
        assert_eq!(status(&hub, req).await.0, 200);
        let req = signed(
            "POST",
            "/2015-03-31/functions/nope/invocations",
            b"{}",
            "us-east-1",
            "lambda",
            hub.now,
        );
        assert_eq!(
            status(&hub, req).await,
            (404, "ResourceNotFoundException".into())
        );
        assert_eq!(hub.calls.lock().unwrap().len(), 1);
        // Secrets Manager is claimed by its target header.
        let target = [
            ("x-amz-target", "secretsmanager.GetSecretValue"),
            ("content-type", "application/x-amz-json-1.1"),
        ];
        let req = signed_with(
            "POST",
            "/",
            &target,
            br#"{"SecretId":"db"}"#,
            "us-east-1",
            "secretsmanager",
            hub.now,
        );
        let r = dispatch(&hub, &services(), req).await.ok().unwrap();
        assert_eq!(r.status(), 200);
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["SecretString"], "hunter2");
        let req = signed_with(
            "POST",
            "/",
            &target,
            br#"{"SecretId":"nope"}"#,
            "us-east-1",
            "secretsmanager",
            hub.now,
        );
        let r = dispatch(&hub, &services(), req).await.ok().unwrap();
        assert_eq!(r.status(), 400);
    }
}
