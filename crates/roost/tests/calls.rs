//! Calls over the communications API: sync and async calls, nested calls,
//! limits, and every way a task can fail without harming the hub.

mod common;
use common::*;
use std::time::Duration;

fn hub_with(tasks: &str, modules: &[&str], args: &[&str]) -> (TestHub, Package) {
    let hub = TestHub::start(args);
    let pkg = Package::new(tasks, modules);
    hub.deploy(&pkg.manifest());
    (hub, pkg)
}

#[test]
fn sync_call_returns_the_output() {
    let (hub, _p) = hub_with(&task("echo", "echo.wat", ""), &["echo.wat"], &[]);
    let r = hub.call("echo", "hello roost");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "hello roost");
    // Empty input and a large one (5 MiB) both make the round trip.
    assert_eq!(hub.call("echo", "").text().unwrap(), "");
    let big: Vec<u8> = (0..5 << 20).map(|i| (i % 251) as u8).collect();
    let r = hub.call("echo", big.clone());
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), &big[..]);
}

#[test]
fn a_task_calls_another_task_through_the_host_import() {
    let tasks = task("echo", "echo.wat", "") + &task("greet", "greet.wat", "");
    let (hub, _p) = hub_with(&tasks, &["echo.wat", "greet.wat"], &[]);
    let r = hub.call("greet", "world");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "hello, world");
    let metrics = hub.metrics();
    assert!(
        metrics.contains(r#"roost_calls_total{task="echo",outcome="succeeded",mode="nested"} 1"#),
        "{metrics}"
    );
}

#[test]
fn nested_calls_never_deadlock_a_full_hub_and_stop_at_the_depth_limit() {
    // One CPU slot and concurrency 1: a callee that queued behind its caller
    // would wait forever. It runs on the caller's reservation instead.
    let tasks = task(
        "recurse",
        "recurse.wat",
        "concurrency = 1\ntimeout_ms = 10000",
    );
    let (hub, _p) = hub_with(&tasks, &["recurse.wat"], &["--cpu-slots", "1"]);
    let r = hub.call("recurse", "x");
    assert_eq!(r.status(), 200);
    let out = r.text().unwrap();
    assert!(out.contains("depth error -6"), "{out}");
    assert!(out.contains("nested deeper"), "{out}");
}

#[test]
fn unknown_task_is_404() {
    let (hub, _p) = hub_with(&task("echo", "echo.wat", ""), &["echo.wat"], &[]);
    let (status, code, msg) = error_of(hub.call("nope", "x"));
    assert_eq!((status, code.as_str()), (404, "unknown_task"));
    assert!(msg.contains("roost tasks"));
    let (status, code, _) = error_of(hub.call("../../etc", "x"));
    assert_eq!(status, 404, "{code}");
    let (status, code, _) = error_of(
        http()
            .get(format!(
                "{}/v1/calls/0123456789abcdef0123456789abcdef",
                hub.url
            ))
            .send()
            .unwrap(),
    );
    assert_eq!((status, code.as_str()), (404, "unknown_call"));
}

#[test]
fn oversized_input_is_413() {
    let (hub, _p) = hub_with(&task("echo", "echo.wat", ""), &["echo.wat"], &[]);
    let (status, code, _) = error_of(hub.call("echo", vec![b'x'; (6 << 20) + 1]));
    assert_eq!((status, code.as_str()), (413, "input_too_large"));
    let (status, code, _) = error_of(hub.call_async("echo", vec![b'x'; (1 << 20) + 1]));
    assert_eq!((status, code.as_str()), (413, "input_too_large"));
    // Right at the limits is fine.
    assert_eq!(hub.call_async("echo", vec![b'x'; 1 << 20]).status(), 202);
    assert_eq!(hub.call("echo", "still fine").status(), 200);
}

#[test]
fn a_trapping_task_fails_with_task_error_and_the_hub_keeps_serving() {
    let tasks = task("trap", "trap.wat", "")
        + &task("echo", "echo.wat", "")
        + &task("exit3", "exit3.wat", "");
    let (hub, _p) = hub_with(&tasks, &["trap.wat", "echo.wat", "exit3.wat"], &[]);
    let (status, code, msg) = error_of(hub.call("trap", ""));
    assert_eq!((status, code.as_str()), (502, "task_error"));
    assert!(msg.contains("unreachable"), "{msg}");
    let (status, code, msg) = error_of(hub.call("exit3", ""));
    assert_eq!((status, code.as_str()), (502, "task_error"));
    assert!(msg.contains("status 3"), "{msg}");
    assert_eq!(hub.call("echo", "alive").text().unwrap(), "alive");
}

