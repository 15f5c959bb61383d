//! `roost bench fleet`: the control plane (`roost cloud`, a process of its
//! own) with N simulated hubs held by this process, each enrolled for real
//! with its own ed25519 key and speaking the fleet protocol as
//! `roost-uplink` does on the wire. Three figures:
//!
//! - a group deployment to all N, from `POST /v1/deployments` until the
//!   cloud says every hub succeeded, against the same hubs doing only the
//!   bare signed package fetch (the least work a deployment can be); on
//!   SQLite, and on PostgreSQL when `ROOST_TEST_POSTGRES` names a server;
//! - the cloud's memory per connected hub (VmRSS delta / N), against a
//!   bare tokio-tungstenite WebSocket server holding the same connections;
//! - the bytes one real idle `roost hub` exchanges with its cloud over
//!   TLS, counted by a TCP proxy here, per heartbeat and per day.

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use roost_fleet::{CloudMsg, HubMsg, CONNECT_PATH, PROTOCOL};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The group every simulated hub is in.
const GROUP: &str = "bench";
/// Deployments measured per database, each followed by its baseline.
const ROUNDS: usize = 2;
/// How often the deployment is polled for completion.
const POLL: Duration = Duration::from_millis(100);
/// The heartbeat the idle figure is extrapolated to (the cloud's default).
const DEFAULT_HEARTBEAT_S: f64 = 60.0;
/// What Greengrass users measured on cellular links (cited, not measured).
const GREENGRASS_MIB_PER_DAY: f64 = 325.0;

pub async fn run(hubs: usize, idle_s: u64) -> Result<()> {
    crate::mqtt::raise_fd_limit();
    let n = hubs.max(1);
    println!("\n[fleet] roost cloud with {n} simulated hubs (this process), same machine");

    let bare = bare_ws_memory(n, None).await?;
    println!(
        "  bare WebSocket server (tokio-tungstenite defaults, one task a connection): {bare:.0} B per connection"
    );
    let small = bare_ws_memory(n, Some(4096)).await?;
    println!(
        "  the same with a 4 KiB read buffer (tungstenite's default is 128 KiB): {small:.0} B per connection"
    );

    let sqlite = fleet(None, n).await?;
    print_fleet("sqlite", &sqlite, bare, n);
    match std::env::var("ROOST_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => {
            let db = FreshDb::create(&url).await?;
            let pg = fleet(Some(&db.url), n).await;
            db.drop_later().await;
            match pg {
                Ok(pg) => print_fleet("postgres", &pg, bare, n),
                Err(e) => println!("  postgres: not measured: {e:#}"),
            }
        }
        _ => println!(
            "  (PostgreSQL skipped: ROOST_TEST_POSTGRES is not set; `. scripts/postgres.sh` starts a server and sets it)"
        ),
    }

    idle_bytes(idle_s).await
}

// ---------------------------------------------------------------------------
// The cloud process.

/// `roost cloud` on a temporary data dir, killed on drop.
struct CloudProcess {
    child: Child,
    /// host:port it serves on.
    addr: String,
    token: String,
    dir: tempfile::TempDir,
}

