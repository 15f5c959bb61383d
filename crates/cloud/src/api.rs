//! The cloud's HTTP API. Open to all: `GET /healthz`, `GET /openapi.json`
//! and a hub's enrolment (its one-time token authorizes it). Under `/v1`
//! with the admin token (`Authorization: Bearer`): hubs, packages and
//! deployments. Under `/v1/hub/...` with a hub's signature: the hub's own
//! connection, packages and secrets (`hubs.rs`). Errors are
//! `{"error": {"code", "message"}}`, as the hub's own API answers.

// Handlers return `Result<_, Response>`: the error is the answer itself, and
// it is built once per failed request, so its size does not matter.
#![allow(clippy::result_large_err)]

use crate::store::{NewDeployment, Target, DEPLOYMENT_SHADOW};
use crate::{now_ms, random_hex, token_hash, valid_name, Cloud, HubRecord, StoreError};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

/// The longest an enrolment token may be made to last.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Deployments listed at most.
const MAX_LISTED: i64 = 1000;

/// The API, ready to serve.
pub fn router(cloud: Cloud) -> Router {
    let max_package = cloud.options.max_package_bytes;
    let v1 = Router::new()
        .route("/v1/hubs", get(list_hubs).post(add_hub))
        .route("/v1/hubs/{name}", delete(remove_hub))
        .route("/v1/hubs/{name}/shadows/{shadow}", get(hub_shadow))
        .route(
            "/v1/packages",
            post(upload_package).layer(DefaultBodyLimit::max(max_package)),
        )
        .route(
            "/v1/deployments",
            get(list_deployments).post(create_deployment),
        )
        .route("/v1/deployments/{id}", get(show_deployment))
        .route_layer(axum::middleware::from_fn_with_state(
            cloud.clone(),
            authorize,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        // A hub's first call: its enrolment token is what authorizes it.
        .route("/v1/enrol", post(enrol))
        .route(roost_fleet::CONNECT_PATH, get(crate::hubs::connect))
        .route("/v1/hub/packages/{sha256}", get(crate::hubs::package))
        .route(
            "/v1/hub/deployments/{id}/secrets",
            get(crate::hubs::secrets),
        )
        .merge(v1)
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see GET /openapi.json",
            )
        })
        .with_state(cloud)
}

pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

pub(crate) fn internal(e: StoreError) -> Response {
    match e {
        StoreError::UnknownHub(n) => error(
            StatusCode::NOT_FOUND,
            "unknown_hub",
            format!("no hub named {n:?} is in the fleet (see `roost cloud hubs`)"),
        ),
        StoreError::UnknownPackage(p) => error(
            StatusCode::NOT_FOUND,
            "unknown_package",
            format!("no package {p} is stored: upload it first (POST /v1/packages; `roost cloud deploy` does both)"),
        ),
        StoreError::Refused(why) => error(StatusCode::BAD_REQUEST, "bad_request", why),
        e => {
            tracing::error!(error = %e, "the cloud's store failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
    }
}

/// A request body read as JSON, or the answer saying what was expected.
fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8], shape: &str) -> Result<T, Response> {
    serde_json::from_slice(bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the body is not {shape}: {e}"),
        )
    })
}

async fn authorize(State(cloud): State<Cloud>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), cloud.admin_token.as_bytes()) => {
            next.run(req).await
        }
        _ => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this API needs the admin token: set ROOST_CLOUD_TOKEN, or pass --data-dir of the cloud (its admin-token file)",
        ),
    }
}

/// Compares without an early exit, so the time taken does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewHub {
    name: String,
    #[serde(default)]
    groups: Vec<String>,
    /// How long its enrolment token works, in seconds (default a day).
    token_ttl_s: Option<u64>,
}

