//! `roost bench mqtt`: the broker against mosquitto on the same machine, in
//! the same run, with the same load generator (a small MQTT client written
//! here on the same codec, so neither broker gets a friendlier client).

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::packet::puback::PubAckPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::subscribe::{SubscribePacket, SubscriptionOptions, TopicFilter};
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::{FixedHeader, Packet, QoS};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub(crate) struct Client {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
    buf: BytesMut,
}

impl Client {
    pub(crate) async fn connect(addr: &str, id: &str, clean: bool) -> Result<Self> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Client {
            r,
            w,
            buf: BytesMut::with_capacity(1 << 16),
        };
        let mut opts = mqtt5_protocol::types::ConnectOptions::new(id);
        opts.clean_start = clean;
        opts.keep_alive = Duration::from_secs(600);
        c.send(&ConnectPacket::new_v311(opts)).await?;
        match c.next().await? {
            Packet::ConnAck(_) => Ok(c),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }
    pub(crate) async fn send<P: MqttPacket>(&mut self, p: &P) -> Result<()> {
        let mut b = BytesMut::new();
        p.encode(&mut b)?;
        self.w.write_all(&b).await?;
        Ok(())
    }
    pub(crate) async fn next(&mut self) -> Result<Packet> {
        loop {
            if self.buf.len() >= 2 {
                let mut len = 0usize;
                let mut i = 1;
                let mut complete = false;
                while i < self.buf.len() && i <= 4 {
                    let b = self.buf[i];
                    len |= ((b & 0x7f) as usize) << (7 * (i - 1));
                    i += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if complete && self.buf.len() >= i + len {
                    let mut frame = self.buf.split_to(i + len).freeze();
                    let h = FixedHeader::decode(&mut frame)?;
                    return Ok(Packet::decode_from_body_with_version(
                        h.packet_type,
                        &h,
                        &mut frame,
                        4,
                    )?);
                }
            }
            if self.r.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed");
            }
        }
    }
    pub(crate) async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<()> {
        let mut s = SubscribePacket::new_v311(1);
        s.filters.push(TopicFilter {
            filter: filter.to_owned(),
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
        });
        self.send(&s).await?;
        match self.next().await? {
            Packet::SubAck(_) => Ok(()),
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }
}

/// A broker under test: a hub or mosquitto, killed on drop.
struct Broker {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(addr: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} did not open");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn start_hub() -> Result<Broker> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let roost = crate::roost_binary()?;
    let child = Command::new(&roost)
        .args([
            "hub",
            "--http",
            "127.0.0.1:0",
            "--allow-anonymous",
            "--data-dir",
        ])
        .arg(dir.path())
        .args(["--mqtt", &format!("127.0.0.1:{port}")])
        .env("ROOST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start a hub from {}", roost.display()))?;
    let addr = format!("127.0.0.1:{port}");
    wait_port(&addr)?;
    Ok(Broker { child, addr, dir })
}

fn start_mosquitto() -> Result<Broker> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\npersistence false\n"),
    )?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("mosquitto is needed for this baseline (apt install mosquitto)")?;
    let addr = format!("127.0.0.1:{port}");
    wait_port(&addr)?;
    Ok(Broker { child, addr, dir })
}

