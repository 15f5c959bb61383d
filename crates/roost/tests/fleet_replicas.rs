//! One fleet served by several `roost cloud` replicas on one PostgreSQL
//! database: a deployment made through one replica reaches the hubs
//! connected to another, and a replica killed with SIGKILL and started
//! again loses nothing while the other keeps serving. Then the TLS cloud:
//! a hub enrols only with the cloud its token pins, and the admin CLI
//! trusts only the certificate it is given.
//!
//! The replica tests need `ROOST_TEST_POSTGRES` (`. scripts/postgres.sh`);
//! each makes a database of its own. Without it they are skipped, with
//! `CI=true` they fail.

mod common;
use common::fleet::*;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Generous on purpose: hubs reconnect with jittered back-off, and a
/// loaded CI machine is slow. Nothing here measures speed.
const WAIT: Duration = Duration::from_secs(180);

const FINAL: [&str; 5] = [
    "succeeded",
    "failed",
    "rolled_back",
    "superseded",
    "cancelled",
];

/// Two replicas, A and B, on one fresh database, with hub-a enrolled
/// through A and hub-b through B, both in group "shops", connected.
struct Fleet {
    // Dropped in this order: the hubs, the replicas, then the database.
    hub_a: TestHub,
    hub_b: TestHub,
    a: TestCloud,
    b: TestCloud,
    _pg: TestPostgres,
}

impl Fleet {
    /// `args`: more `roost cloud` arguments for both replicas.
    fn start(args: &[&str]) -> Option<Fleet> {
        let pg = TestPostgres::new()?;
        let args = [&["--database", pg.url.as_str()], args].concat();
        let a = TestCloud::start_with(&args);
        let b = TestCloud::start_with(&args);
        assert_eq!(
            a.token(),
            b.token(),
            "replicas on one database share the admin token"
        );
        let hub_a = a.hub("hub-a", &["shops"], &[]);
        let hub_b = b.hub("hub-b", &["shops"], &[]);
        let f = Fleet {
            hub_a,
            hub_b,
            a,
            b,
            _pg: pg,
        };
        f.until("hub-a and hub-b connected", || {
            let v = f.hubs(&f.a);
            connected(&v, "hub-a") && connected(&v, "hub-b")
        });
        Some(f)
    }

    /// Every process's log, for a failure message.
    fn logs(&self) -> String {
        format!(
            "\n--- replica A log:\n{}\n--- replica B log:\n{}\n--- hub-a log:\n{}\n--- hub-b log:\n{}",
            self.a.log_text(),
            self.b.log_text(),
            self.hub_a.log_text(),
            self.hub_b.log_text()
        )
    }

    fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out ({WAIT:?}) waiting for {what}{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `roost cloud ARGS` through replica `via`, which must succeed.
    fn ok(&self, via: &TestCloud, args: &[&str]) -> String {
        let out = via.cli(args);
        assert!(
            out.status.success(),
            "roost cloud {args:?} through {} failed: {}{}",
            via.url,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, via: &TestCloud, args: &[&str]) -> Value {
        let text = self.ok(via, args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?} printed {text:?}: {e}"))
    }

    /// `roost cloud hubs --json` through `via`.
    fn hubs(&self, via: &TestCloud) -> Value {
        self.json(via, &["hubs", "--json"])
    }

    /// `roost cloud deploy MANIFEST --group shops` through `via`; its id.
    fn deploy(&self, via: &TestCloud, pkg: &Package) -> i64 {
        let out = self.ok(
            via,
            &[
                "deploy",
                pkg.manifest().to_str().unwrap(),
                "--group",
                "shops",
            ],
        );
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("deploy printed {out:?}, not an id"))
    }

    /// `hub`'s (status, reason) in deployment `id`, through `via`.
    fn status(&self, via: &TestCloud, id: i64, hub: &str) -> (String, String) {
        let d = self.json(via, &["deployments", &id.to_string(), "--json"]);
        hub_in(&d, hub).unwrap_or_else(|| panic!("no {hub} in deployment {id}: {d}{}", self.logs()))
    }

    /// Waits until `hub` is done with deployment `id` (read through `via`)
    /// and checks it succeeded.
    fn succeeded(&self, via: &TestCloud, id: i64, hub: &str) {
        let mut last = (String::new(), String::new());
        self.until(&format!("{hub} done with deployment {id}"), || {
            last = self.status(via, id, hub);
            FINAL.contains(&last.0.as_str())
        });
        assert_eq!(
            last.0,
            "succeeded",
            "{hub} ended deployment {id} {} ({}){}",
            last.0,
            last.1,
            self.logs()
        );
    }

    /// Calls `task` on `hub`'s own API; its output.
    fn call(&self, hub: &TestHub, task: &str, input: &str) -> String {
        let r = hub.call(task, input);
        let status = r.status();
        let body = r.text().unwrap();
        assert_eq!(
            status,
            200,
            "calling {task} on {}: {body}{}",
            hub.url,
            self.logs()
        );
        body
    }
}

/// `hub`'s (status, reason) in a deployment document.
fn hub_in(d: &Value, hub: &str) -> Option<(String, String)> {
    let h = d["hubs"].as_array()?.iter().find(|h| h["hub"] == hub)?;
    Some((
        h["status"].as_str().unwrap_or("").to_owned(),
        h["reason"].as_str().unwrap_or("").to_owned(),
    ))
}

fn row<'a>(hubs: &'a Value, name: &str) -> Option<&'a Value> {
    hubs["hubs"].as_array()?.iter().find(|h| h["name"] == name)
}

