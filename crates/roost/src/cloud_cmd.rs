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
    /// DATA_DIR/endpoints.json).
    #[arg(long, env = "ROOST_CLOUD_HTTP", default_value = "127.0.0.1:8430")]
    http: SocketAddr,
    /// Keep the fleet in PostgreSQL (postgres://...) instead of SQLite. Not
    /// built yet: refused with an error.
    #[arg(long, env = "ROOST_CLOUD_DATABASE")]
    database: Option<String>,
    /// Serve the API over TLS with this certificate (PEM). Not built yet:
    /// refused with an error (serve on loopback for now).
    #[arg(long, env = "ROOST_CLOUD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, env = "ROOST_CLOUD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log as lines for a person or as JSON objects.
    #[arg(long, env = "ROOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

#[derive(clap::Subcommand)]
enum CloudCommand {
    /// List the fleet's hubs, or add or remove one.
    Hubs(HubsArgs),
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

    fn send(&self, req: reqwest::blocking::RequestBuilder) -> Result<serde_json::Value> {
        let resp = req.bearer_auth(self.token()?).send().with_context(|| {
            format!(
                "cannot reach the cloud at {} (is `roost cloud` running?)",
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

fn http() -> Result<reqwest::blocking::Client> {
    Ok(reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()?)
}

pub fn run(args: CloudArgs) -> Result<()> {
    match args.command {
        None => serve(args.serve),
        Some(CloudCommand::Hubs(h)) => hubs(h),
    }
}

fn hubs(args: HubsArgs) -> Result<()> {
    let client = http()?;
    match args.command {
        Some(HubsCommand::Add {
            name,
            groups,
            token_ttl_s,
            cloud,
        }) => {
            let v = cloud.send(client.post(cloud.url("/v1/hubs")).json(&serde_json::json!({
                "name": name,
                "groups": groups,
                "token_ttl_s": token_ttl_s,
            })))?;
            // The token alone on stdout, for scripts; the rest to stderr.
            println!("{}", v["enrolment_token"].as_str().unwrap_or_default());
            eprintln!(
                "added hub {name}; start it with: roost hub --cloud {} --enrol TOKEN (the token works once, until {} ms since the epoch)",
                cloud.url, v["expires_ms"]
            );
            Ok(())
        }
        Some(HubsCommand::Remove { name, cloud }) => {
            cloud.send(client.delete(cloud.url(&format!("/v1/hubs/{name}"))))?;
            eprintln!("removed hub {name}");
            Ok(())
        }
        None => {
            let v = args.cloud.send(client.get(args.cloud.url("/v1/hubs")))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("{:<24} {:<10} GROUPS", "HUB", "ENROLLED");
            for h in v["hubs"].as_array().into_iter().flatten() {
                let groups: Vec<&str> = h["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|g| g.as_str())
                    .collect();
                println!(
                    "{:<24} {:<10} {}",
                    h["name"].as_str().unwrap_or(""),
                    if h["enrolled"] == true { "yes" } else { "no" },
                    groups.join(",")
                );
            }
            Ok(())
        }
    }
}

fn serve(opts: ServeOpts) -> Result<()> {
    init_logs(opts.log_format);
    if opts.tls_cert.is_some() {
        bail!("--tls-cert is not built yet for roost cloud: serve it on loopback, or behind a TLS proxy, for now");
    }
    if !opts.http.ip().is_loopback() {
        bail!(
            "--http {} is reachable from other machines, and roost cloud has no TLS yet: bind 127.0.0.1",
            opts.http
        );
    }
    // The database and the admin token are the cloud's own.
    // SAFETY: umask has no preconditions; set before any thread starts.
    unsafe { libc::umask(0o077) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cloud = roost_cloud::Cloud::open(&opts.data_dir, opts.database.as_deref())
            .with_context(|| {
                format!(
                    "cannot open the cloud's data dir {}",
                    opts.data_dir.display()
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
        write_endpoints(&opts.data_dir, addr)?;
        tracing::info!(http = %addr, data_dir = %opts.data_dir.display(), "roost cloud serving");
        axum::serve(listener, roost_cloud::api::router(cloud))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        tracing::info!("roost cloud stopped");
        Ok(())
    })
}

fn write_endpoints(data_dir: &Path, addr: SocketAddr) -> Result<()> {
    let endpoints = serde_json::json!({
        "http": addr.to_string(),
        "url": format!("http://{addr}"),
    });
    let tmp = data_dir.join("endpoints.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&endpoints)?)?;
    std::fs::rename(&tmp, data_dir.join("endpoints.json"))?;
    Ok(())
}
