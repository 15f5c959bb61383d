//! `roost hub`: starts the hub and serves its API until SIGTERM or Ctrl-C,
//! then drains.

use anyhow::{bail, Context, Result};
use roost_hub::{Hub, HubConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct HubOpts {
    /// Where the hub keeps everything (store, code, compiled modules).
    #[arg(long, env = "ROOST_DATA_DIR", default_value = "./roost-data")]
    data_dir: PathBuf,
    /// Address of the HTTP API. Port 0 picks a free port; the address bound
    /// is written to DATA_DIR/endpoints.json. Anything but loopback needs --token.
    #[arg(long, env = "ROOST_HTTP", default_value = "127.0.0.1:8420")]
    http: SocketAddr,
    /// Address of the MQTT broker (devices on the LAN need 0.0.0.0:1883).
    /// Port 0 picks a free port (written to DATA_DIR/endpoints.json).
    #[arg(long, env = "ROOST_MQTT", default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Address of an MQTT-over-WebSockets listener (subprotocol `mqtt`).
    #[arg(long, env = "ROOST_MQTT_WS")]
    mqtt_ws: Option<SocketAddr>,
    /// Address of an MQTT-over-TLS listener (needs --mqtt-tls-cert and --mqtt-tls-key).
    #[arg(long, env = "ROOST_MQTTS", requires_all = ["mqtt_tls_cert", "mqtt_tls_key"])]
    mqtts: Option<SocketAddr>,
    /// PEM certificate chain of the MQTT TLS listener.
    #[arg(long, env = "ROOST_MQTT_TLS_CERT")]
    mqtt_tls_cert: Option<PathBuf>,
    /// PEM private key of the MQTT TLS listener.
    #[arg(long, env = "ROOST_MQTT_TLS_KEY")]
    mqtt_tls_key: Option<PathBuf>,
    /// PEM CA whose client certificates authenticate devices: the
    /// certificate's common name is the device's name.
    #[arg(long, env = "ROOST_MQTT_TLS_CLIENT_CA")]
    mqtt_tls_client_ca: Option<PathBuf>,
    /// Accept MQTT clients that give no user name (they may publish and
    /// subscribe anywhere). Off by default: devices log in with their name.
    #[arg(long, env = "ROOST_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// MQTT connections each MQTT listener (plain, TLS, WebSocket) keeps
    /// open at once (plus an eighth more for loopback clients); past it new
    /// ones are closed. Default: its share of the
    /// open-files limit (see --http-max-connections).
    #[arg(long, env = "ROOST_MQTT_MAX_CONNECTIONS")]
    mqtt_max_connections: Option<usize>,
    /// Largest MQTT packet accepted, in bytes.
    #[arg(long, env = "ROOST_MQTT_MAX_PACKET", default_value_t = 1 << 20)]
    mqtt_max_packet_bytes: usize,
    /// Messages waiting to be written to one MQTT client; past it, messages
    /// for that client are dropped.
    #[arg(long, env = "ROOST_MQTT_OUTGOING_BUFFER", default_value_t = 10_000)]
    mqtt_outgoing_buffer: usize,
    /// Bytes of messages waiting to be written to one MQTT client, or kept
    /// in memory for one offline persistent session; past it, the same as
    /// --mqtt-outgoing-buffer (a persistent session's QoS 1/2 messages
    /// stay in the store for its next connection).
    #[arg(long, env = "ROOST_MQTT_OUTGOING_BUFFER_BYTES", default_value_t = 16 << 20)]
    mqtt_outgoing_buffer_bytes: usize,
    /// Retained messages one device (or anonymous client id) may keep; past
    /// it, its retained publishes are refused (MQTT 5 QoS 1/2: reason 0x97
    /// quota exceeded; otherwise delivered but not retained).
    #[arg(long, env = "ROOST_MQTT_RETAINED_PER_DEVICE", default_value_t = 1_000)]
    mqtt_retained_per_device: usize,
    /// Bytes (topics, payloads, properties) of one device's retained messages.
    #[arg(long, env = "ROOST_MQTT_RETAINED_PER_DEVICE_BYTES", default_value_t = 8 << 20)]
    mqtt_retained_per_device_bytes: usize,
    /// Retained messages kept in all (the hub's own count too, and are
    /// never refused).
    #[arg(long, env = "ROOST_MQTT_RETAINED_TOTAL", default_value_t = 100_000)]
    mqtt_retained_total: usize,
    /// Bytes of all retained messages.
    #[arg(long, env = "ROOST_MQTT_RETAINED_TOTAL_BYTES", default_value_t = 128 << 20)]
    mqtt_retained_total_bytes: usize,
    /// Seconds a client's buffer may stay full before it is disconnected
    /// as not reading.
    #[arg(long, env = "ROOST_MQTT_SLOW_CLIENT_GRACE_S", default_value_t = 5)]
    mqtt_slow_client_grace_s: u64,
    /// Messages kept for an offline persistent MQTT session.
    #[arg(long, env = "ROOST_MQTT_SESSION_QUEUE", default_value_t = 1000)]
    mqtt_session_queue: usize,
    /// Device password checks (argon2, 19 MiB each) that may run at once.
    /// Default: one per core, at most 4.
    #[arg(long, env = "ROOST_MQTT_AUTH_CONCURRENCY")]
    mqtt_auth_concurrency: Option<usize>,
    /// How long a CONNECT may wait for a password check, in ms; past it
    /// the client is refused as busy (MQTT 5: 0x89, 3.1.1: 3) and retries.
    #[arg(long, env = "ROOST_MQTT_AUTH_WAIT_MS", default_value_t = 5000)]
    mqtt_auth_wait_ms: u64,
    /// Failed password checks a source address (an IPv6 /64), or a device,
    /// may have before its tries are refused unchecked (MQTT 5: 0x9F,
    /// 3.1.1: 3) for a wait that doubles from 1 s. A device is never
    /// backed off at an address it logged in from. 0 turns it off.
    #[arg(long, env = "ROOST_MQTT_AUTH_BACKOFF_AFTER", default_value_t = 5)]
    mqtt_auth_backoff_after: u32,
    /// The longest back-off wait, in seconds.
    #[arg(long, env = "ROOST_MQTT_AUTH_BACKOFF_MAX_S", default_value_t = 60)]
    mqtt_auth_backoff_max_s: u64,
    /// Largest CONNECT packet, in bytes, and over WebSocket what a client
    /// may send before it has logged in (plus 16 KiB for the upgrade).
    #[arg(long, env = "ROOST_MQTT_MAX_CONNECT_BYTES", default_value_t = 64 << 10)]
    mqtt_max_connect_bytes: usize,
    /// Memory running calls may reserve, in MiB (each running call reserves
    /// its task's memory_mb). Default: half of the machine's memory.
    #[arg(long, env = "ROOST_MEMORY_BUDGET_MB")]
    memory_budget_mb: Option<u64>,
    /// Calls that may run at once. Default: 8 per core.
    #[arg(long, env = "ROOST_CPU_SLOTS")]
    cpu_slots: Option<u32>,
    /// Calls that may wait for admission; past it calls get 429. Half of it
    /// is split evenly among the deployment's tasks and routes (each its
    /// own share), the other half is common: a noisy task or route fills
    /// its share and the common half, never another's share.
    #[arg(long, env = "ROOST_QUEUE_LIMIT", default_value_t = 1024)]
    queue_limit: usize,
    /// Bytes of input the calls waiting for admission may hold, in MiB (a
    /// waiting sync call holds its input in memory); past it calls get 429.
    #[arg(long, env = "ROOST_MAX_QUEUED_INPUT_MB", default_value_t = 128)]
    max_queued_input_mb: usize,
    /// Messages one route may hold waiting for delivery (besides the 16 it
    /// delivers at a time); past it new messages for that route are
    /// dropped and counted (roost_route_deliveries_total{outcome="dropped"}).
    #[arg(long, env = "ROOST_ROUTE_BACKLOG", default_value_t = 1000)]
    route_backlog: usize,
    /// Largest synchronous call input, in bytes.
    #[arg(long, env = "ROOST_MAX_SYNC_INPUT", default_value_t = 6 << 20)]
    max_sync_input: usize,
    /// Largest asynchronous call input, in bytes.
    #[arg(long, env = "ROOST_MAX_ASYNC_INPUT", default_value_t = 1 << 20)]
    max_async_input: usize,
    /// Most entries (files and folders) a deployment package may hold.
    #[arg(long, env = "ROOST_PACKAGE_MAX_ENTRIES", default_value_t = 65_536)]
    package_max_entries: usize,
    /// Deepest path in a deployment package, in levels (folders and file).
    #[arg(long, env = "ROOST_PACKAGE_MAX_DEPTH", default_value_t = 32)]
    package_max_depth: usize,
    /// Deployment packages being uploaded or deployed at once; past it, 429
    /// `too_many_uploads`.
    #[arg(long, env = "ROOST_MAX_CONCURRENT_UPLOADS", default_value_t = 2)]
    max_concurrent_uploads: usize,
    /// Disk the packages of inactive deployments (kept for rollback) may
    /// use, in MiB; past it the oldest are removed (the one `roost rollback`
    /// goes back to is always kept).
    #[arg(long, env = "ROOST_DEPLOYMENTS_DISK_BUDGET_MB", default_value_t = 1024)]
    deployments_disk_budget_mb: u64,
    /// Attempts an async call gets before it is kept as failed.
    #[arg(long, env = "ROOST_ASYNC_ATTEMPTS", default_value_t = 3)]
    async_attempts: u32,
    /// First retry delay of a failed async call, in ms (doubles each time).
    #[arg(long, env = "ROOST_RETRY_BACKOFF_MS", default_value_t = 1000)]
    retry_backoff_ms: u64,
    /// How long finished async calls and their outputs are kept, in seconds.
    #[arg(long, env = "ROOST_RETENTION_S", default_value_t = 86400)]
    retention_s: u64,
    /// On SIGTERM, how long running calls get to finish, in seconds.
    #[arg(long, env = "ROOST_GRACE_S", default_value_t = 10)]
    grace_s: u64,
    /// HTTP API connections open at once, plus an eighth more kept for
    /// clients on loopback (the CLI, tasks); past it a client gets 503
    /// `too_many_connections` (GET /healthz still answers), over TLS it is
    /// closed. Default: a quarter of the open-files limit left after a
    /// reserve of an eighth (at least 64), at most 4096; the MQTT listeners
    /// share the rest.
    #[arg(long, env = "ROOST_HTTP_MAX_CONNECTIONS")]
    http_max_connections: Option<usize>,
    /// Seconds an HTTP client gets to send a whole request head, on a new
    /// connection and between requests on a kept-alive one.
    #[arg(long, env = "ROOST_HTTP_HEADER_TIMEOUT_S", default_value_t = 20)]
    http_header_timeout_s: u64,
    /// Seconds an HTTP connection may move no bytes (a stalled request
    /// body, an answer the client does not read) before it is closed.
    #[arg(long, env = "ROOST_HTTP_IDLE_TIMEOUT_S", default_value_t = 60)]
    http_idle_timeout_s: u64,
    /// Bearer token required on every API request but /healthz.
    #[arg(long, env = "ROOST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM certificate chain: serve the API over TLS (with --tls-key).
    #[arg(long, env = "ROOST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "ROOST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The AWS region of the hub's local AWS APIs: tasks get it as AWS_REGION,
    /// DATA_DIR/aws-config names it, and signed requests must be scoped to it.
    #[arg(long, env = "ROOST_REGION", default_value = "us-east-1")]
    region: String,
    /// How process tasks' worker pools are sized: `demand` (the reservation
    /// policy: arrival rate x service time, with headroom) or `fixed`
    /// (exactly min_warm warm workers; extra workers are retired when idle).
    #[arg(long, env = "ROOST_POOL_POLICY", value_enum, default_value_t = PoolPolicy::Demand)]
    pool_policy: PoolPolicy,
    /// Largest shadow state (desired + reported, serialized), in bytes.
    #[arg(long, env = "ROOST_SHADOW_MAX_BYTES", default_value_t = 8192)]
    shadow_max_bytes: usize,
    /// Deepest nesting of objects inside a shadow's desired or reported.
    #[arg(long, env = "ROOST_SHADOW_MAX_DEPTH", default_value_t = 6)]
    shadow_max_depth: usize,
    /// Run each process task's workers under a user and group of its own
    /// (a code group's tasks share one), so a task cannot read the hub's
    /// key, store or credentials, nor another task's code. `auto`: on when
    /// the hub runs as root. `on` refuses to start otherwise. With it on, a
    /// task's runtime (its python, node, ...) must be readable by other
    /// users: not under a private home folder.
    #[arg(long, env = "ROOST_TASK_IDENTITIES", value_enum, default_value_t = TaskIdentities::Auto)]
    task_identities: TaskIdentities,
    /// Deploy the bundled example (tasks `echo` and `greet`) on start.
    #[arg(long)]
    example: bool,
    /// The control plane of the fleet this hub belongs to (`roost cloud`).
    #[arg(long, env = "ROOST_CLOUD")]
    cloud: Option<String>,
    /// At the first start with --cloud: the one-time enrolment token
    /// (`roost cloud hubs add NAME` prints it).
    #[arg(long, env = "ROOST_ENROL", requires = "cloud", hide_env_values = true)]
    enrol: Option<String>,
    /// Time a fleet deployment's health check gets (its min_warm workers
    /// ready and every task's health_check answered) before the hub rolls
    /// back.
    #[arg(long, env = "ROOST_CLOUD_HEALTH_DEADLINE_S", default_value_t = 60)]
    cloud_health_deadline_s: u64,
    /// Log format: `human` or `json`.
    #[arg(long, env = "ROOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

/// `--pool-policy`: how process tasks' worker pools are sized.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PoolPolicy {
    /// Arrival rate x service time, with headroom.
    Demand,
    /// Exactly min_warm warm workers.
    Fixed,
}

/// `--task-identities`: whether process tasks run as users of their own.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TaskIdentities {
    /// On when the hub runs as root.
    Auto,
    /// Always; the hub refuses to start if it cannot.
    On,
    /// Workers run as the hub's user.
    Off,
}

