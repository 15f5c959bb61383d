//! The embedded MQTT broker against clients we did not write
//! (`mosquitto_pub`, `mosquitto_sub`), both MQTT 3.1.1 and 5, plus raw
//! sockets for hostile input.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

fn host_port(hub: &TestHub) -> (String, String) {
    let (h, _) = hub.mqtt.rsplit_once(':').unwrap();
    (h.to_owned(), hub.mqtt_port().to_owned())
}

fn pub_(hub: &TestHub, args: &[&str]) -> std::process::Output {
    let (h, p) = host_port(hub);
    Command::new("mosquitto_pub")
        .args(["-h", &h, "-p", &p])
        .args(args)
        .output()
        .expect("mosquitto_pub (apt install mosquitto-clients)")
}

/// A subscriber collecting `count` messages (or until the timeout), started
/// once the broker has acknowledged its subscription.
fn sub(hub: &TestHub, args: &[&str], count: usize, secs: u32) -> Subscriber {
    hub.subscribe(args, count, secs)
}

fn lines(s: Subscriber) -> Vec<String> {
    s.lines()
}

fn hub_with_devices() -> (TestHub, Package) {
    let hub = TestHub::start(&[]);
    let manifest = format!(
        r#"
[[device]]
name = "sensor-1"
password_hash = "{}"
publish = ["sensors/{{device}}/#"]
subscribe = ["commands/{{device}}/#"]

[[device]]
name = "panel"
password_hash = "{}"
publish = ["commands/#"]
subscribe = ["sensors/#"]
"#,
        password_hash("s1-secret"),
        password_hash("panel-secret")
    );
    let pkg = Package::new(&manifest, &[]);
    hub.deploy(&pkg.manifest());
    (hub, pkg)
}

#[test]
fn mosquitto_clients_exchange_messages_across_3_1_1_and_5() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let v5 = sub(&hub, &["-t", "a/#", "-q", "2", "-V", "mqttv5"], 3, 10);
    let v3 = sub(&hub, &["-t", "a/+", "-q", "1", "-V", "mqttv311"], 3, 10);
    for (topic, msg, qos, version) in [
        ("a/b", "zero", "0", "mqttv311"),
        ("a/c", "one", "1", "mqttv5"),
        ("a/d", "two", "2", "mqttv311"),
    ] {
        let out = pub_(&hub, &["-t", topic, "-m", msg, "-q", qos, "-V", version]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Sorted: MQTT orders messages per connection only, and each publish
    // above is its own connection (the QoS 0 one may be routed late).
    let want = vec!["a/b zero".to_string(), "a/c one".into(), "a/d two".into()];
    let sorted = |c| {
        let mut l = lines(c);
        l.sort();
        l
    };
    assert_eq!(sorted(v5), want);
    assert_eq!(sorted(v3), want);
}

#[test]
fn retained_messages_reach_late_subscribers_and_an_empty_retain_clears_them() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    assert!(
        pub_(&hub, &["-t", "state/door", "-m", "open", "-r", "-q", "1"])
            .status
            .success()
    );
    let late = sub(&hub, &["-t", "state/#"], 1, 5);
    assert_eq!(lines(late), vec!["state/door open"]);
    // QoS 1, so the clear has been applied when mosquitto_pub gets its
    // PUBACK; a QoS 0 publish races the next subscriber's connection.
    assert!(pub_(&hub, &["-t", "state/door", "-n", "-r", "-q", "1"])
        .status
        .success());
    let later = sub(&hub, &["-t", "state/#"], 1, 1);
    assert!(lines(later).is_empty());
}

