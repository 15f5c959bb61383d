//! The CLI's side of the HTTP API: each command is one or two requests and
//! a readable rendering of the answer.

use crate::HubArgs;
use anyhow::{anyhow, bail, Context, Result};
use reqwest::blocking::{Client, RequestBuilder, Response};
use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::time::Duration;

fn client(timeout: Option<Duration>) -> Result<Client> {
    Ok(Client::builder().timeout(timeout).build()?)
}

fn with_auth(req: RequestBuilder, hub: &HubArgs) -> RequestBuilder {
    match &hub.token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

fn url(hub: &HubArgs, path: &str) -> String {
    format!("{}{}", hub.hub.trim_end_matches('/'), path)
}

fn send(req: RequestBuilder, hub: &HubArgs) -> Result<Response> {
    with_auth(req, hub).send().map_err(|e| {
        if e.is_connect() {
            anyhow!(
                "cannot reach the hub at {}: is `roost hub` running? (or pass --hub URL)",
                hub.hub
            )
        } else if e.is_timeout() {
            anyhow!("the hub at {} did not answer in time", hub.hub)
        } else {
            anyhow!("request to the hub failed: {e}")
        }
    })
}

/// Turns an error answer into a message that says what went wrong.
fn check(resp: Response) -> Result<Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.text().unwrap_or_default();
    let parsed: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let Some(err) = parsed.as_ref().and_then(|v| v.get("error")) else {
        bail!("the hub answered {status}: {}", body.trim());
    };
    let code = err["code"].as_str().unwrap_or("error");
    let message = err["message"].as_str().unwrap_or("");
    if let Some(problems) = err.get("problems").and_then(|p| p.as_array()) {
        let mut out = format!(
            "the manifest was refused; nothing was applied ({} problem(s)):",
            problems.len()
        );
        for p in problems {
            let value = p["value"].as_str().unwrap_or("");
            if value.is_empty() {
                out.push_str(&format!(
                    "\n  {}: {}",
                    p["field"].as_str().unwrap_or("?"),
                    p["why"].as_str().unwrap_or("")
                ));
            } else {
                out.push_str(&format!(
                    "\n  {} = {}: {}",
                    p["field"].as_str().unwrap_or("?"),
                    value,
                    p["why"].as_str().unwrap_or("")
                ));
            }
        }
        bail!(out);
    }
    match retry {
        Some(r) => bail!("{code}: {message} (retry after {r} s)"),
        None => bail!("{code}: {message}"),
    }
}

