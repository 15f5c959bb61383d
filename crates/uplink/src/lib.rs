//! The hub's side of the fleet.
//!
//! - `credential.rs`: enrolment and the credential it leaves.
//! - This file: the one connection a hub keeps to its cloud, a WebSocket
//!   over TLS pinned at enrolment. It answers the cloud's challenge with
//!   the hub's key, hands every `roost-deployment` shadow the cloud pushes
//!   to the agent, and sends the agent's latest report, on every change
//!   and again after each reconnect (reports are state, not a queue, so
//!   nothing piles up while the link is down). It reconnects with
//!   exponential back-off and jitter, and takes a silent link as gone
//!   after three heartbeats.
//! - `agent.rs`: applies the desired deployment.

mod agent;
mod credential;

pub use credential::{credential, Credential};

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use roost_fleet::{CloudMsg, HubMsg, PROTOCOL};
use roost_hub::Hub;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// How the uplink behaves.
#[derive(Clone, Debug)]
pub struct UplinkOptions {
    /// Where the agent keeps what it applied (`cloud-deployment.json`).
    pub data_dir: PathBuf,
    /// Time a deployment's health check gets.
    pub health_deadline: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl UplinkOptions {
    pub fn new(data_dir: PathBuf) -> Self {
        UplinkOptions {
            data_dir,
            health_deadline: Duration::from_secs(60),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// The uplink's counters, in the hub's registry.
#[derive(Clone, Default)]
pub struct UplinkMetrics {
    pub connected: Gauge,
    pub connects: Counter,
    pub deployments_applied: Counter,
    pub deployments_failed: Counter,
}

impl UplinkMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "roost_uplink_connected",
            "1 while the hub is connected to its cloud",
            self.connected.clone(),
        );
        registry.register(
            "roost_uplink_connects",
            "Connections made to the cloud",
            self.connects.clone(),
        );
        registry.register(
            "roost_uplink_deployments_applied",
            "Fleet deployments applied and healthy",
            self.deployments_applied.clone(),
        );
        registry.register(
            "roost_uplink_deployments_failed",
            "Fleet deployments that failed or were rolled back",
            self.deployments_failed.clone(),
        );
    }
}

/// The desired deployment, as the cloud's shadow holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub deployment: i64,
    pub package: String,
    pub signature: String,
}

impl Desired {
    /// From the `state.desired` of a `roost-deployment` document.
    fn from_document(doc: &Value) -> Option<Desired> {
        let d = &doc["state"]["desired"];
        Some(Desired {
            deployment: d["deployment"].as_i64()?,
            package: d["package"].as_str()?.to_owned(),
            signature: d["signature"].as_str()?.to_owned(),
        })
    }
}

/// What both halves of the uplink share.
pub(crate) struct Link {
    pub hub: Hub,
    pub credential: Credential,
    pub key: ed25519_dalek::SigningKey,
    pub options: UplinkOptions,
    pub metrics: UplinkMetrics,
    /// The cloud's HTTP client (pinned like the connection).
    pub http: reqwest::Client,
    pub desired: watch::Sender<Option<Desired>>,
    pub reported: watch::Sender<Value>,
}

impl Link {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.credential.cloud.trim_end_matches('/'))
    }

    /// A GET signed with the hub's key.
    pub fn signed_get(&self, path: &str) -> reqwest::RequestBuilder {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.http.get(self.url(path)).header(
            reqwest::header::AUTHORIZATION,
            roost_fleet::authorization(&self.key, &self.credential.hub, "GET", path, now),
        )
    }
}

/// Starts the uplink: the connection and the agent, for as long as the
/// hub runs.
pub fn start(
    hub: Hub,
    credential: Credential,
    options: UplinkOptions,
    metrics: UplinkMetrics,
) -> Result<()> {
    let key = credential.key()?;
    let http = async_client(credential.pin.as_deref())?;
    let link = Arc::new(Link {
        hub,
        key,
        options,
        metrics,
        http,
        desired: watch::channel(None).0,
        reported: watch::channel(Value::Null).0,
        credential,
    });
    let agent = agent::Agent::load(link.clone())?;
    tokio::spawn(agent.run());
    tokio::spawn(keep_connected(link));
    Ok(())
}

