//! The hubs' side of the cloud.
//!
//! - `GET /v1/hub/connect`: the WebSocket each hub keeps open. The cloud
//!   sends a challenge; the hub signs it with the key it enrolled with; a
//!   hub that is unknown, removed or signs wrongly is told why and closed.
//!   Then the cloud pushes the hub's `roost-deployment` shadow whenever it
//!   changes (a database event, whichever replica made the change), the
//!   hub reports into it, and either side notices the other gone within
//!   three heartbeats.
//! - `GET /v1/hub/packages/{sha256}` and `GET /v1/hub/deployments/{id}/secrets`:
//!   requests a hub signs (`Authorization: Roost-Hub NAME:TIME:SIG`), for
//!   its own deployments only.

use crate::api::error;
use crate::store::DEPLOYMENT_SHADOW;
use crate::StoreError;
use crate::{now_ms, random_hex, Cloud};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use futures::SinkExt;
use parking_lot::Mutex;
use roost_fleet::{CloudMsg, HubMsg, MAX_FRAME_BYTES, PROTOCOL};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot};

/// Time a hub gets to answer the challenge.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The hubs connected to this replica: each one's session, so a second
/// connection of the same hub replaces the first.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
    next: AtomicU64,
}

impl Sessions {
    /// Registers a session of `hub`, ending the one it had here before.
    fn join(&self, hub: &str) -> (u64, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Some((_, old)) = self.open.lock().insert(hub.to_owned(), (id, tx)) {
            let _ = old.send(());
        }
        (id, rx)
    }

    /// Ends the registration; whether it was still this session's.
    fn leave(&self, hub: &str, id: u64) -> bool {
        let mut open = self.open.lock();
        if open.get(hub).is_some_and(|(i, _)| *i == id) {
            open.remove(hub);
            true
        } else {
            false
        }
    }

    /// Hubs connected to this replica.
    pub fn count(&self) -> usize {
        self.open.lock().len()
    }
}

pub(crate) async fn connect(State(cloud): State<Cloud>, ws: WebSocketUpgrade) -> Response {
    // A connected hub is mostly idle: small buffers (tungstenite's default
    // is 128 KiB to read, per connection), grown when a frame needs it.
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(2 * MAX_FRAME_BYTES)
        .on_upgrade(move |socket| session(cloud, socket))
}

async fn send(ws: &mut WebSocket, msg: &CloudMsg) -> Result<(), axum::Error> {
    let text = serde_json::to_string(msg).expect("messages serialize");
    ws.send(Message::Text(text.into())).await
}

async fn refuse(mut ws: WebSocket, code: &str, reason: String) {
    tracing::warn!(code, %reason, "a hub's connection was refused");
    let _ = send(
        &mut ws,
        &CloudMsg::Refused {
            code: code.into(),
            reason,
        },
    )
    .await;
    let _ = ws.close().await;
}

/// What a frame from a hub is.
enum Frame {
    Msg(HubMsg),
    /// A control frame or one this cloud does not know (a newer hub's).
    Other,
    Closed,
}

async fn next_frame(ws: &mut WebSocket) -> Frame {
    match ws.recv().await {
        Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()) {
            Ok(m) => Frame::Msg(m),
            Err(e) => {
                tracing::debug!(error = %e, "a hub sent a frame this cloud does not know");
                Frame::Other
            }
        },
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Frame::Closed,
        Some(Ok(_)) => Frame::Other,
    }
}

