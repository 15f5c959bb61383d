//! Every error the API answers with: JSON `{"error": {"code", "message"}}`
//! and the status that fits (INTERFACES.md).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use roost_hub::{CallError, DeployError};
use roost_scheduler::Rejected;
use serde_json::json;

pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    problems: Option<serde_json::Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            problems: None,
            retry_after: None,
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "input_too_large",
            format!("the body is over the {limit} byte limit; send less, or raise the hub's limit"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": { "code": self.code, "message": self.message } });
        if let Some(p) = self.problems {
            body["error"]["problems"] = p;
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        let msg = e.to_string();
        match e {
            CallError::UnknownTask(_) => Self::new(StatusCode::NOT_FOUND, "unknown_task", msg),
            CallError::UnknownCall(_) => Self::new(StatusCode::NOT_FOUND, "unknown_call", msg),
            CallError::InputTooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "input_too_large", msg)
            }
            CallError::NotFinished(_) => Self::new(StatusCode::CONFLICT, "not_finished", msg),
            CallError::Rejected(Rejected::QueueFull { retry_after, .. }) => Self {
                retry_after: Some(retry_after.as_secs().max(1)),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", msg)
            },
            CallError::Rejected(Rejected::TooLarge { .. }) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "over_budget", msg)
            }
            CallError::Rejected(Rejected::Removed) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_task", msg)
            }
            CallError::Rejected(Rejected::Closed) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the hub is shutting down; retry against it once it is back",
            ),
            CallError::Failed(f) => Self::new(
                StatusCode::from_u16(f.code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY),
                f.code.as_str(),
                f.message,
            ),
            CallError::Store(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        let msg = e.to_string();
        match e {
            DeployError::Invalid(problems) => Self {
                problems: Some(serde_json::to_value(&problems).unwrap_or_default()),
                ..Self::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_manifest",
                    format!(
                        "the manifest has {} problem(s); nothing was applied: {}",
                        problems.len(),
                        problems
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                )
            },
            DeployError::BadPackage(_) => Self::new(StatusCode::BAD_REQUEST, "bad_package", msg),
            DeployError::TooLarge { .. } => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "input_too_large", msg)
            }
            DeployError::Busy { .. } => Self {
                retry_after: Some(1),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_uploads", msg)
            },
            DeployError::NothingToRollBack => {
                Self::new(StatusCode::CONFLICT, "nothing_to_roll_back", msg)
            }
            DeployError::Store(_) | DeployError::Io(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
            }
        }
    }
}
