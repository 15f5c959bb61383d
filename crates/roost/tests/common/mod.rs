//! Test harness: runs a real `roost hub` process on a free port with its own
//! data dir, and drives it through HTTP and the `roost` CLI.
#![allow(dead_code)]

pub mod fleet;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn roost_bin() -> &'static str {
    env!("CARGO_BIN_EXE_roost")
}

/// This crate's folder, as cargo names it when it runs the tests. Read at
/// run time: a test binary reused from a build made in another checkout of
/// the same target dir (cargo does not rebuild for a moved workspace) would
/// carry that checkout's compile-time path.
pub fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn wasm_dir() -> PathBuf {
    crate_dir().join("tests/wasm")
}

pub struct TestHub {
    pub url: String,
    /// The MQTT broker's address, host:port.
    pub mqtt: String,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
    pub args: Vec<String>,
    pub log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestHub {
    pub fn start(args: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let mut hub = TestHub {
            url: String::new(),
            mqtt: String::new(),
            data_dir,
            child: None,
            args: Self::with_defaults(args),
            log: tmp.path().join("hub.log"),
            _tmp: Some(tmp),
        };
        hub.launch();
        hub
    }

    /// The tests' Python and Node runtimes live under root's private home
    /// (~/.cache), which a task's own user cannot enter: tasks run as the
    /// hub's user unless a test asks for `--task-identities`.
    fn with_defaults(args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !args.contains(&"--task-identities") {
            all.extend(["--task-identities".into(), "off".into()]);
        }
        all
    }

    /// Starts (or restarts) the hub process on the same data dir.
    pub fn launch(&mut self) {
        let endpoints = self.data_dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(roost_bin())
            .arg("hub")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
            .args(&self.args)
            .env("ROOST_LOG", "info,roost_runtime_wasm=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn roost hub");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&endpoints) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    self.url = v["url"].as_str().unwrap().to_owned();
                    self.mqtt = v["mqtt"].as_str().unwrap_or_default().to_owned();
                    if http().get(format!("{}/healthz", self.url)).send().is_ok() {
                        return;
                    }
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("hub exited with {status}; log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "hub did not start; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            c.wait().unwrap();
        }
    }

    pub fn sigterm(&mut self) -> Child {
        let c = self.child.take().unwrap();
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Runs the `roost` CLI against this hub.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(roost_bin())
            .args(args)
            .env("ROOST_HUB", &self.url)
            .output()
            .unwrap()
    }