async fn session(cloud: Cloud, mut ws: WebSocket) {
    let nonce = random_hex(16);
    let challenge = CloudMsg::Challenge {
        nonce: nonce.clone(),
        protocol: PROTOCOL,
    };
    if send(&mut ws, &challenge).await.is_err() {
        return;
    }
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            match next_frame(&mut ws).await {
                Frame::Msg(m) => return Some(m),
                Frame::Other => continue,
                Frame::Closed => return None,
            }
        }
    })
    .await;
    let (hub, signature, protocol) = match hello {
        Ok(Some(HubMsg::Hello {
            hub,
            signature,
            protocol,
        })) => (hub, signature, protocol),
        Ok(Some(_)) => {
            return refuse(ws, "bad_hello", "the first message must be hello".into()).await
        }
        Ok(None) => return,
        Err(_) => {
            return refuse(
                ws,
                "bad_hello",
                format!("no hello within {} s", HELLO_TIMEOUT.as_secs()),
            )
            .await
        }
    };
    if protocol != PROTOCOL {
        return refuse(
            ws,
            "protocol",
            format!("this cloud speaks protocol {PROTOCOL}, the hub {protocol}: run the same roost version on both"),
        )
        .await;
    }
    let name = hub.clone();
    let record = match cloud
        .run(move |s| Ok((s.hub(&name)?, s.public_key(&name)?)))
        .await
    {
        Ok((Some(r), Some(key))) => (r, key),
        Ok(_) => {
            return refuse(
                ws,
                "unknown_hub",
                format!("no enrolled hub named {hub:?} is in the fleet: it was removed (`roost cloud hubs remove`) or never enrolled; an operator adds it again with `roost cloud hubs add`"),
            )
            .await
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read a hub's key");
            return refuse(ws, "unavailable", "the cloud's database failed; retry".into()).await;
        }
    };
    let (record, key) = record;
    if !roost_fleet::verify(&key, &roost_fleet::connect_text(&hub, &nonce), &signature) {
        return refuse(
            ws,
            "bad_signature",
            format!("the hello is not signed with {hub}'s enrolled key"),
        )
        .await;
    }
    // Subscribe before the first read of the shadow, so no change between
    // the two is missed.
    let mut events = cloud.store.db.events();
    let (session_id, mut replaced) = cloud.sessions.join(&hub);
    let name = hub.clone();
    let connected_at = now_ms();
    if let Err(e) = cloud
        .run(move |s| s.set_connected(&name, true, connected_at))
        .await
    {
        tracing::warn!(error = %e, hub, "cannot record the hub as connected");
    }
    tracing::info!(hub, "hub connected");
    let welcome = CloudMsg::Welcome {
        hub: hub.clone(),
        groups: record.groups.clone(),
        heartbeat_s: cloud.options.heartbeat.as_secs().max(1),
        signing_key: cloud.signing_public_key(),
    };
    let ended = run_session(
        &cloud,
        &mut ws,
        &hub,
        &key,
        welcome,
        &mut events,
        &mut replaced,
    )
    .await;
    match &ended {
        Ended::Replaced => {
            let _ = send(
                &mut ws,
                &CloudMsg::Refused {
                    code: "replaced".into(),
                    reason: "a newer connection of this hub took over".into(),
                },
            )
            .await;
        }
        Ended::Removed => {
            let _ = send(
                &mut ws,
                &CloudMsg::Refused {
                    code: "removed".into(),
                    reason: format!("hub {hub} was removed from the fleet"),
                },
            )
            .await;
        }
        Ended::Silent | Ended::Closed => {}
    }
    let _ = ws.close().await;
    if cloud.sessions.leave(&hub, session_id) {
        let name = hub.clone();
        let _ = cloud
            .run(move |s| s.set_disconnected(&name, connected_at, now_ms()))
            .await;
    }
    tracing::info!(hub, why = ?ended, "hub disconnected");
}

#[derive(Debug)]
enum Ended {
    Closed,
    Silent,
    Replaced,
    Removed,
}

