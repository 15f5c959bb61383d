//! A worker's Runtime API server: the axum endpoint its process calls
//! (`/next` for its call, `/response` or `/error` to end it, `/init/error`),
//! and the state it shares with the hub's side of the worker (the call in
//! progress, the queue of the next one, whether it has initialised).

use axum::body::Bytes as AxBytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use parking_lot::Mutex;
use roost_model::TaskName;
use roost_runtime::LogSink;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// Largest response or error body a worker may post (Lambda's sync limit).
pub const MAX_RESPONSE_BYTES: usize = 6 << 20;
/// A call handed to the worker on its next `/next`.
pub(crate) struct Pending {
    pub(crate) request_id: String,
    pub(crate) body: Bytes,
    pub(crate) deadline_ms: u64,
    pub(crate) client_context: Option<String>,
}

pub(crate) enum Outcome {
    Response(Bytes),
    Error { kind: String, body: Bytes },
    Rejected(String),
}

pub(crate) struct Current {
    pub(crate) request_id: String,
    pub(crate) done: Option<oneshot::Sender<Outcome>>,
}

pub(crate) struct Shared {
    pub(crate) task: TaskName,
    pub(crate) arn: String,
    pub(crate) next: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    pub(crate) current: Mutex<Option<Current>>,
    /// Set once the worker first asks for a call (it has initialised).
    pub(crate) ready: watch::Sender<bool>,
    pub(crate) init_error: Mutex<Option<String>>,
    pub(crate) logs: Arc<dyn LogSink>,
}

fn json_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::json!({ "errorMessage": message, "errorType": kind }).to_string(),
    )
        .into_response()
}

async fn next(State(s): State<Arc<Shared>>) -> Response {
    s.ready.send_replace(true);
    let mut rx = s.next.lock().await;
    let Some(p) = rx.recv().await else {
        return json_error(
            StatusCode::GONE,
            "WorkerRetired",
            "this worker is being retired",
        );
    };
    let mut headers = HeaderMap::new();
    let mut put = |k: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert(k, v);
        }
    };
    put("Lambda-Runtime-Aws-Request-Id", &p.request_id);
    put("Lambda-Runtime-Deadline-Ms", &p.deadline_ms.to_string());
    put("Lambda-Runtime-Invoked-Function-Arn", &s.arn);
    put("Lambda-Runtime-Trace-Id", &trace_id());
    if let Some(cc) = &p.client_context {
        put("Lambda-Runtime-Client-Context", cc);
    }
    // awslambdaric decodes the event by content type; JSON is what Lambda
    // sends. Input that is not JSON is handed over as raw bytes instead.
    let json = p.body.is_empty() || serde_json::from_slice::<serde_json::Value>(&p.body).is_ok();
    put(
        "Content-Type",
        if json {
            "application/json"
        } else {
            "application/octet-stream"
        },
    );
    let body = if p.body.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        p.body
    };
    (StatusCode::OK, headers, body).into_response()
}

fn finish(s: &Shared, id: &str, outcome: Outcome) -> Response {
    let mut cur = s.current.lock();
    match cur.as_mut() {
        Some(c) if c.request_id == id => match c.done.take() {
            Some(tx) => {
                let _ = tx.send(outcome);
                *cur = None;
                (
                    StatusCode::ACCEPTED,
                    [("content-type", "application/json")],
                    r#"{"status":"OK"}"#,
                )
                    .into_response()
            }
            None => json_error(
                StatusCode::BAD_REQUEST,
                "InvalidStateTransition",
                "this request already has a result",
            ),
        },
        _ => json_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestID",
            "no call with this request id is in progress on this worker",
        ),
    }
}

async fn response(State(s): State<Arc<Shared>>, Path(id): Path<String>, body: AxBytes) -> Response {
    if body.len() > MAX_RESPONSE_BYTES {
        let r = finish(
            &s,
            &id,
            Outcome::Rejected(format!(
                "the response is over the {} MiB limit",
                MAX_RESPONSE_BYTES >> 20
            )),
        );
        if r.status() != StatusCode::ACCEPTED {
            return r;
        }
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "response over 6 MiB",
        );
    }
    finish(&s, &id, Outcome::Response(body))
}

async fn error(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: AxBytes,
) -> Response {
    let kind = headers
        .get("Lambda-Runtime-Function-Error-Type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Unhandled")
        .to_owned();
    let body = body.slice(..body.len().min(MAX_RESPONSE_BYTES));
    finish(&s, &id, Outcome::Error { kind, body })
}

async fn init_error(State(s): State<Arc<Shared>>, headers: HeaderMap, body: AxBytes) -> Response {
    let kind = headers
        .get("Lambda-Runtime-Function-Error-Type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Runtime.Unknown");
    let message = error_message(&body);
    s.logs
        .line(&s.task, "init", &format!("init error {kind}: {message}"));
    *s.init_error.lock() = Some(format!("{kind}: {message}"));
    (
        StatusCode::ACCEPTED,
        [("content-type", "application/json")],
        r#"{"status":"OK"}"#,
    )
        .into_response()
}

/// Largest handler error document passed on whole.
pub(crate) const MAX_ERROR_DOCUMENT: usize = 256 << 10;

/// The `errorMessage` of a Lambda error document, or the body itself.
pub(crate) fn error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let msg = v.get("errorMessage")?.as_str()?.to_owned();
            Some(match v.get("errorType").and_then(|t| t.as_str()) {
                Some(t) => format!("{t}: {msg}"),
                None => msg,
            })
        })
        .unwrap_or_else(|| text.chars().take(2000).collect())
}

fn trace_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("Root=1-{secs:08x}-{};Sampled=0", hex::encode(b))
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(response),
        )
        .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
        .route("/2018-06-01/runtime/init/error", post(init_error))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_RESPONSE_BYTES + 1))
        .with_state(shared)
}