impl CloudProcess {
    fn start(database: Option<&str>, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let roost = crate::roost_binary()?;
        let log = std::fs::File::create(dir.path().join("cloud.log"))?;
        let mut cmd = Command::new(&roost);
        cmd.arg("cloud")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--http", "127.0.0.1:0", "--http-max-connections", "20000"])
            .args(extra)
            .env("ROOST_LOG", "warn")
            .env_remove("ROOST_CLOUD_DATABASE")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(url) = database {
            cmd.args(["--database", url]);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start roost cloud from {}", roost.display()))?;
        let mut cloud = CloudProcess {
            child,
            addr: String::new(),
            token: String::new(),
            dir,
        };
        let endpoints = cloud.dir.path().join("endpoints.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(t) = std::fs::read_to_string(&endpoints) {
                let v: Value = serde_json::from_str(&t)?;
                cloud.addr = v["http"].as_str().unwrap_or_default().to_owned();
                break;
            }
            if let Some(status) = cloud.child.try_wait()? {
                bail!("roost cloud exited ({status}): {}", cloud.log_tail());
            }
            if Instant::now() > deadline {
                bail!("roost cloud did not start: {}", cloud.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        cloud.token = std::fs::read_to_string(cloud.dir.path().join("admin-token"))?
            .trim()
            .to_owned();
        Ok(cloud)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("cloud.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        // A panic's message, not its backtrace.
        if let Some(i) = lines.iter().position(|l| l.contains("panicked at")) {
            return lines[i..(i + 2).min(lines.len())].join(" ");
        }
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for CloudProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The operators' API of one cloud, with its admin token.
#[derive(Clone)]
struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Admin {
    fn new(base: String, token: String) -> Result<Self> {
        let http = reqwest::Client::builder()
            // Only ever this machine's own cloud, with a certificate made here.
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Admin { http, base, token })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let resp = req.bearer_auth(&self.token).send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("the cloud answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Uploads a package; its SHA-256 and the fleet's signature.
    async fn upload(&self, bytes: Vec<u8>) -> Result<(String, String)> {
        let v = self
            .send(
                self.http
                    .post(format!("{}/v1/packages", self.base))
                    .header("content-type", "application/gzip")
                    .body(bytes),
            )
            .await?;
        Ok((
            v["sha256"].as_str().unwrap_or_default().to_owned(),
            v["signature"].as_str().unwrap_or_default().to_owned(),
        ))
    }
}

/// A fresh database on the PostgreSQL server `ROOST_TEST_POSTGRES` names,
/// so the fleet starts empty whatever ran there before.
struct FreshDb {
    admin: String,
    name: String,
    url: String,
}

impl FreshDb {
    async fn create(admin: &str) -> Result<Self> {
        let name = format!("roost_bench_{:016x}", rand::random::<u64>());
        let (a, n) = (admin.to_owned(), name.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut c = postgres::Client::connect(&a, postgres::NoTls)
                .context("cannot connect to ROOST_TEST_POSTGRES")?;
            c.batch_execute(&format!("CREATE DATABASE {n}"))?;
            Ok(())
        })
        .await??;
        Ok(FreshDb {
            url: with_dbname(admin, &name),
            admin: admin.to_owned(),
            name,
        })
    }

    async fn drop_later(self) {
        let _ = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut c = postgres::Client::connect(&self.admin, postgres::NoTls)?;
            c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))?;
            Ok(())
        })
        .await;
    }
}

/// `url` naming database `name` instead.
fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let start = base.find("://").map_or(0, |i| i + 3);
    let end = base[start..].find('/').map_or(base.len(), |i| start + i);
    format!("{}/{name}{query}", &base[..end])
}

fn rss_kb(pid: u32) -> u64 {
    crate::mqtt::rss_kb(pid)
}

// ---------------------------------------------------------------------------
// Simulated hubs.

/// What a simulated hub keeps of its enrolment.
struct Enrolled {
    name: String,
    key: ed25519_dalek::SigningKey,
    /// The fleet's package-signing key, from the enrolment's answer.
    signing_key: String,
}

/// Adds `n` hubs to the group and enrols each with a key of its own.
async fn enrol_all(admin: &Admin, n: usize) -> Result<Vec<Enrolled>> {
    let gate = Arc::new(Semaphore::new(16));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (admin, gate) = (admin.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let name = format!("sim-{i:05}");
            let added = admin
                .post("/v1/hubs", &json!({"name": name, "groups": [GROUP]}))
                .await?;
            let token = added["enrolment_token"]
                .as_str()
                .ok_or_else(|| anyhow!("no enrolment token in {added}"))?;
            let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
            let resp = admin
                .http
                .post(format!("{}/v1/enrol", admin.base))
                .json(&json!({"token": token, "public_key": roost_fleet::public_hex(&key)}))
                .send()
                .await?;
            if !resp.status().is_success() {
                bail!("enrolment refused: {}", resp.text().await?);
            }
            let v: Value = resp.json().await?;
            anyhow::Ok(Enrolled {
                name: v["hub"].as_str().unwrap_or_default().to_owned(),
                key,
                signing_key: v["signing_key"].as_str().unwrap_or_default().to_owned(),
            })
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// What every simulated hub shares.
struct Fleet {
    /// http://host:port of the cloud.
    base: String,
    /// The client the hubs fetch with; replaced before each measurement so
    /// every one starts on fresh connections, as a hub's first fetch does.
    http: Mutex<reqwest::Client>,
    succeeded: AtomicUsize,
    /// When the last hub sent `succeeded`, since `started`.
    last_succeeded_us: AtomicU64,
    started: Mutex<Instant>,
    errors: Mutex<Vec<String>>,
}

impl Fleet {
    fn client(&self) -> reqwest::Client {
        self.http.lock().expect("not poisoned").clone()
    }

    fn fresh_client(&self) -> Result<()> {
        *self.http.lock().expect("not poisoned") = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?;
        Ok(())
    }

    fn error(&self, e: String) {
        let mut errors = self.errors.lock().expect("not poisoned");
        if errors.len() < 5 {
            errors.push(e);
        }
    }
}

/// Told to a simulated hub by the bench.
enum Cmd {
    /// Fetch and check this package, nothing else (the baseline).
    Fetch {
        sha: String,
        signature: String,
        done: oneshot::Sender<Result<()>>,
    },
}

type Ws = WebSocketStream<TcpStream>;

fn ws_config() -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(roost_fleet::MAX_FRAME_BYTES);
    config.max_frame_size = Some(roost_fleet::MAX_FRAME_BYTES);
    config
}

async fn recv_msg(ws: &mut Ws) -> Result<CloudMsg> {
    loop {
        match ws.next().await {
            None => bail!("the cloud closed the connection"),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str())?),
            Some(Ok(Message::Close(_))) => bail!("the cloud closed the connection"),
            Some(Ok(_)) => {}
        }
    }
}