#[test]
fn anonymous_clients_are_refused_unless_allowed_and_devices_need_their_password() {
    let (hub, _p) = hub_with_devices();
    let anon = pub_(&hub, &["-t", "x", "-m", "y"]);
    assert!(
        !anon.status.success(),
        "an anonymous client must be refused"
    );
    let wrong = pub_(
        &hub,
        &[
            "-u",
            "sensor-1",
            "-P",
            "nope",
            "-t",
            "sensors/sensor-1/t",
            "-m",
            "1",
        ],
    );
    assert!(!wrong.status.success(), "a wrong password must be refused");
    let unknown = pub_(
        &hub,
        &["-u", "ghost", "-P", "x", "-t", "sensors/ghost/t", "-m", "1"],
    );
    assert!(!unknown.status.success());
    let ok = pub_(
        &hub,
        &[
            "-u",
            "sensor-1",
            "-P",
            "s1-secret",
            "-i",
            "sensor-1",
            "-t",
            "sensors/sensor-1/t",
            "-m",
            "1",
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let m = hub.metrics();
    assert!(m.contains("roost_mqtt_connects_refused_total 3"), "{m}");
}

#[test]
fn device_cannot_publish_or_subscribe_outside_its_policy() {
    let (hub, _p) = hub_with_devices();
    let panel = sub(
        &hub,
        &[
            "-u",
            "panel",
            "-P",
            "panel-secret",
            "-t",
            "sensors/#",
            "-V",
            "mqttv5",
        ],
        2,
        4,
    );
    // Inside the policy: delivered. Outside: dropped, and MQTT 5 says so.
    let ok = pub_(
        &hub,
        &[
            "-u",
            "sensor-1",
            "-P",
            "s1-secret",
            "-t",
            "sensors/sensor-1/temp",
            "-m",
            "21",
            "-q",
            "1",
            "-V",
            "mqttv5",
        ],
    );
    assert!(ok.status.success());
    let denied = pub_(
        &hub,
        &[
            "-u",
            "sensor-1",
            "-P",
            "s1-secret",
            "-t",
            "sensors/other/temp",
            "-m",
            "99",
            "-q",
            "1",
            "-V",
            "mqttv5",
        ],
    );
    let err = String::from_utf8_lossy(&denied.stderr).to_lowercase()
        + &String::from_utf8_lossy(&denied.stdout).to_lowercase();
    assert!(
        err.contains("not authorized") || !denied.status.success(),
        "v5 publisher must hear the refusal: {err}"
    );
    let v3_denied = pub_(
        &hub,
        &[
            "-u",
            "sensor-1",
            "-P",
            "s1-secret",
            "-t",
            "sensors/other/temp",
            "-m",
            "98",
            "-q",
            "1",
            "-V",
            "mqttv311",
        ],
    );
    assert!(
        v3_denied.status.success(),
        "3.1.1 has no negative PUBACK; the message is just dropped"
    );
    assert_eq!(lines(panel), vec!["sensors/sensor-1/temp 21"]);
    // A subscription outside the policy is refused in its SUBACK.
    let (h, p) = host_port(&hub);
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            &h,
            "-p",
            &p,
            "-u",
            "sensor-1",
            "-P",
            "s1-secret",
            "-t",
            "sensors/#",
            "-V",
            "mqttv5",
            "-W",
            "2",
            "-C",
            "1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_lowercase()
        + &String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        text.contains("denied") || text.contains("not authorized") || text.contains("refused"),
        "{text}"
    );
    let m = hub.metrics();
    assert!(m.contains("roost_mqtt_dropped_by_policy_total 2"), "{m}");
}

#[test]
fn another_client_cannot_take_a_devices_client_id() {
    let (hub, _p) = hub_with_devices();
    let listener = sub(
        &hub,
        &[
            "-u",
            "sensor-1",
            "-P",
            "s1-secret",
            "-i",
            "sensor-1",
            "-t",
            "commands/sensor-1/#",
        ],
        1,
        4,
    );
    wait_until(
        "sensor-1 to show as connected",
        Duration::from_secs(5),
        || {
            hub.get_json("/v1/devices")["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["name"] == "sensor-1" && d["connected"] == true)
        },
    );
    // The panel may not use sensor-1's name as its client id.
    let takeover = pub_(
        &hub,
        &[
            "-u",
            "panel",
            "-P",
            "panel-secret",
            "-i",
            "sensor-1",
            "-t",
            "commands/sensor-1/x",
            "-m",
            "evil",
        ],
    );
    assert!(!takeover.status.success());
    let cmd = pub_(
        &hub,
        &[
            "-u",
            "panel",
            "-P",
            "panel-secret",
            "-i",
            "panel",
            "-t",
            "commands/sensor-1/set",
            "-m",
            "on",
            "-q",
            "1",
        ],
    );
    assert!(cmd.status.success());
    assert_eq!(lines(listener), vec!["commands/sensor-1/set on"]);
    let out = hub.cli(&["devices"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("sensor-1") && table.contains("panel"),
        "{table}"
    );
}

#[test]
fn a_will_is_published_when_a_client_vanishes() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let watcher = sub(&hub, &["-t", "status/#"], 1, 6);
    // A raw client with a will, killed without DISCONNECT.
    let mut s = TcpStream::connect(&hub.mqtt).unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b0000_0110, 0, 60];
    body.extend([0, 1, b'w']);
    body.extend([0, 8]);
    body.extend(b"status/w");
    body.extend([0, 4]);
    body.extend(b"gone");
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend(body);
    s.write_all(&pkt).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    drop(s);
    assert_eq!(lines(watcher), vec!["status/w gone"]);
}

#[test]
fn a_persistent_session_gets_what_was_published_while_it_was_away() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    // Subscribe once with a persistent session, then leave.
    let first = sub(
        &hub,
        &["-i", "keeper", "-c", "-q", "1", "-t", "jobs/#"],
        1,
        1,
    );
    let _ = lines(first);
    for i in 0..3 {
        assert!(
            pub_(&hub, &["-t", &format!("jobs/{i}"), "-m", "todo", "-q", "1"])
                .status
                .success()
        );
    }
    let back = sub(
        &hub,
        &["-i", "keeper", "-c", "-q", "1", "-t", "jobs/#"],
        3,
        5,
    );
    assert_eq!(
        lines(back),
        vec!["jobs/0 todo", "jobs/1 todo", "jobs/2 todo"]
    );
}