    /// Deploys a manifest through the CLI; panics with its stderr on failure.
    pub fn deploy(&self, manifest: &Path) {
        let out = self.cli(&["deploy", manifest.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "deploy failed: {}\nhub log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
    }

    pub fn call(&self, task: &str, input: impl Into<Vec<u8>>) -> reqwest::blocking::Response {
        http()
            .post(format!("{}/v1/tasks/{task}/calls", self.url))
            .body(input.into())
            .send()
            .unwrap()
    }

    pub fn call_async(&self, task: &str, input: impl Into<Vec<u8>>) -> reqwest::blocking::Response {
        http()
            .post(format!("{}/v1/tasks/{task}/calls?mode=async", self.url))
            .body(input.into())
            .send()
            .unwrap()
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        http()
            .get(format!("{}{path}", self.url))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// Polls an async call until it is finished; returns its status body.
    pub fn wait_call(&self, id: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.get_json(&format!("/v1/calls/{id}"));
            let s = v["status"].as_str().unwrap_or("");
            if s == "succeeded" || s == "failed" {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "call {id} still {s}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `GET /v1/calls/{id}/output`.
    pub fn call_output(&self, id: &str) -> reqwest::blocking::Response {
        http()
            .get(format!("{}/v1/calls/{id}/output", self.url))
            .send()
            .unwrap()
    }

    /// The hub's Prometheus metrics text.
    pub fn metrics(&self) -> String {
        http()
            .get(format!("{}/metrics", self.url))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    pub fn task_row(&self, task: &str) -> serde_json::Value {
        let v = self.get_json("/v1/tasks");
        v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == task)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for TestHub {
    /// A graceful stop, so the hub's workers and cgroups go with it; a
    /// hub that does not stop in time is killed.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An HTTP client for the test hub (which may use a self-signed certificate).
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A manifest folder: the given manifest text plus copies of the named test
/// modules from tests/wasm.
pub struct Package {
    pub dir: tempfile::TempDir,
}

impl Package {
    pub fn new(manifest: &str, modules: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("manifest.toml"), manifest).unwrap();
        for m in modules {
            std::fs::copy(wasm_dir().join(m), dir.path().join(m)).unwrap();
        }
        Package { dir }
    }
    pub fn manifest(&self) -> PathBuf {
        self.dir.path().join("manifest.toml")
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// Copies the fixture folder `tests/lambda/FROM` (modes kept) into the
    /// package as `TO`.
    pub fn copy_fixture(&self, from: &str, to: &str) {
        copy_all(&lambda_dir().join(from), &self.path().join(to));
    }
}

/// `$PYTHON` (or python3), checked to import `modules` (comma-separated).
pub fn python_with(modules: &str) -> String {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "these tests need the Python modules {modules}: run scripts/test.sh, or set PYTHON to a python that has them"
    );
    py
}

/// The process-task fixtures (`tests/lambda`).
pub fn lambda_dir() -> PathBuf {
    crate_dir().join("tests/lambda")
}

/// `cp -a FROM TO`: a file or a folder, modes kept.
pub fn copy_all(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(ok.success(), "cp -a {} {}", from.display(), to.display());
}

/// A `[[task]]` entry for a wasm module.
pub fn task(name: &str, code: &str, extra: &str) -> String {
    format!("[[task]]\nname = \"{name}\"\nruntime = \"wasm\"\ncode = \"{code}\"\n{extra}\n")
}

pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (status, error code, error message) of an error answer.
pub fn error_of(resp: reqwest::blocking::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().unwrap();
    (
        status,
        v["error"]["code"].as_str().unwrap_or("").to_owned(),
        v["error"]["message"].as_str().unwrap_or("").to_owned(),
    )
}

/// The call id in a 202 answer.
pub fn id_of(resp: reqwest::blocking::Response) -> String {
    resp.json::<serde_json::Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `roost passwd` with the password on stdin: an argon2 hash for a
/// `[[device]]`.
pub fn password_hash(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(roost_bin())
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl TestHub {
    /// The MQTT broker's port.
    pub fn mqtt_port(&self) -> &str {
        self.mqtt.rsplit_once(':').unwrap().1
    }
}

/// A `mosquitto_sub` whose subscription the broker has acknowledged, so
/// whatever is published after `subscribe` returns reaches it. It runs with
/// `-d`: its debug lines are read up to "received SUBACK" and kept out of
/// what it printed. (Sleeping "long enough" instead raced on a loaded CI.)
pub struct Subscriber {
    child: Child,
    printed: std::thread::JoinHandle<Vec<String>>,
}

impl TestHub {
    /// Starts `mosquitto_sub -v -C count -W secs ARGS` against the broker and
    /// returns once it has its SUBACK.
    pub fn subscribe(&self, args: &[&str], count: usize, secs: u32) -> Subscriber {
        self.subscribe_plain(&[&["-v"], args].concat(), count, secs)
    }

    /// As `subscribe`, without `-v` (for `-F` formats or bare payloads).
    pub fn subscribe_plain(&self, args: &[&str], count: usize, secs: u32) -> Subscriber {
        use std::io::BufRead;
        let (host, _) = self.mqtt.rsplit_once(':').unwrap();
        // Line-buffered (stdbuf): a pipe would hold the SUBACK line back
        // until mosquitto_sub exits.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", host, "-p", self.mqtt_port(), "-d"])
            .args(["-C", &count.to_string(), "-W", &secs.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (apt install mosquitto-clients)");
        let stdout = child.stdout.take().unwrap();
        let (subscribed, acked) = std::sync::mpsc::sync_channel(1);
        let printed = std::thread::spawn(move || {
            let mut printed = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("Client ") {
                    if line.ends_with("received SUBACK") {
                        let _ = subscribed.try_send(());
                    }
                } else if !line.starts_with("Subscribed (mid:") {
                    printed.push(line);
                }
            }
            printed
        });
        // Disconnected: it has already left (a resumed session's queued
        // messages can fill `-C` before the SUBACK); its output says why.
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            acked.recv_timeout(Duration::from_secs(30))
        {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "mosquitto_sub {args:?} got no SUBACK: {}\nhub log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
        }
        Subscriber { child, printed }
    }
}

impl Subscriber {
    /// What it printed, a line each, once it has left (after `count`
    /// messages or its timeout).
    pub fn lines(mut self) -> Vec<String> {
        self.child.wait().unwrap();
        self.printed.join().unwrap()
    }

    /// What it printed, as one string.
    pub fn output(self) -> String {
        self.lines().join("\n")
    }
}