#[test]
fn a_task_looping_forever_times_out_while_other_tasks_run() {
    let tasks = task("loop", "loop.wat", "timeout_ms = 500") + &task("echo", "echo.wat", "");
    let (hub, _p) = hub_with(&tasks, &["loop.wat", "echo.wat"], &[]);
    let url = hub.url.clone();
    let spinner = std::thread::spawn(move || {
        http()
            .post(format!("{url}/v1/tasks/loop/calls"))
            .send()
            .unwrap()
    });
    // While the loop spins (the hub counts it as running), another task
    // answers.
    wait_until("the loop call runs", Duration::from_secs(10), || {
        hub.task_row("loop")["running"] == 1
    });
    assert_eq!(hub.call("echo", "meanwhile").text().unwrap(), "meanwhile");
    let (status, code, msg) = error_of(spinner.join().unwrap());
    assert_eq!((status, code.as_str()), (504, "timeout"));
    assert!(msg.contains("timeout_ms = 500"), "{msg}");
}

#[test]
fn a_sleeping_task_times_out_too() {
    let tasks = task("sleep", "sleep.wat", "timeout_ms = 300");
    let (hub, _p) = hub_with(&tasks, &["sleep.wat"], &[]);
    assert_eq!(hub.call("sleep", "10").text().unwrap(), "slept\n");
    let (status, code, _) = error_of(hub.call("sleep", "60000"));
    assert_eq!((status, code.as_str()), (504, "timeout"));
}

#[test]
fn a_task_growing_memory_without_end_fails_with_memory_limit() {
    let tasks = task("grow", "grow.wat", "memory_mb = 8") + &task("echo", "echo.wat", "");
    let (hub, _p) = hub_with(&tasks, &["grow.wat", "echo.wat"], &[]);
    let (status, code, msg) = error_of(hub.call("grow", ""));
    assert_eq!((status, code.as_str()), (502, "memory_limit"));
    assert!(msg.contains("memory_mb = 8"), "{msg}");
    assert_eq!(hub.call("echo", "ok").text().unwrap(), "ok");
}

#[test]
fn stderr_lines_reach_roost_logs() {
    let (hub, _p) = hub_with(&task("chatty", "stderr.wat", ""), &["stderr.wat"], &[]);
    assert_eq!(hub.call("chatty", "").text().unwrap(), "ok");
    let out = hub.cli(&["logs", "chatty"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for l in ["line one", "line two", "line three"] {
        assert!(text.contains(l), "{text}");
    }
    assert!(text.contains("chatty"));
}

#[test]
fn clocks_and_environment_work_inside_a_task() {
    let tasks = task("clock", "clock.wat", "")
        + &task("env", "env.wat", "env = { GREETING = \"hi there\" }");
    let (hub, _p) = hub_with(&tasks, &["clock.wat", "env.wat"], &[]);
    let ns: u128 = hub
        .call("clock", "")
        .text()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    assert!(
        now.abs_diff(ns) < 60_000_000_000,
        "guest clock {ns} vs host {now}"
    );
    assert_eq!(hub.call("env", "").text().unwrap().trim(), "hi there");
}

#[test]
fn a_task_sees_only_the_resources_it_declares_with_their_access() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("input.txt"), "sensor data").unwrap();
    let d = data.path().display();
    let tasks = task(
        "read",
        "readfile.wat",
        &format!("[[task.resource]]\nsource = \"{d}\"\npath = \"/data\"\naccess = \"ro\""),
    ) + &task(
        "write-ro",
        "writefile.wat",
        &format!("[[task.resource]]\nsource = \"{d}\"\npath = \"/data\"\naccess = \"ro\""),
    ) + &task(
        "write-rw",
        "writefile.wat",
        &format!("[[task.resource]]\nsource = \"{d}\"\npath = \"/data\"\naccess = \"rw\""),
    ) + &task("no-grant", "readfile.wat", "");
    let (hub, _p) = hub_with(&tasks, &["readfile.wat", "writefile.wat"], &[]);
    assert_eq!(hub.call("read", "").text().unwrap(), "sensor data");
    let (status, _, _) = error_of(hub.call("write-ro", "x"));
    assert_eq!(status, 502, "a read-only resource must refuse writes");
    assert!(!data.path().join("out.txt").exists());
    assert_eq!(hub.call("write-rw", "written by a task").status(), 200);
    assert_eq!(
        std::fs::read_to_string(data.path().join("out.txt")).unwrap(),
        "written by a task"
    );
    let (status, _, _) = error_of(hub.call("no-grant", ""));
    assert_eq!(status, 502, "a task without the resource sees no files");
}

#[test]
fn calls_wait_when_memory_budget_is_full() {
    let tasks = task("sleep", "sleep.wat", "memory_mb = 32\ntimeout_ms = 5000");
    let (hub, _p) = hub_with(&tasks, &["sleep.wat"], &["--memory-budget-mb", "40"]);
    let url = hub.url.clone();
    let first = std::thread::spawn({
        let url = url.clone();
        move || {
            http()
                .post(format!("{url}/v1/tasks/sleep/calls"))
                .body("800")
                .send()
                .unwrap()
        }
    });
    wait_until("the first call to run", Duration::from_secs(10), || {
        hub.task_row("sleep")["running"] == 1
    });
    let second = std::thread::spawn(move || {
        http()
            .post(format!("{url}/v1/tasks/sleep/calls"))
            .body("10")
            .send()
            .unwrap()
    });
    // The second does not fit in the budget beside the first: it waits, queued.
    wait_until("the second call to queue", Duration::from_secs(10), || {
        hub.task_row("sleep")["queued"] == 1
    });
    assert_eq!(hub.task_row("sleep")["running"], 1);
    let m = hub.metrics();
    assert!(m.contains("roost_memory_reserved_mb 32"), "{m}");
    assert!(m.contains("roost_queue_depth 1"), "{m}");
    // ...and both succeed: waiting is not failing.
    assert_eq!(first.join().unwrap().text().unwrap(), "slept\n");
    assert_eq!(second.join().unwrap().text().unwrap(), "slept\n");
}