/// A persistent-session (clean session off) 3.1.1 client that subscribes at
/// QoS 1, acknowledges every message it gets for `listen`, then says
/// goodbye: unlike mosquitto_sub -C, it never leaves with unsent PUBACKs.
fn persistent_raw_consumer(hub: &TestHub, id: &str, filter: &str, listen: Duration) -> Vec<String> {
    persistent_raw_consumer_at(&hub.mqtt, id, filter, listen)
}

fn persistent_raw_consumer_at(addr: &str, id: &str, filter: &str, listen: Duration) -> Vec<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0, 0, 60];
    body.extend((id.len() as u16).to_be_bytes());
    body.extend(id.as_bytes());
    s.write_all(&[&[0x10, body.len() as u8][..], &body].concat())
        .unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack[3], 0, "CONNACK refused");
    let mut sub = vec![0, 1];
    sub.extend((filter.len() as u16).to_be_bytes());
    sub.extend(filter.as_bytes());
    sub.push(1);
    s.write_all(&[&[0x82, sub.len() as u8][..], &sub].concat())
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = std::time::Instant::now() + listen;
    let mut buf = Vec::new();
    let mut got = Vec::new();
    while std::time::Instant::now() < deadline {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
        // Parse whole packets (all small: one-byte remaining lengths).
        while buf.len() >= 2 && buf.len() >= 2 + buf[1] as usize {
            let len = buf[1] as usize;
            let pkt: Vec<u8> = buf.drain(..2 + len).collect();
            if pkt[0] >> 4 == 3 {
                let tlen = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
                let topic = String::from_utf8_lossy(&pkt[4..4 + tlen]).to_string();
                let qos = (pkt[0] >> 1) & 3;
                let (payload_at, pid) = if qos > 0 {
                    (6 + tlen, Some([pkt[4 + tlen], pkt[5 + tlen]]))
                } else {
                    (4 + tlen, None)
                };
                got.push(format!(
                    "{topic} {}",
                    String::from_utf8_lossy(&pkt[payload_at..])
                ));
                if let Some(pid) = pid {
                    s.write_all(&[0x40, 2, pid[0], pid[1]]).unwrap();
                }
            }
        }
    }
    s.write_all(&[0xE0, 0]).unwrap();
    got
}

fn connect_raw(hub: &TestHub) -> TcpStream {
    let mut s = TcpStream::connect(&hub.mqtt).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0])
        .unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    s
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0) | Err(_)) || matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn hostile_input_harms_only_its_own_connection() {
    let hub = TestHub::start(&["--allow-anonymous", "--mqtt-max-packet-bytes", "65536"]);
    let watcher = sub(&hub, &["-t", "ok/#"], 1, 10);
    // Garbage bytes.
    let mut g = TcpStream::connect(&hub.mqtt).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed(&mut g));
    // A CONNECT claiming a huge remaining length.
    let mut h = TcpStream::connect(&hub.mqtt).unwrap();
    h.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.write_all(&[0x10, 0xff, 0xff, 0xff, 0x7f]).unwrap();
    assert!(closed(&mut h));
    // A remaining length of five bytes.
    let mut f = TcpStream::connect(&hub.mqtt).unwrap();
    f.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    f.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).unwrap();
    assert!(closed(&mut f));
    // A publish over the size limit.
    let mut big = connect_raw(&hub);
    let mut pkt = vec![0x30, 0x80, 0x80, 0x08];
    pkt.extend(std::iter::repeat_n(0u8, 64));
    let _ = big.write_all(&pkt);
    assert!(closed(&mut big));
    // A PUBLISH to a topic with a wildcard.
    let mut w = connect_raw(&hub);
    w.write_all(&[0x30, 5, 0, 3, b'a', b'/', b'#']).unwrap();
    assert!(closed(&mut w));
    // Invalid UTF-8 in a topic.
    let mut u = connect_raw(&hub);
    u.write_all(&[0x30, 5, 0, 3, b'a', 0xff, 0xfe]).unwrap();
    assert!(closed(&mut u));
    // A SUBSCRIBE with thousands of filters gets its SUBACK (or a clean close).
    let mut many = connect_raw(&hub);
    let mut body = vec![0, 1];
    for i in 0..3000 {
        let t = format!("m/{i}");
        body.extend((t.len() as u16).to_be_bytes());
        body.extend(t.as_bytes());
        body.push(0);
    }
    let mut pkt = vec![0x82];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        pkt.push(b);
        if len == 0 {
            break;
        }
    }
    pkt.extend(body);
    many.write_all(&pkt).unwrap();
    let mut head = [0u8; 1];
    many.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x90, "a SUBACK");
    // Through all of it, everyone else is served.
    assert!(pub_(&hub, &["-t", "ok/1", "-m", "fine"]).status.success());
    assert_eq!(lines(watcher), vec!["ok/1 fine"]);
}