async fn send_msg(ws: &mut Ws, msg: &HubMsg) -> Result<()> {
    ws.send(Message::Text(serde_json::to_string(msg)?.into()))
        .await?;
    Ok(())
}

/// Connects, answers the challenge and is welcomed: the socket and the
/// heartbeat the cloud asked for.
async fn open_session(addr: &str, hub: &Enrolled) -> Result<(Ws, Duration)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{addr}{CONNECT_PATH}"),
        tcp,
        Some(ws_config()),
    )
    .await?;
    let nonce = match recv_msg(&mut ws).await? {
        CloudMsg::Challenge { nonce, protocol } if protocol == PROTOCOL => nonce,
        other => bail!("expected a challenge, got {other:?}"),
    };
    let hello = HubMsg::Hello {
        hub: hub.name.clone(),
        signature: roost_fleet::sign(&hub.key, &roost_fleet::connect_text(&hub.name, &nonce)),
        protocol: PROTOCOL,
    };
    send_msg(&mut ws, &hello).await?;
    match recv_msg(&mut ws).await? {
        CloudMsg::Welcome {
            heartbeat_s,
            signing_key,
            ..
        } => {
            if signing_key != hub.signing_key {
                bail!("the welcome's signing key is not the enrolment's");
            }
            Ok((ws, Duration::from_secs(heartbeat_s.clamp(1, 3600))))
        }
        other => bail!("expected a welcome, got {other:?}"),
    }
}

/// A signed GET of a package, its hash and the fleet's signature checked
/// as the agent checks them (the signature before anything is fetched).
async fn fetch_package(fleet: &Fleet, hub: &Enrolled, sha: &str, signature: &str) -> Result<()> {
    if !roost_fleet::verify(&hub.signing_key, &roost_fleet::package_text(sha), signature) {
        bail!("the package's signature is not the fleet's");
    }
    let path = format!("/v1/hub/packages/{sha}");
    let mut resp = signed_get(fleet, hub, &path).await?;
    let mut hash = Sha256::new();
    while let Some(chunk) = resp.chunk().await? {
        hash.update(&chunk);
    }
    if hex::encode(hash.finalize()) != sha {
        bail!("the package fetched does not hash to {sha}");
    }
    Ok(())
}