async fn add_hub(State(cloud): State<Cloud>, body: axum::body::Bytes) -> Response {
    let new: NewHub = match parse_body(&body, "a hub ({\"name\", \"groups\", \"token_ttl_s\"})") {
        Ok(n) => n,
        Err(r) => return r,
    };
    if let Some(bad) = std::iter::once(&new.name)
        .chain(&new.groups)
        .find(|n| !valid_name(n))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{bad:?} is not a valid name: use 1 to 64 letters, digits, '-' or '_'"),
        );
    }
    let ttl = new
        .token_ttl_s
        .map_or(crate::DEFAULT_TOKEN_TTL, Duration::from_secs);
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "token_ttl_s must be 1 to {} seconds",
                MAX_TOKEN_TTL.as_secs()
            ),
        );
    }
    let mut groups = new.groups;
    groups.sort();
    groups.dedup();
    let now = now_ms();
    let hub = HubRecord {
        name: new.name,
        groups,
        created_ms: now,
        enrolled_ms: None,
        connected_ms: None,
        last_seen_ms: None,
    };
    // The secret, and the pin of the cloud's TLS key when it serves TLS:
    // the hub trusts only that key from its first connection on.
    let token = match &cloud.options.tls_pin {
        Some(pin) => format!("{}.{pin}", random_hex(32)),
        None => random_hex(32),
    };
    let expires_ms = now + ttl.as_millis() as i64;
    let (record, hash) = (hub.clone(), token_hash(&token));
    match cloud
        .run(move |s| s.add_hub(&record, &hash, expires_ms))
        .await
    {
        Ok(()) => {
            tracing::info!(hub = %hub.name, groups = ?hub.groups, "hub added to the fleet");
            (
                StatusCode::CREATED,
                Json(json!({
                    "name": hub.name,
                    "groups": hub.groups,
                    "enrolment_token": token,
                    "expires_ms": expires_ms,
                })),
            )
                .into_response()
        }
        Err(StoreError::HubExists(n)) => error(
            StatusCode::CONFLICT,
            "hub_exists",
            format!(
                "a hub named {n:?} is already in the fleet; remove it first or pick another name"
            ),
        ),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Enrolment {
    token: String,
    /// The hub's ed25519 public key, hex (64 digits).
    public_key: String,
}

/// A hub exchanges its one-time token for its place in the fleet: the
/// cloud records the public key the hub made, whose private half never
/// leaves the hub.
async fn enrol(State(cloud): State<Cloud>, body: axum::body::Bytes) -> Response {
    let e: Enrolment = match parse_body(&body, "an enrolment ({\"token\", \"public_key\"})") {
        Ok(e) => e,
        Err(r) => return r,
    };
    let key_ok = hex::decode(&e.public_key)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .is_some_and(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).is_ok());
    if !key_ok {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "public_key is not an ed25519 public key (64 hex digits)",
        );
    }
    let (hash, key) = (token_hash(&e.token), e.public_key);
    match cloud.run(move |s| s.enrol(&hash, &key, now_ms())).await {
        Ok(Some(hub)) => {
            tracing::info!(hub = %hub.name, "hub enrolled");
            Json(json!({
                "hub": hub.name,
                "groups": hub.groups,
                "signing_key": cloud.signing_public_key(),
                "heartbeat_s": cloud.options.heartbeat.as_secs(),
            }))
            .into_response()
        }
        // One answer for unknown, used and expired: a guesser learns nothing.
        Ok(None) => {
            tracing::warn!("an enrolment with an unknown, used or expired token was refused");
            error(
                StatusCode::UNAUTHORIZED,
                "enrolment_refused",
                "the enrolment token is unknown, already used or expired: an operator makes a new one with `roost cloud hubs remove NAME` and `roost cloud hubs add NAME`",
            )
        }
        Err(e) => internal(e),
    }
}