#[test]
fn a_client_that_never_reads_is_dropped_and_slows_no_one() {
    let hub = TestHub::start(&[
        "--allow-anonymous",
        "--mqtt-outgoing-buffer",
        "100",
        "--mqtt-slow-client-grace-s",
        "1",
    ]);
    // A raw subscriber that never reads its socket.
    let mut slow = connect_raw(&hub);
    slow.write_all(&[0x82, 6, 0, 1, 0, 1, b'#', 0]).unwrap();
    let mut suback = [0u8; 5];
    slow.read_exact(&mut suback).unwrap();
    let fast = sub(&hub, &["-t", "flood/last"], 1, 30);
    let payload = "x".repeat(20_000);
    let (h, p) = host_port(&hub);
    // Keep the slow reader's buffer full for longer than its grace.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let mut flood = Command::new("mosquitto_pub")
            .args(["-h", &h, "-p", &p, "-t", "flood/bulk", "-l", "-q", "0"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        {
            let mut stdin = flood.stdin.take().unwrap();
            for _ in 0..500 {
                writeln!(stdin, "{payload}").unwrap();
            }
        }
        assert!(flood.wait().unwrap().success());
    }
    assert!(pub_(&hub, &["-t", "flood/last", "-m", "done"])
        .status
        .success());
    assert_eq!(lines(fast), vec!["flood/last done"]);
    wait_until(
        "the slow client to be dropped",
        Duration::from_secs(10),
        || {
            hub.metrics()
                .contains("roost_mqtt_slow_clients_dropped_total 1")
        },
    );
}

#[test]
fn acknowledged_qos1_messages_and_retained_ones_survive_kill_9() {
    let mut hub = TestHub::start(&["--allow-anonymous"]);
    // A persistent session subscribes, then goes away.
    let first = sub(
        &hub,
        &[
            "-i", "keeper", "-c", "-q", "1", "-t", "jobs/#", "-V", "mqttv311",
        ],
        1,
        1,
    );
    let _ = lines(first);
    for i in 0..5 {
        let out = pub_(&hub, &["-t", &format!("jobs/{i}"), "-m", "todo", "-q", "1"]);
        assert!(out.status.success(), "PUBACK received means acknowledged");
    }
    assert!(
        pub_(&hub, &["-t", "config/mode", "-m", "eco", "-r", "-q", "1"])
            .status
            .success()
    );
    hub.kill9();
    hub.launch();
    assert!(hub
        .log_text()
        .contains("restored the broker's persistent sessions"));
    // The session, its subscription and its queue come back. (No -C: a
    // client that leaves right after its last message may not have sent
    // its acknowledgements yet, and would rightly get them again.)
    let back = persistent_raw_consumer(&hub, "keeper", "jobs/#", Duration::from_secs(2));
    assert_eq!(
        back,
        (0..5).map(|i| format!("jobs/{i} todo")).collect::<Vec<_>>()
    );
    let retained = sub(&hub, &["-t", "config/#"], 1, 5);
    assert_eq!(lines(retained), vec!["config/mode eco"]);
    // Delivered and acknowledged: not delivered again after another restart.
    hub.kill9();
    hub.launch();
    let again = persistent_raw_consumer(&hub, "keeper", "jobs/#", Duration::from_secs(1));
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn a_device_message_flows_through_a_task_to_another_device() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let manifest = task("thermostat", "echo.wat", "")
        + r#"
[[route]]
from = "device:sensors/+/temperature"
to = "task:thermostat"

[[route]]
from = "task:thermostat"
to = "device:commands/heater-1/set"
"#;
    let pkg = Package::new(&manifest, &["echo.wat"]);
    hub.deploy(&pkg.manifest());
    let heater = sub(&hub, &["-t", "commands/heater-1/set", "-q", "1"], 1, 10);
    assert!(pub_(
        &hub,
        &["-t", "sensors/s1/temperature", "-m", "19.5", "-q", "1"]
    )
    .status
    .success());
    // Not matching the route: nothing happens.
    assert!(pub_(&hub, &["-t", "sensors/s1/humidity", "-m", "40"])
        .status
        .success());
    assert_eq!(lines(heater), vec!["commands/heater-1/set 19.5"]);
    let m = hub.metrics();
    assert!(
        m.contains(r#"roost_route_deliveries_total{outcome="delivered"} 2"#),
        "{m}"
    );
}

#[test]
fn a_timer_route_calls_its_task_and_bad_routes_are_refused() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let manifest = task("tick", "echo.wat", "")
        + "[[route]]\nfrom = \"timer:200ms\"\nto = \"task:tick\"\n[[route]]\nfrom = \"task:tick\"\nto = \"device:ticks\"\n";
    let pkg = Package::new(&manifest, &["echo.wat"]);
    hub.deploy(&pkg.manifest());
    let ticks = sub(&hub, &["-t", "ticks"], 2, 10);
    let got = lines(ticks);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].starts_with("ticks {\"time_ms\":"), "{got:?}");

    let bad = Package::new(
        &(task("a", "echo.wat", "")
            + "[[route]]\nfrom = \"device:a/#/b\"\nto = \"task:nope\"\n[[route]]\nfrom = \"timer:soon\"\nto = \"device:x/+\"\n[[route]]\nfrom = \"cloud:lamp\"\nto = \"shadow:a/b\"\n"),
        &["echo.wat"],
    );
    let out = hub.cli(&["deploy", bad.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for f in [
        "route[0].from",
        "route[0].to",
        "route[1].from",
        "route[1].to",
        "route[2].from",
        "route[2].to",
    ] {
        assert!(err.contains(f), "{f} missing in {err}");
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_device_logs_in_over_tls_with_its_client_certificate() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=roost test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=sensor-1",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
        ],
    );
    std::fs::write(
        d.join("client.ext"),
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-extfile",
            "client.ext",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            "client.pem",
        ],
    );
    let p = |f: &str| d.join(f).display().to_string();
    let hub = TestHub::start(&[
        "--mqtts",
        "127.0.0.1:0",
        "--mqtt-tls-cert",
        &p("server.pem"),
        "--mqtt-tls-key",
        &p("server.key"),
        "--mqtt-tls-client-ca",
        &p("ca.pem"),
    ]);
    let manifest = format!(
        "[[device]]\nname = \"sensor-1\"\npublish = [\"sensors/{{device}}/#\"]\n\n[[device]]\nname = \"panel\"\npassword_hash = \"{}\"\nsubscribe = [\"sensors/#\"]\n",
        password_hash("panel-secret")
    );
    let pkg = Package::new(&manifest, &[]);
    hub.deploy(&pkg.manifest());
    let endpoints: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(hub.data_dir.join("endpoints.json")).unwrap(),
    )
    .unwrap();
    let mqtts = endpoints["mqtts"].as_str().unwrap().to_owned();
    let (h, port) = mqtts.rsplit_once(':').unwrap();
    let panel = sub(
        &hub,
        &["-u", "panel", "-P", "panel-secret", "-t", "sensors/#"],
        1,
        10,
    );
    let tls_pub = |extra: &[&str]| {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                h,
                "-p",
                port,
                "--cafile",
                &p("ca.pem"),
                "-t",
                "sensors/sensor-1/t",
                "-m",
                "over tls",
                "-q",
                "1",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    // No certificate: the TLS handshake is refused.
    assert!(!tls_pub(&[]).status.success());
    // With sensor-1's certificate: authenticated as sensor-1, no password.
    let ok = tls_pub(&["--cert", &p("client.pem"), "--key", &p("client.key")]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(lines(panel), vec!["sensors/sensor-1/t over tls"]);
    // The certificate does not let it claim to be another device.
    let other = tls_pub(&[
        "--cert",
        &p("client.pem"),
        "--key",
        &p("client.key"),
        "-u",
        "panel",
    ]);
    assert!(!other.status.success());
}

#[test]
fn a_shared_subscription_spreads_messages_over_its_members() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let all = sub(&hub, &["-t", "jobs/#", "-q", "1"], 10, 10);
    let members: Vec<_> = ["worker-a", "worker-b"]
        .iter()
        .map(|id| {
            let hub_mqtt = hub.mqtt.clone();
            let id = id.to_string();
            std::thread::spawn(move || {
                persistent_raw_consumer_at(
                    &hub_mqtt,
                    &id,
                    "$share/workers/jobs/#",
                    Duration::from_secs(3),
                )
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..10 {
        assert!(
            pub_(&hub, &["-t", &format!("jobs/{i}"), "-m", "x", "-q", "1"])
                .status
                .success()
        );
    }
    let got: Vec<Vec<String>> = members.into_iter().map(|m| m.join().unwrap()).collect();
    assert_eq!(
        got[0].len() + got[1].len(),
        10,
        "each message to exactly one member: {got:?}"
    );
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "both members take turns: {got:?}"
    );
    assert_eq!(
        lines(all).len(),
        10,
        "a plain subscriber still gets everything"
    );
}

#[test]
fn expired_messages_and_expired_sessions_are_dropped() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let v5 = ["-V", "mqttv5"];
    // A persistent MQTT 5 session that waits for QoS 1 messages.
    let first = sub(
        &hub,
        &[
            &v5[..],
            &["-i", "keeper", "-c", "-x", "60", "-q", "1", "-t", "m/#"],
        ]
        .concat(),
        1,
        1,
    );
    let _ = lines(first);
    let expiring = pub_(
        &hub,
        &[
            &v5[..],
            &[
                "-t",
                "m/short",
                "-m",
                "stale",
                "-q",
                "1",
                "-D",
                "publish",
                "message-expiry-interval",
                "1",
            ],
        ]
        .concat(),
    );
    assert!(expiring.status.success());
    let lasting = pub_(
        &hub,
        &[
            &v5[..],
            &[
                "-t",
                "m/long",
                "-m",
                "fresh",
                "-q",
                "1",
                "-D",
                "publish",
                "message-expiry-interval",
                "60",
            ],
        ]
        .concat(),
    );
    assert!(lasting.status.success());
    std::thread::sleep(Duration::from_millis(2200));
    let back = sub(
        &hub,
        &[
            &v5[..],
            &["-i", "keeper", "-c", "-x", "60", "-q", "1", "-t", "m/#"],
        ]
        .concat(),
        1,
        5,
    );
    assert_eq!(
        lines(back),
        vec!["m/long fresh"],
        "the expired message is not delivered"
    );

    // A session with a 1 s expiry is gone 1 s after its client left.
    let brief = sub(
        &hub,
        &[
            &v5[..],
            &["-i", "brief", "-c", "-x", "1", "-q", "1", "-t", "s/#"],
        ]
        .concat(),
        1,
        1,
    );
    let _ = lines(brief);
    std::thread::sleep(Duration::from_millis(1800));
    assert!(pub_(&hub, &["-t", "s/1", "-m", "late", "-q", "1"])
        .status
        .success());
    let gone = sub(
        &hub,
        &[
            &v5[..],
            &["-i", "brief", "-c", "-x", "1", "-q", "1", "-t", "t/none"],
        ]
        .concat(),
        1,
        1,
    );
    assert!(
        lines(gone).is_empty(),
        "an expired session keeps no subscriptions or queue"
    );
}

#[test]
fn paho_talks_to_the_broker_over_websockets_and_tcp_with_mqtt_5_and_3_1_1() {
    let python = python_with("paho.mqtt");
    let hub = TestHub::start(&["--allow-anonymous", "--mqtt-ws", "127.0.0.1:0"]);
    let endpoints: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(hub.data_dir.join("endpoints.json")).unwrap(),
    )
    .unwrap();
    let ws = endpoints["mqtt_ws"].as_str().unwrap().to_owned();
    let script = r#"
import sys, paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
(ws_host, ws_port), (tcp_host, tcp_port) = [a.rsplit(":", 1) for a in sys.argv[1:3]]
got = []
def on_message(c, u, m):
    props = dict(m.properties.UserProperty) if hasattr(m.properties, "UserProperty") else {}
    got.append((m.topic, m.payload.decode(), props.get("origin")))
sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-ws", transport="websockets", protocol=mqtt.MQTTv5)
sub.on_message = on_message
sub.connect(ws_host, int(ws_port))
sub.subscribe("ws/#", qos=1)
sub.loop_start()
import time; time.sleep(0.5)
pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-tcp", protocol=mqtt.MQTTv5)
pub.connect(tcp_host, int(tcp_port))
pub.loop_start()
props = Properties(PacketTypes.PUBLISH)
props.UserProperty = ("origin", "paho")
pub.publish("ws/hello", "over websockets", qos=1, properties=props).wait_for_publish(5)
deadline = time.time() + 5
while not got and time.time() < deadline:
    time.sleep(0.05)
print(got)
assert got == [("ws/hello", "over websockets", "paho")], got
# MQTT 3.1.1 with paho too: a QoS 2 round trip over TCP.
got311 = []
old = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-311", protocol=mqtt.MQTTv311)
old.on_message = lambda c, u, m: got311.append((m.topic, m.payload.decode(), m.qos))
old.connect(tcp_host, int(tcp_port))
old.subscribe("v3/#", qos=2)
old.loop_start()
time.sleep(0.5)
pub.publish("v3/x", "three-one-one", qos=2).wait_for_publish(5)
deadline = time.time() + 5
while not got311 and time.time() < deadline:
    time.sleep(0.05)
assert got311 == [("v3/x", "three-one-one", 2)], got311
"#;
    let out = Command::new(&python)
        .args(["-c", script, &ws, &hub.mqtt])
        .output()
        .expect("python with paho-mqtt (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_offline_session_keeps_only_its_newest_messages_up_to_its_limit() {
    let hub = TestHub::start(&["--allow-anonymous", "--mqtt-session-queue", "3"]);
    let _ = persistent_raw_consumer(&hub, "capped", "q/#", Duration::from_millis(300));
    for i in 0..5 {
        assert!(pub_(&hub, &["-t", &format!("q/{i}"), "-m", "m", "-q", "1"])
            .status
            .success());
    }
    let back = persistent_raw_consumer(&hub, "capped", "q/#", Duration::from_secs(1));
    assert_eq!(back, vec!["q/2 m", "q/3 m", "q/4 m"]);
    let m = hub.metrics();
    assert!(m.contains("roost_mqtt_dropped_queue_full_total 2"), "{m}");
}

#[test]
fn a_flood_from_one_client_slows_no_one_else() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    // One client publishes as fast as it can, for the whole test.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let addr = hub.mqtt.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0])
                .unwrap();
            let mut ack = [0u8; 4];
            s.read_exact(&mut ack).unwrap();
            let mut burst = Vec::new();
            for _ in 0..1000 {
                burst.extend([
                    0x30, 12, 0, 5, b'f', b'l', b'o', b'o', b'd', b'x', b'x', b'x', b'x', b'x',
                ]);
            }
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if s.write_all(&burst).is_err() {
                    break;
                }
                sent += 1000;
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile, other clients are served.
    for i in 0..5 {
        let watcher = sub(&hub, &["-t", "calm/#", "-q", "1"], 1, 10);
        assert!(
            pub_(&hub, &["-t", &format!("calm/{i}"), "-m", "ok", "-q", "1"])
                .status
                .success()
        );
        assert_eq!(lines(watcher), vec![format!("calm/{i} ok")]);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    assert!(sent > 10_000, "the flood really ran ({sent} messages)");
}

#[test]
fn a_silent_client_is_cut_off_after_its_keep_alive_and_its_will_goes_out() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let watcher = sub(&hub, &["-t", "status/#"], 1, 10);
    // Keep-alive 1 s, a will, and then silence (the socket stays open).
    let mut s = TcpStream::connect(&hub.mqtt).unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b0000_0110, 0, 1];
    body.extend([0, 1, b'k']);
    body.extend([0, 8]);
    body.extend(b"status/k");
    body.extend([0, 6]);
    body.extend(b"silent");
    s.write_all(&[&[0x10, body.len() as u8][..], &body].concat())
        .unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(lines(watcher), vec!["status/k silent"]);
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "not before the keep-alive ran out"
    );
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed(&mut s), "the broker closed the connection");
}

