//! Deployments through `roost deploy`: validation of the whole manifest,
//! atomic apply, persistence, rollback, and the compiled-module cache.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn a_malformed_manifest_lists_every_problem_and_the_old_deployment_keeps_running() {
    let hub = TestHub::start(&[]);
    let good = Package::new(&task("echo", "echo.wat", ""), &["echo.wat"]);
    hub.deploy(&good.manifest());
    let bad = Package::new(
        r#"
[[task]]
name = "Echo!"
runtime = "wasm"
code = "echo.wat"
memory_mb = -1
timeout_ms = 0

[[task]]
name = "second"
runtime = "cobol"
concurrency = "lots"
"#,
        &["echo.wat"],
    );
    let out = hub.cli(&["deploy", bad.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "task[0].name",
        "task[0].memory_mb",
        "task[0].timeout_ms",
        "task[1].runtime",
        "task[1].concurrency",
    ] {
        assert!(
            err.lines().any(|l| l.trim_start().starts_with(field)),
            "{field} missing from:\n{err}"
        );
    }
    assert!(err.contains("nothing was applied"), "{err}");
    // The raw API answers 400 invalid_manifest with the problems.
    let pkg_bytes = {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let text = b"[[task]]\nname = 1\n";
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "manifest.toml", &text[..]).unwrap();
        b.into_inner().unwrap().finish().unwrap()
    };
    let r = http()
        .post(format!("{}/v1/deployments", hub.url))
        .body(pkg_bytes)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "invalid_manifest");
    assert!(v["error"]["problems"].as_array().unwrap().len() >= 2, "{v}");
    // Still the old deployment.
    assert_eq!(hub.call("echo", "still here").text().unwrap(), "still here");
}