/// `subs` subscribers on one topic; one publisher sends `n` messages at
/// `qos`, keeping at most `window` unreceived. Returns deliveries/s.
async fn throughput(addr: &str, subs: usize, n: u64, qos: QoS, persistent: bool) -> Result<f64> {
    let received = Arc::new(AtomicU64::new(0));
    // Wakes the publisher when subscribers make progress (no busy waiting:
    // the load generator should not take the CPU the brokers need).
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut readers = Vec::new();
    for i in 0..subs {
        let mut c = Client::connect(addr, &format!("bench-sub-{i}"), !persistent).await?;
        c.subscribe("bench/t", qos).await?;
        let received = received.clone();
        let progress = progress.clone();
        readers.push(tokio::spawn(async move {
            let mut got = 0;
            while got < n {
                if let Packet::Publish(p) = c.next().await? {
                    got += 1;
                    received.fetch_add(1, Ordering::Relaxed);
                    progress.notify_one();
                    if let Some(id) = p.packet_id {
                        c.send(&PubAckPacket::new(id)).await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut p = Client::connect(addr, "bench-pub", true).await?;
    let window = (2000 / subs as u64).max(50);
    let total = n * subs as u64;
    let payload = vec![b'x'; 64];
    let t = Instant::now();
    let mut acks_due = 0u64;
    let mut pid: u16 = 0;
    for sent in 0..n {
        // Stay within the window of unreceived messages, as a real
        // publisher with flow control would.
        while sent.saturating_sub(received.load(Ordering::Relaxed) / subs as u64) > window {
            let _ = tokio::time::timeout(Duration::from_millis(5), progress.notified()).await;
        }
        let mut m = PublishPacket::new_v311("bench/t", payload.clone(), qos);
        if qos != QoS::AtMostOnce {
            pid = pid.wrapping_add(1).max(1);
            m.packet_id = Some(pid);
            acks_due += 1;
        }
        p.send(&m).await?;
        // Read PUBACKs as they come, keeping at most 100 unacknowledged.
        while acks_due > 100 {
            if let Packet::PubAck(_) = p.next().await? {
                acks_due -= 1;
            }
        }
    }
    while acks_due > 0 {
        if let Packet::PubAck(_) = p.next().await? {
            acks_due -= 1;
        }
    }
    for r in readers {
        tokio::time::timeout(Duration::from_secs(120), r)
            .await
            .context("subscribers stalled")???;
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(received.load(Ordering::Relaxed), total);
    Ok(total as f64 / secs)
}

/// Publish-to-deliver latency, one message at a time, QoS 0.
async fn latency(addr: &str, n: usize) -> Result<(f64, f64)> {
    latency_between(addr, n, "lat/t", "lat/t").await
}

/// Latency from a publish on `to_topic`... to its arrival on `from_topic`.
async fn latency_between(
    addr: &str,
    n: usize,
    publish_to: &str,
    watch: &str,
) -> Result<(f64, f64)> {
    let mut s = Client::connect(addr, "lat-sub", true).await?;
    s.subscribe(watch, QoS::AtMostOnce).await?;
    let mut p = Client::connect(addr, "lat-pub", true).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 200 {
        let t = Instant::now();
        p.send(&PublishPacket::new_v311(
            publish_to,
            b"ping".to_vec(),
            QoS::AtMostOnce,
        ))
        .await?;
        loop {
            if let Packet::Publish(_) = s.next().await? {
                break;
            }
        }
        if i >= 200 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok((samples[n / 2], samples[n * 99 / 100]))
}

pub(crate) fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// RSS added per idle connection, over `n` connections.
async fn idle_memory(b: &Broker, n: usize) -> Result<f64> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kb(b.child.id());
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(Client::connect(&b.addr, &format!("idle-{i}"), true).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kb(b.child.id());
    drop(conns);
    Ok((after as f64 - before as f64) * 1024.0 / n as f64)
}

pub(crate) fn raise_fd_limit() {
    // SAFETY: get/setrlimit on this process.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

pub async fn run(n: u64, idle: usize) -> Result<()> {
    raise_fd_limit();
    println!(
        "\n[mqtt] the hub's broker vs mosquitto {}, same client, same machine",
        mosquitto_version()
    );
    let rows: [(&str, usize, QoS, bool); 4] = [
        ("QoS 0, 1 -> 1", 1, QoS::AtMostOnce, false),
        ("QoS 0, 1 -> 100", 100, QoS::AtMostOnce, false),
        ("QoS 1, 1 -> 1", 1, QoS::AtLeastOnce, false),
        ("QoS 1, 1 -> 1 persistent", 1, QoS::AtLeastOnce, true),
    ];
    for (name, subs, qos, persistent) in rows {
        let msgs = if subs > 1 { n / 20 } else { n };
        let m = start_mosquitto()?;
        let base = throughput(&m.addr, subs, msgs, qos, persistent).await?;
        drop(m);
        let h = start_hub()?;
        let ours = throughput(&h.addr, subs, msgs, qos, persistent).await?;
        drop(h);
        println!(
            "  {name:<26} mosquitto {base:>9.0}/s   roost {ours:>9.0}/s   ratio {:.2}",
            ours / base
        );
    }
    let m = start_mosquitto()?;
    let (mp50, mp99) = latency(&m.addr, 5000).await?;
    let mi = idle_memory(&m, idle).await?;
    drop(m);
    let h = start_hub()?;
    let (hp50, hp99) = latency(&h.addr, 5000).await?;
    let hi = idle_memory(&h, idle).await?;
    drop(h);
    println!("  latency p50 / p99          mosquitto {mp50:>6.1} / {mp99:>6.1} us   roost {hp50:>6.1} / {hp99:>6.1} us");
    println!(
        "  memory per idle connection mosquitto {:>6.0} B   roost {:>6.0} B   ({idle} connections)",
        mi, hi
    );
    // Route dispatch: device message -> durable async call of a wasm task ->
    // its output -> a device topic, against a plain publish on the same hub.
    let h = start_hub()?;
    let endpoints: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        h.dir.path().join("endpoints.json"),
    )?)?;
    let http = endpoints["http"].as_str().unwrap_or_default().to_owned();
    let manifest = "[[task]]\nname = \"echo\"\nruntime = \"wasm\"\ncode = \"echo.wat\"\n\n[[route]]\nfrom = \"device:rt/in\"\nto = \"task:echo\"\n\n[[route]]\nfrom = \"task:echo\"\nto = \"device:rt/out\"\n";
    let package = crate::package::package(&[
        ("manifest.toml", manifest),
        ("echo.wat", crate::package::FILES[1].1),
    ])?;
    let r = reqwest::Client::new()
        .post(format!("http://{http}/v1/deployments"))
        .body(package)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("deploy failed: {}", r.text().await?);
    }
    let (dp50, dp99) = latency_between(&h.addr, 1000, "rt/direct", "rt/direct").await?;
    let (rp50, rp99) = latency_between(&h.addr, 1000, "rt/in", "rt/out").await?;
    drop(h);
    println!("  route device -> task -> device p50 / p99  {rp50:>7.1} / {rp99:>7.1} us   (plain publish on the same hub {dp50:.1} / {dp99:.1} us; the call is made durable on the way)");
    println!("  (mosquitto runs with persistence off: it keeps QoS 1 messages in memory; roost writes them for persistent sessions before the PUBACK)");
    Ok(())
}

fn mosquitto_version() -> String {
    Command::new("mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}
