//! A real `roost cloud` process for the fleet tests, with its own data dir
//! (or a PostgreSQL database), and hubs enrolled in it.

use super::*;
use std::process::{Child, Command, Output, Stdio};

pub struct TestCloud {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub url: String,
    /// Extra `roost cloud` arguments (--database, --tls-cert, ...).
    pub args: Vec<String>,
    /// The certificate clients pin, when it serves TLS.
    pub cert: Option<PathBuf>,
    /// The address it bound first: a restart binds it again, so hubs
    /// find it where they left it.
    pub http: Option<String>,
}

impl TestCloud {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), args)
    }

    /// A cloud serving TLS with a fresh self-signed certificate for
    /// 127.0.0.1 (made with openssl, as an operator would).
    pub fn start_tls(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "cloud");
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--tls-cert", cert.to_str().unwrap()]);
        all.extend(["--tls-key", key.to_str().unwrap()]);
        let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut c = Self::start_in(dir, &all);
        c.cert = Some(cert);
        c
    }

    fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Self {
        let mut c = TestCloud {
            dir,
            child: None,
            url: String::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
            cert: None,
            http: None,
        };
        if c.args.iter().any(|a| a == "--tls-cert") {
            let i = c.args.iter().position(|a| a == "--tls-cert").unwrap();
            c.cert = Some(PathBuf::from(&c.args[i + 1]));
        }
        c.launch();
        c
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("cloud")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("cloud.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn launch(&mut self) {
        let endpoints = self.data_dir().join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(roost_bin())
            .args(["cloud", "--http"])
            .arg(self.http.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !endpoints.exists() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "roost cloud exited with {status}; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "roost cloud did not start; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&endpoints).unwrap()).unwrap();
        self.url = v["url"].as_str().unwrap().to_owned();
        self.http = Some(v["http"].as_str().unwrap().to_owned());
    }

    /// Starts it again (after `kill9`) on the address it served before,
    /// where its hubs' credentials point.
    /// Starts it again on the address it had (as `launch` does).
    pub fn relaunch(&mut self) {
        self.launch();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// `roost cloud ARGS` as a client of this cloud (token from its data dir).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(roost_bin());
        cmd.arg("cloud").args(args);
        cmd.env("ROOST_CLOUD", &self.url)
            .env("ROOST_CLOUD_DATA_DIR", self.data_dir())
            .env_remove("ROOST_CLOUD_TOKEN");
        if let Some(cert) = &self.cert {
            cmd.env("ROOST_CLOUD_CERT", cert);
        }
        cmd.output().unwrap()
    }

    /// `roost cloud ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "roost cloud {args:?} failed: {}\ncloud log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin-token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// GET an admin API path as JSON.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let r = http()
            .get(format!("{}{path}", self.url))
            .bearer_auth(self.token())
            .send()
            .unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().unwrap()
    }

    /// Adds a hub and starts it enrolled, with `args` besides.
    pub fn hub(&self, name: &str, groups: &[&str], args: &[&str]) -> TestHub {
        let token = self.add(name, groups);
        let mut all = vec!["--cloud", &self.url, "--enrol", &token];
        all.extend(args);
        TestHub::start(&all)
    }

    /// Adds a hub to the fleet; its one-time token.
    pub fn add(&self, name: &str, groups: &[&str]) -> String {
        let mut args = vec!["hubs", "add", name];
        for g in groups {
            args.extend(["--group", g]);
        }
        self.ok(&args).trim().to_owned()
    }

    /// The hub's row in `roost cloud hubs --json`.
    pub fn hub_row(&self, name: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["hubs", "--json"])).unwrap();
        v["hubs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no hub {name} in {v}"))
    }

    pub fn wait_connected(&self, name: &str) {
        wait_until(
            &format!("{name} connected"),
            Duration::from_secs(30),
            || self.hub_row(name)["connected"] == true,
        );
    }

    /// Deploys through the CLI; the deployment id.
    pub fn deploy(&self, manifest: &Path, target: &[&str]) -> i64 {
        let mut args = vec!["deploy", manifest.to_str().unwrap()];
        args.extend(target);
        self.ok(&args).trim().parse().unwrap()
    }

    pub fn deployment(&self, id: i64) -> serde_json::Value {
        self.get(&format!("/v1/deployments/{id}"))
    }

    /// Waits until the deployment is no longer rolling out; its document.
    pub fn wait_deployment(&self, id: i64, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let last = self.deployment(id);
            if last["state"] != "rolling_out" {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "deployment {id} still rolling out: {last}\ncloud log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The status and reason of `hub` in deployment `id`.
    pub fn hub_status(&self, id: i64, hub: &str) -> (String, String) {
        let d = self.deployment(id);
        let h = d["hubs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["hub"] == hub)
            .cloned()
            .unwrap_or_else(|| panic!("no hub {hub} in {d}"));
        (
            h["status"].as_str().unwrap().to_owned(),
            h["reason"].as_str().unwrap_or("").to_owned(),
        )
    }

    /// Waits until `hub` is in a final status of deployment `id`.
    pub fn wait_hub_done(&self, id: i64, hub: &str, within: Duration) -> (String, String) {
        let deadline = Instant::now() + within;
        loop {
            let (s, r) = self.hub_status(id, hub);
            if matches!(
                s.as_str(),
                "succeeded" | "failed" | "rolled_back" | "superseded" | "cancelled" | "timed_out"
            ) {
                return (s, r);
            }
            assert!(
                Instant::now() < deadline,
                "{hub} is still {s} ({r}) in deployment {id}\ncloud log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestCloud {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, not a CA (as a
/// server certificate should be), with its key: (cert.pem, key.pem).
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "30"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The hub's task names as `roost tasks` would list them.
pub fn task_names(hub: &TestHub) -> Vec<String> {
    let v = hub.get_json("/v1/tasks");
    let mut names: Vec<String> = v["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// A fresh PostgreSQL database of its own on the server
/// `ROOST_TEST_POSTGRES` names (`. scripts/postgres.sh` starts one), so
/// tests never see each other's state; dropped with the value.
pub struct TestPostgres {
    admin: String,
    name: String,
    /// The `--database` URL of the fresh database.
    pub url: String,
}

impl TestPostgres {
    /// None, with a note, when no server is named outside CI; with
    /// `CI=true` that is a failure, so CI cannot lose these tests.
    pub fn new() -> Option<TestPostgres> {
        let admin = match std::env::var("ROOST_TEST_POSTGRES") {
            Ok(u) if !u.is_empty() => u,
            _ => {
                assert_ne!(
                    std::env::var("CI").as_deref(),
                    Ok("true"),
                    "CI=true but ROOST_TEST_POSTGRES is not set: .ci/run starts a server with scripts/postgres.sh"
                );
                eprintln!("note: ROOST_TEST_POSTGRES is not set: skipped; `. scripts/postgres.sh` starts a server and sets it");
                return None;
            }
        };
        let name = format!("roost_t_{:016x}", rand::random::<u64>());
        let mut c = postgres::Client::connect(&admin, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to ROOST_TEST_POSTGRES: {e}"));
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin.as_str(), String::new()),
        };
        let start = base.find("://").map_or(0, |i| i + 3);
        let end = base[start..].find('/').map_or(base.len(), |i| start + i);
        let url = format!("{}/{name}{query}", &base[..end]);
        Some(TestPostgres { admin, name, url })
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}
