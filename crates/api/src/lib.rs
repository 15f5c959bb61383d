//! The communications API: the hub's HTTP interface for tasks, local
//! programs and the CLI (INTERFACES.md, "Calls over HTTP").
//!
//! This crate owns only the HTTP edge: routing, body limits, authentication,
//! TLS, and mapping hub results to status codes and JSON errors. Every
//! operation is a call into [`roost_hub::Hub`].

mod errors;
mod local_hub;
mod serve;

pub use serve::{serve, ConnectionLimits, Peer, PeerUser, ServeConfig, TlsFiles};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use errors::ApiError;
use roost_hub::{CallError, Caller, Hub};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Clone)]
struct AppState {
    hub: Hub,
    token: Option<Arc<str>>,
    /// The AWS-compatible services (signed with SigV4, so outside the
    /// bearer-token check).
    services: Arc<Vec<Arc<dyn roost_overrides::LocalService>>>,
    /// The hub as those services see it.
    local: Arc<dyn roost_overrides::LocalHub>,
}

/// Builds the router. With a token, every request but `/healthz` must carry
/// `Authorization: Bearer TOKEN`.
pub fn router(hub: Hub, token: Option<String>) -> Router {
    let state = AppState {
        local: Arc::new(local_hub::HubForServices::new(hub.clone())),
        hub,
        token: token.map(Arc::from),
        services: Arc::new(roost_overrides::services()),
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/tasks", get(tasks))
        .route("/v1/tasks/{task}/calls", post(call))
        .route("/v1/calls/{id}", get(call_status))
        .route("/v1/calls/{id}/output", get(call_output))
        .route("/v1/deployments", post(deploy))
        .route("/v1/deployments/rollback", post(rollback))
        .route("/v1/deployments/active", get(active_deployment))
        .route("/v1/logs", get(logs))
        .route("/v1/devices", get(devices))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route("/healthz", get(healthz))
        .fallback(local_services)
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn authorize(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // A process task's worker, under its own identity, is itself here:
    // it may use what INTERFACES.md gives tasks (calls, their status and
    // output, the task list), token or not, and never the owner's
    // operations (deploying, rolling back, reading every task's logs).
    if st.hub.task_identities() {
        match task_gate(&st.hub, &req) {
            Gate::NotATask => {}
            Gate::Pass(task) => {
                // Its calls wait in its own share of the queue.
                let mut req = req;
                req.extensions_mut().insert(CallingTask(task));
                return next.run(req).await;
            }
            Gate::Refuse(why) => return task_refused(&req, &why),
        }
    }
    if let Some(token) = &st.token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
        if !ok {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this hub requires a token: pass --token or set ROOST_TOKEN",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// What task identities make of a `/v1` request.
enum Gate {
    /// Not from a task's user: the token decides.
    NotATask,
    /// A task's, for something a task may do (the first of the tasks
    /// sharing its identity).
    Pass(roost_model::TaskName),
    Refuse(String),
}

fn task_gate(hub: &Hub, req: &Request) -> Gate {
    let user = req
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0.user())
        .unwrap_or(PeerUser::Unknown);
    let uid = match user {
        PeerUser::Remote => return Gate::NotATask,
        PeerUser::Local(uid) => uid,
        PeerUser::Unknown => {
            // Fail closed: it could be a task's.
            tracing::warn!(path = %req.uri().path(), "refused a /v1 request from a local connection whose user is unknown");
            return Gate::Refuse(
                "cannot tell which local user holds this connection (was it closed before the answer?)".into(),
            );
        }
    };
    match hub.local_user(uid) {
        roost_hub::local::LocalUser::Other => Gate::NotATask,
        roost_hub::local::LocalUser::RetiredTask => {
            Gate::Refuse("no deployed task runs as this user".into())
        }
        roost_hub::local::LocalUser::Task { tasks } => {
            use roost_hub::local::{task_may, ApiMethod, ApiRequest};
            let method = if req.method() == axum::http::Method::GET {
                ApiMethod::Get
            } else {
                ApiMethod::Other
            };
            match task_may(&ApiRequest::new(method, req.uri().path())) {
                Ok(()) => match tasks.first() {
                    Some(t) => Gate::Pass(t.clone()),
                    None => Gate::Refuse("no deployed task runs as this user".into()),
                },
                Err(why) => {
                    tracing::warn!(tasks = ?tasks, path = %req.uri().path(), "refused a task's request to /v1");
                    Gate::Refuse(why.to_string())
                }
            }
        }
    }
}

fn task_refused(req: &Request, why: &str) -> Response {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{} {}: {why}", req.method(), req.uri().path()),
    )
    .into_response()
}

/// Compares without an early exit, so the time taken does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Paths outside `/v1` may be the AWS APIs the hub answers locally.
async fn local_services(State(st): State<AppState>, req: Request) -> Response {
    match roost_overrides::dispatch(st.local.as_ref(), &st.services, req).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint; see INTERFACES.md for the API",
        )
        .into_response(),
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.hub.metrics_text(),
    )
        .into_response()
}

