//! `roost cloud`: runs the control plane, or (with a subcommand) is a
//! client of its HTTP API. Client commands find the cloud at `--cloud` and
//! its admin token in `ROOST_CLOUD_TOKEN` or `DATA_DIR/admin-token`.

use crate::hub_cmd::{init_logs, shutdown_signal, LogFormat};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Run the control plane (`roost cloud`), or manage the fleet through it.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CloudArgs {
    #[command(subcommand)]
    command: Option<CloudCommand>,
    #[command(flatten)]
    serve: ServeOpts,
}

#[derive(clap::Args)]
struct ServeOpts {
    /// Where the cloud keeps its state (the SQLite database, the admin
    /// token, endpoints.json).
    #[arg(
        long,
        env = "ROOST_CLOUD_DATA_DIR",
        default_value = "./roost-cloud-data"
    )]
    data_dir: PathBuf,
    /// Address of the HTTP API. Port 0 picks a free port (written to
    /// DATA_DIR/endpoints.json). An address other machines can reach needs
    /// --tls-cert and --tls-key.
    #[arg(long, env = "ROOST_CLOUD_HTTP", default_value = "127.0.0.1:8430")]
    http: SocketAddr,
    /// Keep the fleet in PostgreSQL (postgres://USER@HOST/DB) instead of
    /// the embedded SQLite database. Several `roost cloud` processes on one
    /// database serve the same fleet.
    #[arg(long, env = "ROOST_CLOUD_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// Serve the API over TLS with this certificate chain (PEM). Enrolment
    /// tokens then carry the pin of its key, and hubs trust only that key.
    #[arg(long, env = "ROOST_CLOUD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, env = "ROOST_CLOUD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// How often connected hubs send a heartbeat, in seconds; a hub silent
    /// for three is taken as gone.
    #[arg(long, env = "ROOST_CLOUD_HEARTBEAT_S", default_value_t = 60)]
    heartbeat_s: u64,
    /// A hub sent a deployment that reports no progress for this long
    /// gives up its place in the rollout (status timed_out, counted as a
    /// failure); it still applies the deployment when it returns. 0: wait
    /// for it for good.
    #[arg(
        long,
        env = "ROOST_CLOUD_ROLLOUT_HUB_TIMEOUT_S",
        default_value_t = 1800
    )]
    rollout_hub_timeout_s: u64,
    /// Largest package `roost cloud deploy` may upload, in bytes.
    #[arg(long, env = "ROOST_CLOUD_MAX_PACKAGE_BYTES", default_value_t = 64 << 20)]
    max_package_bytes: usize,
    /// HTTP connections open at once (each connected hub holds one).
    #[arg(
        long,
        env = "ROOST_CLOUD_HTTP_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    http_max_connections: usize,
    /// Log as lines for a person or as JSON objects.
    #[arg(long, env = "ROOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(clap::Subcommand)]
enum CloudCommand {
    /// List the fleet's hubs, or add or remove one.
    Hubs(HubsArgs),
    /// Deploy a manifest to a hub or to every hub of a group, through each
    /// hub's `roost-deployment` shadow.
    ///
    /// The manifest is validated with the same code as `roost deploy`, and
    /// refused whole with every problem listed. Each `[[secret]]`'s value is
    /// read from the variable its `value_env` names in this shell; the cloud
    /// seals it and hands it only to the target hubs, never in the package.
    Deploy(DeployArgs),
    /// List deployments, or show one with each hub's status.
    Deployments(DeploymentsArgs),
}

#[derive(clap::Args)]
struct DeployArgs {
    /// The manifest (TOML); `code` paths are relative to its folder.
    manifest: PathBuf,
    /// Deploy to this hub.
    #[arg(long, required_unless_present = "group", conflicts_with = "group")]
    hub: Option<String>,
    /// Deploy to every hub of this group (including hubs added to it later).
    #[arg(long)]
    group: Option<String>,
    /// Hubs deployed to at a time; the next batch starts once one is done
    /// (default: all at once).
    #[arg(long)]
    rollout_batch: Option<u32>,
    /// Stop the rollout once more than this share of its hubs failed
    /// ("10%" or "10"; default 100%).
    #[arg(long, value_parser = parse_percent)]
    max_failures: Option<u8>,
    /// Print the permission plan instead of deploying.
    #[arg(long)]
    plan: bool,
    /// Wait until every hub is done, printing progress; exit 1 unless all
    /// succeeded.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    cloud: CloudClient,
}

#[derive(clap::Args)]
struct DeploymentsArgs {
    /// Show this deployment, hub by hub.
    id: Option<i64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep printing the deployment's progress until every hub is done.
    #[arg(long, requires = "id")]
    follow: bool,
    #[command(flatten)]
    cloud: CloudClient,
}

