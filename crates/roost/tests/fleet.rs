//! Fleet deployments as a user meets them: a real `roost cloud` and real
//! `roost hub` processes, each with its own data dir, deploying through the
//! hubs' `roost-deployment` shadows, with real faults (a failing health
//! check, a command missing on the hub, `kill -9` of a hub and of the cloud,
//! a removed hub, forged credentials).

mod common;
use common::fleet::*;
use common::*;
use std::process::Command;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);

/// A deployment of echo (and, named `extra`, more tasks).
fn echo_package(extra: &str, modules: &[&str]) -> Package {
    let mut all = vec!["echo.wat"];
    all.extend(modules);
    Package::new(&(task("echo", "echo.wat", "") + extra), &all)
}

fn echo_answers(hub: &TestHub) -> bool {
    let r = hub.call("echo", "ping");
    r.status() == 200 && r.text().unwrap() == "ping"
}

#[test]
fn a_group_deployment_reaches_every_hub_through_its_shadow_and_a_later_member_gets_it() {
    let cloud = TestCloud::start();
    let a = cloud.hub("shop-a", &["shops"], &[]);
    let b = cloud.hub("shop-b", &["shops", "north"], &[]);
    let _other = cloud.hub("office", &["offices"], &[]);
    for h in ["shop-a", "shop-b", "office"] {
        cloud.wait_connected(h);
    }
    let pkg = echo_package(&task("greet", "greet.wat", ""), &["greet.wat"]);
    let id = cloud.deploy(&pkg.manifest(), &["--group", "shops"]);
    let d = cloud.wait_deployment(id, LONG);
    assert_eq!(d["state"], "done", "{d}");
    assert_eq!(d["total"], 2, "only the group's hubs: {d}");
    for hub in ["shop-a", "shop-b"] {
        let (s, reason) = cloud.hub_status(id, hub);
        assert_eq!(s, "succeeded", "{hub}: {reason}\n{}", cloud.log_text());
    }
    for hub in [&a, &b] {
        assert_eq!(task_names(hub), ["echo", "greet"]);
        assert!(echo_answers(hub));
    }
    // The desired state is in each hub's shadow: id, package hash and the
    // fleet's signature of it; the hub reported what it runs.
    let shadow = cloud.get("/v1/hubs/shop-a/shadows/roost-deployment");
    let desired = &shadow["state"]["desired"];
    assert_eq!(desired["deployment"], id);
    assert_eq!(desired["package"], d["package"]);
    assert_eq!(desired["signature"].as_str().unwrap().len(), 128);
    assert_eq!(shadow["state"]["reported"]["status"], "succeeded");
    assert_eq!(shadow["state"]["reported"]["applied"], id);
    // The office was not a target: it has no deployment shadow.
    let r = http()
        .get(format!(
            "{}/v1/hubs/office/shadows/roost-deployment",
            cloud.url
        ))
        .bearer_auth(cloud.token())
        .send()
        .unwrap();
    assert_eq!(error_of(r).1, "unknown_shadow");

    // The table an operator reads.
    let table = cloud.ok(&["hubs"]);
    let row = table.lines().find(|l| l.starts_with("shop-a")).unwrap();
    assert!(
        row.contains("yes") && row.contains("succeeded") && row.contains(&id.to_string()),
        "{table}"
    );
    let listed = cloud.ok(&["deployments"]);
    assert!(listed.contains("group shops"), "{listed}");
    let one = cloud.ok(&["deployments", &id.to_string()]);
    assert!(one.contains("shop-b") && one.contains("succeeded"), "{one}");

    // A hub that joins the group later gets the group's deployment.
    let c = cloud.hub("shop-c", &["shops"], &[]);
    wait_until("shop-c to get the group's deployment", LONG, || {
        cloud.hub_row("shop-c")["status"] == "succeeded"
    });
    assert_eq!(cloud.hub_row("shop-c")["applied"], id);
    assert!(echo_answers(&c));
    // `--follow` on a finished deployment prints it and exits 0.
    let follow = cloud.cli(&["deployments", &id.to_string(), "--follow"]);
    assert!(follow.status.success());
}

