//! Process tasks: unmodified AWS Lambda runtime clients (awslambdaric, a
//! curl `bootstrap`) run as warm workers, each failure harms only its call.
//!
//! Needs a Python with `awslambdaric` in $PYTHON (scripts/test.sh makes one)
//! and curl.

mod common;
use common::*;
use std::time::Duration;

fn python() -> String {
    python_with("awslambdaric")
}

/// A package with the fixture folders copied in (modes kept) and a manifest.
fn package(manifest: &str, folders: &[&str]) -> Package {
    let pkg = Package::new(manifest, &[]);
    for f in folders {
        pkg.copy_fixture(f, f);
    }
    pkg
}

fn py_task(name: &str, handler: &str, extra: &str) -> String {
    format!(
        "[[task]]\nname = \"{name}\"\nruntime = \"process\"\ndir = \"py\"\ncommand = [\"{}\", \"-m\", \"awslambdaric\"]\nhandler = \"{handler}\"\n{extra}\n",
        python()
    )
}

#[test]
fn an_unmodified_python_handler_runs_with_the_lambda_environment() {
    let hub = TestHub::start(&["--region", "eu-west-1"]);
    let pkg = package(
        &py_task(
            "hello",
            "app.handler",
            "memory_mb = 256\ntimeout_ms = 5000\nenv = { GREETING = \"hi\" }",
        ),
        &["py"],
    );
    hub.deploy(&pkg.manifest());
    let r = hub.call("hello", r#"{"name": "roost"}"#);
    assert_eq!(r.status(), 200, "{}", hub.log_text());
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["echo"]["name"], "roost");
    assert_eq!(v["function"], "hello");
    assert_eq!(
        v["memory"], "256",
        "awslambdaric reports it as a string, as Lambda does"
    );
    assert_eq!(v["region"], "eu-west-1");
    assert_eq!(v["greeting"], "hi");
    assert_eq!(
        v["arn"],
        "arn:aws:lambda:eu-west-1:000000000000:function:hello"
    );
    assert!(v["task_root"].as_str().unwrap().ends_with("/py"));
    let remaining = v["remaining_ms"].as_i64().unwrap();
    assert!(remaining > 0 && remaining <= 5000, "{remaining}");
    assert_eq!(v["request_id"].as_str().unwrap().len(), 32);
    // A second call reuses the warm worker.
    let v2: serde_json::Value = hub.call("hello", "{}").json().unwrap();
    assert_eq!(
        v2["pid"], v["pid"],
        "the second call should hit the warm worker"
    );
    let row = hub.task_row("hello");
    assert_eq!(row["pool"]["cold_starts"], 1, "{row}");
    assert_eq!(row["pool"]["warm_hits"], 1, "{row}");
    // Input that is not JSON reaches the handler as raw bytes.
    let r = hub.call("hello", "not json");
    assert_eq!(r.status(), 200, "{}", hub.log_text());
}

