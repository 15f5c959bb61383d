//! Local service overrides: the AWS APIs the hub answers itself, so
//! unmodified SDK code (boto3, the AWS CLI, any SDK) pointed at the hub
//! talks to it as if it were the cloud: Lambda `Invoke`, the IoT data plane
//! (shadows and `Publish`) and Secrets Manager `GetSecretValue`.
//!
//! Each service is one [`LocalService`]; [`dispatch`] finds the service a
//! request is for, checks its SigV4 signature (no unsigned request is ever
//! served), finds the caller (the owner or a task) and hands it over. The
//! services know the wire shapes; the hub does the work.

mod iot_data;
mod lambda;
mod secrets;
mod service;
pub mod sigv4;

pub use service::{AwsError, LocalService, Protocol, Signed};

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use roost_hub::Hub;
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
    hub: &Hub,
    services: &[Arc<dyn LocalService>],
    req: Request,
) -> Result<Response, Request> {
    let Some(service) = services.iter().find(|s| s.claims(&req.parts_ref())) else {
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
    hub.count_local_request(service.name(), response.status().as_u16());
    Ok(response)
}

/// Bodies being read at once by the local services: unsigned or slow
/// clients cannot make the hub hold more than this many request bodies.
static BODIES_IN_FLIGHT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(64);

/// The access key id an `Authorization` header names, if it names one.
fn access_key_id(headers: &axum::http::HeaderMap) -> Option<&str> {
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let cred = auth.split_once("Credential=")?.1;
    cred.split_once('/').map(|(k, _)| k)
}

/// botocore never sends `//`, `.` or `..` path segments to these services;
/// the signature covers the normalised path, so a path that is not already
/// normal could be replayed to name another resource.
fn path_is_normal(path: &str) -> bool {
    !path.contains("//") && !path.split('/').any(|seg| seg == "." || seg == "..")
}

/// Reads the body (bounded), verifies the signature and the scope, finds
/// the caller and serves.
async fn serve(hub: &Hub, service: &dyn LocalService, req: Request) -> Result<Response, AwsError> {
    let (parts, body) = req.into_parts();
    if !path_is_normal(parts.uri.path()) {
        return Err(AwsError::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestException",
            "The request path has empty, '.' or '..' segments",
        ));
    }
    // Before reading any body: a request that cannot be signed by a key
    // this hub issued is refused at once.
    match access_key_id(&parts.headers) {
        None if !parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION) =>
        {
            return Err(sig_error(sigv4::SigError::Missing))
        }
        None => {
            return Err(sig_error(sigv4::SigError::Incomplete(
                "Authorization header requires 'Credential' parameter.".into(),
            )))
        }
        Some(k) if hub.principal(k).is_none() => {
            return Err(sig_error(sigv4::SigError::UnknownKey))
        }
        Some(_) => {}
    }
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
    let mut caller = None;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let verified = sigv4::verify(
        &signed,
        |key| {
            let (principal, secret) = hub.principal(key)?;
            caller = Some(principal);
            Some(secret)
        },
        now,
    )
    .map_err(sig_error)?;
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
    let region = &hub.config().region;
    if &verified.region != region {
        return Err(AwsError::new(
            StatusCode::FORBIDDEN,
            "InvalidSignatureException",
            format!(
                "Credential should be scoped to a valid region: this hub is '{region}' (set AWS_REGION={region})."
            ),
        ));
    }
    let caller = caller.expect("a verified request has a known key");
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

trait PartsRef {
    fn parts_ref(&self) -> axum::http::request::Parts;
}

impl PartsRef for Request {
    /// The head of a request without its body, for `claims`.
    fn parts_ref(&self) -> axum::http::request::Parts {
        let mut b = axum::http::Request::builder()
            .method(self.method().clone())
            .uri(self.uri().clone());
        if let Some(h) = b.headers_mut() {
            *h = self.headers().clone();
        }
        b.body(()).expect("a copy of a valid head").into_parts().0
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

    #[test]
    fn the_access_key_is_read_from_the_credential() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(access_key_id(&h), None);
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKID/20261124/us-east-1/iotdata/aws4_request, SignedHeaders=host, Signature=00"
                .parse()
                .unwrap(),
        );
        assert_eq!(access_key_id(&h), Some("AKID"));
        h.insert("authorization", "garbage".parse().unwrap());
        assert_eq!(access_key_id(&h), None);
    }
}
