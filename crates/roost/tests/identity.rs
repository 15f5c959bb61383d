//! Task identities: with the hub running as root, each process task's
//! workers run under a user and group of their own and cannot read the
//! hub's key, store or owner credentials, another task's code, or signal
//! the hub.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Ignored tests run only when asked for (`--ignored`): asked for without
/// root, they fail, and say why, rather than pass without running.
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    assert!(
        root,
        "task identities need the tests to run as root (they switch users)"
    );
}

/// A hub with task identities on, its data dir reachable by other users
/// (the test's temp folder is 0700; a real data dir's parent is /var/lib).
fn hub_with_identities() -> TestHub {
    let hub = TestHub::start(&["--task-identities", "on"]);
    let parent = hub.data_dir.parent().unwrap();
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711)).unwrap();
    hub
}

fn probe_task(hub: &TestHub, name: &str, other: &str, extra: &str) -> String {
    format!(
        "[[task]]\nname = \"{name}\"\nruntime = \"process\"\ndir = \"{name}\"\ncommand = [\"./bootstrap\"]\ntimeout_ms = 10000\n{extra}\nenv = {{ DATA = \"{}\", OTHER = \"{}\", HUB_PID = \"{}\", CALL_TASK = \"echo\" }}\n",
        hub.data_dir.display(),
        hub.data_dir
            .join("deployments/1")
            .join(other)
            .join("bootstrap")
            .display(),
        hub.pid()
    )
}

