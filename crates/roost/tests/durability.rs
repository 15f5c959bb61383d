//! Nothing acknowledged is lost: async calls survive `kill -9` and restarts,
//! SIGTERM drains running calls and leaves queued ones on disk.

mod common;
use common::*;
use std::time::Duration;

fn ids_of(hub: &TestHub, task: &str, inputs: &[&str]) -> Vec<String> {
    inputs
        .iter()
        .map(|i| {
            let r = hub.call_async(task, *i);
            assert_eq!(r.status(), 202);
            id_of(r)
        })
        .collect()
}

#[test]
fn async_call_survives_kill_9() {
    let mut hub = TestHub::start(&[]);
    // One at a time and slow, so most calls are still queued (or running)
    // when the hub is killed.
    let pkg = Package::new(
        &task("sleep", "sleep.wat", "concurrency = 1\ntimeout_ms = 5000"),
        &["sleep.wat"],
    );
    hub.deploy(&pkg.manifest());
    let ids = ids_of(&hub, "sleep", &["300"; 6]);
    hub.kill9();
    hub.launch();
    assert!(hub
        .log_text()
        .contains("requeued async calls acknowledged before the restart"));
    for id in &ids {
        let v = hub.wait_call(id, Duration::from_secs(30));
        assert_eq!(v["status"], "succeeded", "{v}");
        let out = hub.call_output(id);
        assert_eq!(out.text().unwrap(), "slept\n");
    }
}

#[test]
fn a_call_running_when_the_hub_is_killed_runs_again_after_restart() {
    let mut hub = TestHub::start(&[]);
    let pkg = Package::new(
        &task("sleep", "sleep.wat", "timeout_ms = 10000"),
        &["sleep.wat"],
    );
    hub.deploy(&pkg.manifest());
    let ids = ids_of(&hub, "sleep", &["3000"]);
    wait_until("the call to run", Duration::from_secs(10), || {
        hub.get_json(&format!("/v1/calls/{}", ids[0]))["status"] == "running"
    });
    hub.kill9();
    hub.launch();
    let v = hub.wait_call(&ids[0], Duration::from_secs(30));
    assert_eq!(v["status"], "succeeded");
    assert_eq!(
        v["attempts"], 2,
        "at least once: the interrupted attempt counts"
    );
}

#[test]
fn sigterm_lets_running_calls_finish_and_keeps_queued_ones_for_the_next_start() {
    let mut hub = TestHub::start(&["--grace-s", "20"]);
    let pkg = Package::new(
        &task("sleep", "sleep.wat", "concurrency = 1\ntimeout_ms = 10000"),
        &["sleep.wat"],
    );
    hub.deploy(&pkg.manifest());
    let url = hub.url.clone();
    let running = std::thread::spawn(move || {
        http()
            .post(format!("{url}/v1/tasks/sleep/calls"))
            .body("1000")
            .send()
            .unwrap()
    });
    wait_until("the sync call to run", Duration::from_secs(10), || {
        hub.task_row("sleep")["running"] == 1
    });
    let queued = ids_of(&hub, "sleep", &["10", "10"]);
    let mut child = hub.sigterm();
    // The running call still completes.
    let r = running.join().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "slept\n");
    let status = child.wait().unwrap();
    assert!(status.success(), "hub exit status {status}");
    // The queued async calls were not run; they run after the next start.
    hub.launch();
    for id in &queued {
        assert_eq!(
            hub.wait_call(id, Duration::from_secs(30))["status"],
            "succeeded"
        );
    }
}

#[test]
fn outputs_are_purged_after_the_retention_period() {
    // Retention is checked by a sweeper; with retention 0 a finished call is
    // gone after the next sweep (the first sweep runs at start).
    let mut hub = TestHub::start(&["--retention-s", "0"]);
    let pkg = Package::new(&task("echo", "echo.wat", ""), &["echo.wat"]);
    hub.deploy(&pkg.manifest());
    let ids = ids_of(&hub, "echo", &["x"]);
    hub.wait_call(&ids[0], Duration::from_secs(10));
    hub.kill9();
    std::thread::sleep(Duration::from_millis(20));
    hub.launch();
    wait_until(
        "the finished call to be purged",
        Duration::from_secs(10),
        || {
            http()
                .get(format!("{}/v1/calls/{}", hub.url, ids[0]))
                .send()
                .unwrap()
                .status()
                == 404
        },
    );
}
