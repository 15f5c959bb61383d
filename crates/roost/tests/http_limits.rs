//! Hostile HTTP clients hold little of the hub: connections that send half
//! a header are closed at the header timeout, the HTTP API takes at most its
//! cap of connections (past it a client gets 503 and `/healthz` still
//! answers), and under a low open-files limit, idle HTTP connections never
//! take the descriptors the MQTT listener needs.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn http_addr(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// A connection that sent `sent` and nothing more.
fn hold(addr: &str, sent: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(sent).unwrap();
    s
}

/// Whether the hub has closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A raw `GET path` on a new connection: (status, body).
fn get_raw(addr: &str, path: &str) -> (u16, String) {
    // Past every lane the hub drops a connection at once: (0, "").
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn half_header_connections_are_closed_at_the_header_timeout() {
    let hub = TestHub::start(&["--http-header-timeout-s", "1"]);
    let addr = http_addr(&hub.url);
    let started = Instant::now();
    let mut held: Vec<TcpStream> = (0..50)
        .map(|_| hold(&addr, b"GET /v1/tasks HTTP/1.1\r\nHost: hub\r\nX-Slow: "))
        .collect();
    // A legitimate client is served meanwhile.
    assert_eq!(get_raw(&addr, "/healthz"), (200, "ok\n".into()));
    for (i, s) in held.iter_mut().enumerate() {
        // 1 s timeout; generous for a loaded CI, far below "never".
        assert!(
            closed_within(s, Duration::from_secs(20)),
            "connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let m = hub.metrics();
    assert!(
        metric(&m, "roost_connections_open{listener=\"http\"}") <= 2.0,
        "{m}"
    );
}

#[test]
fn past_the_connection_cap_healthz_answers_and_other_requests_get_503() {
    let hub = TestHub::start(&[
        "--http-max-connections",
        "20",
        "--http-header-timeout-s",
        "120",
    ]);
    let addr = http_addr(&hub.url);
    // Twenty under the cap, two more in the reserve kept for loopback
    // clients (an eighth of the cap), and eight over, so the cap stays
    // full whichever connections the hub took first (a probe below may
    // hold a place while the held ones arrive).
    let held: Vec<TcpStream> = (0..30).map(|_| hold(&addr, b"")).collect();
    // Once the hub has accepted all of them, the next is past the cap.
    wait_until("the cap to be reached", Duration::from_secs(20), || {
        get_raw(&addr, "/v1/tasks").0 == 503
    });
    let (status, body) = get_raw(&addr, "/v1/tasks");
    assert_eq!(status, 503);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["error"]["code"], "too_many_connections", "{body}");
    assert!(doc["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--http-max-connections"));
    assert_eq!(get_raw(&addr, "/healthz"), (200, "ok\n".into()));
    drop(held);
    wait_until("the API to serve again", Duration::from_secs(20), || {
        get_raw(&addr, "/v1/tasks").0 == 200
    });
    let m = hub.metrics();
    assert!(
        metric(&m, "roost_connections_refused_total{listener=\"http\"}") >= 2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "roost_connections_max{listener=\"http\"}"),
        20.0,
        "{m}"
    );
    assert!(hub.log_text().contains("connection refused"));
}

/// The hub process started with `RLIMIT_NOFILE` at `limit` (soft and
/// hard), as under a service manager's low default.
struct LimitedHub {
    child: std::process::Child,
    url: String,
    mqtt: String,
    log: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

impl LimitedHub {
    fn start(limit: u64, args: &[&str]) -> Self {
        use std::os::unix::process::CommandExt;
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let log = tmp.path().join("hub.log");
        let mut cmd = Command::new(roost_bin());
        cmd.arg("hub")
            .arg("--data-dir")
            .arg(&data)
            .args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
            .args(["--task-identities", "off"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // SAFETY: setrlimit is async-signal-safe and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let l = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let endpoints = data.join("endpoints.json");
        let mut hub = LimitedHub {
            child,
            url: String::new(),
            mqtt: String::new(),
            log,
            _tmp: tmp,
        };
        wait_until("the hub to start", Duration::from_secs(60), || {
            let Ok(text) = std::fs::read_to_string(&endpoints) else {
                return false;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                return false;
            };
            hub.url = v["url"].as_str().unwrap().to_owned();
            hub.mqtt = v["mqtt"].as_str().unwrap().to_owned();
            true
        });
        hub
    }
}

impl Drop for LimitedHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn idle_http_connections_under_a_low_open_files_limit_do_not_stop_mqtt() {
    // This test holds 400 sockets itself.
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut own);
        own.rlim_cur = own.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &own);
    }
    let hub = LimitedHub::start(256, &["--allow-anonymous"]);
    let addr = http_addr(&hub.url);
    wait_until("/healthz", Duration::from_secs(30), || {
        get_raw(&addr, "/healthz").0 == 200
    });
    let log = || std::fs::read_to_string(&hub.log).unwrap_or_default();
    assert!(log().contains("open-files limit"), "{}", log());
    // More idle connections than the hub has descriptors.
    let held: Vec<TcpStream> = (0..400)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    assert!(held.len() > 256);
    let (host, port) = hub.mqtt.rsplit_once(':').unwrap();
    for i in 0..3 {
        let out = Command::new("timeout")
            .args(["20", "mosquitto_pub", "-h", host, "-p", port])
            .args(["-t", "limits/check", "-m", &i.to_string(), "-q", "1"])
            .output()
            .expect("mosquitto_pub (apt install mosquitto-clients)");
        assert!(
            out.status.success(),
            "MQTT publish {i} failed: {}\nhub log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            log()
        );
    }
    // Past the cap, /healthz answers in a small lane of its own (which
    // idle connections hold a second at most).
    wait_until("/healthz past the cap", Duration::from_secs(20), || {
        get_raw(&addr, "/healthz") == (200, "ok\n".into())
    });
    let text = log();
    assert!(
        !text.contains("MQTT accept failed") && !text.contains("for want of resources"),
        "{text}"
    );
    drop(held);
    let mut metrics = String::new();
    wait_until("the API to serve again", Duration::from_secs(20), || {
        let (status, body) = get_raw(&addr, "/metrics");
        metrics = body;
        status == 200
    });
    assert!(
        metric(
            &metrics,
            "roost_connections_refused_total{listener=\"http\"}"
        ) > 100.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "roost_accept_errors_total{listener=\"mqtt\"}"),
        0.0,
        "{metrics}"
    );
}