fn parse_percent(s: &str) -> Result<u8, String> {
    let n: u8 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (0 to 100, e.g. 10%)"))?;
    if n > 100 {
        return Err(format!("{s} is over 100%"));
    }
    Ok(n)
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct HubsArgs {
    #[command(subcommand)]
    command: Option<HubsCommand>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cloud: CloudClient,
}

#[derive(clap::Subcommand)]
enum HubsCommand {
    /// Add a hub to the fleet and print its one-time enrolment token.
    Add {
        /// The hub's name (1 to 64 letters, digits, '-' or '_').
        name: String,
        /// A group it belongs to (repeat for more).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// How long the token works, in seconds (default a day).
        #[arg(long)]
        token_ttl_s: Option<u64>,
        #[command(flatten)]
        cloud: CloudClient,
    },
    /// Remove a hub: it is refused from then on.
    Remove {
        name: String,
        #[command(flatten)]
        cloud: CloudClient,
    },
}

/// How a client command reaches the cloud.
#[derive(clap::Args, Clone)]
struct CloudClient {
    /// The cloud's URL.
    #[arg(
        long = "cloud",
        env = "ROOST_CLOUD",
        default_value = "http://127.0.0.1:8430"
    )]
    url: String,
    /// The cloud's data dir, where its admin token is (when
    /// ROOST_CLOUD_TOKEN is not set).
    #[arg(
        long,
        env = "ROOST_CLOUD_DATA_DIR",
        default_value = "./roost-cloud-data"
    )]
    data_dir: PathBuf,
    /// Over https: trust the cloud that holds this certificate's key (the
    /// PEM it was started with), rather than the system's authorities.
    #[arg(long, env = "ROOST_CLOUD_CERT")]
    cloud_cert: Option<PathBuf>,
}

impl CloudClient {
    fn token(&self) -> Result<String> {
        if let Ok(t) = std::env::var("ROOST_CLOUD_TOKEN") {
            if !t.is_empty() {
                return Ok(t);
            }
        }
        let path = self.data_dir.join("admin-token");
        let t = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no admin token: set ROOST_CLOUD_TOKEN or pass the cloud's --data-dir (cannot read {})",
                path.display()
            )
        })?;
        Ok(t.trim().to_owned())
    }

    fn http(&self) -> Result<reqwest::blocking::Client> {
        let pin = match &self.cloud_cert {
            Some(pem) => Some(roost_fleet::tls::pem_pin(pem).with_context(|| {
                format!("cannot read the cloud's certificate {}", pem.display())
            })?),
            None => None,
        };
        roost_uplink::blocking_client(pin.as_deref())
    }

    fn send(&self, req: reqwest::blocking::RequestBuilder) -> Result<serde_json::Value> {
        let resp = req.bearer_auth(self.token()?).send().with_context(|| {
            format!(
                "cannot reach the cloud at {} (is `roost cloud` running? over https, pass --cloud-cert)",
                self.url
            )
        })?;
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        let body: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let msg = body["error"]["message"].as_str().unwrap_or(&text);
            bail!("{msg} ({status})");
        }
        Ok(body)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}

pub fn run(args: CloudArgs) -> Result<()> {
    match args.command {
        None => serve(args.serve),
        Some(CloudCommand::Hubs(h)) => hubs(h),
        Some(CloudCommand::Deploy(d)) => deploy(d),
        Some(CloudCommand::Deployments(d)) => deployments(d),
    }
}

