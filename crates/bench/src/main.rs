//! `roost-bench` (run as `roost bench`): performance figures, each next to a
//! baseline measured in the same run on the same machine, reported as ratios
//! (BENCHMARKS.md). A binary of its own, so the shipped `roost` carries
//! neither the benchmarks nor their baselines (SQLite, an HTTP client).
//!
//! - http: a warm wasm call vs the bare round trip to `/healthz`, both on
//!   one kept-alive connection to a separate hub process.
//! - instantiate: the cost of a fresh instance per call, in process.
//! - throughput: trivial calls/s with concurrent connections vs `/healthz`.
//! - async: durable async calls/s (202 after fsync) vs naive SQLite inserts
//!   with the same durability settings.
//! - rss: idle hub RSS and RSS per additional deployed task.
//! - fleet (`fleet.rs`): `roost cloud` deploying to N simulated hubs vs
//!   their bare package fetch, its memory per connected hub vs a bare
//!   WebSocket server, and an idle real hub's bytes per day.
//!
//! The hub under test is the `roost` binary, started as a process of its
//! own, as a user runs it: the load generator never shares its runtime or
//! its cores' scheduler with the hub, and the figures stay comparable with
//! those measured when the bench was part of `roost`.

mod fleet;
mod mqtt;
// The owner's keys and signing, as `roost shadow` has them: one source.
#[path = "../../roost/src/owner.rs"]
mod owner;
// The same files `roost hub --example` deploys: one source, compiled into
// both binaries (`roost` is not a library to depend on).
#[path = "../../roost/src/example.rs"]
mod package;
mod shadow;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Measure the hub against baselines measured in the same run.
#[derive(Parser)]
#[command(name = "roost-bench", version, about, long_about = None)]
struct BenchOpts {
    /// Which figures.
    #[arg(value_enum, default_value_t = Which::All)]
    which: Which,
    /// Round trips per measurement.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Concurrent connections for throughput and async.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Messages per MQTT throughput measurement.
    #[arg(long, default_value_t = 100_000)]
    mqtt_messages: u64,
    /// Idle MQTT connections for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Simulated hubs connected to `roost cloud` for the fleet figures.
    #[arg(long, default_value_t = 1000)]
    hubs: usize,
    /// Seconds the idle hub's traffic is counted for (at a 2 s heartbeat).
    #[arg(long, default_value_t = 60)]
    idle_window_s: u64,
    /// Python with awslambdaric, for the process benchmarks.
    #[arg(long, env = "PYTHON", default_value = "python3")]
    python: String,
    /// The `roost` binary whose hub is measured (`roost bench` passes
    /// itself). Default: the `roost` next to this binary.
    #[arg(long, env = "ROOST_BIN")]
    roost: Option<PathBuf>,
}

/// The figures `roost bench` can measure.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    /// Every figure below, in this order.
    All,
    /// A warm wasm call vs the bare `/healthz` round trip.
    Http,
    /// A fresh instance per call, and a whole call without HTTP, in process.
    Instantiate,
    /// Trivial calls/s over concurrent connections vs `/healthz`.
    Throughput,
    /// Durable async calls/s vs naive SQLite inserts.
    Async,
    /// Idle hub RSS and RSS per deployed task.
    Rss,
    /// Warm and cold Python calls (needs --python).
    Process,
    /// PSS per worker, separate vs a code group (needs --python).
    Pss,
    /// Cold starts under bursts, fixed vs demand pools (needs --python).
    Burst,
    /// The broker vs mosquitto.
    Mqtt,
    /// Shadows over HTTP (SigV4) and MQTT.
    Shadow,
    /// What task identities cost a `/v1` call (needs root).
    Identity,
    /// The control plane: a deployment to --hubs simulated hubs, memory
    /// per connected hub, an idle hub's bytes per day (PostgreSQL too when
    /// ROOST_TEST_POSTGRES is set).
    Fleet,
    /// The fleet figure's memory baseline, a bare WebSocket server (run by
    /// `fleet` itself).
    #[value(hide = true)]
    BareWs,
}

/// The `roost` binary the hubs are started from, when `--roost` names one.
static ROOST: OnceLock<PathBuf> = OnceLock::new();