#[test]
fn an_mqtt_listener_keeps_to_its_cap_and_counts_the_refused() {
    let hub = TestHub::start(&["--mqtt-max-connections", "5", "--allow-anonymous"]);
    let (host, port) = hub.mqtt.rsplit_once(':').unwrap();
    let publish = || {
        Command::new("timeout")
            .args(["20", "mosquitto_pub", "-h", host, "-p", port])
            .args(["-t", "cap/check", "-m", "x", "-q", "1"])
            .output()
            .expect("mosquitto_pub (apt install mosquitto-clients)")
            .status
            .success()
    };
    // Five connections that never send CONNECT (the broker gives them 10 s),
    // and one in the reserve kept for loopback clients.
    let held: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(&hub.mqtt).unwrap())
        .collect();
    wait_until("the MQTT cap to be reached", Duration::from_secs(8), || {
        metric(&hub.metrics(), "roost_connections_open{listener=\"mqtt\"}") == 6.0
    });
    assert!(
        !publish(),
        "a sixth MQTT client was served past the cap of 5"
    );
    let m = hub.metrics();
    assert!(
        metric(&m, "roost_connections_refused_total{listener=\"mqtt\"}") >= 1.0,
        "{m}"
    );
    drop(held);
    wait_until("MQTT to serve again", Duration::from_secs(20), publish);
}