#[test]
fn a_code_path_that_escapes_the_manifest_folder_is_refused() {
    let hub = TestHub::start(&[]);
    let outer = tempfile::tempdir().unwrap();
    std::fs::copy(wasm_dir().join("echo.wat"), outer.path().join("echo.wat")).unwrap();
    let inner = outer.path().join("pkg");
    std::fs::create_dir(&inner).unwrap();
    std::fs::write(inner.join("manifest.toml"), task("echo", "../echo.wat", "")).unwrap();
    let out = hub.cli(&["deploy", inner.join("manifest.toml").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("task[0].code") && err.contains("leaves the manifest's folder"),
        "{err}"
    );

    // Through a symlink too.
    std::os::unix::fs::symlink(outer.path().join("echo.wat"), inner.join("link.wat")).unwrap();
    std::fs::write(inner.join("manifest.toml"), task("echo", "link.wat", "")).unwrap();
    let out = hub.cli(&["deploy", inner.join("manifest.toml").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(hub.get_json("/v1/tasks")["tasks"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn a_module_that_is_not_wasm_is_refused_at_deploy() {
    let hub = TestHub::start(&[]);
    let pkg = Package::new(
        &(task("bad", "bad.wasm", "") + &task("echo", "echo.wat", "")),
        &["echo.wat"],
    );
    std::fs::write(pkg.path().join("bad.wasm"), "this is not webassembly").unwrap();
    let out = hub.cli(&["deploy", pkg.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("task[0].code") && err.contains("not a valid WebAssembly module"),
        "{err}"
    );
    // Atomic: the valid task of the same manifest was not applied either.
    assert!(hub.get_json("/v1/tasks")["tasks"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn a_resource_that_does_not_exist_or_escapes_is_refused_at_deploy() {
    let hub = TestHub::start(&[]);
    let pkg = Package::new(
        &task(
            "read",
            "readfile.wat",
            "[[task.resource]]\nsource = \"/no/such/folder\"\npath = \"/data\"\n[[task.resource]]\nsource = \"/tmp\"\npath = \"/data/../../etc\"\n",
        ),
        &["readfile.wat"],
    );
    let out = hub.cli(&["deploy", pkg.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("resource[0].source") && err.contains("does not exist"),
        "{err}"
    );
    assert!(err.contains("resource[1].path"), "{err}");
}

#[test]
fn a_task_larger_than_the_memory_budget_is_refused_at_deploy() {
    let hub = TestHub::start(&["--memory-budget-mb", "64"]);
    let pkg = Package::new(&task("echo", "echo.wat", "memory_mb = 128"), &["echo.wat"]);
    let out = hub.cli(&["deploy", pkg.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--memory-budget-mb"));
}

#[test]
fn a_deployment_survives_a_restart_without_recompiling() {
    let mut hub = TestHub::start(&[]);
    let pkg = Package::new(&task("echo", "echo.wat", ""), &["echo.wat"]);
    hub.deploy(&pkg.manifest());
    assert!(hub.log_text().contains("compiled wasm module"));
    let artifacts: Vec<_> = std::fs::read_dir(hub.data_dir.join("cache"))
        .unwrap()
        .collect();
    assert_eq!(artifacts.len(), 1, "one compiled artifact per code hash");
    hub.kill9();
    let before = hub.log_text().matches("compiled wasm module").count();
    hub.launch();
    assert_eq!(
        hub.call("echo", "after restart").text().unwrap(),
        "after restart"
    );
    let log = hub.log_text();
    assert_eq!(
        log.matches("compiled wasm module").count(),
        before,
        "restart must load from the cache:\n{log}"
    );
    assert!(log.contains("loaded compiled module from cache"), "{log}");
}

#[test]
fn rollback_returns_to_the_previous_deployment() {
    let hub = TestHub::start(&[]);
    let v1 = Package::new(&task("echo", "echo.wat", ""), &["echo.wat"]);
    hub.deploy(&v1.manifest());
    let v2 = Package::new(&task("trap", "trap.wat", ""), &["trap.wat"]);
    hub.deploy(&v2.manifest());
    assert_eq!(
        hub.call("echo", "x").status(),
        404,
        "a deployment replaces the previous one whole"
    );
    let out = hub.cli(&["deploy", "--rollback"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rolled back"));
    assert_eq!(hub.call("echo", "back").text().unwrap(), "back");
    assert_eq!(hub.call("trap", "").status(), 404);
    // Nothing before the first deployment.
    let out = hub.cli(&["deploy", "--rollback"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing_to_roll_back"));
}

#[test]
fn hostile_packages_are_refused() {
    let hub = TestHub::start(&[]);
    for body in [
        &b"garbage, not gzip"[..],
        &[0x1f, 0x8b, 0x08, 0, 0, 0][..],
        &[][..],
    ] {
        let r = http()
            .post(format!("{}/v1/deployments", hub.url))
            .body(body.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: serde_json::Value = r.json().unwrap();
        assert_eq!(v["error"]["code"], "bad_package", "{v}");
    }
    // A package holding a symlink out of it.
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_cksum();
    b.append_link(&mut h, "manifest.toml", "/etc/passwd")
        .unwrap();
    let pkg = b.into_inner().unwrap().finish().unwrap();
    let r = http()
        .post(format!("{}/v1/deployments", hub.url))
        .body(pkg)
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(hub.get_json("/v1/tasks")["tasks"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn the_example_hub_answers_out_of_the_box() {
    let hub = TestHub::start(&["--example"]);
    assert_eq!(hub.call("greet", "world").text().unwrap(), "hello, world");
    assert_eq!(
        http()
            .get(format!("{}/healthz", hub.url))
            .send()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn binding_beyond_loopback_requires_a_token_and_the_token_is_enforced() {
    let out = std::process::Command::new(roost_bin())
        .args(["hub", "--http", "0.0.0.0:0", "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));

    let hub = TestHub::start(&["--token", "s3cret", "--example"]);
    let r = http()
        .post(format!("{}/v1/tasks/echo/calls", hub.url))
        .body("x")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http()
        .post(format!("{}/v1/tasks/echo/calls", hub.url))
        .bearer_auth("wrong")
        .body("x")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http()
        .post(format!("{}/v1/tasks/echo/calls", hub.url))
        .bearer_auth("s3cret")
        .body("x")
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), "x");
    let out = std::process::Command::new(roost_bin())
        .args(["call", "echo", "--hub", &hub.url, "--token", "s3cret"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn the_api_serves_tls_when_given_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    let Ok(made) = made else {
        panic!("this test needs the openssl command (apt install openssl)");
    };
    assert!(made.status.success());
    let hub = TestHub::start(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--example",
    ]);
    assert!(hub.url.starts_with("https://"));
    let client = reqwest::blocking::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let r = client
        .post(format!("{}/v1/tasks/echo/calls", hub.url))
        .body("over tls")
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), "over tls");
}