/// `--log-format`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Lines for a person.
    Human,
    /// One JSON object per line.
    Json,
}

/// The address local programs and tasks use to reach a listener: loopback
/// for one bound to every interface.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// Writes `DATA_DIR/aws-credentials` (the owner's keys, profile `roost`,
/// mode 0600) and `DATA_DIR/aws-config` (its region and the hub's
/// endpoint), so `AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE` and
/// `AWS_PROFILE=roost` point any SDK or the AWS CLI at the hub.
fn write_aws_profile(
    data_dir: &std::path::Path,
    hub: &Hub,
    url: &str,
    ca_bundle: Option<&std::path::Path>,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let owner = hub.owner_credential();
    let write = |name: &str, text: String| -> Result<()> {
        let path = data_dir.join(name);
        let tmp = data_dir.join(format!(".{name}.partial"));
        // A fresh file, never one (or a link) someone left in the way, so
        // the mode is always 0600.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    };
    write(
        "aws-credentials",
        format!(
            "[roost]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            owner.access_key_id, owner.secret_access_key
        ),
    )?;
    write(
        "aws-config",
        format!(
            "[profile roost]\nregion = {}\nendpoint_url = {url}\n{}",
            hub.config().region,
            ca_bundle
                .map(|c| format!("ca_bundle = {}\n", c.display()))
                .unwrap_or_default()
        ),
    )?;
    Ok(())
}

pub(crate) fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROOST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,cranelift=warn,wasmtime=warn")
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == LogFormat::Json {
        b.json().init();
    } else {
        b.init();
    }
}

