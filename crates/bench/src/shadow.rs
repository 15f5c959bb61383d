//! `roost bench shadow`: shadow get and update over HTTP (SigV4-signed, as
//! boto3 sends them) against the bare `/healthz` round trip on the same
//! connection; over MQTT against a plain publish round trip on the same
//! client; updates/s; and what checking one signature costs.

use crate::mqtt::Client;
use crate::owner::Owner;
use crate::{connect, stats, HubProcess, Sender};
use anyhow::{bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::{Packet, QoS};
use roost_sigv4 as sigv4;
use std::time::{Duration, Instant};

/// A request signed the way botocore signs it (host and x-amz-date).
fn signed(
    addr: &str,
    owner: &Owner,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<hyper::Request<Full<Bytes>>> {
    let mut b = hyper::Request::builder().method(method).uri(path);
    for (k, v) in owner.sign(method, path, addr, &body)?.iter() {
        b = b.header(k, v);
    }
    Ok(b.body(Full::new(Bytes::from(body)))?)
}

async fn send(s: &mut Sender, req: hyper::Request<Full<Bytes>>) -> Result<()> {
    s.ready().await?;
    let resp = s.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

fn line(label: &str, v: Vec<Duration>, bare_p50: Option<f64>) -> f64 {
    let s = stats(v);
    match bare_p50 {
        Some(b) => println!(
            "  {label:<30} p50 {:>8.1} us  p99 {:>8.1}  ({:.2}x bare)",
            s.p50_us,
            s.p99_us,
            s.p50_us / b
        ),
        None => println!(
            "  {label:<30} p50 {:>8.1} us  p99 {:>8.1}",
            s.p50_us, s.p99_us
        ),
    }
    s.p50_us
}

pub async fn run(n: usize) -> Result<()> {
    let hub = HubProcess::start(&["--allow-anonymous"])?;
    let endpoints: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hub.data_dir().join("endpoints.json"))?)?;
    let mqtt = endpoints["mqtt"].as_str().unwrap_or_default().to_owned();
    let owner = Owner::load(hub.data_dir())?;
    let addr = hub.addr.clone();
    let n = n.max(100);

    println!("\nshadows over HTTP (SigV4-signed, one kept-alive connection, {n} each)");
    let mut s = connect(&addr).await?;
    let healthz = || {
        hyper::Request::get("/healthz")
            .header("host", "bench")
            .body(Full::new(Bytes::new()))
            .expect("a valid request")
    };
    let update = |i: usize| {
        signed(
            &addr,
            &owner,
            "POST",
            "/things/bench/shadow",
            format!(
                r#"{{"state":{{"reported":{{"n":{i}}},"desired":{{"n":{}}}}}}}"#,
                i + 1
            )
            .into_bytes(),
        )
    };
    let get = || signed(&addr, &owner, "GET", "/things/bench/shadow", Vec::new());
    // A retained message to read back (GetRetainedMessage).
    send(
        &mut s,
        signed(
            &addr,
            &owner,
            "POST",
            "/topics/bench%2Fstate?qos=1&retain=true",
            br#"{"mode":"eco"}"#.to_vec(),
        )?,
    )
    .await?;
    let get_retained = || {
        signed(
            &addr,
            &owner,
            "GET",
            "/retainedMessage/bench%2Fstate",
            Vec::new(),
        )
    };
    for i in 0..200 {
        send(&mut s, healthz()).await?;
        send(&mut s, update(i)?).await?;
        send(&mut s, get()?).await?;
        send(&mut s, get_retained()?).await?;
    }
    // Requests are signed before the clock starts: the figures are the
    // hub's side (signature check included), not the client's signing.
    let (mut bare, mut upd, mut gets, mut retained) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for batch in 0..(n / 100) {
        let updates: Vec<_> = (0..100)
            .map(|i| update(batch * 100 + i))
            .collect::<Result<_>>()?;
        let reads: Vec<_> = (0..100).map(|_| get()).collect::<Result<_>>()?;
        let retained_reads: Vec<_> = (0..100).map(|_| get_retained()).collect::<Result<_>>()?;
        for _ in 0..100 {
            let t = Instant::now();
            send(&mut s, healthz()).await?;
            bare.push(t.elapsed());
        }
        for r in reads {
            let t = Instant::now();
            send(&mut s, r).await?;
            gets.push(t.elapsed());
        }
        for r in updates {
            let t = Instant::now();
            send(&mut s, r).await?;
            upd.push(t.elapsed());
        }
        for r in retained_reads {
            let t = Instant::now();
            send(&mut s, r).await?;
            retained.push(t.elapsed());
        }
    }
    let bare_p50 = line("bare GET /healthz", bare, None);
    line("GetThingShadow", gets, Some(bare_p50));
    line("GetRetainedMessage", retained, Some(bare_p50));
    let update_p50 = line("UpdateThingShadow (fsync)", upd, Some(bare_p50));

    for conns in [1usize, 8, 32] {
        let secs = 2.0;
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (addr, owner) = (addr.clone(), owner.clone());
            tasks.push(tokio::spawn(async move {
                let mut s = connect(&addr).await?;
                let started = Instant::now();
                let mut done = 0u64;
                while started.elapsed().as_secs_f64() < secs {
                    let body = format!(r#"{{"state":{{"reported":{{"n":{done}}}}}}}"#);
                    let req = signed(
                        &addr,
                        &owner,
                        "POST",
                        &format!("/things/load-{c}/shadow"),
                        body.into_bytes(),
                    )?;
                    send(&mut s, req).await?;
                    done += 1;
                }
                anyhow::Ok(done)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        println!(
            "  updates/s, {conns:>2} connection(s) on their own shadows: {:>8.0}",
            total as f64 / secs
        );
    }

    println!("\nshadows over MQTT (one client, QoS 0 requests, {n} each)");
    let mut c = Client::connect(&mqtt, "shadow-bench", true).await?;
    for t in [
        "bench/echo",
        "$aws/things/mbench/shadow/update/accepted",
        "$aws/things/mbench/shadow/get/accepted",
    ] {
        c.subscribe(t, QoS::AtMostOnce).await?;
    }
    async fn round_trip(c: &mut Client, topic: &str, payload: Vec<u8>) -> Result<Duration> {
        let t = Instant::now();
        c.send(&PublishPacket::new_v311(topic, payload, QoS::AtMostOnce))
            .await?;
        loop {
            if let Packet::Publish(_) = c.next().await? {
                return Ok(t.elapsed());
            }
        }
    }
    let upd_topic = "$aws/things/mbench/shadow/update";
    let get_topic = "$aws/things/mbench/shadow/get";
    let doc = |i: usize| format!(r#"{{"state":{{"reported":{{"n":{i}}}}}}}"#).into_bytes();
    for i in 0..200 {
        round_trip(&mut c, "bench/echo", b"ping".to_vec()).await?;
        round_trip(&mut c, upd_topic, doc(i)).await?;
        round_trip(&mut c, get_topic, Vec::new()).await?;
    }
    let (mut bare, mut upd, mut gets) = (Vec::new(), Vec::new(), Vec::new());
    for batch in 0..(n / 100) {
        for _ in 0..100 {
            bare.push(round_trip(&mut c, "bench/echo", b"ping".to_vec()).await?);
        }
        for _ in 0..100 {
            gets.push(round_trip(&mut c, get_topic, Vec::new()).await?);
        }
        for i in 0..100 {
            upd.push(round_trip(&mut c, upd_topic, doc(batch * 100 + i)).await?);
        }
    }
    let bare_p50 = line("publish -> own subscription", bare, None);
    line("get -> get/accepted", gets, Some(bare_p50));
    line("update -> update/accepted", upd, Some(bare_p50));

    println!("\nSigV4 verification, in process (a signed UpdateThingShadow)");
    let body = br#"{"state":{"reported":{"temp":21.5,"humidity":40}}}"#.to_vec();
    let (m, uri): (http::Method, http::Uri) =
        ("POST".parse()?, "/things/bench/shadow?name=cfg".parse()?);
    let full = owner.sign("POST", &uri.to_string(), "127.0.0.1:8420", &body)?;
    let now = (roost_store::now_ms() / 1000) as u64;
    let req = sigv4::Request::from_http(&m, &uri, &full, &body);
    let rounds = 100_000;
    let t = Instant::now();
    for _ in 0..rounds {
        sigv4::verify(&req, |_| Some(owner.secret.as_str()), now)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!(
        "  verify                         {per:>8.2} us per request ({:.1}% of an UpdateThingShadow round trip)",
        per / update_p50 * 100.0
    );
    Ok(())
}