async fn tasks(State(st): State<AppState>) -> Response {
    Json(serde_json::json!({ "tasks": st.hub.tasks() })).into_response()
}

#[derive(Deserialize)]
struct CallQuery {
    mode: Option<String>,
}

/// Reads at most `limit` bytes of body, answering 413 past it.
async fn body_within(
    body: Body,
    headers: &axum::http::HeaderMap,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        drain(body).await;
        return Err(ApiError::too_large(limit));
    }
    use http_body_util::BodyExt;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(cut_off());
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                drain(body).await;
                return Err(ApiError::too_large(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A request whose body ended before it was whole.
fn cut_off() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "the request body was cut off",
    )
}

/// Reads and drops what is left of a body the hub refuses (up to a cap),
/// so the client, still sending, gets the 413 or 429 instead of a broken
/// pipe.
async fn drain(mut body: Body) {
    use http_body_util::BodyExt;
    const CAP: usize = 64 << 20;
    let mut seen = 0;
    let reading = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(d) = frame.into_data() {
                seen += d.len();
                if seen > CAP {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), reading).await;
}

/// The task a `/v1` request comes from, when task identities tell.
#[derive(Clone)]
struct CallingTask(roost_model::TaskName);

async fn call(
    State(st): State<AppState>,
    Path(task): Path<String>,
    Query(q): Query<CallQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    let asynchronous = match q.mode.as_deref() {
        None | Some("sync") => false,
        Some("async") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("mode={other:?} is not a call mode; use mode=async or leave it out"),
            ))
        }
    };
    let cfg = st.hub.config();
    let limit = if asynchronous {
        cfg.max_async_input
    } else {
        cfg.max_sync_input
    };
    let (parts, body) = req.into_parts();
    // An unknown task is a 404 even when the body is too large.
    if !st.hub.has_task(&task) {
        return Err(CallError::UnknownTask(task).into());
    }
    // The body's bytes count against the bound on waiting inputs while it
    // is read, so a flood of large calls is refused before it is in memory.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(limit)
        .min(limit);
    let hold = match st.hub.hold_input(declared) {
        Ok(h) => h,
        Err(e) => {
            // Read and drop the body, so the client gets the 429 rather
            // than a broken pipe while it is still sending.
            drain(body).await;
            return Err(e.into());
        }
    };
    let input = body_within(body, &parts.headers, limit).await?;
    let caller = match parts.extensions.get::<CallingTask>() {
        Some(CallingTask(t)) => Caller::Task(t.clone()),
        None => Caller::Outside,
    };
    if asynchronous {
        let id = st.hub.call_async(&caller, &task, input, Vec::new()).await?;
        drop(hold);
        Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id }))).into_response())
    } else {
        let out = st
            .hub
            .call_sync_holding(
                roost_hub::new_call_id(),
                &caller,
                &task,
                input,
                Vec::new(),
                Some(hold),
            )
            .await?;
        Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
    }
}

async fn call_status(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(st.hub.call_view(&id)?).into_response())
}

async fn call_output(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let out = st.hub.call_output(&id)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response())
}

/// Streams the package to the hub's upload file as it arrives (memory stays
/// flat whatever its size), then deploys it.
/// `?force=true`: deploy or roll back on a hub the fleet manages.
#[derive(serde::Deserialize, Default)]
struct Force {
    #[serde(default)]
    force: bool,
}