async fn list_hubs(State(cloud): State<Cloud>) -> Response {
    let result = cloud
        .run(|s| Ok((s.hubs()?, s.deployment_shadows()?)))
        .await;
    let (hubs, shadows) = match result {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let shadows: std::collections::HashMap<_, _> = shadows.into_iter().collect();
    let now = now_ms();
    // A replica refreshes last_seen once per heartbeat; one that died
    // leaves connected_ms behind, so a hub not heard from for three
    // heartbeats is not connected whatever the row says.
    let stale = 3 * cloud.options.heartbeat.as_millis() as i64 + 10_000;
    let hubs: Vec<_> = hubs
        .into_iter()
        .map(|h| {
            let doc = shadows.get(&h.name).and_then(|r| r.document.clone());
            let section = |d: Option<&roost_shadows::Section>| {
                d.map(|s| serde_json::Value::Object(s.state.clone()))
                    .unwrap_or(serde_json::Value::Null)
            };
            let desired = section(doc.as_ref().and_then(|d| d.desired.as_ref()));
            let reported = section(doc.as_ref().and_then(|d| d.reported.as_ref()));
            let connected =
                h.connected_ms.is_some() && h.last_seen_ms.is_some_and(|t| now - t <= stale);
            json!({
                "name": h.name,
                "groups": h.groups,
                "created_ms": h.created_ms,
                "enrolled": h.enrolled_ms.is_some(),
                "enrolled_ms": h.enrolled_ms,
                "connected": connected,
                "last_seen_ms": h.last_seen_ms,
                "desired": desired["deployment"],
                "applied": reported["applied"],
                "status": reported["status"],
                "reason": reported["reason"],
                "drift": reported["drift"],
            })
        })
        .collect();
    Json(json!({ "hubs": hubs })).into_response()
}

async fn hub_shadow(
    State(cloud): State<Cloud>,
    Path((name, shadow)): Path<(String, String)>,
) -> Response {
    let Ok(id) = roost_shadows::ShadowId::parse(&name, Some(&shadow)) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "not a hub and shadow name",
        );
    };
    let (n, sh) = (name.clone(), shadow.clone());
    match cloud.run(move |s| s.shadow(&n, &sh)).await {
        Ok(rec) => match rec.get(&id, None, (now_ms() / 1000) as u64) {
            Ok(doc) => Json(doc).into_response(),
            Err(_) => error(
                StatusCode::NOT_FOUND,
                "unknown_shadow",
                format!("hub {name:?} has no shadow {shadow:?} (a hub's {DEPLOYMENT_SHADOW} exists once a deployment is sent to it)"),
            ),
        },
        Err(e) => internal(e),
    }
}