async fn signed_get(fleet: &Fleet, hub: &Enrolled, path: &str) -> Result<reqwest::Response> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let resp = fleet
        .client()
        .get(format!("{}{path}", fleet.base))
        .header(
            reqwest::header::AUTHORIZATION,
            roost_fleet::authorization(&hub.key, &hub.name, "GET", path, now),
        )
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("GET {path}: {} {}", resp.status(), resp.text().await?);
    }
    Ok(resp)
}

/// What a simulated hub remembers between deployments.
#[derive(Default)]
struct HubState {
    done: Option<i64>,
    applied: Option<i64>,
    local: i64,
}

async fn report(ws: &mut Ws, st: &HubState, id: i64, status: &str, reason: &str) -> Result<()> {
    // The shape `roost-uplink`'s agent reports.
    let reported = json!({
        "deployment": id,
        "status": status,
        "reason": reason,
        "applied": st.applied,
        "local_deployment": (st.local > 0).then_some(st.local),
        "drift": null,
    });
    send_msg(ws, &HubMsg::Report { reported }).await
}

/// A desired deployment as the agent takes it: downloading (the package,
/// then the deployment's secrets, both signed requests), applying,
/// checking, succeeded. Applying and checking cost nothing here: the
/// figure is the control plane's.
async fn apply(
    ws: &mut Ws,
    fleet: &Fleet,
    hub: &Enrolled,
    st: &mut HubState,
    d: &Value,
) -> Result<()> {
    let (Some(id), Some(sha), Some(sig)) = (
        d["deployment"].as_i64(),
        d["package"].as_str(),
        d["signature"].as_str(),
    ) else {
        return Ok(());
    };
    if st.done == Some(id) {
        return Ok(());
    }
    st.done = Some(id);
    report(
        ws,
        st,
        id,
        "downloading",
        &format!("fetching package {}", &sha[..12]),
    )
    .await?;
    let fetched = async {
        fetch_package(fleet, hub, sha, sig).await?;
        signed_get(fleet, hub, &format!("/v1/hub/deployments/{id}/secrets"))
            .await?
            .bytes()
            .await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = fetched {
        fleet.error(format!("{}: {e:#}", hub.name));
        return report(ws, st, id, "failed", &format!("{e:#}")).await;
    }
    report(
        ws,
        st,
        id,
        "applying",
        "the package's hash and the fleet's signature match; applying it",
    )
    .await?;
    st.applied = Some(id);
    st.local += 1;
    report(
        ws,
        st,
        id,
        "checking",
        &format!(
            "applied as local deployment {}; checking its health",
            st.local
        ),
    )
    .await?;
    report(
        ws,
        st,
        id,
        "succeeded",
        &format!("running as local deployment {}; healthy", st.local),
    )
    .await?;
    fleet.succeeded.fetch_add(1, Ordering::Relaxed);
    let at = fleet.started.lock().expect("not poisoned").elapsed();
    fleet
        .last_succeeded_us
        .fetch_max(at.as_micros() as u64, Ordering::Relaxed);
    Ok(())
}

/// One simulated hub's connection, until the bench drops its command
/// channel.
async fn hub_session(
    mut ws: Ws,
    heartbeat: Duration,
    hub: Enrolled,
    fleet: Arc<Fleet>,
    mut cmds: mpsc::Receiver<Cmd>,
) -> Result<()> {
    let mut st = HubState::default();
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                None | Some(Ok(Message::Close(_))) => bail!("{}: the cloud closed the connection", hub.name),
                Some(Err(e)) => bail!("{}: {e}", hub.name),
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<CloudMsg>(t.as_str()) {
                    Ok(CloudMsg::Shadow { name, document }) if name == "roost-deployment" => {
                        apply(&mut ws, &fleet, &hub, &mut st, &document["state"]["desired"]).await?;
                    }
                    Ok(CloudMsg::Refused { code, reason }) => bail!("{}: refused ({code}): {reason}", hub.name),
                    _ => {}
                },
                Some(Ok(_)) => {}
            },
            cmd = cmds.recv() => match cmd {
                None => {
                    let _ = ws.close(None).await;
                    return Ok(());
                }
                Some(Cmd::Fetch { sha, signature, done }) => {
                    let _ = done.send(fetch_package(&fleet, &hub, &sha, &signature).await);
                }
            },
            _ = tick.tick() => ws.send(Message::Ping(Vec::new().into())).await?,
        }
    }
}