/// The `roost` to start: `--roost`, else the one next to this binary.
fn roost_binary() -> Result<PathBuf> {
    if let Some(p) = ROOST.get() {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("roost");
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "roost-bench starts hubs from the roost binary, and there is none at {}: build both with `cargo build --release -p roost -p roost-bench`, or pass --roost PATH",
        beside.display()
    )
}

fn main() -> ExitCode {
    let opts = BenchOpts::parse();
    if let Some(p) = &opts.roost {
        ROOST.get_or_init(|| p.clone());
    }
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: BenchOpts) -> Result<()> {
    if opts.which == Which::BareWs {
        return fleet::bare_ws_server();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let wants = |w: Which| opts.which == Which::All || opts.which == w;
    if cfg!(debug_assertions) {
        eprintln!("note: this is a debug build; build with --release for figures worth keeping");
    }
    println!(
        "roost bench on {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if wants(Which::Http) {
        rt.block_on(bench_http(&opts))?;
    }
    if wants(Which::Instantiate) {
        rt.block_on(bench_instantiate(&opts))?;
    }
    if wants(Which::Throughput) {
        rt.block_on(bench_throughput(&opts))?;
    }
    if wants(Which::Async) {
        rt.block_on(bench_async(&opts))?;
    }
    if wants(Which::Rss) {
        rt.block_on(bench_rss())?;
    }
    if wants(Which::Process) {
        rt.block_on(bench_process(&opts))?;
    }
    if wants(Which::Pss) {
        rt.block_on(bench_pss(&opts))?;
    }
    if wants(Which::Burst) {
        rt.block_on(bench_burst(&opts))?;
    }
    if wants(Which::Mqtt) {
        rt.block_on(mqtt::run(opts.mqtt_messages, opts.idle_connections))?;
    }
    if wants(Which::Shadow) {
        rt.block_on(shadow::run(opts.calls))?;
    }
    if wants(Which::Identity) {
        rt.block_on(bench_identity(&opts))?;
    }
    if wants(Which::Fleet) {
        rt.block_on(fleet::run(opts.hubs, opts.idle_window_s))?;
    }
    Ok(())
}

/// A hub process on a temporary data dir, killed on drop.
pub(crate) struct HubProcess {
    child: Child,
    pub(crate) addr: String,
    data: tempfile::TempDir,
}

impl HubProcess {
    pub(crate) fn start(extra: &[&str]) -> Result<Self> {
        let data = tempfile::tempdir()?;
        let roost = roost_binary()?;
        let child = Command::new(&roost)
            .arg("hub")
            .arg("--data-dir")
            .arg(data.path())
            .args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
            // The benchmarks' Python is usually a venv in a private home,
            // which a task's own user could not reach; identities change
            // only how workers start, not a warm call (`bench identity`
            // measures what they do cost).
            .args(if extra.contains(&"--task-identities") {
                &[][..]
            } else {
                &["--task-identities", "off"][..]
            })
            .args(extra)
            .env("ROOST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start a hub from {}", roost.display()))?;
        let endpoints = data.path().join("endpoints.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            if let Ok(t) = std::fs::read_to_string(&endpoints) {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                break v["http"].as_str().unwrap_or_default().to_owned();
            }
            if Instant::now() > deadline {
                bail!("the hub did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Self { child, addr, data })
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    pub(crate) fn data_dir(&self) -> &Path {
        self.data.path()
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) type Sender = http1::SendRequest<Full<Bytes>>;

pub(crate) async fn connect(addr: &str) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn round_trip(s: &mut Sender, method: &str, path: &str, body: &'static [u8]) -> Result<u16> {
    s.ready().await?;
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bench")
        .body(Full::new(Bytes::from_static(body)))?;
    let resp = s.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

pub(crate) struct Stats {
    pub(crate) mean_us: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

pub(crate) fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = v.iter().map(|d| us(*d)).sum::<f64>() / v.len().max(1) as f64;
    Stats {
        mean_us: mean,
        p50_us: us(v[v.len() / 2]),
        p99_us: us(v[(v.len() * 99 / 100).min(v.len() - 1)]),
    }
}

/// A call path measured against the bare `/healthz` round trip on one
/// kept-alive connection: 200 warm-up pairs, then `n` of each, interleaved
/// in batches of 100 so drift (CPU frequency, other load) hits both.
struct Paired {
    bare: Stats,
    call: Stats,
    /// Sequential calls/s on the call path.
    calls_per_s: f64,
}

async fn against_healthz(
    addr: &str,
    path: &'static str,
    body: &'static [u8],
    n: usize,
) -> Result<Paired> {
    let mut s = connect(addr).await?;
    for _ in 0..200 {
        round_trip(&mut s, "GET", "/healthz", b"").await?;
        round_trip(&mut s, "POST", path, body).await?;
    }
    let (mut bare, mut call) = (Vec::new(), Vec::new());
    for _ in 0..(n / 100).max(1) {
        for _ in 0..100 {
            let t = Instant::now();
            round_trip(&mut s, "GET", "/healthz", b"").await?;
            bare.push(t.elapsed());
        }
        for _ in 0..100 {
            let t = Instant::now();
            let st = round_trip(&mut s, "POST", path, body).await?;
            if st != 200 {
                bail!("POST {path} failed with {st}");
            }
            call.push(t.elapsed());
        }
    }
    let calls_per_s = call.len() as f64 / call.iter().map(|d| d.as_secs_f64()).sum::<f64>();
    Ok(Paired {
        bare: stats(bare),
        call: stats(call),
        calls_per_s,
    })
}

fn print_paired(label: &str, p: &Paired, target: &str) {
    let (b, c) = (&p.bare, &p.call);
    println!(
        "  bare GET /healthz        mean {:>8.1} us  p50 {:>8.1}  p99 {:>8.1}",
        b.mean_us, b.p50_us, b.p99_us
    );
    println!(
        "  {label:<24} mean {:>8.1} us  p50 {:>8.1}  p99 {:>8.1}",
        c.mean_us, c.p50_us, c.p99_us
    );
    println!(
        "  ratio (call / bare)      mean {:>8.2}     p50 {:>8.2}   {target}",
        c.mean_us / b.mean_us,
        c.p50_us / b.p50_us
    );
}

async fn bench_http(opts: &BenchOpts) -> Result<()> {
    let hub = HubProcess::start(&["--example"])?;
    let p = against_healthz(
        &hub.addr,
        "/v1/tasks/echo/calls",
        b"0123456789abcdef",
        opts.calls,
    )
    .await?;
    println!(
        "\n[http] warm wasm call vs bare HTTP round trip, one kept-alive connection, {} each",
        opts.calls
    );
    print_paired("POST echo call", &p, "(target <= 1.25)");
    Ok(())
}

/// What task identities cost a local program on `/v1`: the hub asks the
/// kernel (sock_diag) who holds each new loopback connection. Calls on
/// a fresh connection each, and on one kept-alive connection, with
/// identities on against the same hub with them off.
async fn bench_identity(opts: &BenchOpts) -> Result<()> {
    if !roost_runtime_process::identity::can_switch() {
        println!("\n[identity] skipped: task identities need root");
        return Ok(());
    }
    let n = opts.calls.min(2000);
    let path = "/v1/tasks/echo/calls";
    let body: &'static [u8] = b"0123456789abcdef";
    // Both hubs at once, measured in alternating batches of 100, so drift
    // (CPU frequency, TIME_WAIT sockets piling up) hits both alike.
    let hubs = [
        HubProcess::start(&["--example", "--task-identities", "off"])?,
        HubProcess::start(&["--example", "--task-identities", "on"])?,
    ];
    let mut fresh: [Vec<Duration>; 2] = Default::default();
    let mut kept: [Vec<Duration>; 2] = Default::default();
    let mut conns = [connect(&hubs[0].addr).await?, connect(&hubs[1].addr).await?];
    for round in 0..(n / 100).max(1) + 2 {
        for (i, hub) in hubs.iter().enumerate() {
            for _ in 0..100 {
                let t = Instant::now();
                let mut s = connect(&hub.addr).await?;
                let st = round_trip(&mut s, "POST", path, body).await?;
                if st != 200 {
                    bail!("POST {path} failed with {st}");
                }
                // The first two rounds warm up.
                if round >= 2 {
                    fresh[i].push(t.elapsed());
                }
                let t = Instant::now();
                round_trip(&mut conns[i], "POST", path, body).await?;
                if round >= 2 {
                    kept[i].push(t.elapsed());
                }
            }
        }
    }
    let [f0, f1] = fresh;
    let [k0, k1] = kept;
    let fresh = [stats(f0), stats(f1)];
    let kept = [stats(k0), stats(k1)];
    println!("\n[identity] /v1 calls with task identities off and on (the hub asks who holds each new connection), {n} each");
    for (label, s) in [("fresh connection", &fresh), ("kept-alive", &kept)] {
        println!(
            "  {label:<18} off p50 {:>8.1} us  on p50 {:>8.1} us  ratio {:.3}  (mean {:.1} / {:.1})",
            s[0].p50_us,
            s[1].p50_us,
            s[1].p50_us / s[0].p50_us,
            s[0].mean_us,
            s[1].mean_us
        );
    }
    Ok(())
}

async fn bench_instantiate(opts: &BenchOpts) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let code = dir.path().join("echo.wat");
    std::fs::write(&code, package::FILES[1].1)?;
    let spec = roost_model::TaskSpec {
        name: roost_model::TaskName::parse("echo")?,
        runtime: roost_model::RuntimeKind::Wasm,
        limits: roost_model::Limits {
            memory_mb: 16,
            timeout_ms: 1000,
            concurrency: 1,
            priority: 0,
        },
        env: Default::default(),
        resources: Vec::new(),
        code: roost_model::TaskCode::Wasm {
            sha256: "bench-echo".into(),
            path: code,
        },
        allow: Default::default(),
        health_check: None,
    };
    let rt = roost_runtime_wasm::WasmRuntime::new(roost_runtime_wasm::WasmConfig {
        cache_dir: dir.path().join("cache"),
        instance_slots: 16,
    })?;
    let task = rt.prepare_wasm(&spec).map_err(|e| anyhow!("{e}"))?;
    for _ in 0..500 {
        task.instantiate_only().await.map_err(|e| anyhow!("{e}"))?;
    }
    let n = opts.calls.max(1000);
    let t = Instant::now();
    for _ in 0..n {
        task.instantiate_only().await.map_err(|e| anyhow!("{e}"))?;
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    // A whole call without HTTP: scheduler admission, a fresh instance, the
    // guest reading stdin and writing stdout, metrics.
    let mut cfg = roost_hub::HubConfig::new(dir.path().join("hub"));
    cfg.memory_budget_mb = 1024;
    // The example is wasm only: the hub gets that one runtime.
    let logs = std::sync::Arc::new(roost_hub::logs::LogBook::default());
    let wasm = roost_runtime_wasm::WasmRuntime::new(roost_runtime_wasm::WasmConfig {
        cache_dir: dir.path().join("hub-cache"),
        instance_slots: 64,
    })?;
    let parts = roost_hub::Parts {
        extra_metrics: Vec::new(),
        runtimes: vec![std::sync::Arc::new(wasm)],
        logs,
        bus: Box::new(|state: roost_bus::BusState| {
            std::sync::Arc::new(roost_broker::Broker::with_persistence(
                roost_broker::BrokerConfig::default(),
                Some(state.persistence),
                state.restore,
            ))
        }),
    };
    let hub = roost_hub::Hub::start(cfg, parts).await?;
    hub.deploy_package(&package::package(package::FILES)?)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let input = Bytes::from_static(b"0123456789abcdef");
    for _ in 0..500 {
        hub.call_sync("echo", input.clone(), Vec::new())
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    let t = Instant::now();
    for _ in 0..n {
        hub.call_sync("echo", input.clone(), Vec::new())
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    let call = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("\n[instantiate] fresh store + WASI context + instance from InstancePre (pooling allocator), {n} times");
    println!("  per instantiation        {per:>8.1} us   (target <= 20 us)");
    println!("  whole echo call, no HTTP {call:>8.1} us   (admission, instance, WASI stdin/stdout, metrics)");
    Ok(())
}

async fn bench_throughput(opts: &BenchOpts) -> Result<()> {
    let hub = HubProcess::start(&["--example"])?;
    let run = |path: &'static str, method: &'static str| {
        let addr = hub.addr.clone();
        let secs = opts.seconds;
        let conns = opts.concurrency;
        async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for _ in 0..conns {
                let addr = addr.clone();
                tasks.push(tokio::spawn(async move {
                    let mut s = connect(&addr).await?;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        round_trip(&mut s, method, path, b"0123456789abcdef").await?;
                        n += 1;
                    }
                    Ok::<u64, anyhow::Error>(n)
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await??;
            }
            Ok::<f64, anyhow::Error>(total as f64 / secs as f64)
        }
    };
    run("/healthz", "GET").await?; // warm up
    let bare = run("/healthz", "GET").await?;
    let calls = run("/v1/tasks/echo/calls", "POST").await?;
    println!(
        "\n[throughput] {} connections for {} s, client and hub on the same 2 cores",
        opts.concurrency, opts.seconds
    );
    println!("  bare GET /healthz        {bare:>10.0} req/s");
    println!(
        "  echo calls               {calls:>10.0} calls/s   ({:.2} of bare)",
        calls / bare
    );
    Ok(())
}

async fn bench_async(opts: &BenchOpts) -> Result<()> {
    let n = opts.calls.min(5000);
    // Baseline: the naive approach, one transaction (one fsync) per row,
    // with the hub's durability settings (WAL, synchronous = FULL).
    let dir = tempfile::tempdir()?;
    let db = rusqlite::Connection::open(dir.path().join("naive.db"))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute_batch(
        "CREATE TABLE calls (id TEXT PRIMARY KEY, task TEXT, input BLOB, status TEXT)",
    )?;
    let t = Instant::now();
    for i in 0..n {
        db.execute(
            "INSERT INTO calls VALUES (?1, 'echo', ?2, 'queued')",
            rusqlite::params![format!("{i:032x}"), &b"0123456789abcdef"[..]],
        )?;
    }
    let naive = n as f64 / t.elapsed().as_secs_f64();

    let hub = HubProcess::start(&["--example", "--queue-limit", "100000"])?;
    let per_conn = n / opts.concurrency;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..opts.concurrency {
        let addr = hub.addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = connect(&addr).await?;
            for _ in 0..per_conn {
                let st = round_trip(
                    &mut s,
                    "POST",
                    "/v1/tasks/echo/calls?mode=async",
                    b"0123456789abcdef",
                )
                .await?;
                if st != 202 {
                    bail!("async call answered {st}");
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let hub_rate = (per_conn * opts.concurrency) as f64 / t.elapsed().as_secs_f64();
    println!(
        "\n[async] durable async calls: 202 only after the call is on disk (WAL, synchronous=FULL)"
    );
    println!("  naive SQLite, 1 txn/row  {naive:>10.0} inserts/s   ({n} rows, one writer)");
    println!(
        "  hub, HTTP, group commit  {hub_rate:>10.0} calls/s     ({} connections; {:.2}x the naive inserts)",
        opts.concurrency,
        hub_rate / naive
    );
    Ok(())
}

fn rss_kb(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .context("no VmRSS")
}

async fn bench_rss() -> Result<()> {
    let hub = HubProcess::start(&[])?;
    let client = reqwest::Client::new();
    let url = format!("http://{}", hub.addr);
    client.get(format!("{url}/healthz")).send().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kb(hub.pid())?;

    // Deploy 1 task, then 21 tasks with distinct code (a distinct hash each,
    // so nothing is shared), calling each once so it is fully loaded.
    let deploy = |k: usize| -> Result<Vec<u8>> {
        let mut files: Vec<(String, String)> = Vec::new();
        let mut manifest = String::new();
        for i in 0..k {
            let wat = package::FILES[1].1.replacen(
                "(memory (export \"memory\") 1)",
                &format!(
                    "(memory (export \"memory\") 1)\n  (data (i32.const 70000) \"variant {i}\")"
                ),
                1,
            );
            files.push((format!("t{i}.wat"), wat));
            manifest.push_str(&format!("[[task]]\nname = \"t{i}\"\nruntime = \"wasm\"\ncode = \"t{i}.wat\"\nmemory_mb = 16\n\n"));
        }
        files.push(("manifest.toml".into(), manifest));
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        Ok(package::package(&refs)?)
    };
    let mut after = Vec::new();
    for k in [1usize, 21] {
        let r = client
            .post(format!("{url}/v1/deployments"))
            .body(deploy(k)?)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("deploy failed: {}", r.text().await?);
        }
        for i in 0..k {
            client
                .post(format!("{url}/v1/tasks/t{i}/calls"))
                .body("x")
                .send()
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        after.push(rss_kb(hub.pid())?);
    }
    let per_task = (after[1] as f64 - after[0] as f64) / 20.0;
    let _ = hub.data_dir();
    println!("\n[rss] resident memory of a hub process (VmRSS)");
    println!(
        "  idle, nothing deployed   {:>8.1} MB   (target <= 15 MB)",
        idle as f64 / 1024.0
    );
    println!(
        "  1 task deployed + called {:>8.1} MB",
        after[0] as f64 / 1024.0
    );
    println!(
        "  21 tasks                 {:>8.1} MB",
        after[1] as f64 / 1024.0
    );
    println!("  per additional task      {per_task:>8.0} KB  (distinct code each; same code would share one module)");
    Ok(())
}

/// The handler the process benchmarks run: a realistic import set from the
/// standard library, and a handler that echoes its event.
const BENCH_APP: &str = r#"
import json, decimal, email.message, http.client, xml.etree.ElementTree, sqlite3, asyncio, logging, uuid

def handler(event, context):
    return {"ok": True, "event": event}

def slow(event, context):
    import time
    time.sleep(0.2)
    return "done"
"#;

fn py_package(python: &str, extra: &str, handler: &str) -> Result<Vec<u8>> {
    let manifest = format!(
        "[[task]]\nname = \"py\"\nruntime = \"process\"\ndir = \"app\"\ncommand = [\"{python}\", \"-m\", \"awslambdaric\"]\nhandler = \"{handler}\"\nmemory_mb = 256\ntimeout_ms = 10000\n{extra}\n"
    );
    Ok(package::package(&[
        ("manifest.toml", manifest.as_str()),
        ("app/app.py", BENCH_APP),
    ])?)
}

async fn deploy_raw(addr: &str, package: Vec<u8>) -> Result<()> {
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/deployments"))
        .body(package)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("deploy failed: {}", r.text().await?);
    }
    Ok(())
}

fn python_path(python: &str) -> Result<String> {
    let out = Command::new(python)
        .args(["-c", "import sys, awslambdaric; print(sys.executable)"])
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    if !out.status.success() {
        bail!("{python} has no awslambdaric; pass --python (scripts/test.sh makes a venv at ~/.cache/roost-venv)");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn bench_process(opts: &BenchOpts) -> Result<()> {
    let python = python_path(&opts.python)?;
    let hub = HubProcess::start(&[])?;
    deploy_raw(
        &hub.addr,
        py_package(
            &python,
            "min_warm = 1\nmax_workers = 1\nconcurrency = 1",
            "app.handler",
        )?,
    )
    .await?;
    let body: &'static [u8] = br#"{"k": 1}"#;
    let warm = against_healthz(&hub.addr, "/v1/tasks/py/calls", body, opts.calls.min(3000)).await?;
    let calls_per_s = warm.calls_per_s;
    // Cold calls: a fresh deployment with no warm worker, five times.
    let mut cold = Vec::new();
    for _ in 0..5 {
        deploy_raw(
            &hub.addr,
            py_package(&python, "min_warm = 0\nmax_workers = 1", "app.handler")?,
        )
        .await?;
        let mut s = connect(&hub.addr).await?;
        let t = Instant::now();
        round_trip(&mut s, "POST", "/v1/tasks/py/calls", body).await?;
        cold.push(t.elapsed());
    }
    let cold = stats(cold);
    // The floor: the same handler called in a loop inside Python.
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("app.py"), BENCH_APP)?;
    let out = Command::new(&python)
        .current_dir(dir.path())
        .args([
            "-c",
            "import time, json, app\nn=200000\nev=json.loads('{\"k\": 1}')\nt=time.perf_counter()\nfor _ in range(n):\n    json.dumps(app.handler(json.loads('{\"k\": 1}'), None))\nprint(n/(time.perf_counter()-t))",
        ])
        .output()?;
    let floor: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    println!("\n[process] a warm Python (awslambdaric) worker, one kept-alive connection");
    print_paired("warm python call", &warm, "(target <= 2)");
    println!(
        "  cold call (new worker)   p50  {:>8.1} ms  ({:.0}x the warm p50)",
        cold.p50_us / 1000.0,
        cold.p50_us / warm.call.p50_us
    );
    println!("  one worker, sequential   {calls_per_s:>8.0} calls/s");
    println!("  handler in a Python loop {floor:>8.0} calls/s (json in and out; the physical floor)   ratio {:.3}", calls_per_s / floor.max(1.0));
    Ok(())
}

/// PIDs of every process descended from `root`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                    if let Some(ppid) = rest
                        .split_whitespace()
                        .nth(1)
                        .and_then(|p| p.parse::<u32>().ok())
                    {
                        parent.insert(pid, ppid);
                    }
                }
            }
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut cur = p;
            for _ in 0..64 {
                match parent.get(&cur) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 => cur = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

fn pss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn total_pss_after(
    addr: &str,
    hub_pid: u32,
    package: Vec<u8>,
    workers: usize,
) -> Result<u64> {
    deploy_raw(addr, package).await?;
    // Let old pools go and the new workers settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pids = descendants(hub_pid);
    if pids.len() < workers {
        bail!("expected {workers} workers, found {}", pids.len());
    }
    Ok(pids.iter().map(|p| pss_kb(*p)).sum())
}

async fn bench_pss(opts: &BenchOpts) -> Result<()> {
    let python = python_path(&opts.python)?;
    let n = 6u64;
    let mut per = Vec::new();
    for group in [false, true] {
        let hub = HubProcess::start(&[])?;
        let extra = |k: u64| {
            format!(
                "min_warm = {k}\nmax_workers = {k}\n{}",
                if group { "code_group = \"py\"" } else { "" }
            )
        };
        let one = total_pss_after(
            &hub.addr,
            hub.pid(),
            py_package(&python, &extra(1), "app.handler")?,
            1,
        )
        .await?;
        let many = total_pss_after(
            &hub.addr,
            hub.pid(),
            py_package(&python, &extra(n), "app.handler")?,
            n as usize,
        )
        .await?;
        per.push((one, many, (many as f64 - one as f64) / (n - 1) as f64));
    }
    println!("\n[pss] proportional set size of a task's workers (smaps_rollup), the handler importing a stdlib set");
    println!("  separate processes       1 worker {:>7} KB, {n} workers {:>7} KB: {:>7.0} KB per additional worker", per[0].0, per[0].1, per[0].2);
    println!("  code_group (zygote)      1 worker {:>7} KB, {n} workers {:>7} KB: {:>7.0} KB per additional worker (zygote included)", per[1].0, per[1].1, per[1].2);
    println!(
        "  shared / unshared        {:>7.2}   (target <= 0.25)",
        per[1].2 / per[0].2
    );
    Ok(())
}

async fn bench_burst(opts: &BenchOpts) -> Result<()> {
    let python = python_path(&opts.python)?;
    let (bursts, size, gap) = (8, 6usize, Duration::from_secs(3));
    let mut shares = Vec::new();
    for policy in ["fixed", "demand"] {
        let hub = HubProcess::start(&["--pool-policy", policy])?;
        deploy_raw(
            &hub.addr,
            py_package(
                &python,
                "min_warm = 1\nmax_workers = 8\nconcurrency = 8",
                "app.slow",
            )?,
        )
        .await?;
        for _ in 0..bursts {
            let mut calls = Vec::new();
            for _ in 0..size {
                let addr = hub.addr.clone();
                calls.push(tokio::spawn(async move {
                    let mut s = connect(&addr).await?;
                    round_trip(&mut s, "POST", "/v1/tasks/py/calls", b"{}").await
                }));
            }
            for c in calls {
                c.await??;
            }
            tokio::time::sleep(gap).await;
        }
        let v: serde_json::Value = reqwest::get(format!("http://{}/v1/tasks", hub.addr))
            .await?
            .json()
            .await?;
        let pool = &v["tasks"][0]["pool"];
        let cold = pool["cold_starts"].as_f64().unwrap_or(0.0);
        let warm = pool["warm_hits"].as_f64().unwrap_or(0.0);
        shares.push((policy, cold, cold / (cold + warm).max(1.0)));
    }
    println!(
        "\n[burst] {bursts} bursts of {size} concurrent 200 ms calls, {} s apart, min_warm = 1",
        gap.as_secs()
    );
    for (policy, cold, share) in &shares {
        println!(
            "  {policy:<6} pool: {cold:>3.0} cold starts of {} calls = {:>5.1} %",
            bursts * size,
            share * 100.0
        );
    }
    Ok(())
}