/// The rustls configuration for the cloud: pinned to its key when the
/// enrolment gave a pin, else the web's certificate authorities.
fn tls_config(pin: Option<&str>) -> Result<Arc<rustls::ClientConfig>> {
    match pin {
        Some(pin) => Ok(roost_fleet::tls::pinned_client_config(pin)?),
        None => {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            Ok(Arc::new(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ))
        }
    }
}

fn async_client(pin: Option<&str>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(600));
    if pin.is_some() {
        b = b.use_preconfigured_tls((*tls_config(pin)?).clone());
    }
    Ok(b.build()?)
}

pub fn blocking_client(pin: Option<&str>) -> Result<reqwest::blocking::Client> {
    let mut b = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
    if pin.is_some() {
        b = b.use_preconfigured_tls((*tls_config(pin)?).clone());
    }
    Ok(b.build()?)
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Socket = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// Why a session ended.
enum End {
    /// The cloud refused the hub; its code and reason.
    Refused(String, String),
    Lost(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for End {
    fn from(e: E) -> Self {
        End::Lost(e.into())
    }
}

async fn keep_connected(link: Arc<Link>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let end = session(&link).await;
        link.metrics.connected.set(0);
        // A session that lasted a while was healthy: start over small.
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        let wait = match end {
            End::Refused(code, reason)
                if matches!(code.as_str(), "unknown_hub" | "removed" | "bad_signature") =>
            {
                tracing::error!(%code, %reason, "the cloud refuses this hub; it keeps running its deployment and asks again in 5 minutes (to rejoin, an operator adds it again and the hub enrols with a new data dir)");
                Duration::from_secs(300)
            }
            End::Refused(code, reason) => {
                tracing::warn!(%code, %reason, "the cloud ended the connection");
                backoff
            }
            End::Lost(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in_s = backoff.as_secs(), "the connection to the cloud is down; the hub runs on, and reconnects");
                backoff
            }
        };
        // Jitter, so a fleet that lost its cloud does not return in step.
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        tokio::time::sleep(wait.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(link.options.max_backoff);
    }
}

async fn open_socket(link: &Link) -> Result<Socket> {
    let url = reqwest::Url::parse(&link.credential.cloud)
        .with_context(|| format!("--cloud {} is not a URL", link.credential.cloud))?;
    let host = url
        .host_str()
        .ok_or_else(|| anyhow!("--cloud has no host"))?
        .to_owned();
    let port = url
        .port_or_known_default()
        .ok_or_else(|| anyhow!("--cloud has no port"))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| anyhow!("connecting to {host}:{port} timed out"))??;
    let _ = tcp.set_nodelay(true);
    let (io, scheme): (Box<dyn Io>, &str) = match url.scheme() {
        "https" => {
            let connector =
                tokio_rustls::TlsConnector::from(tls_config(link.credential.pin.as_deref())?);
            let name = rustls::pki_types::ServerName::try_from(host.clone())?;
            let tls = connector
                .connect(name, tcp)
                .await
                .context("the TLS handshake with the cloud failed (is it the cloud this hub enrolled with? its key is pinned)")?;
            (Box::new(tls), "wss")
        }
        "http" => (Box::new(tcp), "ws"),
        other => bail!("--cloud must be http:// or https://, not {other}://"),
    };
    let ws_url = format!("{scheme}://{host}:{port}{}", roost_fleet::CONNECT_PATH);
    let mut config = WebSocketConfig::default();
    // Mostly idle: a small read buffer (the default is 128 KiB), grown
    // when a frame needs it.
    config.read_buffer_size = 4096;
    config.write_buffer_size = 0;
    config.max_message_size = Some(roost_fleet::MAX_FRAME_BYTES);
    config.max_frame_size = Some(roost_fleet::MAX_FRAME_BYTES);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::client_async_with_config(ws_url, io, Some(config)),
    )
    .await
    .map_err(|_| anyhow!("the WebSocket handshake with the cloud timed out"))??;
    Ok(ws)
}

async fn recv_msg(ws: &mut Socket) -> Result<Option<CloudMsg>> {
    loop {
        match ws.next().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()) {
                Ok(m) => return Ok(Some(m)),
                Err(e) => {
                    tracing::debug!(error = %e, "the cloud sent a message this hub does not know")
                }
            },
            Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Ok(_)) => {}
        }
    }
}