/// Opens `hubs`' sessions (at most 64 handshakes at a time); their command
/// channels, and how long connecting all took.
async fn connect_all(
    addr: &str,
    hubs: Vec<Enrolled>,
    fleet: &Arc<Fleet>,
) -> Result<(Vec<mpsc::Sender<Cmd>>, Duration)> {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let mut opening = Vec::with_capacity(hubs.len());
    for hub in hubs {
        let (addr, gate, fleet) = (addr.to_owned(), gate.clone(), fleet.clone());
        opening.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let (ws, heartbeat) = open_session(&addr, &hub)
                .await
                .with_context(|| format!("{} could not connect", hub.name))?;
            drop(permit);
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                if let Err(e) = hub_session(ws, heartbeat, hub, fleet.clone(), rx).await {
                    fleet.error(format!("{e:#}"));
                }
            });
            anyhow::Ok(tx)
        }));
    }
    let mut cmds = Vec::with_capacity(opening.len());
    for o in opening {
        cmds.push(o.await??);
    }
    Ok((cmds, started.elapsed()))
}

/// A package of the example's files, distinct per `round` (so each
/// deployment is a new package).
fn package(round: usize) -> Result<Vec<u8>> {
    let manifest = format!(
        "# roost bench fleet, round {round}\n{}",
        crate::package::FILES[0].1
    );
    let mut files: Vec<(&str, &str)> = crate::package::FILES.to_vec();
    files[0].1 = &manifest;
    Ok(crate::package::package(&files)?)
}

/// What one database's run measured.
struct FleetFigures {
    connect_all: Duration,
    rss_before_kb: u64,
    rss_after_kb: u64,
    /// Per round: deployment, then the bare fetch by every hub.
    rounds: Vec<(Duration, Duration, Duration)>,
    package_bytes: usize,
}

async fn fleet(database: Option<&str>, n: usize) -> Result<FleetFigures> {
    let cloud = CloudProcess::start(database, &[])?;
    let r = fleet_on(&cloud, n).await;
    if r.is_err() {
        eprintln!("roost cloud's log, last lines:\n{}", cloud.log_tail());
    }
    r
}

async fn fleet_on(cloud: &CloudProcess, n: usize) -> Result<FleetFigures> {
    let base = format!("http://{}", cloud.addr);
    let admin = Admin::new(base.clone(), cloud.token.clone())?;
    let hubs = enrol_all(&admin, n).await?;
    let fleet = Arc::new(Fleet {
        base,
        http: Mutex::new(reqwest::Client::new()),
        succeeded: AtomicUsize::new(0),
        last_succeeded_us: AtomicU64::new(0),
        started: Mutex::new(Instant::now()),
        errors: Mutex::new(Vec::new()),
    });
    // The listing polled below, once before too, so its buffers are in
    // both measurements.
    admin.get("/v1/hubs").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kb = rss_kb(cloud.pid());
    let (cmds, connect_all) = connect_all(&cloud.addr, hubs, &fleet).await?;
    // Every hub is welcomed; give the cloud's per-session writes (connected_ms) time to land.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = admin.get("/v1/hubs").await?;
        let connected = v["hubs"]
            .as_array()
            .map_or(0, |h| h.iter().filter(|h| h["connected"] == true).count());
        if connected == n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {connected} of {n} hubs show as connected");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kb = rss_kb(cloud.pid());

    let mut rounds = Vec::new();
    let mut package_bytes = 0;
    for round in 0..ROUNDS {
        let bytes = package(round)?;
        package_bytes = bytes.len();
        let (sha, signature) = admin.upload(bytes).await?;
        fleet.fresh_client()?;
        fleet.succeeded.store(0, Ordering::Relaxed);
        fleet.last_succeeded_us.store(0, Ordering::Relaxed);
        let t0 = Instant::now();
        *fleet.started.lock().expect("not poisoned") = t0;
        let created = admin
            .post("/v1/deployments", &json!({"group": GROUP, "package": sha}))
            .await?;
        let id = created["deployment"]
            .as_i64()
            .ok_or_else(|| anyhow!("no deployment id in {created}"))?;
        if created["hubs"].as_u64() != Some(n as u64) {
            bail!("the deployment went to {} hubs, not {n}", created["hubs"]);
        }
        let d = loop {
            let d = admin.get(&format!("/v1/deployments/{id}")).await?;
            if d["state"] != "rolling_out" {
                break d;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!(
                    "deployment {id} still rolling out after 600 s: {}",
                    d["counts"]
                );
            }
            tokio::time::sleep(POLL).await;
        };
        let deploy = t0.elapsed();
        let ok = d["counts"]["succeeded"].as_u64().unwrap_or(0);
        if ok != n as u64 {
            bail!(
                "deployment {id} ended {} with {ok} of {n} succeeded ({}); first errors: {:?}",
                d["state"],
                d["counts"],
                fleet.errors.lock().expect("not poisoned")
            );
        }
        let last_report = Duration::from_micros(fleet.last_succeeded_us.load(Ordering::Relaxed));

        // The baseline: the same hubs, only fetching and checking the package.
        fleet.fresh_client()?;
        let t0 = Instant::now();
        let mut waits = Vec::with_capacity(n);
        for c in &cmds {
            let (done, wait) = oneshot::channel();
            c.send(Cmd::Fetch {
                sha: sha.clone(),
                signature: signature.clone(),
                done,
            })
            .await
            .map_err(|_| anyhow!("a simulated hub's session ended"))?;
            waits.push(wait);
        }
        for w in waits {
            w.await
                .map_err(|_| anyhow!("a simulated hub's session ended"))??;
        }
        let fetch = t0.elapsed();
        rounds.push((deploy, fetch, last_report));
    }
    drop(cmds);
    Ok(FleetFigures {
        connect_all,
        rss_before_kb,
        rss_after_kb,
        rounds,
        package_bytes,
    })
}