#[test]
fn a_flood_past_the_queue_bound_gets_429_and_nothing_accepted_is_lost() {
    let tasks = task("sleep", "sleep.wat", "concurrency = 1\ntimeout_ms = 5000");
    let (hub, _p) = hub_with(&tasks, &["sleep.wat"], &["--queue-limit", "4"]);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        let r = hub.call_async("sleep", "50");
        match r.status().as_u16() {
            202 => accepted.push(id_of(r)),
            429 => {
                let retry: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry >= 1);
                let v: serde_json::Value = r.json().unwrap();
                assert_eq!(v["error"]["code"], "queue_full");
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(refused > 0, "the queue bound must refuse some of 20 calls");
    assert!(accepted.len() >= 4);
    for id in &accepted {
        let v = hub.wait_call(id, Duration::from_secs(30));
        assert_eq!(v["status"], "succeeded", "{v}");
        let out = hub.call_output(id);
        assert_eq!(out.text().unwrap(), "slept\n");
    }
}

#[test]
fn async_call_output_is_409_until_done_and_then_fetched() {
    let tasks = task("sleep", "sleep.wat", "timeout_ms = 5000");
    let (hub, _p) = hub_with(&tasks, &["sleep.wat"], &[]);
    let r = hub.call_async("sleep", "500");
    assert_eq!(r.status(), 202);
    let id = id_of(r);
    let early = hub.call_output(&id);
    assert_eq!(early.status(), 409);
    hub.wait_call(&id, Duration::from_secs(10));
    let out = hub.cli(&["status", &id, "--output"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "slept\n");
}

#[test]
fn a_failing_async_call_is_retried_then_kept_as_failed() {
    let tasks = task("trap", "trap.wat", "");
    let (hub, _p) = hub_with(
        &tasks,
        &["trap.wat"],
        &["--retry-backoff-ms", "20", "--async-attempts", "3"],
    );
    let r = hub.call_async("trap", "");
    let id = id_of(r);
    let v = hub.wait_call(&id, Duration::from_secs(20));
    assert_eq!(v["status"], "failed");
    assert_eq!(v["attempts"], 3);
    assert_eq!(v["error"]["code"], "task_error");
    let out = hub.call_output(&id);
    assert_eq!(out.status(), 502);
    let m = hub.metrics();
    assert!(m.contains("roost_async_retries_total 2"), "{m}");
}

#[test]
fn a_c_program_built_with_a_real_toolchain_runs() {
    let c_dir = wasm_dir().join("c");
    let built = tempfile::tempdir().unwrap();
    let out_path = built.path().join("upper.wasm");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = std::process::Command::new("bash")
        .arg(c_dir.join("build.sh"))
        .arg(&out_path)
        .env("PYTHON", python)
        .status()
        .unwrap();
    if !status.success() && std::env::var("ROOST_SKIP_C").is_ok() {
        eprintln!("skipping: ziglang is not installed and ROOST_SKIP_C is set");
        return;
    }
    assert!(status.success(), "building upper.c needs the ziglang package (pip install ziglang); set ROOST_SKIP_C=1 to skip");
    let pkg = Package::new(&task("upper", "upper.wasm", ""), &[]);
    std::fs::copy(&out_path, pkg.path().join("upper.wasm")).unwrap();
    let hub = TestHub::start(&[]);
    hub.deploy(&pkg.manifest());
    assert_eq!(
        hub.call("upper", "make me loud").text().unwrap(),
        "MAKE ME LOUD"
    );
    wait_until(
        "the C program's stderr in the log",
        Duration::from_secs(5),
        || String::from_utf8_lossy(&hub.cli(&["logs", "upper"]).stdout).contains("upper: 12 bytes"),
    );
}

#[test]
fn the_cli_calls_tasks_and_lists_them() {
    let (hub, p) = hub_with(
        &task("echo", "echo.wat", "memory_mb = 24"),
        &["echo.wat"],
        &[],
    );
    let input = p.path().join("in.txt");
    std::fs::write(&input, "from a file").unwrap();
    let out = hub.cli(&["call", "echo", "--input", input.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from a file");
    let out = hub.cli(&["tasks"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("echo") && table.contains("24"), "{table}");
    let out = hub.cli(&["call", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: unknown_task"), "{err}");
}