async fn upload_package(State(cloud): State<Cloud>, bytes: axum::body::Bytes) -> Response {
    let c = cloud.clone();
    let validated = tokio::task::spawn_blocking(move || {
        crate::packages::validate(&c, &bytes, now_ms()).map(|v| (v, bytes))
    })
    .await;
    let (v, bytes) = match validated {
        Ok(Ok(v)) => v,
        Ok(Err(crate::packages::Refusal::Bad(why))) => {
            return error(StatusCode::BAD_REQUEST, "bad_package", why)
        }
        Ok(Err(crate::packages::Refusal::Invalid(problems))) => {
            let message = format!(
                "the manifest has {} problem(s); nothing was stored: {}",
                problems.len(),
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": {"code": "invalid_manifest", "message": message, "problems": problems}})),
            )
                .into_response();
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("validating the package failed: {e}"),
            )
        }
    };
    let record = v.record.clone();
    match cloud.run(move |s| s.put_package(&record, &bytes)).await {
        Ok(new) => {
            tracing::info!(package = %v.record.sha256, bytes = v.record.size, new, "package stored");
            (
                if new {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                Json(json!({
                    "sha256": v.record.sha256,
                    "size": v.record.size,
                    "signature": v.record.signature,
                    "tasks": v.tasks,
                    "secrets": v.secrets,
                    "new": new,
                })),
            )
                .into_response()
        }
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeploymentRequest {
    hub: Option<String>,
    group: Option<String>,
    package: String,
    /// Hubs deployed to at a time (default: all at once).
    rollout_batch: Option<i64>,
    /// Stop the rollout once more than this share of its hubs failed.
    max_failures_pct: Option<i64>,
    /// The `[[secret]]` values, by name.
    #[serde(default)]
    secrets: std::collections::BTreeMap<String, String>,
}

async fn create_deployment(State(cloud): State<Cloud>, bytes: axum::body::Bytes) -> Response {
    let req: DeploymentRequest = match parse_body(
        &bytes,
        "a deployment ({\"hub\" or \"group\", \"package\", \"rollout_batch\", \"max_failures_pct\", \"secrets\"})",
    ) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let bad = |why: String| error(StatusCode::BAD_REQUEST, "bad_request", why);
    let target = match (req.hub, req.group) {
        (Some(h), None) if valid_name(&h) => Target::Hub(h),
        (None, Some(g)) if valid_name(&g) => Target::Group(g),
        (Some(_), Some(_)) | (None, None) => return bad("give exactly one of hub and group".into()),
        (Some(n), _) | (_, Some(n)) => return bad(format!("{n:?} is not a valid name")),
    };
    let batch = req.rollout_batch.unwrap_or(i64::from(u32::MAX));
    if batch < 1 {
        return bad("rollout_batch must be at least 1".into());
    }
    let pct = req.max_failures_pct.unwrap_or(100);
    if !(0..=100).contains(&pct) {
        return bad("max_failures_pct must be 0 to 100".into());
    }
    let sha = req.package.clone();
    let package = match cloud.run(move |s| s.package(&sha)).await {
        Ok(Some(p)) => p,
        Ok(None) => return internal(StoreError::UnknownPackage(req.package)),
        Err(e) => return internal(e),
    };
    let declared = crate::packages::secret_names(&package.manifest);
    let missing: Vec<_> = declared
        .iter()
        .filter(|n| !req.secrets.contains_key(*n))
        .cloned()
        .collect();
    let unknown: Vec<_> = req
        .secrets
        .keys()
        .filter(|n| !declared.contains(n))
        .cloned()
        .collect();
    if !missing.is_empty() || !unknown.is_empty() {
        return bad(format!(
            "the secrets do not match the manifest's [[secret]]s: missing {missing:?}, unknown {unknown:?} (roost cloud deploy reads each value_env from your shell)"
        ));
    }
    let secrets = (!req.secrets.is_empty())
        .then(|| cloud.seal(&serde_json::to_vec(&req.secrets).expect("strings serialize")));
    let new = NewDeployment {
        target: target.clone(),
        package: package.sha256.clone(),
        secrets,
        rollout_batch: batch,
        max_failures_pct: pct,
    };
    match cloud
        .run(move |s| {
            let id = s.create_deployment(&new, now_ms())?;
            Ok((id, s.deployment(id)?))
        })
        .await
    {
        Ok((id, Some((_, hubs)))) => {
            tracing::info!(deployment = id, target = ?target, hubs = hubs.len(), "deployment created");
            (
                StatusCode::CREATED,
                Json(json!({"deployment": id, "hubs": hubs.len(), "package": package.sha256})),
            )
                .into_response()
        }
        Ok((id, None)) => internal(StoreError::Schema(format!("deployment {id} vanished"))),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

fn deployment_json(
    d: &crate::store::DeploymentRecord,
    hubs: &[crate::store::HubStatus],
    with_hubs: bool,
) -> serde_json::Value {
    let mut counts = serde_json::Map::new();
    for h in hubs {
        let n = counts.get(&h.status).and_then(|v| v.as_u64()).unwrap_or(0);
        counts.insert(h.status.clone(), (n + 1).into());
    }
    let done = hubs
        .iter()
        .filter(|h| crate::store::terminal(&h.status))
        .count();
    let mut v = json!({
        "id": d.id,
        "target": d.target,
        "package": d.package,
        "rollout_batch": d.rollout_batch,
        "max_failures_pct": d.max_failures_pct,
        "state": d.state,
        "reason": d.reason,
        "created_ms": d.created_ms,
        "total": hubs.len(),
        "done": done,
        "counts": counts,
    });
    if with_hubs {
        v["hubs"] = serde_json::to_value(hubs).unwrap_or_default();
    }
    v
}

async fn list_deployments(State(cloud): State<Cloud>, Query(q): Query<ListQuery>) -> Response {
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_LISTED);
    let listed = cloud
        .run(move |s| {
            let mut out = Vec::new();
            for d in s.deployments(limit)? {
                let hubs = s.deployment(d.id)?.map(|(_, h)| h).unwrap_or_default();
                out.push((d, hubs));
            }
            Ok(out)
        })
        .await;
    match listed {
        Ok(list) => {
            let list: Vec<_> = list
                .iter()
                .map(|(d, h)| deployment_json(d, h, false))
                .collect();
            Json(json!({ "deployments": list })).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn show_deployment(State(cloud): State<Cloud>, Path(id): Path<i64>) -> Response {
    match cloud.run(move |s| s.deployment(id)).await {
        Ok(Some((d, hubs))) => Json(deployment_json(&d, &hubs, true)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_deployment",
            format!("no deployment {id} (see `roost cloud deployments`)"),
        ),
        Err(e) => internal(e),
    }
}

async fn remove_hub(State(cloud): State<Cloud>, Path(name): Path<String>) -> Response {
    let n = name.clone();
    match cloud.run(move |s| s.remove_hub(&n)).await {
        Ok(true) => {
            tracing::info!(hub = %name, "hub removed from the fleet");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "unknown_hub",
            format!("no hub named {name:?} is in the fleet (see `roost cloud hubs`)"),
        ),
        Err(e) => internal(e),
    }
}

/// The API's OpenAPI 3.1 document; a test checks that every operation it
/// names is served and every route is in it.
pub fn openapi() -> serde_json::Value {
    let err = json!({"$ref": "#/components/schemas/Error"});
    let bad = |d: &str| json!({"description": d, "content": {"application/json": {"schema": err}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "roost cloud", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer", "description": "DATA_DIR/admin-token"},
                "hub": {"type": "apiKey", "in": "header", "name": "Authorization",
                    "description": "Roost-Hub NAME:TIME_MS:SIG, SIG the hub's ed25519 signature (hex) of \"roost-request-v1\\nMETHOD\\nPATH\\nTIME_MS\" with its enrolled key, TIME_MS within 5 minutes of the cloud's clock; on the WebSocket, the signed challenge instead"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
                "Hub": {"type": "object", "required": ["name", "groups", "created_ms", "enrolled"], "properties": {
                    "name": {"type": "string"}, "groups": {"type": "array", "items": {"type": "string"}},
                    "created_ms": {"type": "integer"}, "enrolled": {"type": "boolean"},
                    "enrolled_ms": {"type": ["integer", "null"]}}}
            }
        },
        "paths": {
            "/healthz": {"get": {"summary": "200 once the cloud serves", "responses": {"200": {"description": "ok"}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "the document"}}}},
            "/v1/hubs": {
                "get": {"summary": "the fleet's hubs: groups, enrolled, connected, last seen, desired and applied deployment, status", "security": [{"admin": []}], "responses": {
                    "200": {"description": "{\"hubs\": [Hub]}", "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"hubs": {"type": "array", "items": {"$ref": "#/components/schemas/Hub"}}}}}}},
                    "401": bad("no or a wrong admin token")}},
                "post": {"summary": "add a hub; answers its one-time enrolment token", "security": [{"admin": []}],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                            "name": {"type": "string"}, "groups": {"type": "array", "items": {"type": "string"}},
                            "token_ttl_s": {"type": "integer", "minimum": 1}}}}}},
                    "responses": {
                        "201": {"description": "{\"name\", \"groups\", \"enrolment_token\", \"expires_ms\"}; over TLS the token is SECRET.PIN, PIN the SHA-256 of the cloud's TLS public key"},
                        "400": bad("bad_request: not a hub, a bad name or TTL"),
                        "401": bad("no or a wrong admin token"),
                        "409": bad("hub_exists")}}
            },
            "/v1/enrol": {"post": {"summary": "a hub exchanges its one-time enrolment token for its place in the fleet",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["token", "public_key"], "additionalProperties": false, "properties": {
                        "token": {"type": "string"}, "public_key": {"type": "string", "description": "ed25519, hex"}}}}}},
                "responses": {
                    "200": {"description": "{\"hub\", \"groups\", \"signing_key\", \"heartbeat_s\"}"},
                    "400": bad("bad_request: not an enrolment, or not an ed25519 key"),
                    "401": bad("enrolment_refused: the token is unknown, used or expired")}}},
            "/v1/hubs/{name}": {"delete": {"summary": "remove a hub: it is refused from then on", "security": [{"admin": []}],
                "parameters": [path_param("name")],
                "responses": {"204": {"description": "removed"}, "401": bad("no or a wrong admin token"), "404": bad("unknown_hub")}}},
            "/v1/hubs/{name}/shadows/{shadow}": {"get": {"summary": "one of a hub's shadows as the cloud holds it (GetThingShadow's document); roost-deployment holds state.desired (deployment, package, signature) and state.reported (deployment, status, reason, applied, drift)",
                "security": [{"admin": []}],
                "parameters": [path_param("name"), path_param("shadow")],
                "responses": {"200": {"description": "the shadow document"}, "400": bad("bad_request: not a hub and shadow name"),
                    "401": bad("no or a wrong admin token"), "404": bad("unknown_shadow")}}},
            "/v1/packages": {"post": {"summary": "upload a deployment package (the gzipped tar `roost deploy` builds, without secret values); validated as the hub validates it, stored once by SHA-256 and signed with the fleet's key",
                "security": [{"admin": []}],
                "requestBody": {"required": true, "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {
                    "200": {"description": "already stored: {\"sha256\", \"size\", \"signature\", \"tasks\", \"secrets\", \"new\": false}"},
                    "201": {"description": "stored: {\"sha256\", \"size\", \"signature\", \"tasks\", \"secrets\", \"new\": true}"},
                    "400": bad("bad_package (not a package, or one carrying secret values) or invalid_manifest (with every problem in error.problems)"),
                    "401": bad("no or a wrong admin token"),
                    "413": {"description": "larger than --max-package-bytes"}}}},
            "/v1/deployments": {
                "get": {"summary": "the newest deployments with their per-status counts", "security": [{"admin": []}],
                    "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}],
                    "responses": {"200": {"description": "{\"deployments\": [Deployment without hubs]}"}, "401": bad("no or a wrong admin token")}},
                "post": {"summary": "deploy a stored package to a hub or a group, through each hub's roost-deployment shadow", "security": [{"admin": []}],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["package"], "additionalProperties": false, "properties": {
                            "hub": {"type": "string"}, "group": {"type": "string"}, "package": {"type": "string", "description": "SHA-256, hex"},
                            "rollout_batch": {"type": "integer", "minimum": 1}, "max_failures_pct": {"type": "integer", "minimum": 0, "maximum": 100},
                            "secrets": {"type": "object", "additionalProperties": {"type": "string"}}}}}}},
                    "responses": {
                        "201": {"description": "{\"deployment\", \"hubs\", \"package\"}"},
                        "400": bad("bad_request: not exactly one of hub and group, a bad batch or bound, secrets that do not match the manifest"),
                        "401": bad("no or a wrong admin token"),
                        "404": bad("unknown_hub or unknown_package")}}
            },
            "/v1/deployments/{id}": {"get": {"summary": "one deployment, hub by hub", "security": [{"admin": []}],
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
                "responses": {"200": {"description": "{\"id\", \"target\", \"package\", \"state\" (rolling_out, done, stopped), \"reason\", \"total\", \"done\", \"counts\", \"hubs\": [{\"hub\", \"status\", \"reason\", \"started_ms\", \"updated_ms\"}]}"},
                    "400": {"description": "the id is not a number"},
                    "401": bad("no or a wrong admin token"), "404": bad("unknown_deployment")}}},
            roost_fleet::CONNECT_PATH: {"get": {"summary": "a hub's WebSocket: the cloud sends a challenge, the hub answers hello signed with its enrolled key, then shadows flow down and reports and heartbeats up (roost-fleet's CloudMsg and HubMsg, JSON text frames)",
                "security": [{"hub": []}],
                "responses": {"101": {"description": "switching to the WebSocket"}, "400": {"description": "not a WebSocket request"},
                    "401": bad("unauthorized"), "426": {"description": "the connection cannot be upgraded"}}}},
            "/v1/hub/packages/{sha256}": {"get": {"summary": "a package of a deployment sent to the signing hub, and no other",
                "security": [{"hub": []}],
                "parameters": [path_param("sha256")],
                "responses": {"200": {"description": "the package", "content": {"application/gzip": {}}},
                    "401": bad("unauthorized: unsigned, badly signed, out of the time window, or an unknown or removed hub"),
                    "404": bad("unknown_package: not in a deployment sent to this hub")}}},
            "/v1/hub/deployments/{id}/secrets": {"get": {"summary": "the secret values of a deployment sent to the signing hub",
                "security": [{"hub": []}],
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
                "responses": {"200": {"description": "{\"values\": {NAME: VALUE} or null}"},
                    "400": {"description": "the id is not a number"},
                    "401": bad("unauthorized"), "404": bad("unknown_deployment: not sent to this hub")}}}
        }
    })
}

