//! The queue under a hostile or noisy load: a route flooded by a device
//! fills its own share, never another task's; waiting inputs are bounded in
//! bytes; and the waiting calls of a task that leaves the deployment end
//! with `unknown_task` instead of running its old code.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn hub_with(tasks: &str, modules: &[&str], args: &[&str]) -> (TestHub, Package) {
    let hub = TestHub::start(args);
    let pkg = Package::new(tasks, modules);
    hub.deploy(&pkg.manifest());
    (hub, pkg)
}

/// The value of the metric line that starts with `name` (0 if absent).
fn metric(hub: &TestHub, name: &str) -> f64 {
    hub.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn the_waiting_calls_of_a_removed_task_end_with_unknown_task() {
    let tasks = task("sleep", "sleep.wat", "concurrency = 1\ntimeout_ms = 10000")
        + &task("echo", "echo.wat", "");
    let (hub, _p) = hub_with(&tasks, &["sleep.wat", "echo.wat"], &[]);
    // One call runs for a second; 30 wait behind it (30 s of work).
    let running = id_of(hub.call_async("sleep", "1000"));
    wait_until("the first call to run", Duration::from_secs(10), || {
        hub.task_row("sleep")["running"] == 1
    });
    let waiting: Vec<String> = (0..30)
        .map(|_| id_of(hub.call_async("sleep", "1000")))
        .collect();
    // A sync call waits too.
    let sync = {
        let url = format!("{}/v1/tasks/sleep/calls", hub.url);
        std::thread::spawn(move || {
            let r = http().post(url).body("1000").send().unwrap();
            error_of(r)
        })
    };
    wait_until("the sync call to queue", Duration::from_secs(10), || {
        hub.task_row("sleep")["queued"] == 31
    });
    let without = Package::new(&task("echo", "echo.wat", ""), &["echo.wat"]);
    hub.deploy(&without.manifest());
    for id in &waiting {
        let v = hub.wait_call(id, Duration::from_secs(10));
        assert_eq!(v["status"], "failed", "{v}");
        assert_eq!(v["error"]["code"], "unknown_task", "{v}");
        assert_eq!(v["attempts"], 0, "it never ran: {v}");
    }
    let (status, code, _) = sync.join().unwrap();
    assert_eq!((status, code.as_str()), (404, "unknown_task"));
    // The call that was running when the task left finishes as it was.
    let v = hub.wait_call(&running, Duration::from_secs(10));
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(hub.call("echo", "still here").text().unwrap(), "still here");
}

#[test]
fn waiting_sync_inputs_are_bounded_in_bytes() {
    let tasks = task("sleep", "sleep.wat", "timeout_ms = 10000") + &task("echo", "echo.wat", "");
    let (hub, _p) = hub_with(
        &tasks,
        &["sleep.wat", "echo.wat"],
        &["--cpu-slots", "1", "--max-queued-input-mb", "8"],
    );
    // The one CPU slot is busy for 8 s (long enough for ten uploads on a
    // loaded machine), so every echo call waits.
    let busy = {
        let url = format!("{}/v1/tasks/sleep/calls", hub.url);
        std::thread::spawn(move || http().post(url).body("8000").send().unwrap().status())
    };
    wait_until("the slot to be taken", Duration::from_secs(10), || {
        hub.task_row("sleep")["running"] == 1
    });
    let input = vec![b'x'; 3 << 20];
    let callers: Vec<_> = (0..10)
        .map(|_| {
            let url = format!("{}/v1/tasks/echo/calls", hub.url);
            let input = input.clone();
            std::thread::spawn(move || {
                let r = http().post(url).body(input).send().unwrap();
                let status = r.status().as_u16();
                let body = r.bytes().unwrap();
                (
                    status,
                    body.len(),
                    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
                )
            })
        })
        .collect();
    let results: Vec<(u16, usize, String)> =
        callers.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(busy.join().unwrap(), 200);
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    // 8 MiB holds two 3 MiB inputs waiting; the rest are refused.
    assert!((1..=2).contains(&ok), "{ok} calls were queued: {results:?}");
    assert_eq!(ok + refused.len(), 10, "{results:?}");
    for r in &refused {
        assert!(
            r.2.contains("queue_full") && r.2.contains("input bytes"),
            "{}",
            r.2
        );
    }
    for r in results.iter().filter(|r| r.0 == 200) {
        assert_eq!(r.1, 3 << 20, "the output is the whole input");
    }
    assert_eq!(metric(&hub, "roost_queue_input_bytes"), 0.0);
}

#[test]
fn a_flooded_route_fills_its_own_share_and_another_task_is_still_served() {
    // 64 places: 32 split among 2 tasks and 1 route (10 each), 34 common.
    let manifest = task("sink", "sleep.wat", "timeout_ms = 10000")
        + &task("other", "echo.wat", "")
        + "[[route]]\nfrom = \"device:flood/#\"\nto = \"task:sink\"\n";
    let (hub, _p) = hub_with(
        &manifest,
        &["sleep.wat", "echo.wat"],
        &[
            "--allow-anonymous",
            "--queue-limit",
            "64",
            "--cpu-slots",
            "1",
        ],
    );
    // A device publishes 3,000 messages as fast as it can; each asks the
    // sink for 20 ms of work (a minute in all on the one slot).
    let (h, p) = hub.mqtt.rsplit_once(':').unwrap();
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", h, "-p", p, "-t", "flood/x", "-l", "-q", "0"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (apt install mosquitto-clients)");
    {
        let mut stdin = publisher.stdin.take().unwrap();
        for _ in 0..3000 {
            writeln!(stdin, "20").unwrap();
        }
    }
    assert!(publisher.wait().unwrap().success());
    wait_until(
        "the route to fill its share",
        Duration::from_secs(20),
        || metric(&hub, r#"roost_route_deliveries_total{outcome="waited"}"#) > 0.0,
    );
    // The other task's calls still find a place in the queue.
    for i in 0..20 {
        let r = hub.call("other", format!("call {i}"));
        assert_eq!(r.status(), 200, "call {i} to the other task");
        assert_eq!(r.text().unwrap(), format!("call {i}"));
    }
    // An outside caller of the flooded task waits in that task's own
    // share, not the route's: it is served too.
    let r = hub.call("sink", "1");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "slept\n");
    // Nothing the route kept fails for good: it waits and is delivered;
    // what its backlog could not hold is dropped and counted.
    assert_eq!(
        metric(&hub, r#"roost_route_deliveries_total{outcome="failed"}"#),
        0.0
    );
    let dropped = metric(&hub, r#"roost_route_deliveries_total{outcome="dropped"}"#);
    assert!(
        dropped > 0.0,
        "3,000 messages cannot all fit a backlog of 1,000"
    );
    assert!(
        hub.log_text().contains("a route's backlog is full"),
        "the drops are logged"
    );
    wait_until(
        "deliveries to go on past the share",
        Duration::from_secs(30),
        || metric(&hub, r#"roost_route_deliveries_total{outcome="delivered"}"#) >= 200.0,
    );
    assert_eq!(
        metric(&hub, r#"roost_route_deliveries_total{outcome="failed"}"#),
        0.0
    );
}

/// A process's resident memory now and at its peak, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

#[test]
fn a_flood_of_large_sync_calls_is_refused_before_its_bodies_are_read() {
    let tasks = task("sleep", "sleep.wat", "timeout_ms = 10000") + &task("echo", "echo.wat", "");
    let (hub, _p) = hub_with(
        &tasks,
        &["sleep.wat", "echo.wat"],
        &["--cpu-slots", "1", "--max-queued-input-mb", "24"],
    );
    // Warm up the path a 6 MiB call takes, so its buffers are not counted.
    assert_eq!(hub.call("echo", vec![b'w'; 6 << 20]).status(), 200);
    let (before, _) = rss_mib(hub.pid());
    let busy = {
        let url = format!("{}/v1/tasks/sleep/calls", hub.url);
        std::thread::spawn(move || http().post(url).body("3000").send().unwrap().status())
    };
    wait_until("the slot to be taken", Duration::from_secs(10), || {
        hub.task_row("sleep")["running"] == 1
    });
    // 40 callers send 6 MiB each (240 MiB) at a hub that queues 24 MiB.
    // (Reading every body first, as the hub did, peaked 340 MiB above
    // where it started; refusing before reading, 40 MiB.)
    let callers: Vec<_> = (0..40)
        .map(|_| {
            let url = format!("{}/v1/tasks/echo/calls", hub.url);
            std::thread::spawn(move || {
                http()
                    .post(url)
                    .body(vec![b'x'; 6 << 20])
                    .send()
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            })
        })
        .collect();
    let statuses: Vec<u16> = callers.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(busy.join().unwrap(), 200);
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(ok <= 4, "at most 4 × 6 MiB wait: {statuses:?}");
    assert!(refused >= 30, "{statuses:?}");
    let (_, peak) = rss_mib(hub.pid());
    eprintln!("hub RSS {before:.0} MiB before, peak {peak:.0} MiB");
    assert!(
        peak - before < 120.0,
        "the hub's memory grew by {:.0} MiB for 24 MiB of queued input",
        peak - before
    );
}
