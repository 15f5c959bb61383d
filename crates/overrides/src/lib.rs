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