fn connected(hubs: &Value, name: &str) -> bool {
    row(hubs, name).is_some_and(|h| h["connected"] == true)
}

/// The first package: an echo task.
fn echo_package() -> Package {
    Package::new(&task("echo", "echo.wat", ""), &["echo.wat"])
}

/// The second: echo, and greet, which calls it.
fn greet_package() -> Package {
    Package::new(
        &(task("echo", "echo.wat", "") + &task("greet", "greet.wat", "")),
        &["echo.wat", "greet.wat"],
    )
}

#[test]
fn a_deployment_made_through_one_replica_reaches_a_hub_connected_to_another() {
    let Some(f) = Fleet::start(&[]) else { return };
    let pkg = echo_package();
    let id = f.deploy(&f.b, &pkg);
    // hub-a's socket is held by replica A only: B's deployment reaches it
    // as a database event.
    f.succeeded(&f.b, id, "hub-a");
    f.succeeded(&f.b, id, "hub-b");
    // The same, read through the other replica.
    assert_eq!(f.status(&f.a, id, "hub-a").0, "succeeded");
    assert_eq!(f.status(&f.a, id, "hub-b").0, "succeeded");
    // The hubs run the deployment's task.
    assert_eq!(f.call(&f.hub_a, "echo", "to hub-a"), "to hub-a");
    assert_eq!(f.call(&f.hub_b, "echo", "to hub-b"), "to hub-b");
    // Either replica lists both hubs connected, with the deployment applied.
    for (replica, via) in [("A", &f.a), ("B", &f.b)] {
        let mut last = Value::Null;
        f.until(
            &format!("both hubs connected with {id} applied, through replica {replica}"),
            || {
                last = f.hubs(via);
                ["hub-a", "hub-b"].iter().all(|h| {
                    row(&last, h).is_some_and(|r| r["connected"] == true && r["applied"] == id)
                })
            },
        );
        for h in ["hub-a", "hub-b"] {
            let r = row(&last, h).unwrap();
            assert_eq!(
                (r["desired"].as_i64(), r["status"].as_str()),
                (Some(id), Some("succeeded")),
                "{h} through replica {replica}: {last}"
            );
        }
    }
}