fn hubs(args: HubsArgs) -> Result<()> {
    match args.command {
        Some(HubsCommand::Add {
            name,
            groups,
            token_ttl_s,
            cloud,
        }) => {
            let client = cloud.http()?;
            let v = cloud.send(client.post(cloud.url("/v1/hubs")).json(&serde_json::json!({
                "name": name,
                "groups": groups,
                "token_ttl_s": token_ttl_s,
            })))?;
            // The token alone on stdout, for scripts; the rest to stderr.
            println!("{}", v["enrolment_token"].as_str().unwrap_or_default());
            let hours = (v["expires_ms"].as_i64().unwrap_or(0) - now_ms()) as f64 / 3.6e6;
            eprintln!(
                "added hub {name}; start it with: roost hub --cloud {} --enrol TOKEN (the token works once, for the next {hours:.1} h)",
                cloud.url
            );
            Ok(())
        }
        Some(HubsCommand::Remove { name, cloud }) => {
            let client = cloud.http()?;
            cloud.send(client.delete(cloud.url(&format!("/v1/hubs/{name}"))))?;
            eprintln!("removed hub {name}");
            Ok(())
        }
        None => {
            let client = args.cloud.http()?;
            let v = args.cloud.send(client.get(args.cloud.url("/v1/hubs")))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let now = now_ms();
            println!(
                "{:<20} {:<9} {:<10} {:<8} {:<8} {:<12} GROUPS",
                "HUB", "ENROLLED", "CONNECTED", "DESIRED", "APPLIED", "STATUS"
            );
            for h in v["hubs"].as_array().into_iter().flatten() {
                let groups: Vec<&str> = h["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g.as_str())
                    .collect();
                let connected = if h["connected"] == true {
                    "yes".to_owned()
                } else {
                    match h["last_seen_ms"].as_i64() {
                        Some(t) => format!("{} ago", ago(now - t)),
                        None => "never".to_owned(),
                    }
                };
                let mut status = h["status"].as_str().unwrap_or("-").to_owned();
                if h["drift"].is_object() || h["drift"] == true {
                    status.push_str(" (drift)");
                }
                println!(
                    "{:<20} {:<9} {:<10} {:<8} {:<8} {:<12} {}",
                    h["name"].as_str().unwrap_or(""),
                    if h["enrolled"] == true { "yes" } else { "no" },
                    connected,
                    dash(&h["desired"]),
                    dash(&h["applied"]),
                    status,
                    groups.join(",")
                );
            }
            Ok(())
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A duration in ms, short: "45s", "12m", "3h", "2d".
fn ago(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn dash(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn deploy(args: DeployArgs) -> Result<()> {
    if args.plan {
        bail!("--plan (the permission plan of a deployment) comes with filesystem permissions, which are not built yet; deploy without it");
    }
    let cloud = &args.cloud;
    let client = cloud.http()?;
    let packed = crate::pack::pack(&args.manifest, crate::pack::Secrets::Apart)?;
    if !packed.secrets.is_empty() && !crate::client::secrets_may_travel_to(&cloud.url) {
        bail!(
            "the manifest has [[secret]]s and {} is plain HTTP to another machine; serve the cloud with --tls-cert/--tls-key and use its https:// address",
            cloud.url
        );
    }
    eprintln!(
        "uploading the package ({} bytes) to {}",
        packed.bytes.len(),
        cloud.url
    );
    let pkg = cloud.send(
        client
            .post(cloud.url("/v1/packages"))
            .header("content-type", "application/gzip")
            .body(packed.bytes),
    )?;
    let sha = pkg["sha256"].as_str().unwrap_or_default().to_owned();
    let mut body = serde_json::json!({
        "package": sha,
        "secrets": packed.secrets,
    });
    match (&args.hub, &args.group) {
        (Some(h), _) => body["hub"] = h.clone().into(),
        (_, Some(g)) => body["group"] = g.clone().into(),
        _ => bail!("give --hub HUB or --group GROUP"),
    }
    if let Some(b) = args.rollout_batch {
        body["rollout_batch"] = b.into();
    }
    if let Some(p) = args.max_failures {
        body["max_failures_pct"] = p.into();
    }
    let d = cloud.send(client.post(cloud.url("/v1/deployments")).json(&body))?;
    let id = d["deployment"].as_i64().unwrap_or_default();
    println!("{id}");
    eprintln!(
        "deployment {id}: package {} to {} hub(s); follow it with `roost cloud deployments {id} --follow`",
        &sha[..sha.len().min(12)],
        d["hubs"]
    );
    if args.wait {
        return follow(cloud, id, false);
    }
    Ok(())
}

fn deployments(args: DeploymentsArgs) -> Result<()> {
    let cloud = &args.cloud;
    let client = cloud.http()?;
    match args.id {
        Some(id) if args.follow => follow(cloud, id, args.json),
        Some(id) => {
            let d = cloud.send(client.get(cloud.url(&format!("/v1/deployments/{id}"))))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print_deployment(&d);
            }
            Ok(())
        }
        None => {
            let v = cloud.send(client.get(cloud.url("/v1/deployments")))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<6} {:<20} {:<14} {:<12} {:<9} COUNTS",
                "ID", "TARGET", "PACKAGE", "STATE", "DONE"
            );
            for d in v["deployments"].as_array().into_iter().flatten() {
                println!(
                    "{:<6} {:<20} {:<14} {:<12} {:<9} {}",
                    d["id"].to_string(),
                    target(&d["target"]),
                    d["package"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .take(12)
                        .collect::<String>(),
                    d["state"].as_str().unwrap_or(""),
                    format!("{}/{}", d["done"], d["total"]),
                    counts(&d["counts"])
                );
            }
            Ok(())
        }
    }
}

fn target(t: &serde_json::Value) -> String {
    match (t["hub"].as_str(), t["group"].as_str()) {
        (Some(h), _) => format!("hub {h}"),
        (_, Some(g)) => format!("group {g}"),
        _ => dash(t),
    }
}

fn counts(c: &serde_json::Value) -> String {
    c.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn print_deployment(d: &serde_json::Value) {
    println!(
        "deployment {} to {}: {} ({}/{} done; {})",
        d["id"],
        target(&d["target"]),
        d["state"].as_str().unwrap_or(""),
        d["done"],
        d["total"],
        counts(&d["counts"])
    );
    if let Some(r) = d["reason"].as_str() {
        println!("  {r}");
    }
    println!("{:<20} {:<12} REASON", "HUB", "STATUS");
    for h in d["hubs"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<12} {}",
            h["hub"].as_str().unwrap_or(""),
            h["status"].as_str().unwrap_or(""),
            h["reason"].as_str().unwrap_or("")
        );
    }
}

/// Polls a deployment until every hub is done, printing each change;
/// fails unless every hub succeeded.
fn follow(cloud: &CloudClient, id: i64, json: bool) -> Result<()> {
    let client = cloud.http()?;
    let mut last = String::new();
    loop {
        let d = cloud.send(client.get(cloud.url(&format!("/v1/deployments/{id}"))))?;
        let now = serde_json::to_string(&(&d["state"], &d["counts"], &d["hubs"]))?;
        if now != last {
            if json {
                println!("{}", serde_json::to_string(&d)?);
            } else {
                eprintln!(
                    "deployment {id}: {} ({}/{} done; {})",
                    d["state"].as_str().unwrap_or(""),
                    d["done"],
                    d["total"],
                    counts(&d["counts"])
                );
            }
            last = now;
        }
        let state = d["state"].as_str().unwrap_or("");
        if state != "rolling_out" {
            if !json {
                print_deployment(&d);
            }
            let all_ok = d["hubs"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|h| h["status"] == "succeeded");
            if !all_ok {
                bail!("deployment {id} ended {state}: not every hub succeeded");
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn serve(opts: ServeOpts) -> Result<()> {
    init_logs(opts.log_format);
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => Some(roost_api::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    if tls.is_none() && !opts.http.ip().is_loopback() {
        bail!(
            "--http {} is reachable from other machines: give --tls-cert and --tls-key (hub traffic is always TLS off this machine), or bind 127.0.0.1",
            opts.http
        );
    }
    let tls_pin = match &opts.tls_cert {
        Some(cert) => Some(
            roost_fleet::tls::pem_pin(cert)
                .with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?,
        ),
        None => None,
    };
    let options = roost_cloud::CloudOptions {
        heartbeat: std::time::Duration::from_secs(opts.heartbeat_s.max(1)),
        max_package_bytes: opts.max_package_bytes,
        tls_pin,
        rollout_hub_timeout: (opts.rollout_hub_timeout_s > 0)
            .then(|| std::time::Duration::from_secs(opts.rollout_hub_timeout_s)),
    };
    // The database and the admin token are the cloud's own.
    // SAFETY: umask has no preconditions; set before any thread starts.
    unsafe { libc::umask(0o077) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Opening runs the blocking database client: off the async workers.
        let (dir, database) = (opts.data_dir.clone(), opts.database.clone());
        let cloud = tokio::task::spawn_blocking(move || {
            roost_cloud::Cloud::open_with(&dir, database.as_deref(), options)
        })
        .await?
        .with_context(|| {
            format!(
                "cannot open the cloud's state (data dir {}{})",
                opts.data_dir.display(),
                if opts.database.is_some() {
                    ", and the --database"
                } else {
                    ""
                }
            )
        })?;
        let listener = tokio::net::TcpListener::bind(opts.http)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (is another roost cloud running? try --http 127.0.0.1:0)",
                    opts.http
                )
            })?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        write_endpoints(&opts.data_dir, addr, scheme)?;
        tracing::info!(
            url = %format!("{scheme}://{addr}"),
            data_dir = %opts.data_dir.display(),
            database = cloud.database_kind(),
            "roost cloud serving"
        );
        tokio::spawn(cloud.clone().keep_rollouts_moving());
        let limits = roost_api::ConnectionLimits {
            max_connections: opts.http_max_connections.max(1),
            // A hub's WebSocket is upgraded out of the HTTP idle timer; it
            // is watched by its heartbeats instead.
            ..Default::default()
        };
        roost_api::serve(
            listener,
            roost_cloud::api::router(cloud),
            roost_api::ServeConfig { tls, limits },
            shutdown_signal(),
        )
        .await?;
        tracing::info!("roost cloud stopped");
        Ok(())
    })
}

fn write_endpoints(data_dir: &Path, addr: SocketAddr, scheme: &str) -> Result<()> {
    let endpoints = serde_json::json!({
        "http": addr.to_string(),
        "url": format!("{scheme}://{addr}"),
    });
    let tmp = data_dir.join("endpoints.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&endpoints)?)?;
    std::fs::rename(&tmp, data_dir.join("endpoints.json"))?;
    Ok(())
}