#[test]
fn min_warm_workers_are_ready_before_the_first_call() {
    let hub = TestHub::start(&[]);
    let pkg = package(
        &py_task("warm", "app.handler", "min_warm = 2\nmax_workers = 3"),
        &["py"],
    );
    hub.deploy(&pkg.manifest());
    let row = hub.task_row("warm");
    assert_eq!(row["pool"]["workers"], 2, "{row}");
    assert_eq!(hub.call("warm", "{}").status(), 200);
    let row = hub.task_row("warm");
    assert_eq!(row["pool"]["cold_starts"], 0, "{row}");
    let m = hub.metrics();
    assert!(m.contains(r#"roost_pool_warm_hits{task="warm"} 1"#), "{m}");
}

#[test]
fn a_handler_that_raises_fails_only_its_call() {
    let hub = TestHub::start(&[]);
    let pkg = package(
        &(py_task("fail", "app.fail", "") + &py_task("ok", "app.handler", "")),
        &["py"],
    );
    hub.deploy(&pkg.manifest());
    let (status, code, msg) = error_of(hub.call("fail", r#""boom""#));
    assert_eq!((status, code.as_str()), (502, "task_error"));
    assert!(
        msg.contains("ValueError") && msg.contains("bad input: boom"),
        "{msg}"
    );
    let (status, _, _) = error_of(hub.call("fail", r#""again""#));
    assert_eq!(status, 502);
    assert_eq!(hub.call("ok", "{}").status(), 200);
}

#[test]
fn a_handler_sleeping_past_its_timeout_is_killed_and_replaced() {
    let hub = TestHub::start(&[]);
    let pkg = package(&py_task("slow", "app.slow", "timeout_ms = 1500"), &["py"]);
    hub.deploy(&pkg.manifest());
    let (status, code, _) = error_of(hub.call("slow", r#"{"seconds": 30}"#));
    assert_eq!((status, code.as_str()), (504, "timeout"));
    // The next call gets a fresh worker and succeeds (the start-up of that
    // worker does not count toward its timeout).
    let r = hub.call("slow", r#"{"seconds": 0.1}"#);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "\"woke\"");
}

#[test]
fn a_handler_calling_os_exit_crashes_only_its_call() {
    let hub = TestHub::start(&[]);
    let pkg = package(
        &(py_task("die", "app.die", "") + &py_task("ok", "app.handler", "")),
        &["py"],
    );
    hub.deploy(&pkg.manifest());
    let (status, code, msg) = error_of(hub.call("die", "{}"));
    assert_eq!((status, code.as_str()), (502, "crashed"), "{msg}");
    assert!(msg.contains("exit status 3"), "{msg}");
    assert_eq!(hub.call("ok", "{}").status(), 200);
    let (status, code, _) = error_of(hub.call("die", "{}"));
    assert_eq!((status, code.as_str()), (502, "crashed"));
}

#[test]
fn a_handler_allocating_past_its_memory_limit_fails_with_memory_limit() {
    let hub = TestHub::start(&[]);
    let pkg = package(
        &(py_task("hog", "app.hog", "memory_mb = 96\ntimeout_ms = 20000")
            + &py_task("ok", "app.handler", "")),
        &["py"],
    );
    hub.deploy(&pkg.manifest());
    let (status, code, msg) = error_of(hub.call("hog", "{}"));
    assert_eq!(
        (status, code.as_str()),
        (502, "memory_limit"),
        "{msg}\n{}",
        hub.log_text()
    );
    assert_eq!(hub.call("ok", "{}").status(), 200);
    assert!(hub.log_text().contains("process runtime ready"));
}

#[test]
fn megabytes_of_stdout_go_to_the_log_line_by_line_and_the_call_succeeds() {
    let hub = TestHub::start(&[]);
    let pkg = package(
        &(py_task("noisy", "app.noisy", "timeout_ms = 20000") + &py_task("huge", "app.huge", "")),
        &["py"],
    );
    hub.deploy(&pkg.manifest());
    let r = hub.call("noisy", "{}");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "\"quiet now\"");
    wait_until("the stderr line", Duration::from_secs(5), || {
        String::from_utf8_lossy(&hub.cli(&["logs", "noisy"]).stdout).contains("noisy done")
    });
    // A response over Lambda's 6 MiB limit fails the call, not the hub.
    let (status, code, msg) = error_of(hub.call("huge", "{}"));
    assert_eq!(status, 502, "{code} {msg}");
}

#[test]
fn a_curl_bootstrap_script_runs_as_a_custom_runtime() {
    let hub = TestHub::start(&[]);
    let pkg = package(
        "[[task]]\nname = \"shell\"\nruntime = \"process\"\ndir = \"curl\"\ncommand = [\"./bootstrap\"]\n",
        &["curl"],
    );
    hub.deploy(&pkg.manifest());
    for i in 0..3 {
        let r = hub.call("shell", format!("{{\"n\": {i}}}"));
        assert_eq!(r.status(), 200, "{}", hub.log_text());
        let v: serde_json::Value = r.json().unwrap();
        assert_eq!(v["shell"]["n"], i);
    }
    wait_until(
        "the script's stderr in the log",
        Duration::from_secs(5),
        || String::from_utf8_lossy(&hub.cli(&["logs", "shell"]).stdout).contains("handling"),
    );
}

#[test]
fn a_worker_may_only_answer_its_own_request_once() {
    let hub = TestHub::start(&[]);
    let pkg = package(
        "[[task]]\nname = \"strict\"\nruntime = \"process\"\ndir = \"strict\"\ncommand = [\"./bootstrap\"]\n",
        &["strict"],
    );
    hub.deploy(&pkg.manifest());
    let v: serde_json::Value = hub.call("strict", "{}").json().unwrap();
    assert_eq!(v["wrong_id"], 400, "{v}");
    let v: serde_json::Value = hub.call("strict", "{}").json().unwrap();
    assert_eq!(v["twice_before"], "400", "{v}");
}

#[test]
fn a_command_that_does_not_exist_or_exits_at_once_is_a_clear_error() {
    let hub = TestHub::start(&[]);
    let pkg = package(
        "[[task]]\nname = \"ghost\"\nruntime = \"process\"\ndir = \"py\"\ncommand = [\"no-such-program-anywhere\"]\n",
        &["py"],
    );
    let out = hub.cli(&["deploy", pkg.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Exits at once: with min_warm the deployment fails...
    let pkg = package(
        "[[task]]\nname = \"quitter\"\nruntime = \"process\"\ndir = \"py\"\ncommand = [\"false\"]\nmin_warm = 1\n",
        &["py"],
    );
    let out = hub.cli(&["deploy", pkg.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exited while starting"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...without, the call does.
    let pkg = package(
        "[[task]]\nname = \"quitter\"\nruntime = \"process\"\ndir = \"py\"\ncommand = [\"false\"]\n",
        &["py"],
    );
    hub.deploy(&pkg.manifest());
    let (status, code, msg) = error_of(hub.call("quitter", "{}"));
    assert_eq!((status, code.as_str()), (502, "crashed"), "{msg}");

    // A handler that cannot be imported is reported through init/error.
    let pkg = package(&py_task("broken", "nosuchmodule.handler", ""), &["py"]);
    hub.deploy(&pkg.manifest());
    let (status, code, msg) = error_of(hub.call("broken", "{}"));
    assert_eq!(status, 502, "{code} {msg}");
    assert!(
        msg.contains("nosuchmodule") || msg.contains("ImportModuleError"),
        "{msg}"
    );
}

fn worker_pids(marker_hub: &TestHub) -> Vec<i32> {
    let needle = format!("LAMBDA_TASK_ROOT={}", marker_hub.data_dir.display());
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if String::from_utf8_lossy(&env).contains(&needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

#[test]
fn workers_die_with_the_hub_after_kill_9() {
    let mut hub = TestHub::start(&[]);
    let pkg = package(
        &(py_task("warm", "app.handler", "min_warm = 2")
            + "[[task]]\nname = \"shell\"\nruntime = \"process\"\ndir = \"curl\"\ncommand = [\"./bootstrap\"]\nmin_warm = 1\n"),
        &["py", "curl"],
    );
    hub.deploy(&pkg.manifest());
    let before = worker_pids(&hub);
    assert!(
        before.len() >= 3,
        "expected the warm workers (and the script's curl) to be running: {before:?}"
    );
    hub.kill9();
    wait_until(
        "every worker, grandchildren included, to exit",
        Duration::from_secs(10),
        || worker_pids(&hub).is_empty(),
    );
}

#[test]
fn workers_of_a_code_group_fork_from_one_preloaded_parent_and_keep_their_limits() {
    let mut hub = TestHub::start(&[]);
    let pkg = package(
        &(py_task("a", "app.handler", "code_group = \"py\"\nmin_warm = 2")
            + &py_task("b", "app.handler", "code_group = \"py\"\nmin_warm = 1")
            + &py_task(
                "hog",
                "app.hog",
                "code_group = \"py\"\nmemory_mb = 96\ntimeout_ms = 20000",
            )),
        &["py"],
    );
    hub.deploy(&pkg.manifest());
    let a: serde_json::Value = hub.call("a", r#"{"x": 1}"#).json().unwrap();
    let b: serde_json::Value = hub.call("b", r#"{"x": 2}"#).json().unwrap();
    assert_eq!(a["echo"]["x"], 1);
    assert_eq!(b["echo"]["x"], 2);
    assert_eq!(a["function"], "a");
    assert_eq!(b["function"], "b");
    assert_eq!(
        a["ppid"], b["ppid"],
        "both workers fork from the same zygote"
    );
    assert_ne!(a["ppid"].as_i64().unwrap(), hub.pid() as i64);
    assert!(hub
        .log_text()
        .contains("workers fork from the code group's zygote"));
    // A forked worker is still held to its own memory limit.
    let r = hub.call("hog", "{}");
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "memory_limit", "{v}");
    assert_eq!(hub.call("a", "{}").status(), 200);
    // Its output still reaches the log under its task's name.
    let row = hub.task_row("a");
    assert_eq!(row["pool"]["cold_starts"], 0, "{row}");
    hub.kill9();
    wait_until(
        "the zygote and its workers to exit",
        Duration::from_secs(10),
        || worker_pids(&hub).is_empty(),
    );
}

#[test]
fn a_redeployment_keeps_the_new_pool_warm() {
    let hub = TestHub::start(&[]);
    let v1 = package(&py_task("py", "app.handler", "min_warm = 1"), &["py"]);
    hub.deploy(&v1.manifest());
    let v2 = package(&py_task("py", "app.handler", "min_warm = 2"), &["py"]);
    hub.deploy(&v2.manifest());
    std::thread::sleep(Duration::from_millis(300));
    let row = hub.task_row("py");
    assert_eq!(
        row["pool"]["workers"], 2,
        "retiring the old pool must not touch the new one: {row}"
    );
    assert_eq!(hub.call("py", "{}").status(), 200);
    assert_eq!(hub.task_row("py")["pool"]["cold_starts"], 0);
}

#[test]
fn a_restarted_hub_prewarms_the_pool_it_needed_before() {
    let mut hub = TestHub::start(&[]);
    let pkg = package(
        &py_task(
            "busy",
            "app.slow",
            "min_warm = 0\nmax_workers = 6\nconcurrency = 6\ntimeout_ms = 5000",
        ),
        &["py"],
    );
    hub.deploy(&pkg.manifest());
    // Steady demand: 4 clients calling a 200 ms handler back to back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = hub.url.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = http()
                        .post(format!("{url}/v1/tasks/busy/calls"))
                        .body(r#"{"seconds": 0.2}"#)
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(7));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let target_before = hub.task_row("busy")["pool"]["target"].as_u64().unwrap();
    assert!(
        target_before >= 2,
        "the policy should have asked for several workers: {target_before}"
    );
    hub.kill9();
    hub.launch();
    // No call yet, and the pool grows to what the demand needed.
    wait_until("the pool to be pre-warmed", Duration::from_secs(20), || {
        hub.task_row("busy")["pool"]["workers"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    });
    assert_eq!(hub.task_row("busy")["pool"]["cold_starts"], 0);
    wait_until("the pre-warm to be logged", Duration::from_secs(20), || {
        hub.log_text()
            .contains("pre-warmed from the demand measured before the restart")
    });
}

#[test]
fn an_unmodified_node_handler_runs_through_the_npm_runtime_client() {
    let ric = std::env::var("ROOST_NODE_RIC").expect(
        "set ROOST_NODE_RIC to aws-lambda-ric's bin/index.mjs (scripts/test.sh installs it)",
    );
    let hub = TestHub::start(&[]);
    let task = |name: &str, handler: &str| {
        format!("[[task]]\nname = \"{name}\"\nruntime = \"process\"\ndir = \"node\"\ncommand = [\"node\", \"{ric}\"]\nhandler = \"{handler}\"\nmemory_mb = 256\ntimeout_ms = 5000\n")
    };
    let pkg = package(
        &(task("node-hello", "index.handler") + &task("node-fail", "index.fail")),
        &["node"],
    );
    hub.deploy(&pkg.manifest());
    let r = hub.call("node-hello", r#"{"a": 1}"#);
    assert_eq!(r.status(), 200, "{}", hub.log_text());
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["node"]["a"], 1);
    assert_eq!(v["fn"], "node-hello");
    let (status, code, msg) = error_of(hub.call("node-fail", "{}"));
    assert_eq!((status, code.as_str()), (502, "task_error"));
    assert!(msg.contains("node says no"), "{msg}");
    assert_eq!(hub.call("node-hello", "{}").status(), 200);
}

#[test]
fn malformed_runtime_api_documents_fail_only_their_call() {
    let hub = TestHub::start(&[]);
    let pkg = package(
        "[[task]]\nname = \"garbage\"\nruntime = \"process\"\ndir = \"garbage\"\ncommand = [\"./bootstrap\"]\ntimeout_ms = 10000\n",
        &["garbage"],
    );
    hub.deploy(&pkg.manifest());
    let (status, code, msg) = error_of(hub.call("garbage", "{}"));
    assert_eq!((status, code.as_str()), (502, "task_error"));
    assert!(
        msg.contains("{not json at all") && msg.contains("Weird"),
        "{msg}"
    );
    // A cut-off body is dropped; the worker's proper answer still lands.
    let r = hub.call("garbage", "{}");
    assert_eq!(r.status(), 200, "{}", hub.log_text());
    assert_eq!(r.text().unwrap(), "\"recovered\"");
}

#[test]
fn another_local_process_cannot_take_a_workers_calls() {
    let hub = TestHub::start(&[]);
    let pkg = package(&py_task("mine", "app.handler", "min_warm = 1"), &["py"]);
    hub.deploy(&pkg.manifest());
    let worker = worker_pids(&hub)
        .into_iter()
        .find_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            String::from_utf8_lossy(&env).split('\0').find_map(|kv| {
                kv.strip_prefix("AWS_LAMBDA_RUNTIME_API=")
                    .map(str::to_owned)
            })
        })
        .expect("the worker's Runtime API address");
    // This test process is not the worker: its /next is never answered.
    let stolen = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
        .get(format!(
            "http://{worker}/2018-06-01/runtime/invocation/next"
        ))
        .send();
    assert!(
        stolen.is_err(),
        "a stranger must not get a call: {stolen:?}"
    );
    let r = hub.call("mine", r#"{"still": "mine"}"#);
    assert_eq!(r.status(), 200);
    assert!(hub.log_text().contains("refused a Runtime API connection"));
}

#[test]
fn a_routed_message_reaches_a_python_handler_with_its_topic() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let manifest = py_task("on-event", "app.topic", "")
        + "[[route]]\nfrom = \"device:events/#\"\nto = \"task:on-event\"\n[[route]]\nfrom = \"task:on-event\"\nto = \"device:seen\"\n";
    let pkg = package(&manifest, &["py"]);
    hub.deploy(&pkg.manifest());
    let (h, p) = hub.mqtt.rsplit_once(':').unwrap();
    let seen = hub.subscribe_plain(&["-t", "seen"], 1, 15);
    let ok = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            h,
            "-p",
            p,
            "-t",
            "events/door",
            "-m",
            r#"{"open": true}"#,
            "-q",
            "1",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let out = seen.output();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(v["topic"], "events/door", "{out}");
    assert_eq!(v["event"]["open"], true);
}