#[test]
fn mqtt5_topic_aliases_stand_for_their_topic() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let watcher = sub(&hub, &["-t", "al/#", "-V", "mqttv5"], 2, 10);
    let mut s = TcpStream::connect(&hub.mqtt).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // CONNECT, MQTT 5, clean start, keep-alive 60, no properties, empty id.
    s.write_all(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 0,
    ])
    .unwrap();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x20);
    let mut rest = vec![0u8; head[1] as usize];
    s.read_exact(&mut rest).unwrap();
    assert_eq!(rest[1], 0, "CONNACK success");
    // Topic plus alias 1, then the alias alone.
    s.write_all(&[
        0x30, 13, 0, 4, b'a', b'l', b'/', b'x', 3, 0x23, 0, 1, b'o', b'n', b'e',
    ])
    .unwrap();
    s.write_all(&[0x30, 9, 0, 0, 3, 0x23, 0, 1, b't', b'w', b'o'])
        .unwrap();
    assert_eq!(lines(watcher), vec!["al/x one", "al/x two"]);
    // An alias never set is a protocol error: the client is disconnected.
    s.write_all(&[0x30, 9, 0, 0, 3, 0x23, 0, 9, b'b', b'a', b'd'])
        .unwrap();
    assert!(closed(&mut s));
}