#[test]
fn a_failed_health_check_rolls_the_hub_back_and_a_command_missing_on_the_hub_fails_it() {
    let cloud = TestCloud::start();
    let hub = cloud.hub("shop", &[], &["--cloud-health-deadline-s", "20"]);
    let good = echo_package("", &[]);
    let v1 = cloud.deploy(&good.manifest(), &["--hub", "shop"]);
    assert_eq!(cloud.wait_hub_done(v1, "shop", LONG).0, "succeeded");

    // v2's health check traps: the hub goes back to v1 by itself.
    let sick = echo_package(
        &task(
            "sick",
            "trap.wat",
            "health_check = { input = \"are you well?\", timeout_ms = 2000 }",
        ),
        &["trap.wat"],
    );
    let v2 = cloud.deploy(&sick.manifest(), &["--hub", "shop"]);
    let (s, reason) = cloud.wait_hub_done(v2, "shop", LONG);
    assert_eq!(s, "rolled_back", "{reason}");
    assert!(
        reason.contains("sick"),
        "the reason names the task: {reason}"
    );
    assert_eq!(task_names(&hub), ["echo"]);
    assert!(echo_answers(&hub));
    let row = cloud.hub_row("shop");
    assert_eq!(row["desired"], v2);
    assert_eq!(row["applied"], v1, "{row}");

    // v3 validates at the cloud, but its command is not on the hub: failed,
    // the running deployment untouched.
    let ghost = echo_package(
        "[[task]]\nname = \"ghost\"\nruntime = \"process\"\ndir = \"py\"\ncommand = [\"no-such-program-anywhere\"]\n",
        &[],
    );
    ghost.copy_fixture("py", "py");
    let v3 = cloud.deploy(&ghost.manifest(), &["--hub", "shop"]);
    let (s, reason) = cloud.wait_hub_done(v3, "shop", LONG);
    assert_eq!(s, "failed", "{reason}");
    assert!(reason.contains("no-such-program-anywhere"), "{reason}");
    assert_eq!(task_names(&hub), ["echo"]);
    assert!(echo_answers(&hub));

    // A manifest the cloud itself can judge is refused whole, every problem
    // listed, and nothing is deployed.
    let bad = Package::new(
        "[[task]]\nname = \"x\"\nruntime = \"wasm\"\ncode = \"missing.wasm\"\nmemory_mb = 0\n[[task]]\nname = \"x\"\nruntime = \"cobol\"\n",
        &[],
    );
    let out = cloud.cli(&["deploy", bad.manifest().to_str().unwrap(), "--hub", "shop"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("problem"), "{e}");
    assert!(e.contains("missing.wasm") && e.contains("cobol"), "{e}");
    let listed = cloud.get("/v1/deployments");
    assert_eq!(listed["deployments"].as_array().unwrap().len(), 3);
    // A deployment naming a package the cloud does not hold.
    let r = http()
        .post(format!("{}/v1/deployments", cloud.url))
        .bearer_auth(cloud.token())
        .json(&serde_json::json!({"hub": "shop", "package": "ab".repeat(32)}))
        .send()
        .unwrap();
    let (status, code, _) = error_of(r);
    assert_eq!((status, code.as_str()), (404, "unknown_package"));
    assert_eq!(cloud.hub_row("shop")["applied"], v1);
}

#[test]
fn a_rollout_goes_batch_by_batch_and_stops_past_its_failure_bound() {
    let cloud = TestCloud::start();
    let hubs: Vec<TestHub> = (1..=3)
        .map(|i| cloud.hub(&format!("s{i}"), &["shops"], &[]))
        .collect();
    for i in 1..=3 {
        cloud.wait_connected(&format!("s{i}"));
    }
    // One at a time, each health check taking a while: never two hubs
    // past pending at once.
    let slow = echo_package(
        &task(
            "slow",
            "sleep.wat",
            "timeout_ms = 10000\nhealth_check = { input = \"700\", timeout_ms = 5000 }",
        ),
        &["sleep.wat"],
    );
    let id = cloud.deploy(
        &slow.manifest(),
        &["--group", "shops", "--rollout-batch", "1"],
    );
    let mut most_in_flight = 0;
    loop {
        let d = cloud.deployment(id);
        let in_flight = d["hubs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| {
                matches!(
                    h["status"].as_str().unwrap(),
                    "downloading" | "applying" | "checking"
                )
            })
            .count();
        most_in_flight = most_in_flight.max(in_flight);
        if d["state"] != "rolling_out" {
            assert_eq!(d["counts"]["succeeded"], 3, "{d}");
            break;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(
        most_in_flight, 1,
        "a batch of 1 deploys to one hub at a time"
    );

    // A deployment failing everywhere, with no failure allowed: the first
    // hub fails, the rollout stops, the others are never sent it and keep
    // what they run.
    let ghost = echo_package(
        "[[task]]\nname = \"ghost\"\nruntime = \"process\"\ndir = \"py\"\ncommand = [\"no-such-program-anywhere\"]\n",
        &[],
    );
    ghost.copy_fixture("py", "py");
    let out = cloud.cli(&[
        "deploy",
        ghost.manifest().to_str().unwrap(),
        "--group",
        "shops",
        "--rollout-batch",
        "1",
        "--max-failures",
        "0%",
        "--wait",
    ]);
    assert!(!out.status.success(), "--wait fails when a hub failed");
    // The id comes first on stdout, then the deployment as it ended.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dep: i64 = stdout.lines().next().unwrap().parse().unwrap();
    assert!(stdout.contains("failed"), "{stdout}");
    let d = cloud.deployment(dep);
    assert_eq!(d["state"], "stopped", "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("max-failures"),
        "{d}"
    );
    assert_eq!(d["counts"]["failed"], 1, "{d}");
    for h in &hubs {
        assert_eq!(task_names(h), ["echo", "slow"]);
    }
    // A bad bound is refused by the CLI.
    let out = cloud.cli(&[
        "deploy",
        ghost.manifest().to_str().unwrap(),
        "--group",
        "shops",
        "--max-failures",
        "150%",
    ]);
    assert!(!out.status.success());
}

#[test]
fn a_hub_offline_for_a_while_applies_only_the_latest_and_a_newer_deployment_supersedes() {
    let cloud = TestCloud::start();
    let mut hub = cloud.hub("shop", &[], &[]);
    cloud.wait_connected("shop");
    hub.kill9();
    let p1 = echo_package("", &[]);
    let p2 = echo_package(&task("greet", "greet.wat", ""), &["greet.wat"]);
    let v1 = cloud.deploy(&p1.manifest(), &["--hub", "shop"]);
    let v2 = cloud.deploy(&p2.manifest(), &["--hub", "shop"]);
    assert_eq!(cloud.hub_status(v1, "shop").0, "superseded");
    hub.launch();
    assert_eq!(cloud.wait_hub_done(v2, "shop", LONG).0, "succeeded");
    assert_eq!(task_names(&hub), ["echo", "greet"]);
    // It applied v2 alone: v2 is its first local deployment.
    assert_eq!(hub.get_json("/v1/deployments/active")["deployment"], 1);
    assert_eq!(cloud.hub_status(v1, "shop").0, "superseded");
}

#[test]
fn a_local_deploy_on_a_managed_hub_needs_force_and_is_reported_as_drift() {
    let cloud = TestCloud::start();
    let hub = cloud.hub("shop", &[], &[]);
    let p1 = echo_package("", &[]);
    let v1 = cloud.deploy(&p1.manifest(), &["--hub", "shop"]);
    assert_eq!(cloud.wait_hub_done(v1, "shop", LONG).0, "succeeded");
    let p2 = echo_package(&task("greet", "greet.wat", ""), &["greet.wat"]);
    let out = hub.cli(&["deploy", p2.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("roost cloud deploy") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(task_names(&hub), ["echo"]);
    let out = hub.cli(&["deploy", "--force", p2.manifest().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(task_names(&hub), ["echo", "greet"]);
    wait_until("the drift to reach the cloud", LONG, || {
        !cloud.hub_row("shop")["drift"].is_null()
    });
    let table = cloud.ok(&["hubs"]);
    assert!(table.contains("drift"), "{table}");
    // The next fleet deployment puts the hub back under the fleet.
    let v2 = cloud.deploy(&p1.manifest(), &["--hub", "shop"]);
    assert_eq!(cloud.wait_hub_done(v2, "shop", LONG).0, "succeeded");
    assert_eq!(task_names(&hub), ["echo"]);
}

/// A hub's credential, as it keeps it: (name, signing key).
fn credential(hub: &TestHub) -> (String, ed25519_dalek::SigningKey) {
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(hub.data_dir.join("cloud-credential.json")).unwrap())
            .unwrap();
    (
        c["hub"].as_str().unwrap().to_owned(),
        roost_fleet::signing_key(c["secret_key"].as_str().unwrap()).unwrap(),
    )
}

fn signed_get(
    cloud: &TestCloud,
    name: &str,
    key: &ed25519_dalek::SigningKey,
    path: &str,
) -> reqwest::blocking::Response {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    http()
        .get(format!("{}{path}", cloud.url))
        .header(
            "authorization",
            roost_fleet::authorization(key, name, "GET", path, now),
        )
        .send()
        .unwrap()
}

#[test]
fn a_hub_gets_only_its_own_packages_and_secrets_and_a_removed_or_forged_one_nothing() {
    let cloud = TestCloud::start();
    let a = cloud.hub("shop-a", &[], &[]);
    let b = cloud.hub("shop-b", &[], &[]);
    let with_secret = Package::new(
        &(task("echo", "echo.wat", "")
            + "[[secret]]\nname = \"db-password\"\nvalue_env = \"DB_PASSWORD\"\n"),
        &["echo.wat"],
    );
    // The value comes from the deploying shell.
    let out = cloud.cli(&[
        "deploy",
        with_secret.manifest().to_str().unwrap(),
        "--hub",
        "shop-b",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DB_PASSWORD"));
    let out = Command::new(roost_bin())
        .args(["cloud", "deploy", with_secret.manifest().to_str().unwrap()])
        .args(["--hub", "shop-b", "--cloud", &cloud.url, "--data-dir"])
        .arg(cloud.data_dir())
        .env("DB_PASSWORD", "hunter2-fleet")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vb: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(cloud.wait_hub_done(vb, "shop-b", LONG).0, "succeeded");
    // Never in plain text at the cloud: not in the database, not in a package.
    for f in std::fs::read_dir(cloud.data_dir()).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap_or_default();
        assert!(!bytes.windows(7).any(|w| w == b"hunter2"));
    }
    let sha = cloud.deployment(vb)["package"].as_str().unwrap().to_owned();

    let (name_a, key_a) = credential(&a);
    let (name_b, key_b) = credential(&b);
    // B fetches its own package and secrets.
    let r = signed_get(&cloud, &name_b, &key_b, &format!("/v1/hub/packages/{sha}"));
    assert_eq!(r.status(), 200);
    let r = signed_get(
        &cloud,
        &name_b,
        &key_b,
        &format!("/v1/hub/deployments/{vb}/secrets"),
    );
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().unwrap()["values"]["db-password"],
        "hunter2-fleet"
    );
    // A may not: not B's package, not B's secrets.
    let r = signed_get(&cloud, &name_a, &key_a, &format!("/v1/hub/packages/{sha}"));
    assert_eq!(error_of(r).0, 404);
    let r = signed_get(
        &cloud,
        &name_a,
        &key_a,
        &format!("/v1/hub/deployments/{vb}/secrets"),
    );
    assert_eq!(error_of(r).0, 404);
    // A cannot act as B: its key does not sign for B.
    let r = signed_get(&cloud, &name_b, &key_a, &format!("/v1/hub/packages/{sha}"));
    let (status, _, msg) = error_of(r);
    assert_eq!(status, 401, "{msg}");
    // Nor can anyone with no signature, or an old one.
    let r = http()
        .get(format!("{}/v1/hub/packages/{sha}", cloud.url))
        .send()
        .unwrap();
    assert_eq!(error_of(r).0, 401);
    let old = roost_fleet::authorization(
        &key_b,
        &name_b,
        "GET",
        &format!("/v1/hub/packages/{sha}"),
        1,
    );
    let r = http()
        .get(format!("{}/v1/hub/packages/{sha}", cloud.url))
        .header("authorization", old)
        .send()
        .unwrap();
    assert_eq!(error_of(r).0, 401);
    // The admin API does not take a hub's signature.
    let r = http()
        .get(format!("{}/v1/hubs", cloud.url))
        .header(
            "authorization",
            roost_fleet::authorization(&key_b, &name_b, "GET", "/v1/hubs", 0),
        )
        .send()
        .unwrap();
    assert_eq!(error_of(r).0, 401);

    // Forged, reused and expired tokens.
    let fresh = tempfile::tempdir().unwrap();
    let enrol = |token: &str| {
        let out = Command::new(roost_bin())
            .args(["hub", "--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"])
            .args(["--cloud", &cloud.url, "--enrol", token, "--data-dir"])
            .arg(fresh.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(!fresh.path().join("cloud-credential.json").exists());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = enrol(&"0".repeat(64));
    assert!(e.contains("refused the enrolment"), "{e}");
    let short = String::from_utf8_lossy(
        &cloud
            .cli(&["hubs", "add", "shop-x", "--token-ttl-s", "1"])
            .stdout,
    )
    .trim()
    .to_owned();
    std::thread::sleep(Duration::from_millis(1500));
    let e = enrol(&short);
    assert!(
        e.contains("refused the enrolment") && e.contains("expired"),
        "{e}"
    );

    // A removed hub is refused from then on: disconnected, its signature no
    // longer good for anything.
    cloud.ok(&["hubs", "remove", "shop-b"]);
    let r = signed_get(&cloud, &name_b, &key_b, &format!("/v1/hub/packages/{sha}"));
    assert_eq!(error_of(r).0, 401);
    wait_until("shop-b to be told it was removed", LONG, || {
        b.log_text().contains("removed")
    });
    // A is unaffected.
    cloud.wait_connected("shop-a");
}

#[test]
fn kill_9_of_a_hub_mid_check_and_of_the_cloud_mid_rollout_strand_nothing() {
    let mut cloud = TestCloud::start();
    let mut a = cloud.hub("s1", &["shops"], &[]);
    let _b = cloud.hub("s2", &["shops"], &[]);
    cloud.wait_connected("s1");
    cloud.wait_connected("s2");
    let p1 = echo_package("", &[]);
    let v1 = cloud.deploy(&p1.manifest(), &["--group", "shops"]);
    assert_eq!(cloud.wait_deployment(v1, LONG)["counts"]["succeeded"], 2);

    // A health check that fails after 2.5 s: kill -9 the hub while it
    // checks. At start it checks again (without applying twice), fails,
    // and rolls back to v1 by itself.
    let sick = echo_package(
        &task(
            "sick",
            "sleep.wat",
            "timeout_ms = 20000\nhealth_check = { input = \"3000\", timeout_ms = 2500 }",
        ),
        &["sleep.wat"],
    );
    let v2 = cloud.deploy(&sick.manifest(), &["--hub", "s1"]);
    wait_until("s1 checking v2", LONG, || {
        cloud.hub_status(v2, "s1").0 == "checking"
    });
    a.kill9();
    a.launch();
    let (s, reason) = cloud.wait_hub_done(v2, "s1", LONG);
    assert_eq!(s, "rolled_back", "{reason}\nhub log:\n{}", a.log_text());
    assert_eq!(task_names(&a), ["echo"]);
    assert!(echo_answers(&a));
    assert_eq!(cloud.hub_row("s1")["applied"], v1);
    assert!(
        cloud.hub_row("s1")["drift"].is_null(),
        "its own rollback is not drift"
    );

    // A health check of 3 s that passes.
    let slow = echo_package(
        &task(
            "slow",
            "sleep.wat",
            "timeout_ms = 20000\nhealth_check = { input = \"3000\", timeout_ms = 15000 }",
        ),
        &["sleep.wat"],
    );

    // One hub at a time, each taking 3 s: kill -9 the cloud mid-rollout.
    let v3 = cloud.deploy(
        &slow.manifest(),
        &["--group", "shops", "--rollout-batch", "1"],
    );
    wait_until("the rollout to start", LONG, || {
        let d = cloud.deployment(v3);
        d["hubs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["status"] == "checking")
    });
    cloud.kill9();
    std::thread::sleep(Duration::from_secs(4));
    cloud.launch();
    // It resumes: every hub ends succeeded, none left pending.
    let d = cloud.wait_deployment(v3, Duration::from_secs(180));
    assert_eq!(d["counts"]["succeeded"], 2, "{d}\n{}", cloud.log_text());
}

/// Runs SQL on the cloud's SQLite database beside the running cloud (as
/// a corrupted disk or a hostile operator of the database would).
fn tamper(cloud: &TestCloud, sql: &str) {
    let db = cloud.data_dir().join("cloud.db");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1],timeout=30)\nc.execute(sys.argv[2])\nc.commit()",
        ])
        .arg(&db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Uploads a package; its SHA-256.
fn upload(cloud: &TestCloud, pkg: &Package) -> String {
    let bytes = std::fs::read(pack(pkg)).unwrap();
    let r = http()
        .post(format!("{}/v1/packages", cloud.url))
        .bearer_auth(cloud.token())
        .header("content-type", "application/gzip")
        .body(bytes)
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().unwrap());
    r.json::<serde_json::Value>().unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The package `roost deploy` would send, made with tar (a test client we
/// did not write): manifest.toml and the module beside it.
fn pack(pkg: &Package) -> std::path::PathBuf {
    let out = pkg.path().join("package.tar.gz");
    let ok = Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(pkg.path())
        .args(["manifest.toml", "echo.wat"])
        .status()
        .unwrap();
    assert!(ok.success());
    out
}

fn deploy_sha(cloud: &TestCloud, hub: &str, sha: &str) -> i64 {
    let r = http()
        .post(format!("{}/v1/deployments", cloud.url))
        .bearer_auth(cloud.token())
        .json(&serde_json::json!({"hub": hub, "package": sha}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<serde_json::Value>().unwrap()["deployment"]
        .as_i64()
        .unwrap()
}

#[test]
fn a_package_whose_hash_or_signature_does_not_match_is_refused_by_the_hub_before_unpacking() {
    let cloud = TestCloud::start();
    let hub = cloud.hub("shop", &[], &[]);
    let good = echo_package("", &[]);
    let v1 = cloud.deploy(&good.manifest(), &["--hub", "shop"]);
    assert_eq!(cloud.wait_hub_done(v1, "shop", LONG).0, "succeeded");

    // A signature that is not the fleet's (a valid-looking one of another
    // package): refused, nothing fetched.
    let p2 = echo_package(&task("two", "echo.wat", ""), &[]);
    let sha2 = upload(&cloud, &p2);
    let sha1 = cloud.deployment(v1)["package"].as_str().unwrap().to_owned();
    tamper(
        &cloud,
        &format!(
            "UPDATE packages SET signature = (SELECT signature FROM packages WHERE sha256 = '{sha1}') WHERE sha256 = '{sha2}'"
        ),
    );
    let v2 = deploy_sha(&cloud, "shop", &sha2);
    let (s, reason) = cloud.wait_hub_done(v2, "shop", LONG);
    assert_eq!(s, "failed", "{reason}");
    assert!(reason.contains("signature"), "{reason}");
    assert_eq!(task_names(&hub), ["echo"]);

    // Bytes that are not the package the deployment names (another
    // package's, properly signed for that one): refused on the hash.
    let p3 = echo_package(&task("three", "echo.wat", ""), &[]);
    let sha3 = upload(&cloud, &p3);
    tamper(
        &cloud,
        &format!(
            "UPDATE packages SET bytes = (SELECT bytes FROM packages WHERE sha256 = '{sha2}') WHERE sha256 = '{sha3}'"
        ),
    );
    let v3 = deploy_sha(&cloud, "shop", &sha3);
    let (s, reason) = cloud.wait_hub_done(v3, "shop", LONG);
    assert_eq!(s, "failed", "{reason}");
    assert!(reason.contains("hashes to"), "{reason}");
    assert_eq!(task_names(&hub), ["echo"]);
    assert!(echo_answers(&hub));
    assert_eq!(cloud.hub_row("shop")["applied"], v1);
}