async fn send_msg(ws: &mut Socket, msg: &HubMsg) -> Result<()> {
    let text = serde_json::to_string(msg)?;
    ws.send(Message::Text(text.into())).await?;
    Ok(())
}

async fn session(link: &Link) -> End {
    let mut ws = match open_socket(link).await {
        Ok(ws) => ws,
        Err(e) => return End::Lost(e),
    };
    let nonce = match tokio::time::timeout(Duration::from_secs(20), recv_msg(&mut ws)).await {
        Ok(Ok(Some(CloudMsg::Challenge { nonce, protocol }))) if protocol == PROTOCOL => nonce,
        Ok(Ok(Some(CloudMsg::Challenge { protocol, .. }))) => {
            return End::Refused(
                "protocol".into(),
                format!("the cloud speaks protocol {protocol}, this hub {PROTOCOL}: run the same roost version on both"),
            )
        }
        Ok(Ok(_)) => return End::Lost(anyhow!("the cloud did not open with a challenge")),
        Ok(Err(e)) => return End::Lost(e),
        Err(_) => return End::Lost(anyhow!("no challenge from the cloud within 20 s")),
    };
    let hub = &link.credential.hub;
    let hello = HubMsg::Hello {
        hub: hub.clone(),
        signature: roost_fleet::sign(&link.key, &roost_fleet::connect_text(hub, &nonce)),
        protocol: PROTOCOL,
    };
    if let Err(e) = send_msg(&mut ws, &hello).await {
        return End::Lost(e);
    }
    let heartbeat = match tokio::time::timeout(Duration::from_secs(20), recv_msg(&mut ws)).await {
        Ok(Ok(Some(CloudMsg::Welcome {
            heartbeat_s,
            signing_key,
            ..
        }))) => {
            if link
                .credential
                .signing_key
                .as_deref()
                .is_some_and(|k| k != signing_key)
            {
                tracing::error!("the cloud's package-signing key is not the one this hub enrolled with; packages are checked against the enrolled one");
            }
            Duration::from_secs(heartbeat_s.clamp(1, 3600))
        }
        Ok(Ok(Some(CloudMsg::Refused { code, reason }))) => return End::Refused(code, reason),
        Ok(Ok(_)) => return End::Lost(anyhow!("the cloud did not welcome the hub")),
        Ok(Err(e)) => return End::Lost(e),
        Err(_) => return End::Lost(anyhow!("no welcome from the cloud within 20 s")),
    };
    link.metrics.connected.set(1);
    link.metrics.connects.inc();
    tracing::info!(hub, cloud = %link.credential.cloud, "connected to the cloud");
    match run(link, &mut ws, heartbeat).await {
        Ok(()) => End::Lost(anyhow!("the cloud closed the connection")),
        Err(e) => e,
    }
}

async fn run(link: &Link, ws: &mut Socket, heartbeat: Duration) -> Result<(), End> {
    let mut reported = link.reported.subscribe();
    let current = reported.borrow_and_update().clone();
    if !current.is_null() {
        send_msg(ws, &HubMsg::Report { reported: current }).await?;
    }
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            frame = ws.next() => {
                last_heard = Instant::now();
                match frame {
                    None | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<CloudMsg>(t.as_str()) {
                        Ok(CloudMsg::Shadow { name, document }) if name == roost_fleet_deployment_shadow() => {
                            let desired = Desired::from_document(&document);
                            link.desired.send_if_modified(|d| {
                                let changed = *d != desired;
                                *d = desired;
                                changed
                            });
                        }
                        Ok(CloudMsg::Refused { code, reason }) => return Err(End::Refused(code, reason)),
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "the cloud sent a message this hub does not know"),
                    },
                    Some(Ok(_)) => {}
                }
            }
            changed = reported.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let now = reported.borrow_and_update().clone();
                send_msg(ws, &HubMsg::Report { reported: now }).await?;
            }
            _ = tick.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    return Err(End::Lost(anyhow!("the cloud has been silent for three heartbeats")));
                }
                ws.send(Message::Ping(Vec::new().into())).await?;
            }
        }
    }
}

/// The shadow that carries a hub's deployment (the cloud's name for it).
fn roost_fleet_deployment_shadow() -> &'static str {
    "roost-deployment"
}