fn path_param(name: &str) -> serde_json::Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn send(
        app: &Router,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = axum::http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    fn cloud() -> (tempfile::TempDir, Cloud) {
        let dir = tempfile::tempdir().unwrap();
        let c = Cloud::open(dir.path(), None).unwrap();
        (dir, c)
    }

    /// The paths the router serves, read from this file and hubs.rs, so a
    /// route added without its documentation fails the test below.
    fn served_paths() -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for src in [include_str!("api.rs"), include_str!("hubs.rs")] {
            let mut rest = src;
            while let Some(i) = rest.find(".route(") {
                rest = &rest[i + ".route(".len()..];
                let arg = rest.trim_start();
                if let Some(lit) = arg.strip_prefix("\"/") {
                    out.insert(format!("/{}", &lit[..lit.find('"').unwrap()]));
                } else if arg.starts_with("roost_fleet::CONNECT_PATH") {
                    out.insert(roost_fleet::CONNECT_PATH.to_owned());
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn every_route_is_documented_and_every_documented_operation_is_served_as_documented() {
        let (_d, c) = cloud();
        let app = router(c.clone());
        let doc = openapi();
        let documented: std::collections::BTreeSet<String> =
            doc["paths"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            served_paths(),
            documented,
            "the routes served and the paths documented differ"
        );
        let mut operations = 0;
        for (path, ops) in doc["paths"].as_object().unwrap() {
            let concrete = path
                .replace("{name}", "nobody")
                .replace("{shadow}", "roost-deployment")
                .replace("{id}", "7")
                .replace("{sha256}", &"0".repeat(64));
            for (method, op) in ops.as_object().unwrap() {
                operations += 1;
                let m = method.to_uppercase();
                let secured = op.get("security").is_some();
                let (status, _) = send(&app, &m, &concrete, None, "").await;
                if secured && path != roost_fleet::CONNECT_PATH {
                    assert_eq!(
                        status,
                        StatusCode::UNAUTHORIZED,
                        "{m} {path} without a token"
                    );
                }
                for body in ["{\"name\":\"x\"}", "not json", ""] {
                    let (status, _) = send(&app, &m, &concrete, Some(c.admin_token()), body).await;
                    assert!(
                        status != StatusCode::NOT_FOUND || op["responses"].get("404").is_some(),
                        "{m} {path} is documented but not served"
                    );
                    assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
                    assert!(
                        op["responses"].get(status.as_str()).is_some(),
                        "{m} {path} with {body:?} answered {status}, which the document does not list"
                    );
                }
                // Every other method on a documented path is refused.
                for other in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
                    if ops.get(other.to_lowercase()).is_none() {
                        let (status, _) =
                            send(&app, other, &concrete, Some(c.admin_token()), "").await;
                        assert!(
                            status == StatusCode::METHOD_NOT_ALLOWED
                                || status == StatusCode::NOT_FOUND,
                            "{other} {path} answered {status} but is not documented"
                        );
                    }
                }
            }
        }
        assert_eq!(operations, 14);
        // And nothing undocumented is served.
        let (status, v) = send(&app, "GET", "/v1/secrets", Some(c.admin_token()), "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(v["error"]["code"], "not_found");
    }

    #[tokio::test]
    async fn hubs_are_added_listed_and_removed_and_bad_input_is_refused() {
        let (_d, c) = cloud();
        let app = router(c.clone());
        let t = Some(c.admin_token());
        let (s, v) = send(
            &app,
            "POST",
            "/v1/hubs",
            t,
            r#"{"name":"shop-1","groups":["eu","eu","north"]}"#,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        assert_eq!(v["groups"], json!(["eu", "north"]));
        let token = v["enrolment_token"].as_str().unwrap();
        assert_eq!(token.len(), 64);
        // The token is kept only as its hash, and works once.
        let take = || {
            c.store
                .enrol(&token_hash(token), "key", now_ms())
                .unwrap()
                .map(|h| h.name)
        };
        assert_eq!(take().as_deref(), Some("shop-1"));
        assert_eq!(take(), None);
        let (s, v) = send(&app, "POST", "/v1/hubs", t, r#"{"name":"shop-1"}"#).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("hub_exists"))
        );
        for bad in [
            "",
            "[]",
            "{\"name\":\"a/b\"}",
            "{\"name\":\"ok\",\"groups\":[\"+\"]}",
            "{\"name\":\"ok\",\"token_ttl_s\":0}",
            "{\"name\":\"ok\",\"token_ttl_s\":99999999999}",
            "{\"name\":\"ok\",\"surprise\":1}",
            &format!("{{\"name\":\"{}\"}}", "n".repeat(65)),
        ] {
            let (s, v) = send(&app, "POST", "/v1/hubs", t, bad).await;
            assert_eq!(
                (s, v["error"]["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some("bad_request")),
                "{bad}"
            );
        }
        let (s, v) = send(&app, "GET", "/v1/hubs", t, "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["hubs"].as_array().unwrap().len(), 1);
        assert_eq!(v["hubs"][0]["enrolled"], true);
        let (s, _) = send(&app, "GET", "/v1/hubs", Some("wrong"), "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = send(&app, "DELETE", "/v1/hubs/shop-1", t, "").await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, v) = send(&app, "DELETE", "/v1/hubs/shop-1", t, "").await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("unknown_hub"))
        );
    }

    #[tokio::test]
    async fn a_hub_enrols_once_with_its_token_and_a_valid_key() {
        let (_d, c) = cloud();
        let app = router(c.clone());
        let (_, v) = send(
            &app,
            "POST",
            "/v1/hubs",
            Some(c.admin_token()),
            r#"{"name":"shop-1","groups":["eu"]}"#,
        )
        .await;
        let token = v["enrolment_token"].as_str().unwrap().to_owned();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let body = |t: &str, k: &str| format!(r#"{{"token":"{t}","public_key":"{k}"}}"#);
        let good = hex::encode(key.as_bytes());
        for bad_key in ["", "zz", &"00".repeat(31), &"ab".repeat(33)] {
            let (s, v) = send(&app, "POST", "/v1/enrol", None, &body(&token, bad_key)).await;
            assert_eq!(
                (s, v["error"]["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some("bad_request")),
                "{bad_key}"
            );
        }
        let (s, v) = send(&app, "POST", "/v1/enrol", None, &body("forged", &good)).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("enrolment_refused"))
        );
        let (s, v) = send(&app, "POST", "/v1/enrol", None, &body(&token, &good)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(
            (v["hub"].as_str(), &v["groups"]),
            (Some("shop-1"), &json!(["eu"]))
        );
        assert_eq!(c.store.public_key("shop-1").unwrap(), Some(good.clone()));
        // Once only: a second hub with the same token is refused.
        let (s, _) = send(&app, "POST", "/v1/enrol", None, &body(&token, &good)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
}