/// Secret values go only over TLS, or over loopback to a hub on this
/// machine.
pub(crate) fn secrets_may_travel_to(hub: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(hub) else {
        return false;
    };
    let host = u.host_str().unwrap_or_default();
    u.scheme() == "https"
        || host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub fn deploy(hub: &HubArgs, manifest: Option<&Path>, rollback: bool, force: bool) -> Result<()> {
    let c = client(Some(Duration::from_secs(600)))?;
    let query: &[(&str, &str)] = if force { &[("force", "true")] } else { &[] };
    let resp = if rollback {
        check(send(
            c.post(url(hub, "/v1/deployments/rollback")).query(query),
            hub,
        )?)?
    } else {
        let manifest = manifest.ok_or_else(|| anyhow!("give the manifest to deploy"))?;
        let package = crate::pack::pack(manifest, crate::pack::Secrets::InPackage)?;
        if !package.secrets.is_empty() && !secrets_may_travel_to(&hub.hub) {
            anyhow::bail!(
                "the manifest has [[secret]]s and {} is plain HTTP to another machine; serve the hub's API with --tls-cert/--tls-key and deploy to its https:// address",
                hub.hub
            );
        }
        check(send(
            c.post(url(hub, "/v1/deployments"))
                .query(query)
                .header("content-type", "application/gzip")
                .body(package.bytes),
            hub,
        )?)?
    };
    let report: serde_json::Value = resp.json()?;
    let tasks: Vec<&str> = report["tasks"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
        .unwrap_or_default();
    println!(
        "{} deployment {} with {} task(s): {}",
        if rollback {
            "rolled back to"
        } else {
            "applied"
        },
        report["deployment"],
        tasks.len(),
        tasks.join(", ")
    );
    Ok(())
}

fn read_input(input: Option<&str>) -> Result<Vec<u8>> {
    match input {
        None => Ok(Vec::new()),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            Ok(buf)
        }
        Some(path) => {
            std::fs::read(path).with_context(|| format!("cannot read the input file {path}"))
        }
    }
}

pub fn call(hub: &HubArgs, task: &str, asynchronous: bool, input: Option<&str>) -> Result<()> {
    let body = read_input(input)?;
    let c = client(None)?;
    let path = format!(
        "/v1/tasks/{task}/calls{}",
        if asynchronous { "?mode=async" } else { "" }
    );
    let resp = check(send(c.post(url(hub, &path)).body(body), hub)?)?;
    if asynchronous {
        let v: serde_json::Value = resp.json()?;
        println!("{}", v["id"].as_str().unwrap_or_default());
    } else {
        let out = resp.bytes()?;
        std::io::stdout().write_all(&out)?;
    }
    Ok(())
}

pub fn status(hub: &HubArgs, id: &str, output: bool) -> Result<()> {
    let c = client(Some(Duration::from_secs(30)))?;
    if output {
        let out = check(send(
            c.get(url(hub, &format!("/v1/calls/{id}/output"))),
            hub,
        )?)?
        .bytes()?;
        std::io::stdout().write_all(&out)?;
    } else {
        let v: serde_json::Value =
            check(send(c.get(url(hub, &format!("/v1/calls/{id}"))), hub)?)?.json()?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

pub fn tasks(hub: &HubArgs, json: bool) -> Result<()> {
    let c = client(Some(Duration::from_secs(30)))?;
    let v: serde_json::Value = check(send(c.get(url(hub, "/v1/tasks")), hub)?)?.json()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
    if tasks.is_empty() {
        println!("no tasks deployed; deploy some with `roost deploy MANIFEST`");
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:>7} {:>9} {:>5} {:>4} {:>7} {:>7} {:>9} {:>7}  USER",
        "TASK",
        "RUNTIME",
        "MEM_MB",
        "TIMEOUT",
        "CONC",
        "PRIO",
        "QUEUED",
        "RUNNING",
        "SUCCEEDED",
        "FAILED"
    );
    for t in tasks {
        let n = |k: &str| t[k].to_string();
        println!(
            "{:<24} {:<8} {:>7} {:>7}ms {:>5} {:>4} {:>7} {:>7} {:>9} {:>7}  {}",
            t["name"].as_str().unwrap_or("?"),
            t["runtime"].as_str().unwrap_or("?"),
            n("memory_mb"),
            n("timeout_ms"),
            n("concurrency"),
            n("priority"),
            n("queued"),
            n("running"),
            n("succeeded"),
            n("failed"),
            // A process task's own uid (task identities), else the hub's.
            t["uid"]
                .as_u64()
                .map(|u| u.to_string())
                .unwrap_or_else(|| "hub".into())
        );
    }
    Ok(())
}

pub fn devices(hub: &HubArgs, json: bool) -> Result<()> {
    let c = client(Some(Duration::from_secs(30)))?;
    let v: serde_json::Value = check(send(c.get(url(hub, "/v1/devices")), hub)?)?.json()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let devices = v["devices"].as_array().cloned().unwrap_or_default();
    if devices.is_empty() {
        println!("no devices deployed; add [[device]] entries to a manifest and `roost deploy` it");
        return Ok(());
    }
    println!("{:<32} {:<12} CLIENT IDS", "DEVICE", "STATE");
    for d in devices {
        let ids: Vec<&str> = d["client_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<32} {:<12} {}",
            d["name"].as_str().unwrap_or("?"),
            if d["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "offline"
            },
            ids.join(",")
        );
    }
    Ok(())
}

pub fn logs(hub: &HubArgs, task: Option<&str>, follow: bool) -> Result<()> {
    let c = client(if follow {
        None
    } else {
        Some(Duration::from_secs(30))
    })?;
    let mut q = Vec::new();
    if let Some(t) = task {
        q.push(("task", t.to_owned()));
    }
    if follow {
        q.push(("follow", "true".to_owned()));
    }
    let resp = check(send(c.get(url(hub, "/v1/logs")).query(&q), hub)?)?;
    let reader = std::io::BufReader::new(resp);
    let mut out = std::io::stdout().lock();
    for line in reader.lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        writeln!(
            out,
            "{} {} [{}] {}",
            format_ms(v["time_ms"].as_i64().unwrap_or(0)),
            v["task"].as_str().unwrap_or("?"),
            v["call_id"]
                .as_str()
                .map(|s| &s[..s.len().min(8)])
                .unwrap_or(""),
            v["line"].as_str().unwrap_or("")
        )?;
        out.flush()?;
    }
    Ok(())
}

/// `HH:MM:SS.mmm` UTC, enough to read a log.
fn format_ms(ms: i64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}