#[test]
#[ignore = "needs root (task identities switch users); scripts/test.sh runs it as root with --ignored"]
fn each_process_task_runs_as_its_own_user_and_cannot_reach_the_hubs_secrets() {
    require_root();
    let mut hub = hub_with_identities();
    // Each probe calls the wasm task `echo` through /v1.
    let manifest = probe_task(&hub, "probe-a", "probe-b", "")
        + &probe_task(&hub, "probe-b", "probe-a", "")
        + &task("echo", "echo.wat", "");
    let pkg = Package::new(&manifest, &["echo.wat"]);
    pkg.copy_fixture("probe", "probe-a");
    pkg.copy_fixture("probe", "probe-b");
    hub.deploy(&pkg.manifest());
    // What the probes try exists: a "no" below is the identity at work.
    for f in [
        "hub.key",
        "aws-credentials",
        "roost.db",
        "deployments/1/probe-b/bootstrap",
    ] {
        assert!(hub.data_dir.join(f).exists(), "{f}");
    }
    let ask = |hub: &TestHub, task: &str| -> serde_json::Value {
        let r = hub.call(task, "{}");
        assert_eq!(r.status(), 200, "{}", hub.log_text());
        r.json().unwrap()
    };
    let a = ask(&hub, "probe-a");
    let b = ask(&hub, "probe-b");
    for v in [&a, &b] {
        assert_ne!(v["uid"], 0, "not root: {v}");
        assert_eq!(v["uid"], v["gid"], "{v}");
        assert_eq!(v["own"], "yes", "a task reads its own code: {v}");
        assert_eq!(v["key"], "no", "the hub key is the hub's: {v}");
        assert_eq!(v["creds"], "no", "the owner's credentials: {v}");
        assert_eq!(v["store"], "no", "the store: {v}");
        assert_eq!(v["other"], "no", "another task's code: {v}");
        assert_eq!(v["signal_hub"], "no", "the hub's process: {v}");
        assert_eq!(v["home_writable"], "yes", "a home of its own: {v}");
        assert!(v["home"].as_str().unwrap().contains("/homes/"), "{v}");
    }
    assert_ne!(a["uid"], b["uid"], "one user per task");
    // On the hub's /v1 API a task is itself, without a token: it calls
    // tasks as INTERFACES.md has it, and cannot deploy or read every
    // task's logs.
    for v in [&a, &b] {
        assert_eq!(v["call"], 200, "{v}");
        assert_eq!(v["deploy"], 403, "{v}");
        assert_eq!(v["logs"], 403, "{v}");
    }
    assert!(hub.log_text().contains("refused a task's request to /v1"));
    // The owner still can (loopback, no token), and sees each task's user.
    let listed = hub.get_json("/v1/tasks");
    let uid_of = |name: &str| {
        listed["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["uid"].clone())
            .unwrap()
    };
    assert_eq!(uid_of("probe-a"), a["uid"], "{listed}");
    assert_eq!(uid_of("probe-b"), b["uid"], "{listed}");
    let table = String::from_utf8_lossy(&hub.cli(&["tasks"]).stdout).to_string();
    assert!(table.contains(&a["uid"].to_string()), "{table}");
    // The same users after a restart (ids are derived, not allocated).
    hub.kill9();
    hub.launch();
    let again = ask(&hub, "probe-a");
    assert_eq!(again["uid"], a["uid"]);
    // Files the hub made are its own.
    for f in ["hub.key", "aws-credentials", "roost.db"] {
        let mode = std::fs::metadata(hub.data_dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is {mode:o}");
    }
}

#[test]
#[ignore = "needs root (task identities switch users); scripts/test.sh runs it as root with --ignored"]
fn a_runtime_the_tasks_user_cannot_reach_is_refused_at_deploy_with_the_reason() {
    require_root();
    let hub = hub_with_identities();
    // A "runtime" in a folder only root may enter, as ~/.cache is in /root.
    let private = tempfile::tempdir().unwrap();
    let runtime = private.path().join("bin/runtime");
    std::fs::create_dir_all(runtime.parent().unwrap()).unwrap();
    std::fs::copy(lambda_dir().join("probe/bootstrap"), &runtime).unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let manifest = format!(
        "[[task]]\nname = \"stuck\"\nruntime = \"process\"\ndir = \"stuck\"\ncommand = [\"{}\"]\n",
        runtime.display()
    );
    let pkg = Package::new(&manifest, &[]);
    pkg.copy_fixture("probe", "stuck");
    let out = hub.cli(&["deploy", pkg.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot enter") && err.contains(&private.path().display().to_string()),
        "{err}"
    );
    assert!(err.contains("--task-identities off"), "{err}");
    // With `auto` (the default as root) the same task runs, as the hub's
    // user, and the log says why.
    let auto = TestHub::start(&["--task-identities", "auto"]);
    let pkg = Package::new(
        &format!(
            "[[task]]\nname = \"stuck\"\nruntime = \"process\"\ndir = \"stuck\"\ncommand = [\"{}\"]\nenv = {{ DATA = \"/nonexistent\", OTHER = \"/nonexistent\", HUB_PID = \"1\", CALL_TASK = \"stuck\" }}\n",
            runtime.display()
        ),
        &[],
    );
    pkg.copy_fixture("probe", "stuck");
    auto.deploy(&pkg.manifest());
    assert!(auto.log_text().contains("this task runs as the hub's user"));
    assert!(auto.get_json("/v1/tasks")["tasks"][0]["uid"].is_null());
    // Two tasks with their own users cannot share one folder.
    let manifest = "[[task]]\nname = \"one\"\nruntime = \"process\"\ndir = \"probe\"\ncommand = [\"./bootstrap\"]\n[[task]]\nname = \"two\"\nruntime = \"process\"\ndir = \"probe\"\ncommand = [\"./bootstrap\"]\n";
    let pkg = Package::new(manifest, &[]);
    pkg.copy_fixture("probe", "probe");
    let out = hub.cli(&["deploy", pkg.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("overlap"), "{err}");
    // Nor nest one's folder in another's.
    let manifest = "[[task]]\nname = \"outer\"\nruntime = \"process\"\ndir = \"probe\"\ncommand = [\"./bootstrap\"]\n[[task]]\nname = \"inner\"\nruntime = \"process\"\ndir = \"probe/inner\"\ncommand = [\"./bootstrap\"]\n";
    let pkg = Package::new(manifest, &[]);
    pkg.copy_fixture("probe", "probe");
    pkg.copy_fixture("probe", "probe/inner");
    let out = hub.cli(&["deploy", pkg.manifest().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("overlap"), "{err}");
}

/// A venv that other users can use: the test venv lives under /root, so
/// the runtime client is copied next to the system Python in a temp folder.
fn reachable_python(into: &Path) -> String {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&py)
        .args([
            "-c",
            "import awslambdaric, os, sys; print(os.path.dirname(os.path.dirname(awslambdaric.__file__))); print(sys.version_info[1])",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "needs awslambdaric: run scripts/test.sh"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let site = PathBuf::from(lines.next().unwrap());
    let minor = lines.next().unwrap();
    let venv = into.join("venv");
    let base = format!("/usr/bin/python3.{minor}");
    let ok = std::process::Command::new(&base)
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(ok.success());
    let dest = venv.join(format!("lib/python3.{minor}/site-packages"));
    for entry in std::fs::read_dir(&site).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("awslambdaric")
            || name.starts_with("runtime_client")
            || name.starts_with("simplejson")
            || name.starts_with("snapshot_restore_py")
        {
            copy_all(&entry.path(), &dest);
        }
    }
    std::fs::set_permissions(into, std::fs::Permissions::from_mode(0o755)).unwrap();
    venv.join("bin/python").display().to_string()
}

/// A hub with identities on and a Python its tasks' users can run.
fn hub_and_python() -> (TestHub, tempfile::TempDir, String) {
    require_root();
    let hub = hub_with_identities();
    let tmp = tempfile::tempdir().unwrap();
    let python = reachable_python(tmp.path());
    (hub, tmp, python)
}

#[test]
#[ignore = "needs root (task identities switch users); scripts/test.sh runs it as root with --ignored"]
fn a_code_groups_zygote_and_its_workers_run_as_the_groups_user() {
    let (hub, _tmp, python) = hub_and_python();
    let task = |name: &str| {
        format!(
            "[[task]]\nname = \"{name}\"\nruntime = \"process\"\ndir = \"py\"\ncommand = [\"{python}\", \"-m\", \"awslambdaric\"]\nhandler = \"app.whoami\"\ncode_group = \"shared\"\nenv = {{ DATA = \"{}\" }}\n",
            hub.data_dir.display()
        )
    };
    let sneaky = task("sneaky").replace("app.whoami", "app.sneak");
    let pkg = Package::new(&(task("left") + &task("right") + &sneaky), &[]);
    pkg.copy_fixture("py", "py");
    hub.deploy(&pkg.manifest());
    // Twice, so a rollback would have somewhere to go.
    hub.deploy(&pkg.manifest());
    let active = hub.get_json("/v1/deployments/active")["id"].clone();
    assert!(hub
        .log_text()
        .contains("workers fork from the code group's zygote"));
    let ask = |task: &str| -> serde_json::Value {
        let r = hub.call(task, "{}");
        assert_eq!(r.status(), 200, "{}", hub.log_text());
        r.json().unwrap()
    };
    let (l, r) = (ask("left"), ask("right"));
    assert_ne!(l["uid"], 0, "{l}");
    assert_eq!(l["uid"], r["uid"], "one user per code group");
    assert_eq!(l["ppid"], r["ppid"], "both forked from one zygote");
    assert_eq!(l["key"], "no", "{l}");
    // The zygote itself runs as the group's user.
    let zygote = l["ppid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{zygote}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u.parse::<i64>().ok() == l["uid"].as_i64()),
        "{uid_line}"
    );
    // An owner-only request sent by a task that hangs up before the hub asks
    // who it is: refused, not taken for the owner's.
    assert_eq!(hub.call("sneaky", "{}").status(), 200);
    wait_until(
        "the hub to refuse the hung-up request",
        std::time::Duration::from_secs(10),
        || {
            let log = hub.log_text();
            log.contains("refused a task's request") || log.contains("whose user is unknown")
        },
    );
    assert_eq!(
        hub.get_json("/v1/deployments/active")["id"],
        active,
        "no rollback happened"
    );
}

#[test]
#[ignore = "needs root (task identities switch users); scripts/test.sh runs it as root with --ignored"]
fn a_zygote_that_lies_about_its_children_is_stopped_and_the_hub_is_untouched() {
    let (hub, _tmp, python) = hub_and_python();
    // Its handler module, pre-loaded into the zygote, makes the zygote say
    // the hub's own pid is a worker it forked.
    let manifest = format!(
        "[[task]]\nname = \"liar\"\nruntime = \"process\"\ndir = \"evil\"\ncommand = [\"{python}\", \"-m\", \"awslambdaric\"]\nhandler = \"evil.handler\"\ncode_group = \"bad\"\n"
    );
    let pkg = Package::new(&manifest, &[]);
    pkg.copy_fixture("evil", "evil");
    hub.deploy(&pkg.manifest());
    let r = hub.call("liar", "{}");
    let status = r.status();
    let body = r.text().unwrap();
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("not its child"), "{body}");
    // The hub is alive, serving, and still outside every worker's cgroup.
    let health = http().get(format!("{}/healthz", hub.url)).send().unwrap();
    assert_eq!(health.status(), 200);
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", hub.pid())).unwrap();
    assert!(!cgroups.contains("/roost/"), "{cgroups}");
}