async fn run_session(
    cloud: &Cloud,
    ws: &mut WebSocket,
    hub: &str,
    key: &str,
    welcome: CloudMsg,
    events: &mut broadcast::Receiver<String>,
    replaced: &mut oneshot::Receiver<()>,
) -> Ended {
    if send(ws, &welcome).await.is_err() {
        return Ended::Closed;
    }
    let heartbeat = cloud.options.heartbeat.max(Duration::from_secs(1));
    let mut sent_desired = None;
    if push_shadow(cloud, ws, hub, &mut sent_desired)
        .await
        .is_err()
    {
        return Ended::Closed;
    }
    let mut last_heard = Instant::now();
    let mut last_touched = Instant::now();
    let mut tick = tokio::time::interval(heartbeat);
    let desired = format!("desired:{hub}");
    let removed = format!("removed:{hub}");
    loop {
        tokio::select! {
            frame = next_frame(ws) => {
                last_heard = Instant::now();
                match frame {
                    Frame::Closed => return Ended::Closed,
                    Frame::Other | Frame::Msg(HubMsg::Heartbeat) => {}
                    Frame::Msg(HubMsg::Hello { .. }) => {}
                    Frame::Msg(HubMsg::Report { reported }) => {
                        let (name, key) = (hub.to_owned(), key.to_owned());
                        // Taken only from the hub that proved this key: a
                        // hub removed (and perhaps added again under its
                        // name) while this session missed the event is out.
                        let taken = cloud
                            .run(move |s| {
                                if s.public_key(&name)?.as_deref() != Some(key.as_str()) {
                                    return Err(StoreError::UnknownHub(name));
                                }
                                s.report(&name, &reported, now_ms())
                            })
                            .await;
                        match taken {
                            Ok(()) => {}
                            Err(StoreError::UnknownHub(_)) => return Ended::Removed,
                            // Unacknowledged: end the session, so the hub
                            // reconnects and sends its report again.
                            Err(e) => {
                                tracing::warn!(hub, error = %e, "a hub's report was not taken; the hub is asked to reconnect and send it again");
                                return Ended::Closed;
                            }
                        }
                    }
                }
                if last_touched.elapsed() >= heartbeat {
                    last_touched = Instant::now();
                    let name = vec![hub.to_owned()];
                    let _ = cloud.run(move |s| s.touch(&name, now_ms())).await;
                }
            }
            ev = events.recv() => {
                let push = match &ev {
                    Ok(e) if *e == removed => return Ended::Removed,
                    Ok(e) => *e == desired || e == "resync",
                    // Missed some: reread.
                    Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => return Ended::Closed,
                };
                if push && push_shadow(cloud, ws, hub, &mut sent_desired).await.is_err() {
                    return Ended::Closed;
                }
            }
            _ = &mut *replaced => return Ended::Replaced,
            _ = tick.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    return Ended::Silent;
                }
                // One read a heartbeat: a removal whose event was missed
                // ends the session here, and (the fallback to the push) the
                // shadow is sent if an event about it was missed (nothing
                // goes on the wire when it has not changed).
                let name = hub.to_owned();
                match cloud
                    .run(move |s| Ok((s.public_key(&name)?, s.shadow(&name, DEPLOYMENT_SHADOW)?)))
                    .await
                {
                    Ok((k, _)) if k.as_deref() != Some(key) => return Ended::Removed,
                    Ok((_, rec)) => {
                        if send_if_changed(ws, hub, rec, &mut sent_desired).await.is_err() {
                            return Ended::Closed;
                        }
                    }
                    Err(e) => tracing::warn!(hub, error = %e, "cannot read a hub's key and shadow"),
                }
            }
        }
    }
}

/// Sends the hub its `roost-deployment` shadow if its desired state
/// changed since it was last sent (the hub's own reports, which change the
/// shadow's version too, are not echoed back).
async fn push_shadow(
    cloud: &Cloud,
    ws: &mut WebSocket,
    hub: &str,
    sent: &mut Option<serde_json::Value>,
) -> Result<(), axum::Error> {
    let name = hub.to_owned();
    match cloud.run(move |s| s.shadow(&name, DEPLOYMENT_SHADOW)).await {
        Ok(rec) => send_if_changed(ws, hub, rec, sent).await,
        Err(e) => {
            tracing::warn!(hub, error = %e, "cannot read a hub's shadow");
            Ok(())
        }
    }
}