#[test]
fn a_qos2_message_is_delivered_once_even_when_resent_across_a_kill_9() {
    let mut hub = TestHub::start(&["--allow-anonymous"]);
    let _ = persistent_raw_consumer(&hub, "sink", "x2/#", Duration::from_millis(300));
    let connect = |hub: &TestHub| {
        let mut s = TcpStream::connect(&hub.mqtt).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Persistent session "p2" (clean session off).
        s.write_all(&[
            0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0, 0, 60, 0, 2, b'p', b'2',
        ])
        .unwrap();
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).unwrap();
        assert_eq!(ack[3], 0);
        s
    };
    let publish = |dup: bool| {
        let mut p = vec![
            0x34 | if dup { 0x08 } else { 0 },
            12,
            0,
            4,
            b'x',
            b'2',
            b'/',
            b'a',
            0,
            7,
        ];
        p.extend(b"once");
        p
    };
    let mut s = connect(&hub);
    s.write_all(&publish(false)).unwrap();
    let mut rec = [0u8; 4];
    s.read_exact(&mut rec).unwrap();
    assert_eq!(rec, [0x50, 2, 0, 7], "PUBREC");
    drop(s);
    hub.kill9();
    hub.launch();
    // The publisher sends it again (as a client unsure of the PUBREC may).
    let mut s = connect(&hub);
    s.write_all(&publish(true)).unwrap();
    s.read_exact(&mut rec).unwrap();
    assert_eq!(rec, [0x50, 2, 0, 7]);
    s.write_all(&[0x62, 2, 0, 7]).unwrap();
    let mut comp = [0u8; 4];
    s.read_exact(&mut comp).unwrap();
    assert_eq!(comp, [0x70, 2, 0, 7], "PUBCOMP");
    let got = persistent_raw_consumer(&hub, "sink", "x2/#", Duration::from_secs(1));
    assert_eq!(got, vec!["x2/a once"], "exactly once");
}