#[test]
fn a_replica_killed_and_restarted_while_the_other_serves_loses_nothing() {
    // Short heartbeats, so a replica's death shows within seconds.
    let Some(mut f) = Fleet::start(&["--heartbeat-s", "2"]) else {
        return;
    };
    let first = f.deploy(&f.a, &echo_package());
    f.succeeded(&f.a, first, "hub-a");
    f.succeeded(&f.a, first, "hub-b");

    f.a.kill9();
    // B serves on alone: a deployment made through it during A's outage
    // reaches hub-b at once, and waits for hub-a.
    let second = f.deploy(&f.b, &greet_package());
    f.succeeded(&f.b, second, "hub-b");
    assert_eq!(f.call(&f.hub_b, "greet", "b"), "hello, b");
    let (s, r) = f.status(&f.b, second, "hub-a");
    assert!(
        !FINAL.contains(&s.as_str()),
        "hub-a cannot have finished deployment {second} without its replica: {s} ({r}){}",
        f.logs()
    );
    // The dead replica stops refreshing hub-a's row: B soon lists it as
    // not connected, and hub-b as connected still.
    f.until("B to list hub-a as not connected while A is dead", || {
        !connected(&f.hubs(&f.b), "hub-a")
    });
    assert!(
        connected(&f.hubs(&f.b), "hub-b"),
        "hub-b is still connected to B{}",
        f.logs()
    );

    // A comes back on the same database and address; hub-a reconnects
    // (with back-off) and gets what was deployed meanwhile.
    f.a.relaunch();
    f.succeeded(&f.a, second, "hub-a");
    f.succeeded(&f.b, second, "hub-a");
    assert_eq!(f.call(&f.hub_a, "greet", "a"), "hello, a");

    // Nothing acknowledged before the kill is lost, read through either.
    for via in [&f.a, &f.b] {
        let v = f.json(via, &["deployments", "--json"]);
        let mut ids: Vec<i64> = v["deployments"]
            .as_array()
            .unwrap_or_else(|| panic!("no deployments list: {v}"))
            .iter()
            .filter_map(|d| d["id"].as_i64())
            .collect();
        ids.sort();
        assert_eq!(ids, [first, second], "deployments through {}: {v}", via.url);
        for h in ["hub-a", "hub-b"] {
            assert_eq!(f.status(via, first, h).0, "succeeded", "{h} in {first}");
        }
        let hubs = f.hubs(via);
        let mut names: Vec<&str> = hubs["hubs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|h| h["name"].as_str())
            .collect();
        names.sort();
        assert_eq!(names, ["hub-a", "hub-b"], "{hubs}");
    }
    f.until(
        "both hubs connected with the second deployment applied",
        || {
            let v = f.hubs(&f.a);
            ["hub-a", "hub-b"].iter().all(|h| {
                row(&v, h).is_some_and(|r| r["connected"] == true && r["applied"] == second)
            })
        },
    );
}

/// `roost hub` on a fresh data dir, expected to refuse to start; its
/// stderr.
fn enrol_refused(dir: &Path, args: &[&str]) -> String {
    let mut child = Command::new(roost_bin())
        .args(["hub", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
        .args(["--task-identities", "off", "--data-dir"])
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hub that enrolled would serve on: give it a while, then stop it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "roost hub {args:?} did not refuse; it logged:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "roost hub {args:?} exited 0: {stderr}"
    );
    stderr
}

#[test]
fn a_hub_enrols_only_with_the_tls_cloud_its_token_pins() {
    let cloud = TestCloud::start_tls(&[]);
    assert!(cloud.url.starts_with("https://"), "{}", cloud.url);
    let hub = cloud.hub("tls-hub", &["tls"], &[]);
    let logs = |other: &str| {
        format!(
            "{other}\n--- cloud log:\n{}\n--- hub log:\n{}",
            cloud.log_text(),
            hub.log_text()
        )
    };
    let cred: Value =
        serde_json::from_slice(&std::fs::read(hub.data_dir.join("cloud-credential.json")).unwrap())
            .unwrap();
    assert!(
        cred["pin"].as_str().is_some_and(|p| p.len() == 64),
        "the credential keeps the pin: {cred}"
    );
    cloud.wait_connected("tls-hub");
    let pkg = echo_package();
    let id = cloud.deploy(&pkg.manifest(), &["--group", "tls"]);
    let (s, r) = cloud.wait_hub_done(id, "tls-hub", WAIT);
    assert_eq!(s, "succeeded", "{r}{}", logs(""));
    let out = hub.call("echo", "over tls");
    assert_eq!(out.status(), 200, "{}", logs(""));
    assert_eq!(out.text().unwrap(), "over tls");

    // A token whose pin is cloud 1's key, at cloud 2's address: the TLS
    // handshake fails on the pin, before the token is sent.
    let other = TestCloud::start_tls(&[]);
    let token = cloud.add("pinned-elsewhere", &[]);
    let dir = tempfile::tempdir().unwrap();
    let e = enrol_refused(dir.path(), &["--cloud", &other.url, "--enrol", &token]);
    assert!(
        e.contains("cannot reach the cloud") && e.contains("pinned"),
        "the refusal names the pin: {e}{}",
        logs("")
    );
    assert!(
        !dir.path().join("cloud-credential.json").exists(),
        "no credential is written for a refused enrolment"
    );
    // Plain http with a token for a TLS cloud is refused before any
    // request.
    let plain = cloud.url.replacen("https://", "http://", 1);
    let e = enrol_refused(dir.path(), &["--cloud", &plain, "--enrol", &token]);
    assert!(e.contains("use https://"), "{e}");
    assert!(!dir.path().join("cloud-credential.json").exists());
    // Neither attempt used the token up: it enrols with its own cloud.
    let late = TestHub::start(&["--cloud", &cloud.url, "--enrol", &token]);
    assert!(
        late.data_dir.join("cloud-credential.json").exists(),
        "{}",
        logs(&late.log_text())
    );
    cloud.wait_connected("pinned-elsewhere");

    // The admin CLI trusts only the certificate it is given.
    let admin = |cert: Option<&Path>| {
        let mut cmd = Command::new(roost_bin());
        cmd.args(["cloud", "hubs", "--cloud", &cloud.url])
            .env("ROOST_CLOUD_DATA_DIR", cloud.data_dir())
            .env_remove("ROOST_CLOUD_TOKEN")
            .env_remove("ROOST_CLOUD_CERT");
        if let Some(c) = cert {
            cmd.arg("--cloud-cert").arg(c);
        }
        cmd.output().unwrap()
    };
    let out = admin(None);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("--cloud-cert"),
        "without --cloud-cert: {e}"
    );
    let out = admin(other.cert.as_deref());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("cannot reach the cloud"),
        "with another cloud's certificate: {e}"
    );
    let out = admin(cloud.cert.as_deref());
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("tls-hub"),
        "with its certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