fn print_fleet(db: &str, f: &FleetFigures, bare_per_conn: f64, n: usize) {
    println!(
        "  {db}: {n} hubs connected in {:.2} s",
        f.connect_all.as_secs_f64()
    );
    for (i, (deploy, fetch, last)) in f.rounds.iter().enumerate() {
        println!(
            "    deployment {} to {n} hubs ({} B package): {:>8.3} s until the cloud said all succeeded (last report sent at {:.3} s); bare signed fetch by all {n}: {:>7.3} s  ({:.1}x)",
            i + 1,
            f.package_bytes,
            deploy.as_secs_f64(),
            last.as_secs_f64(),
            fetch.as_secs_f64(),
            deploy.as_secs_f64() / fetch.as_secs_f64()
        );
    }
    let per_hub = (f.rss_after_kb as f64 - f.rss_before_kb as f64) * 1024.0 / n as f64;
    println!(
        "    cloud VmRSS {:.1} -> {:.1} MB with the hubs connected: {per_hub:.0} B per hub  ({:.1}x the bare WebSocket server's {bare_per_conn:.0} B)",
        f.rss_before_kb as f64 / 1024.0,
        f.rss_after_kb as f64 / 1024.0,
        per_hub / bare_per_conn
    );
}

// ---------------------------------------------------------------------------
// The memory baseline: a WebSocket server that only holds its connections.

/// Serves WebSockets on 127.0.0.1 (the address on stdout), each connection
/// sent one text frame and then only read, until stdin closes. Run as
/// `roost-bench bare-ws` by [`bare_ws_memory`], a process of its own;
/// `ROOST_BENCH_WS_READ_BUFFER` sets tungstenite's read buffer.
pub fn bare_ws_server() -> Result<()> {
    let mut config = ws_config();
    if let Some(n) = std::env::var("ROOST_BENCH_WS_READ_BUFFER")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.read_buffer_size = n;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(mut ws) =
                        tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
                    else {
                        return;
                    };
                    let hello =
                        json!({"type": "challenge", "nonce": "0".repeat(32), "protocol": PROTOCOL});
                    if ws
                        .send(Message::Text(hello.to_string().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                });
            }
        });
        // Until the bench closes our stdin (or dies).
        let mut buf = [0u8; 64];
        let mut stdin = tokio::io::stdin();
        while stdin.read(&mut buf).await.unwrap_or(0) > 0 {}
        anyhow::Ok(())
    })
}