/// A hub enrolled in a fleet takes its deployments from the cloud; a
/// local change is refused unless forced, and the uplink then reports it
/// to the cloud as drift.
fn refuse_unless_forced(st: &AppState, force: bool) -> Result<(), ApiError> {
    match &st.hub.config().managed_by {
        Some(cloud) if !force => Err(ApiError::new(
            StatusCode::CONFLICT,
            "managed_by_cloud",
            format!("this hub takes its deployments from the fleet at {cloud}: deploy with `roost cloud deploy --hub NAME MANIFEST`, or pass --force to change it here (the cloud is told: drift)"),
        )),
        Some(_) => {
            tracing::warn!("a forced local change on a hub the fleet manages; the cloud is told");
            Ok(())
        }
        None => Ok(()),
    }
}

async fn deploy(
    State(st): State<AppState>,
    Query(force): Query<Force>,
    req: Request,
) -> Result<Response, ApiError> {
    use http_body_util::BodyExt;
    let (parts, mut body) = req.into_parts();
    if let Err(e) = refuse_unless_forced(&st, force.force) {
        drain(body).await;
        return Err(e);
    }
    let limit = st.hub.config().max_package_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        drain(body).await;
        return Err(ApiError::too_large(limit));
    }
    let mut upload = match st.hub.begin_upload() {
        Ok(u) => u,
        Err(e) => {
            drain(body).await;
            return Err(e.into());
        }
    };
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(cut_off());
        };
        if let Ok(data) = frame.into_data() {
            if let Err(e) = upload.write(&data).await {
                drop(upload);
                drain(body).await;
                return Err(e.into());
            }
        }
    }
    let report = st.hub.deploy_upload(upload).await?;
    Ok(Json(report).into_response())
}

async fn rollback(
    State(st): State<AppState>,
    Query(force): Query<Force>,
) -> Result<Response, ApiError> {
    refuse_unless_forced(&st, force.force)?;
    Ok(Json(st.hub.rollback().await?).into_response())
}

async fn active_deployment(State(st): State<AppState>) -> Result<Response, ApiError> {
    match st.hub.active_manifest() {
        Some((id, manifest)) => {
            Ok(Json(serde_json::json!({"deployment": id, "manifest": manifest})).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_deployment",
            "nothing is deployed yet; run `roost deploy MANIFEST`",
        )),
    }
}

async fn devices(State(st): State<AppState>) -> Response {
    let list: Vec<serde_json::Value> = st
        .hub
        .bus()
        .devices()
        .into_iter()
        .map(|d| serde_json::json!({"name": d.name, "connected": d.connected, "client_ids": d.client_ids}))
        .collect();
    Json(serde_json::json!({ "devices": list })).into_response()
}

#[derive(Deserialize)]
struct LogQuery {
    task: Option<String>,
    #[serde(default)]
    follow: bool,
}

/// Task log lines as NDJSON; with `follow=true` the stream stays open.
async fn logs(State(st): State<AppState>, Query(q): Query<LogQuery>) -> Result<Response, ApiError> {
    let task =
        match q.task.as_deref() {
            None => None,
            Some(t) => Some(roost_model::TaskName::parse(t).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            })?),
        };
    let live = q.follow.then(|| st.hub.logs().follow());
    let mut text = String::new();
    for l in st.hub.logs().recent(task.as_ref()) {
        text.push_str(&serde_json::to_string(&l).unwrap_or_default());
        text.push('\n');
    }
    let ndjson = HeaderValue::from_static("application/x-ndjson");
    let Some(live) = live else {
        return Ok(([(header::CONTENT_TYPE, ndjson)], text).into_response());
    };
    let first =
        futures::stream::once(async move { Ok::<_, std::convert::Infallible>(Bytes::from(text)) });
    let wanted = task.map(|t| t.to_string());
    let rest = futures::stream::unfold((live, wanted), |(mut rx, wanted)| async move {
        loop {
            match rx.recv().await {
                Ok(l) if wanted.as_ref().is_none_or(|w| *w == l.task) => {
                    let mut s = serde_json::to_string(&l).unwrap_or_default();
                    s.push('\n');
                    return Some((Ok(Bytes::from(s)), (rx, wanted)));
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    });
    use futures::StreamExt;
    Ok((
        [(header::CONTENT_TYPE, ndjson)],
        Body::from_stream(first.chain(rest)),
    )
        .into_response())
}