#[test]
fn a_wasm_task_publishes_through_the_host_import_where_allow_grants() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let manifest = task(
        "announce",
        "publish.wat",
        "allow = { publish = [\"out/#\"] }",
    ) + &task("rogue", "publish.wat", "allow = { publish = [\"in/#\"] }");
    let pkg = Package::new(&manifest, &["publish.wat"]);
    hub.deploy(&pkg.manifest());
    let watcher = sub(&hub, &["-t", "out/#", "-q", "1"], 1, 10);
    let (status, code, _) = error_of(hub.call("rogue", "not mine"));
    assert_eq!((status, code.as_str()), (502, "task_error"));
    let log = http()
        .get(format!("{}/v1/logs?task=rogue", hub.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(log.contains("allow.publish"), "{log}");
    let r = hub.call("announce", "the door is open");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "published");
    assert_eq!(lines(watcher), vec!["out/published the door is open"]);
}

#[test]
fn session_and_message_expiry_survive_a_kill_9() {
    let mut hub = TestHub::start(&["--allow-anonymous"]);
    let v5 = ["-V", "mqttv5"];
    // A persistent MQTT 5 session that takes `topic` and lasts `expiry` s.
    let run_sub = |hub: &TestHub, id: &str, expiry: &str, topic: &str, secs: u32| {
        let args = [
            &v5[..],
            &["-i", id, "-c", "-x", expiry, "-q", "1", "-t", topic],
        ]
        .concat();
        sub(hub, &args, 1, secs)
    };
    // Two persistent MQTT 5 sessions go offline: one lasting a minute,
    // one for 1 s.
    let _ = lines(run_sub(&hub, "keeper", "60", "r/#", 1));
    let _ = lines(run_sub(&hub, "brief", "1", "s/#", 1));
    // Queued for "keeper" and retained, each with its expiry and a user
    // property.
    for (topic, msg, expiry, retain) in [
        ("r/stale", "stale", "1", false),
        ("r/fresh", "fresh", "600", false),
        ("r/kept", "kept", "600", true),
        ("r/gone", "gone", "1", true),
    ] {
        let out = pub_(
            &hub,
            &[
                &v5[..],
                if retain { &["-r"][..] } else { &[][..] },
                &[
                    "-t",
                    topic,
                    "-m",
                    msg,
                    "-q",
                    "1",
                    "-D",
                    "publish",
                    "message-expiry-interval",
                    expiry,
                    "-D",
                    "publish",
                    "user-property",
                    "site",
                    "plant-7",
                ],
            ]
            .concat(),
        )
        .status;
        assert!(out.success());
    }
    assert!(pub_(&hub, &["-t", "s/1", "-m", "early", "-q", "1"])
        .status
        .success());
    hub.kill9();
    hub.launch();
    std::thread::sleep(Duration::from_millis(2000));
    // The message's expiry outlived the restart; the other is still due.
    let back = sub(
        &hub,
        &[
            &v5[..],
            &["-i", "keeper", "-c", "-x", "60", "-q", "1", "-t", "r/#"],
            &["-F", "%t %p %P"],
        ]
        .concat(),
        2,
        5,
    );
    let mut got = lines(back);
    got.sort();
    assert_eq!(
        got,
        vec!["r/fresh fresh site:plant-7", "r/kept kept site:plant-7"],
        "expired messages stay expired and properties survive"
    );
    let retained = sub(
        &hub,
        &[&v5[..], &["-t", "r/#", "--retained-only", "-F", "%t %p %P"]].concat(),
        2,
        2,
    );
    assert_eq!(
        lines(retained),
        vec!["r/kept kept site:plant-7"],
        "a retained message keeps its properties and its expiry"
    );
    // The 1 s session expired after the restart instead of living forever:
    // its queued message is gone with it.
    let gone = run_sub(&hub, "brief", "1", "t/none", 1);
    assert!(lines(gone).is_empty(), "the expired session was resumed");
}

