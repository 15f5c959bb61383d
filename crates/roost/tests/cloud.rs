//! `roost cloud` as a user meets it: a real control-plane process with its
//! own data dir, driven through its HTTP API and the `roost cloud` CLI,
//! killed with SIGKILL and started again.

mod common;
use common::fleet::*;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(out: &Output) -> String {
    assert!(!out.status.success(), "should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn an_operator_adds_lists_and_removes_hubs_and_the_fleet_survives_kill_9() {
    let mut cloud = TestCloud::start();
    assert_eq!(mode(&cloud.data_dir().join("admin-token")), 0o600);
    let health = http().get(format!("{}/healthz", cloud.url)).send().unwrap();
    assert_eq!(health.status(), 200);
    let doc: serde_json::Value = http()
        .get(format!("{}/openapi.json", cloud.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(doc["paths"]["/v1/hubs"]["post"].is_object());

    let token = ok(&cloud.cli(&["hubs", "add", "shop-1", "--group", "eu"]));
    assert_eq!(token.trim().len(), 64, "the token alone on stdout: {token}");
    ok(&cloud.cli(&["hubs", "add", "shop-2", "--group", "eu", "--group", "north"]));
    let e = err(&cloud.cli(&["hubs", "add", "shop-1"]));
    assert!(e.contains("already in the fleet"), "{e}");
    let e = err(&cloud.cli(&["hubs", "add", "bad/name"]));
    assert!(e.contains("not a valid name"), "{e}");
    let table = ok(&cloud.cli(&["hubs"]));
    assert!(
        table.contains("shop-1") && table.contains("eu,north"),
        "{table}"
    );

    // Acknowledged is kept: a SIGKILL and a restart on the same data dir.
    cloud.kill9();
    cloud.launch();
    let v: serde_json::Value = serde_json::from_str(&ok(&cloud.cli(&["hubs", "--json"]))).unwrap();
    let names: Vec<&str> = v["hubs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["shop-1", "shop-2"]);
    assert_eq!(v["hubs"][1]["groups"], serde_json::json!(["eu", "north"]));

    ok(&cloud.cli(&["hubs", "remove", "shop-1"]));
    let e = err(&cloud.cli(&["hubs", "remove", "shop-1"]));
    assert!(e.contains("no hub named"), "{e}");
    assert!(!ok(&cloud.cli(&["hubs"])).contains("shop-1"));
}

#[test]
fn the_api_refuses_without_the_admin_token_and_an_unreachable_database_says_so() {
    let cloud = TestCloud::start();
    let r = http().get(format!("{}/v1/hubs", cloud.url)).send().unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    let r = http()
        .get(format!("{}/v1/hubs", cloud.url))
        .bearer_auth("not-the-token")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http()
        .get(format!("{}/v1/hubs", cloud.url))
        .bearer_auth(cloud.token())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // A client without a token is told where one is.
    let out = Command::new(roost_bin())
        .args([
            "cloud",
            "hubs",
            "--cloud",
            &cloud.url,
            "--data-dir",
            "/nonexistent",
        ])
        .env_remove("ROOST_CLOUD_TOKEN")
        .output()
        .unwrap();
    let e = err(&out);
    assert!(e.contains("ROOST_CLOUD_TOKEN"), "{e}");
    // A database that cannot be reached is a clear refusal, not a silent
    // SQLite.
    let out = Command::new(roost_bin())
        .args([
            "cloud",
            "--database",
            "postgres://roost@127.0.0.1:1/fleet",
            "--data-dir",
        ])
        .arg(cloud.dir.path().join("other"))
        .output()
        .unwrap();
    let e = err(&out);
    assert!(e.contains("--database"), "{e}");
}

/// `roost hub` on a fresh data dir, expected to refuse to start.
fn hub_refused(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(roost_bin())
        .args([
            "hub",
            "--http",
            "127.0.0.1:0",
            "--mqtt",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    err(&out)
}

#[test]
fn a_hub_enrols_once_with_its_token_and_keeps_its_key_private() {
    let cloud = TestCloud::start();
    let token = ok(&cloud.cli(&["hubs", "add", "shop-1", "--group", "eu"]));
    let token = token.trim();
    let mut hub = TestHub::start(&["--cloud", &cloud.url, "--enrol", token]);
    let cred = hub.data_dir.join("cloud-credential.json");
    assert_eq!(mode(&cred), 0o600);
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&cred).unwrap()).unwrap();
    assert_eq!(
        (c["hub"].as_str(), &c["groups"]),
        (Some("shop-1"), &serde_json::json!(["eu"]))
    );
    assert_eq!(c["public_key"].as_str().unwrap().len(), 64);
    let v: serde_json::Value = serde_json::from_str(&ok(&cloud.cli(&["hubs", "--json"]))).unwrap();
    assert_eq!(v["hubs"][0]["enrolled"], true);
    // It starts again as the same hub, its key unchanged.
    hub.kill9();
    hub.launch();
    let again: serde_json::Value = serde_json::from_slice(&std::fs::read(&cred).unwrap()).unwrap();
    assert_eq!(again["public_key"], c["public_key"]);
    // The token worked once: another hub cannot use it.
    let other = tempfile::tempdir().unwrap();
    let e = hub_refused(other.path(), &["--cloud", &cloud.url, "--enrol", token]);
    assert!(
        e.contains("refused the enrolment") && e.contains("already used"),
        "{e}"
    );
    assert!(!other.path().join("cloud-credential.json").exists());
    // A hub without a token is told how to get one.
    let e = hub_refused(other.path(), &["--cloud", &cloud.url]);
    assert!(
        e.contains("--enrol") && e.contains("roost cloud hubs add"),
        "{e}"
    );
}
