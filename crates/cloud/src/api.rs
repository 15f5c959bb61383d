//! The operators' HTTP API: `GET /healthz`, `GET /openapi.json` (open to
//! all), and under `/v1` (the admin token as `Authorization: Bearer`) the
//! fleet's hubs: add one (answered with its one-time enrolment token),
//! list them, remove one. Errors are `{"error": {"code", "message"}}`, as
//! the hub's own API answers.

use crate::{now_ms, random_hex, token_hash, valid_name, Cloud, HubRecord, StoreError};
use axum::extract::{Path, Request, State};
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

/// The API, ready to serve.
pub fn router(cloud: Cloud) -> Router {
    let v1 = Router::new()
        .route("/v1/hubs", get(list_hubs).post(add_hub))
        .route("/v1/hubs/{name}", delete(remove_hub))
        .route_layer(axum::middleware::from_fn_with_state(
            cloud.clone(),
            authorize,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        // A hub's first call: its enrolment token is what authorizes it.
        .route("/v1/enrol", post(enrol))
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

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

fn internal(e: StoreError) -> Response {
    tracing::error!(error = %e, "the cloud's store failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
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
    let new: NewHub = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body is not a hub ({{\"name\", \"groups\", \"token_ttl_s\"}}): {e}"),
            )
        }
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
    let token = random_hex(32);
    let expires_ms = now + ttl.as_millis() as i64;
    match cloud.store.add_hub(&hub, &token_hash(&token), expires_ms) {
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
    let e: Enrolment = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body is not an enrolment ({{\"token\", \"public_key\"}}): {err}"),
            )
        }
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
    match cloud
        .store
        .enrol(&token_hash(&e.token), &e.public_key, now_ms())
    {
        Ok(Some(hub)) => {
            tracing::info!(hub = %hub.name, "hub enrolled");
            Json(json!({"hub": hub.name, "groups": hub.groups})).into_response()
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
    match cloud.store.hubs() {
        Ok(hubs) => {
            let hubs: Vec<_> = hubs
                .into_iter()
                .map(|h| {
                    json!({
                        "name": h.name,
                        "groups": h.groups,
                        "created_ms": h.created_ms,
                        "enrolled": h.enrolled_ms.is_some(),
                        "enrolled_ms": h.enrolled_ms,
                    })
                })
                .collect();
            Json(json!({ "hubs": hubs })).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn remove_hub(State(cloud): State<Cloud>, Path(name): Path<String>) -> Response {
    match cloud.store.remove_hub(&name) {
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
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer", "description": "DATA_DIR/admin-token"}},
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
                "get": {"summary": "the fleet's hubs", "security": [{"admin": []}], "responses": {
                    "200": {"description": "{\"hubs\": [Hub]}"}, "401": bad("no or a wrong admin token")}},
                "post": {"summary": "add a hub; answers its one-time enrolment token", "security": [{"admin": []}],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                            "name": {"type": "string"}, "groups": {"type": "array", "items": {"type": "string"}},
                            "token_ttl_s": {"type": "integer", "minimum": 1}}}}}},
                    "responses": {
                        "201": {"description": "{\"name\", \"groups\", \"enrolment_token\", \"expires_ms\"}"},
                        "400": bad("bad_request: not a hub, a bad name or TTL"),
                        "401": bad("no or a wrong admin token"),
                        "409": bad("hub_exists")}}
            },
            "/v1/enrol": {"post": {"summary": "a hub exchanges its one-time enrolment token for its place in the fleet",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["token", "public_key"], "additionalProperties": false, "properties": {
                        "token": {"type": "string"}, "public_key": {"type": "string", "description": "ed25519, hex"}}}}}},
                "responses": {
                    "200": {"description": "{\"hub\", \"groups\"}"},
                    "400": bad("bad_request: not an enrolment, or not an ed25519 key"),
                    "401": bad("enrolment_refused: the token is unknown, used or expired")}}},
            "/v1/hubs/{name}": {"delete": {"summary": "remove a hub: it is refused from then on", "security": [{"admin": []}],
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"204": {"description": "removed"}, "401": bad("no or a wrong admin token"), "404": bad("unknown_hub")}}}
        }
    })
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

    #[tokio::test]
    async fn every_documented_operation_is_served_and_guarded_as_documented() {
        let (_d, c) = cloud();
        let app = router(c.clone());
        let doc = openapi();
        let mut operations = 0;
        for (path, ops) in doc["paths"].as_object().unwrap() {
            let concrete = path.replace("{name}", "nobody");
            for (method, op) in ops.as_object().unwrap() {
                operations += 1;
                let m = method.to_uppercase();
                let secured = op.get("security").is_some();
                let (status, _) = send(&app, &m, &concrete, None, "").await;
                if secured {
                    assert_eq!(
                        status,
                        StatusCode::UNAUTHORIZED,
                        "{m} {path} without a token"
                    );
                }
                let (status, _) = send(
                    &app,
                    &m,
                    &concrete,
                    Some(c.admin_token()),
                    "{\"name\":\"x\"}",
                )
                .await;
                assert!(
                    status != StatusCode::NOT_FOUND || op["responses"].get("404").is_some(),
                    "{m} {path} is documented but not served"
                );
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
                assert!(
                    op["responses"].get(status.as_str()).is_some(),
                    "{m} {path} answered {status}, which the document does not list"
                );
            }
        }
        assert_eq!(operations, 6);
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