pub fn run(opts: HubOpts) -> Result<()> {
    init_logs(opts.log_format);
    // Enrolment (blocking HTTP) happens before the runtime starts.
    let credential = match &opts.cloud {
        Some(cloud) => {
            std::fs::create_dir_all(&opts.data_dir).with_context(|| {
                format!("cannot create the data dir {}", opts.data_dir.display())
            })?;
            let c = roost_uplink::credential(&opts.data_dir, cloud, opts.enrol.as_deref())?;
            tracing::info!(hub = %c.hub, groups = ?c.groups, cloud, "a hub of the fleet");
            Some(c)
        }
        None => None,
    };
    if !opts.http.ip().is_loopback() && opts.token.is_none() {
        bail!(
            "--http {} is reachable from other machines; give a --token (and --tls-cert/--tls-key) or bind 127.0.0.1",
            opts.http
        );
    }
    if opts.task_identities == TaskIdentities::On && !roost_runtime_process::identity::can_switch()
    {
        bail!("--task-identities on needs the hub to run as root (or use auto/off)");
    }
    // Whatever the hub writes (store, keys, packages) is its own; what a
    // task needs is opened to that task explicitly.
    // SAFETY: umask has no preconditions; set before any thread starts.
    unsafe { libc::umask(0o077) };
    match roost_listen::raise_open_files() {
        Ok(f) => tracing::info!(
            open_files = f.now,
            was = f.was,
            hard = f.hard,
            "open-files limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("roost")
        .build()?;
    rt.block_on(serve(opts, credential))
}

async fn serve(opts: HubOpts, credential: Option<roost_uplink::Credential>) -> Result<()> {
    let mut config = HubConfig::new(opts.data_dir.clone());
    config.managed_by = credential.as_ref().map(|c| c.cloud.clone());
    if let Some(m) = opts.memory_budget_mb {
        config.memory_budget_mb = m;
    }
    if let Some(c) = opts.cpu_slots {
        config.cpu_slots = c.max(1);
    }
    config.queue_limit = opts.queue_limit;
    config.queued_input_limit = opts.max_queued_input_mb << 20;
    config.route_backlog = opts.route_backlog.max(1);
    config.max_sync_input = opts.max_sync_input;
    config.max_async_input = opts.max_async_input;
    config.package_max_entries = opts.package_max_entries.max(1);
    config.package_max_depth = opts.package_max_depth.max(1);
    config.max_concurrent_uploads = opts.max_concurrent_uploads.max(1);
    config.deployments_disk_budget = opts.deployments_disk_budget_mb << 20;
    config.async_attempts = opts.async_attempts.max(1);
    config.retry_backoff = Duration::from_millis(opts.retry_backoff_ms);
    config.retention = Duration::from_secs(opts.retention_s);
    config.region = opts.region.clone();
    let runtimes = crate::assembly::RuntimeOptions {
        pool_policy: match opts.pool_policy {
            PoolPolicy::Fixed => roost_runtime_process::pool::PoolPolicy::Fixed,
            PoolPolicy::Demand => roost_runtime_process::pool::PoolPolicy::Demand,
        },
        task_identities: {
            use roost_runtime_process::identity::{can_switch, Mode};
            match opts.task_identities {
                TaskIdentities::On => Mode::On,
                TaskIdentities::Auto if can_switch() => Mode::Auto,
                TaskIdentities::Auto | TaskIdentities::Off => Mode::Off,
            }
        },
        ..Default::default()
    };
    let broker = roost_broker::BrokerConfig {
        allow_anonymous: opts.allow_anonymous,
        max_packet_bytes: opts.mqtt_max_packet_bytes,
        session_queue_limit: opts.mqtt_session_queue,
        outgoing_buffer: opts.mqtt_outgoing_buffer.max(1),
        outgoing_buffer_bytes: opts.mqtt_outgoing_buffer_bytes,
        retained: roost_broker::RetainedLimits {
            per_device: opts.mqtt_retained_per_device,
            per_device_bytes: opts.mqtt_retained_per_device_bytes,
            total: opts.mqtt_retained_total,
            total_bytes: opts.mqtt_retained_total_bytes,
        },
        slow_client_grace: Duration::from_secs(opts.mqtt_slow_client_grace_s),
        login: roost_broker::LoginLimits {
            concurrency: opts
                .mqtt_auth_concurrency
                .unwrap_or_else(roost_broker::LoginLimits::default_concurrency)
                .max(1),
            wait: Duration::from_millis(opts.mqtt_auth_wait_ms),
            backoff_after: opts.mqtt_auth_backoff_after,
            backoff_max: Duration::from_secs(opts.mqtt_auth_backoff_max_s.max(1)),
            max_connect_bytes: opts.mqtt_max_connect_bytes,
        },
    };
    let listener = tokio::net::TcpListener::bind(opts.http)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another hub running? try --http 127.0.0.1:0)",
                opts.http
            )
        })?;
    let addr = listener.local_addr()?;
    let mqtt_listener = tokio::net::TcpListener::bind(opts.mqtt)
        .await
        .with_context(|| format!("cannot listen for MQTT on {} (is mosquitto or another hub running? try --mqtt 127.0.0.1:0)", opts.mqtt))?;
    let mqtt_addr = mqtt_listener.local_addr()?;
    let mqtts = match (opts.mqtts, &opts.mqtt_tls_cert, &opts.mqtt_tls_key) {
        (Some(a), Some(cert), Some(key)) => {
            let tls =
                roost_broker::tls::MqttTls::load(cert, key, opts.mqtt_tls_client_ca.as_deref())
                    .context("cannot set up MQTT over TLS")?;
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for MQTT/TLS on {a}"))?;
            Some((l, tls))
        }
        _ => None,
    };
    let mqtts_addr = mqtts.as_ref().and_then(|(l, _)| l.local_addr().ok());
    let mqtt_ws = match opts.mqtt_ws {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for MQTT/WebSocket on {a}"))?,
        ),
        None => None,
    };
    let mqtt_ws_addr = mqtt_ws.as_ref().and_then(|l| l.local_addr().ok());
    let scheme = if opts.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    config.shadow_limits.max_state_bytes = opts.shadow_max_bytes;
    config.shadow_limits.max_depth = opts.shadow_max_depth;
    config.api_url = Some(format!("{scheme}://{}", reachable(addr)));
    config.api_ca_bundle = opts.tls_cert.clone();
    let uplink_metrics = roost_uplink::UplinkMetrics::default();
    let register = uplink_metrics.clone();
    let (hub, broker) = crate::assembly::start_hub(
        config,
        runtimes,
        broker,
        vec![Box::new(
            move |r: &mut prometheus_client::registry::Registry| register.register(r),
        )],
    )
    .await
    .with_context(|| {
        format!(
            "cannot start the hub with data dir {}",
            opts.data_dir.display()
        )
    })?;
    if let Some(c) = credential {
        let mut uplink = roost_uplink::UplinkOptions::new(opts.data_dir.clone());
        uplink.health_deadline = std::time::Duration::from_secs(opts.cloud_health_deadline_s);
        roost_uplink::start(hub.clone(), c, uplink, uplink_metrics)?;
    }
    if opts.example {
        let package = crate::example::package(crate::example::FILES)?;
        let report = hub
            .deploy_package(&package)
            .await
            .map_err(|e| anyhow::anyhow!("the bundled example did not deploy: {e}"))?;
        tracing::info!(tasks = ?report.tasks, "example deployed");
    }
    write_aws_profile(
        &opts.data_dir,
        &hub,
        &format!("{scheme}://{}", reachable(addr)),
        opts.tls_cert.as_deref(),
    )
    .context("cannot write DATA_DIR/aws-credentials and aws-config")?;
    // The listeners' default caps, from the open-files limit now in force.
    let shares = roost_listen::Shares::of(
        roost_listen::open_files_limit(),
        1 + mqtts.is_some() as usize + mqtt_ws.is_some() as usize,
    );
    let mqtt_cap = |name: &'static str| {
        let max = opts.mqtt_max_connections.unwrap_or(shares.mqtt_each);
        roost_listen::ConnectionLimit::new(name, max, hub.listener_metrics(name))
    };
    tokio::spawn(broker.clone().serve(mqtt_listener, mqtt_cap("mqtt")));
    if let Some((l, tls)) = mqtts {
        tokio::spawn(broker.clone().serve_tls(l, tls, mqtt_cap("mqtts")));
    }
    if let Some(l) = mqtt_ws {
        tokio::spawn(broker.serve_websocket(l, mqtt_cap("mqtt_ws")));
    }
    let endpoints = serde_json::json!({
        "http": addr.to_string(),
        "url": format!("{scheme}://{addr}"),
        "mqtt": mqtt_addr.to_string(),
        "mqtts": mqtts_addr.map(|a| a.to_string()),
        "mqtt_ws": mqtt_ws_addr.map(|a| a.to_string()),
    });
    std::fs::write(
        opts.data_dir.join("endpoints.json"),
        serde_json::to_vec_pretty(&endpoints)?,
    )?;
    // Where the hub listens is no secret (unlike the rest of the data dir).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            opts.data_dir.join("endpoints.json"),
            std::fs::Permissions::from_mode(0o644),
        )?;
    }
    let app = roost_api::router(hub.clone(), opts.token.clone());
    tracing::info!(url = %format!("{scheme}://{addr}"), mqtt = %mqtt_addr, anonymous = opts.allow_anonymous, budget_mb = hub.config().memory_budget_mb, "roost hub serving");
    if opts.example {
        let data = opts.data_dir.display();
        eprintln!(
            "\nThe example is deployed. Try:\n  curl -d 'world' {scheme}://{addr}/v1/tasks/greet/calls\n  roost call echo --input - --hub {scheme}://{addr} <<< 'hi'\n  roost tasks --hub {scheme}://{addr}\n  roost shadow update lamp '{{\"state\":{{\"desired\":{{\"on\":true}}}}}}' --data-dir {data} --hub {scheme}://{addr}\n\nAny AWS SDK or the AWS CLI reaches the hub's local Lambda, IoT data plane and\nSecrets Manager with the profile the hub wrote:\n  export AWS_SHARED_CREDENTIALS_FILE={data}/aws-credentials AWS_CONFIG_FILE={data}/aws-config AWS_PROFILE=roost\n  aws iot-data get-thing-shadow --thing-name lamp lamp.json && cat lamp.json\n  aws lambda invoke --function-name greet --payload '\"world\"' out.json && cat out.json\n"
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace = Duration::from_secs(opts.grace_s);
    // The drain starts with the signal (no call is admitted after it) and
    // runs once; the process exits when it is done.
    let draining = {
        let hub = hub.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!(
                grace_s = grace.as_secs(),
                "shutting down: no new calls; running calls may finish"
            );
            let _ = stop_tx.send(true);
            hub.drain(grace).await;
        })
    };
    let mut rx = stop_rx.clone();
    let shutdown = async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tls = match (opts.tls_cert, opts.tls_key) {
        (Some(cert), Some(key)) => Some(roost_api::TlsFiles { cert, key }),
        _ => None,
    };
    let limits = roost_api::ConnectionLimits {
        max_connections: opts.http_max_connections.unwrap_or(shares.http),
        header_timeout: Duration::from_secs(opts.http_header_timeout_s.max(1)),
        idle_timeout: Duration::from_secs(opts.http_idle_timeout_s.max(1)),
        metrics: hub.listener_metrics("http"),
    };
    let mqtt_each = opts.mqtt_max_connections.unwrap_or(shares.mqtt_each);
    tracing::info!(
        http = limits.max_connections,
        mqtt_each,
        reserve = shares.reserve,
        "connection caps"
    );
    let mqtt_listeners = 1 + opts.mqtts.is_some() as usize + opts.mqtt_ws.is_some() as usize;
    let asked = (limits.max_connections + mqtt_each * mqtt_listeners) as u64;
    if asked + shares.reserve > roost_listen::open_files_limit() {
        tracing::warn!(
            asked,
            open_files = roost_listen::open_files_limit(),
            reserve = shares.reserve,
            "the connection caps given add up to more than the open-files limit less its reserve: a flood on one listener may take descriptors the others need"
        );
    }
    let server = roost_api::serve(
        listener,
        app,
        roost_api::ServeConfig { tls, limits },
        shutdown,
    );
    let mut rx = stop_rx.clone();
    tokio::select! {
        r = server => r?,
        // Do not let open streams (`roost logs --follow`) hold the exit.
        _ = async {
            let _ = rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace + Duration::from_secs(1)).await;
        } => {}
    }
    // Running calls finish (up to the grace period) before we exit.
    tokio::time::timeout(grace + Duration::from_secs(1), draining)
        .await
        .ok();
    tracing::info!("stopped");
    Ok(())
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