/// Sends `rec` (the hub's `roost-deployment` shadow) unless its desired
/// state is what was sent last.
async fn send_if_changed(
    ws: &mut WebSocket,
    hub: &str,
    rec: roost_shadows::ShadowRecord,
    sent: &mut Option<serde_json::Value>,
) -> Result<(), axum::Error> {
    if !rec.exists() {
        return Ok(());
    }
    let Ok(id) = roost_shadows::ShadowId::parse(hub, Some(DEPLOYMENT_SHADOW)) else {
        return Ok(());
    };
    let Ok(document) = rec.get(&id, None, (now_ms() / 1000) as u64) else {
        return Ok(());
    };
    let desired = document["state"]["desired"].clone();
    if sent.as_ref() == Some(&desired) {
        return Ok(());
    }
    *sent = Some(desired);
    send(
        ws,
        &CloudMsg::Shadow {
            name: DEPLOYMENT_SHADOW.into(),
            document,
        },
    )
    .await
}

/// The hub a signed request comes from, or the answer refusing it.
async fn signed_by(
    cloud: &Cloud,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<String, Response> {
    let refuse = |why: String| {
        tracing::warn!(%why, "a hub's request was refused");
        error(StatusCode::UNAUTHORIZED, "unauthorized", why)
    };
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some((hub, time, sig)) = roost_fleet::parse_authorization(header) else {
        return Err(refuse(
            "this endpoint is for hubs: sign the request with the hub's enrolled key (Authorization: Roost-Hub NAME:TIME:SIG)".into(),
        ));
    };
    if (now_ms() - time).abs() > roost_fleet::REQUEST_WINDOW_MS {
        return Err(refuse(format!(
            "the request's time is more than {} s from the cloud's clock: check the hub's clock (NTP)",
            roost_fleet::REQUEST_WINDOW_MS / 1000
        )));
    }
    let name = hub.to_owned();
    let key = cloud
        .run(move |s| s.public_key(&name))
        .await
        .map_err(crate::api::internal)?;
    let text = roost_fleet::request_text(method.as_str(), uri.path(), time);
    match key {
        Some(k) if roost_fleet::verify(&k, &text, sig) => Ok(hub.to_owned()),
        Some(_) => Err(refuse(format!(
            "the request is not signed with {hub}'s enrolled key"
        ))),
        None => Err(refuse(format!(
            "no enrolled hub named {hub:?} is in the fleet"
        ))),
    }
}

pub(crate) async fn package(
    State(cloud): State<Cloud>,
    Path(sha): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let hub = match signed_by(&cloud, &method, &uri, &headers).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let (name, key) = (hub.clone(), sha.clone());
    match cloud.run(move |s| s.package_for_hub(&name, &key)).await {
        Ok(Some(bytes)) => {
            tracing::info!(hub, package = %sha, bytes = bytes.len(), "package sent to a hub");
            ([(header::CONTENT_TYPE, "application/gzip")], bytes).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_package",
            format!("no package {sha} is in a deployment sent to hub {hub}"),
        ),
        Err(e) => crate::api::internal(e),
    }
}

pub(crate) async fn secrets(
    State(cloud): State<Cloud>,
    Path(id): Path<i64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let hub = match signed_by(&cloud, &method, &uri, &headers).await {
        Ok(h) => h,
        Err(r) => return r,
    };
    let name = hub.clone();
    match cloud.run(move |s| s.secrets_for_hub(&name, id)).await {
        Ok(Some(None)) => axum::Json(serde_json::json!({"values": null})).into_response(),
        Ok(Some(Some(sealed))) => match cloud.open_sealed(&sealed) {
            Some(values) => {
                let values: serde_json::Value =
                    serde_json::from_slice(&values).unwrap_or(serde_json::Value::Null);
                axum::Json(serde_json::json!({ "values": values })).into_response()
            }
            None => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the deployment's secrets do not open with the fleet's key",
            ),
        },
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_deployment",
            format!("no deployment {id} was sent to hub {hub}"),
        ),
        Err(e) => crate::api::internal(e),
    }
}