#[test]
fn a_client_may_change_its_session_expiry_when_it_leaves() {
    let python = python_with("paho.mqtt");
    let hub = TestHub::start(&["--allow-anonymous"]);
    let script = r#"
import sys, time, paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
host, port = sys.argv[1].rsplit(":", 1)
def session(client_id, expiry, leave_with):
    # Connect with a session expiry, subscribe, leave with another one.
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    c.connect(host, int(port), clean_start=False, properties=props)
    c.loop_start()
    c.subscribe(client_id + "/#", qos=1)[1]
    time.sleep(0.3)
    out = Properties(PacketTypes.DISCONNECT)
    out.SessionExpiryInterval = leave_with
    c.disconnect(properties=out)
    c.loop_stop()
def resume(client_id):
    got = []
    present = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_connect = lambda c, u, flags, rc, p: present.append(flags.session_present)
    c.on_message = lambda c, u, m: got.append(m.payload.decode())
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 60
    c.connect(host, int(port), clean_start=False, properties=props)
    c.loop_start()
    time.sleep(0.8)
    c.disconnect()
    c.loop_stop()
    return present, got
session("ends", 300, 0)       # leaves ending its session at once
session("stays", 1, 300)      # leaves extending it past its first expiry
time.sleep(1.5)
p = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv5)
p.connect(host, int(port))
p.loop_start()
for t in ("ends/x", "stays/x"):
    p.publish(t, t, qos=1).wait_for_publish(5)
p.disconnect()
p.loop_stop()
print(resume("ends"), resume("stays"))
"#;
    let out = Command::new(&python)
        .args(["-c", script, &hub.mqtt])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "([False], []) ([True], ['stays/x'])"
    );
}