/// The bare server's VmRSS growth per connection, `n` connections.
async fn bare_ws_memory(n: usize, read_buffer: Option<usize>) -> Result<f64> {
    let me = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(&me);
    if let Some(b) = read_buffer {
        cmd.env("ROOST_BENCH_WS_READ_BUFFER", b.to_string());
    }
    let mut child = cmd
        .arg("bare-ws")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} bare-ws", me.display()))?;
    let mut out = child.stdout.take().expect("piped");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).await? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let addr = String::from_utf8(line)?;
    let pid = child.id().ok_or_else(|| anyhow!("bare-ws exited"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kb(pid);
    let gate = Arc::new(Semaphore::new(64));
    let mut opening = Vec::with_capacity(n);
    for _ in 0..n {
        let (addr, gate) = (addr.clone(), gate.clone());
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let (mut ws, _) = tokio_tungstenite::client_async_with_config(
                format!("ws://{addr}/"),
                tcp,
                Some(ws_config()),
            )
            .await?;
            match ws.next().await {
                Some(Ok(Message::Text(_))) => anyhow::Ok(ws),
                other => bail!("the bare server sent {other:?}"),
            }
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for o in opening {
        conns.push(o.await??);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kb(pid);
    drop(conns);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.shutdown().await;
    }
    let _ = child.kill().await;
    Ok((after as f64 - before as f64) * 1024.0 / n as f64)
}

// ---------------------------------------------------------------------------
// An idle hub's traffic.

/// Bytes through one proxied connection, each direction, and the reads
/// they came in (about one TCP segment each, for such small messages).
#[derive(Default)]
struct Counted {
    up: AtomicU64,
    down: AtomicU64,
    up_reads: AtomicU64,
    down_reads: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    up: u64,
    down: u64,
    up_reads: u64,
    down_reads: u64,
}

impl Counted {
    fn totals(&self) -> Totals {
        Totals {
            up: self.up.load(Ordering::Relaxed),
            down: self.down.load(Ordering::Relaxed),
            up_reads: self.up_reads.load(Ordering::Relaxed),
            down_reads: self.down_reads.load(Ordering::Relaxed),
        }
    }
}

/// A TCP proxy to the cloud that counts what passes, per connection.
struct Proxy {
    addr: String,
    conns: Arc<Mutex<Vec<Arc<Counted>>>>,
}

impl Proxy {
    async fn start(to: String) -> Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let conns: Arc<Mutex<Vec<Arc<Counted>>>> = Arc::default();
        let list = conns.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counted = Arc::new(Counted::default());
                list.lock().expect("not poisoned").push(counted.clone());
                let to = to.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&to).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let c2 = counted.clone();
                    let up = tokio::spawn(pipe(cr, sw, move |n| {
                        c2.up.fetch_add(n, Ordering::Relaxed);
                        c2.up_reads.fetch_add(1, Ordering::Relaxed);
                    }));
                    pipe(sr, cw, move |n| {
                        counted.down.fetch_add(n, Ordering::Relaxed);
                        counted.down_reads.fetch_add(1, Ordering::Relaxed);
                    })
                    .await;
                    let _ = up.await;
                });
            }
        });
        Ok(Proxy { addr, conns })
    }

    fn connections(&self) -> Vec<Totals> {
        self.conns
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|c| c.totals())
            .collect()
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: impl Fn(u64),
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                count(n as u64);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// A self-signed certificate for 127.0.0.1 (not a CA, as rustls insists).
fn certificate(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("openssl makes the cloud's TLS certificate for this figure")?;
    if !out.status.success() {
        bail!("openssl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((cert, key))
}

async fn idle_bytes(window_s: u64) -> Result<()> {
    const HEARTBEAT_S: u64 = 2;
    let certs = tempfile::tempdir()?;
    let (cert, key) = certificate(certs.path())?;
    let cloud = CloudProcess::start(
        None,
        &[
            "--tls-cert",
            cert.to_str().unwrap_or_default(),
            "--tls-key",
            key.to_str().unwrap_or_default(),
            "--heartbeat-s",
            &HEARTBEAT_S.to_string(),
        ],
    )?;
    let admin = Admin::new(format!("https://{}", cloud.addr), cloud.token.clone())?;
    let proxy = Proxy::start(cloud.addr.clone()).await?;
    // The operator's way: `roost cloud hubs add`, straight to the cloud.
    let roost = crate::roost_binary()?;
    let out = Command::new(&roost)
        .args(["cloud", "hubs", "add", "idle-hub", "--group", "idle"])
        .arg("--cloud")
        .arg(format!("https://{}", cloud.addr))
        .arg("--cloud-cert")
        .arg(&cert)
        .arg("--data-dir")
        .arg(cloud.data_dir())
        .env_remove("ROOST_CLOUD_TOKEN")
        .output()?;
    if !out.status.success() {
        bail!(
            "roost cloud hubs add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    if roost_fleet::token_pin(&token).is_none() {
        bail!("the enrolment token carries no pin of the cloud's key");
    }
    let cloud_url = format!("https://{}", proxy.addr);
    let hub = crate::HubProcess::start(&["--cloud", &cloud_url, "--enrol", &token])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = admin.get("/v1/hubs").await?;
        if v["hubs"][0]["connected"] == true {
            break;
        }
        if Instant::now() > deadline {
            bail!("the hub did not connect: {v}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the connect: two heartbeats in, then the measured window.
    tokio::time::sleep(Duration::from_secs(2 * HEARTBEAT_S)).await;
    let at_start = proxy.connections();
    let ws_index = at_start.len() - 1;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(window_s.max(4 * HEARTBEAT_S))).await;
    let at_end = proxy.connections();
    let elapsed = t0.elapsed().as_secs_f64();
    drop(hub);
    if at_end.len() != at_start.len() {
        bail!("the hub opened another connection during the window (it reconnected?)");
    }
    let (a, b) = (at_start[ws_index], at_end[ws_index]);
    let intervals = elapsed / HEARTBEAT_S as f64;
    let per = |x: u64, y: u64| (y - x) as f64 / intervals;
    let (up, down) = (per(a.up, b.up), per(a.down, b.down));
    let segments = per(a.up_reads, b.up_reads) + per(a.down_reads, b.down_reads);
    // The connection before the window: TLS handshake, upgrade, challenge,
    // hello, welcome and the two heartbeats since (taken off).
    let connect = (a.up + a.down) as f64 - 2.0 * (up + down);
    let enrol: u64 = at_start[..ws_index].iter().map(|t| t.up + t.down).sum();
    let per_day_intervals = 86_400.0 / DEFAULT_HEARTBEAT_S;
    let day = (up + down) * per_day_intervals + connect;
    // IPv4 (20) + TCP with timestamps (32) per segment; each data segment
    // counted with an ACK of its own (an upper bound: ACKs piggyback).
    let day_wire = day + segments * per_day_intervals * 2.0 * 52.0;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "\n[fleet] one idle roost hub <-> roost cloud over TLS (pinned), through a counting proxy, heartbeat {HEARTBEAT_S} s, {elapsed:.0} s window"
    );
    println!(
        "  per heartbeat: {up:.1} B up (ping), {down:.1} B down (pong), {segments:.1} reads; enrolment {enrol} B once; connect {connect:.0} B"
    );
    println!(
        "  per day at the default {DEFAULT_HEARTBEAT_S:.0} s heartbeat (one connect a day): {:.1} KiB of TLS payload, <= {:.1} KiB with TCP/IP headers",
        day / 1024.0,
        day_wire / 1024.0
    );
    println!(
        "  target < 1 MiB/day: {:.3} of it; Greengrass users' {GREENGRASS_MIB_PER_DAY} MiB/day on cellular (cited, not measured here) is {:.0}x that",
        mib(day_wire),
        GREENGRASS_MIB_PER_DAY / mib(day_wire)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_is_pointed_at_another_database() {
        assert_eq!(
            with_dbname("postgres://u@h:5/postgres", "x"),
            "postgres://u@h:5/x"
        );
        assert_eq!(with_dbname("postgres://u@h:5", "x"), "postgres://u@h:5/x");
        assert_eq!(
            with_dbname("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
