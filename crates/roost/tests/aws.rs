//! Shadows and local service overrides: unmodified AWS SDK code (boto3,
//! the AWS CLI) and AWS IoT devices (paho-mqtt on the shadow topics) talk
//! to the hub as if it were the cloud; each task is allowed only what its
//! manifest grants; an accepted shadow update survives kill -9.
//!
//! Needs $PYTHON with boto3, awscli, paho-mqtt, awsiotsdk and awslambdaric
//! (scripts/test.sh makes one).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn python() -> String {
    python_with("boto3, awscli, paho.mqtt, awslambdaric, awsiot.iotshadow")
}

fn script(name: &str) -> PathBuf {
    crate_dir().join("tests/aws").join(name)
}

/// Runs a client; panics with its output and the hub's log unless it
/// passes.
fn run_ok(hub: &TestHub, cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}\nhub log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        hub.log_text()
    );
    out
}

/// Runs a Python client script with `$PYTHON`.
fn run_py(hub: &TestHub, args: &[&str], env: &[(&str, &str)]) -> Output {
    run_ok(
        hub,
        Command::new(python()).args(args).envs(env.iter().copied()),
    )
}

/// Deploys with the given variables set in the deploying shell.
fn deploy_with(hub: &TestHub, manifest: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(roost_bin())
        .args(["deploy", manifest.to_str().unwrap()])
        .env("ROOST_HUB", &hub.url)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// What the owner's profile files make of `code` (Python using boto3).
/// The environment that points an AWS SDK or the CLI at the hub's owner
/// profile files.
fn owner_env(hub: &TestHub) -> [(&'static str, String); 3] {
    let d = hub.data_dir.display();
    [
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            format!("{d}/aws-credentials"),
        ),
        ("AWS_CONFIG_FILE", format!("{d}/aws-config")),
        ("AWS_PROFILE", "roost".into()),
    ]
}

fn as_owner(hub: &TestHub, code: &str) -> String {
    let env = owner_env(hub);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run_py(hub, &["-c", code], &env);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

const GET_SHADOW: &str = "import boto3,sys,json\ntry:\n  print(boto3.client('iot-data').get_thing_shadow(thingName=sys.argv[1])['payload'].read().decode())\nexcept boto3.exceptions.botocore.exceptions.ClientError as e:\n  print(e.response['Error']['Code'])";

fn get_shadow(hub: &TestHub, thing: &str) -> String {
    let code = GET_SHADOW.replace("sys.argv[1]", &format!("{thing:?}"));
    as_owner(hub, &code)
}

fn owner_manifest() -> String {
    task("echo", "echo.wat", "")
        + &task("fail", "trap.wat", "")
        + &task("logger", "stderr.wat", "")
        + "[[secret]]\nname = \"db-password\"\nvalue_env = \"DB_PASSWORD\"\n"
}

#[test]
fn boto3_as_the_owner_gets_shadows_lambda_publish_and_secrets_with_aws_semantics() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let pkg = Package::new(&owner_manifest(), &["echo.wat", "trap.wat", "stderr.wat"]);
    let out = deploy_with(&hub, &pkg.manifest(), &[("DB_PASSWORD", "s3cr3t-Ü")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The owner's profile files: private, in AWS's formats.
    use std::os::unix::fs::PermissionsExt;
    for f in ["aws-credentials", "aws-config"] {
        let meta = std::fs::metadata(hub.data_dir.join(f)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let config = std::fs::read_to_string(hub.data_dir.join("aws-config")).unwrap();
    assert!(
        config.contains(&format!("endpoint_url = {}", hub.url)),
        "{config}"
    );

    // The secret is sealed at rest: not in the store, not in the package.
    let mut on_disk = Vec::new();
    for f in walk(&hub.data_dir) {
        on_disk.extend(std::fs::read(f).unwrap_or_default());
    }
    assert!(!on_disk.windows(6).any(|w| w == b"s3cr3t"));

    let sub = hub.subscribe_plain(&["-V", "mqttv5", "-t", "alerts/#", "-F", "%p|%P|%C"], 1, 30);
    let d = hub.data_dir.display().to_string();
    run_py(
        &hub,
        &[script("owner.py").to_str().unwrap(), &d],
        &[("EXPECT_SECRET", "s3cr3t-Ü")],
    );
    assert_eq!(
        sub.output().trim(),
        "from-boto3|site:plant-7|text/plain",
        "Publish carries its MQTT 5 properties"
    );

    // The AWS CLI (v1, from PyPI) works from the same profile.
    let aws = Path::new(&python()).with_file_name("aws");
    assert!(
        aws.exists(),
        "the AWS CLI is expected beside $PYTHON (scripts/test.sh installs it)"
    );
    {
        let out_file = hub.data_dir.join("cli-shadow.json");
        run_ok(
            &hub,
            Command::new(&aws)
                .args(["iot-data", "get-thing-shadow", "--thing-name", "lamp"])
                .arg(&out_file)
                .envs(owner_env(&hub)),
        );
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
        assert_eq!(doc["state"]["desired"]["on"], true, "{doc}");
    }
    let m = hub.metrics();
    assert!(
        m.contains("roost_local_service_requests_total{service=\"lambda\",status=\"200\"}"),
        "{m}"
    );
    assert!(m.contains("roost_shadow_requests_total"), "{m}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn bad_signatures_skewed_clocks_and_path_tricks_get_aws_errors_and_change_nothing() {
    let hub = TestHub::start(&[]);
    let pkg = Package::new(&task("echo", "echo.wat", ""), &["echo.wat"]);
    hub.deploy(&pkg.manifest());
    let d = hub.data_dir.display().to_string();
    run_py(
        &hub,
        &[script("hostile.py").to_str().unwrap(), &d, &hub.url],
        &[],
    );
    // Unsigned requests never reach a service, whatever the path.
    for (method, path) in [
        ("GET", "/things/door/shadow"),
        ("POST", "/2015-03-31/functions/echo/invocations"),
        ("POST", "/topics/a"),
    ] {
        let r = http()
            .request(method.parse().unwrap(), format!("{}{path}", hub.url))
            .body("{}")
            .send()
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
        assert_eq!(
            r.headers()["x-amzn-ErrorType"],
            "MissingAuthenticationTokenException"
        );
    }
    // Of the Invokes hostile.py sent, only the first (as signed) ran: none
    // of the replays with an unsigned header added ran, async or not.
    let m = hub.metrics();
    let ran: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("roost_calls_total{") && l.contains("task=\"echo\""))
        .collect();
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert!(
        ran[0].contains("mode=\"sync\"") && ran[0].ends_with(" 1"),
        "{ran:?}"
    );
    let r = http()
        .post(format!("{}/", hub.url))
        .header("X-Amz-Target", "secretsmanager.GetSecretValue")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["__type"], "MissingAuthenticationTokenException");
}

#[test]
fn a_process_task_uses_boto3_unconfigured_and_gets_only_what_allow_grants() {
    let py = python();
    let hub = TestHub::start(&["--allow-anonymous"]);
    let manifest = format!(
        "[[task]]\nname = \"ctl\"\nruntime = \"process\"\ndir = \"boto\"\ncommand = [\"{py}\", \"-m\", \"awslambdaric\"]\nhandler = \"app.handler\"\nmemory_mb = 256\ntimeout_ms = 20000\nallow = {{ invoke = [\"echo\"], shadow_read = [\"thermo*\"], shadow_update = [\"thermostat\"], publish = [\"alerts/#\"], secrets = [\"db-password\"], retained = [\"state/#\"] }}\n"
    ) + &format!(
        "[[task]]\nname = \"boom\"\nruntime = \"process\"\ndir = \"boto\"\ncommand = [\"{py}\", \"-m\", \"awslambdaric\"]\nhandler = \"app.boom\"\nmemory_mb = 256\n[[task]]\nname = \"ctx\"\nruntime = \"process\"\ndir = \"boto\"\ncommand = [\"{py}\", \"-m\", \"awslambdaric\"]\nhandler = \"app.context_of\"\nmemory_mb = 256\n[[task]]\nname = \"nosy\"\nruntime = \"process\"\ndir = \"boto\"\ncommand = [\"{py}\", \"-m\", \"awslambdaric\"]\nhandler = \"app.list_retained\"\nmemory_mb = 256\n"
    ) + &task("echo", "echo.wat", "")
        + &task("secret-keeper", "echo.wat", "")
        + "[[secret]]\nname = \"db-password\"\nvalue_env = \"DB_PASSWORD\"\n[[secret]]\nname = \"api-key\"\nvalue_env = \"API_KEY\"\n"
        + "[[route]]\nfrom = \"device:alerts/#\"\nto = \"task:secret-keeper\"\n"
        + "[[route]]\nfrom = \"task:secret-keeper\"\nto = \"device:seen\"\n";
    let pkg = Package::new(&manifest, &["echo.wat"]);
    pkg.copy_fixture("boto", "boto");
    // A secret whose variable is not set stops the deploy before upload.
    let out = deploy_with(&hub, &pkg.manifest(), &[("DB_PASSWORD", "pw")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("API_KEY"));
    let out = deploy_with(
        &hub,
        &pkg.manifest(),
        &[("DB_PASSWORD", "pw-123"), ("API_KEY", "k")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    as_owner(
        &hub,
        "import boto3; boto3.client('iot-data').update_thing_shadow(thingName='door', payload=b'{\"state\":{\"reported\":{\"open\":false}}}')",
    );
    as_owner(
        &hub,
        "import boto3; c = boto3.client('iot-data'); c.publish(topic='state/mode', retain=True, qos=1, payload=b'eco'); c.publish(topic='private/key', retain=True, qos=1, payload=b'k')",
    );

    let r = hub.call("ctl", r#"{"temp": 23}"#);
    let status = r.status();
    let text = r.text().unwrap();
    assert_eq!(status, 200, "{text}\nhub log:\n{}", hub.log_text());
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["update_own"], "ok", "{v}");
    assert_eq!(v["get_own"], "ok", "{v}");
    assert_eq!(v["reported"]["temp"], 23, "{v}");
    assert_eq!(v["update_other"], "ForbiddenException", "{v}");
    assert_eq!(v["get_other"], "ForbiddenException", "{v}");
    assert_eq!(v["publish_allowed"], "ok", "{v}");
    assert_eq!(v["publish_denied"], "ForbiddenException", "{v}");
    assert_eq!(v["invoke_allowed"], "ok", "{v}");
    assert_eq!(v["invoke_output"], r#"{"via":"task"}"#, "{v}");
    assert_eq!(v["invoke_denied"], "AccessDeniedException", "{v}");
    assert_eq!(v["secret"], "pw-123", "{v}");
    assert_eq!(v["secret_denied"], "AccessDeniedException", "{v}");
    assert_eq!(v["retained"], "eco", "{v}");
    assert_eq!(v["retained_denied"], "ForbiddenException", "{v}");
    assert_eq!(
        v["retained_listed"],
        serde_json::json!(["state/mode"]),
        "only what allow.retained covers: {v}"
    );
    let nosy = hub.call("nosy", "{}").text().unwrap();
    assert_eq!(
        nosy, "\"ForbiddenException\"",
        "no allow.retained, no listing"
    );
    // The denied update changed nothing.
    assert!(get_shadow(&hub, "door").contains("\"open\":false"));
    // The task's Publish to alerts/hot reached subscribers but not the
    // `device:alerts/#` route (a task cannot loop through its own topic);
    // the owner's Publish, like an MQTT client's message, does.
    // secret-keeper echoes what it is routed to `seen`: the first thing
    // there is the owner's `{}`, not the task's `hot`. The task's message
    // went through the broker before the ctl call returned, so a call it
    // had been routed to would be counted by the time the owner's is done.
    let seen = hub.subscribe_plain(&["-t", "seen"], 1, 30);
    as_owner(
        &hub,
        "import boto3; boto3.client('iot-data').publish(topic='alerts/owner', qos=1, payload=b'{}')",
    );
    assert_eq!(seen.output(), "{}", "the owner's message is routed");
    let routed = || {
        hub.task_row("secret-keeper")["succeeded"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until(
        "the owner's routed call to be counted",
        Duration::from_secs(10),
        || routed() >= 1,
    );
    assert_eq!(routed(), 1, "only the owner's Publish was routed");

    // Invoke passes a ClientContext to the handler and returns a failed
    // handler's own error document, as Lambda does.
    let out = as_owner(
        &hub,
        r#"import boto3, base64, json
lam = boto3.client('lambda')
cc = base64.b64encode(json.dumps({"custom": {"site": "plant-7"}}).encode()).decode()
r = lam.invoke(FunctionName='ctx', Payload=b'{}', ClientContext=cc)
print(r['Payload'].read().decode())
r = lam.invoke(FunctionName='boom', Payload=b'{"x": 1}')
print(r['FunctionError'], r['Payload'].read().decode())"#,
    );
    let mut lines = out.lines();
    let ctx: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(ctx["custom"]["site"], "plant-7", "{out}");
    let (kind, doc) = lines.next().unwrap().split_once(' ').unwrap();
    assert_eq!(kind, "Unhandled");
    let doc: serde_json::Value = serde_json::from_str(doc).unwrap();
    assert_eq!(doc["errorType"], "ValueError", "{doc}");
    assert_eq!(doc["errorMessage"], "the sky fell: {\"x\": 1}", "{doc}");
    assert!(
        doc["stackTrace"].as_array().is_some_and(|s| !s.is_empty()),
        "{doc}"
    );
}

#[test]
fn devices_use_the_shadow_topics_and_deltas_feed_routes() {
    let hub = TestHub::start(&["--allow-anonymous"]);
    let hash = password_hash("lamp-pw");
    let manifest = task("echo", "echo.wat", "")
        + &format!(
            "[[device]]\nname = \"lamp-1\"\npassword_hash = \"{hash}\"\npublish = [\"$aws/things/{{device}}/shadow/#\"]\nsubscribe = [\"$aws/things/{{device}}/shadow/#\", \"lamp/deltas\"]\n"
        )
        + &format!(
            "[[device]]\nname = \"fan-1\"\npassword_hash = \"{}\"\npublish = [\"$aws/things/{{device}}/shadow/#\"]\nsubscribe = [\"$aws/things/{{device}}/shadow/#\"]\n",
            password_hash("fan-pw")
        )
        + "[[route]]\nfrom = \"shadow:lamp-1\"\nto = \"task:echo\"\n[[route]]\nfrom = \"task:echo\"\nto = \"device:lamp/deltas\"\n"
        + "[[route]]\nfrom = \"device:heater/set\"\nto = \"shadow:heater\"\n";
    let pkg = Package::new(&manifest, &["echo.wat"]);
    hub.deploy(&pkg.manifest());
    run_py(
        &hub,
        &[
            script("device.py").to_str().unwrap(),
            "127.0.0.1",
            hub.mqtt_port(),
            "lamp-pw",
        ],
        &[],
    );
    // The AWS IoT Device SDK v2 (awscrt MQTT, its shadow client) parses
    // every answer; it appends usage metrics to its user name, as on AWS.
    run_py(
        &hub,
        &[
            script("sdk_device.py").to_str().unwrap(),
            "127.0.0.1",
            hub.mqtt_port(),
            "fan-1",
            "fan-pw",
        ],
        &[],
    );
    // The device could not touch a shadow outside its policy.
    assert_eq!(get_shadow(&hub, "other"), "ResourceNotFoundException");
    // A `shadow:` destination applies the routed document.
    let _ = hub.kill9_safe_publish("heater/set", r#"{"state":{"desired":{"temp":21}}}"#);
    wait_until(
        "the routed document is applied",
        Duration::from_secs(10),
        || get_shadow(&hub, "heater").contains("\"temp\":21"),
    );
}

#[test]
fn an_accepted_shadow_update_survives_kill_9() {
    let mut hub = TestHub::start(&["--allow-anonymous"]);
    // Over MQTT: the accepted reply is sent only after the commit.
    let sub = hub.subscribe_plain(&["-t", "$aws/things/vault/shadow/update/accepted"], 1, 20);
    hub.kill9_safe_publish(
        "$aws/things/vault/shadow/update",
        r#"{"state":{"reported":{"locked":true}},"clientToken":"k9"}"#,
    );
    let got = sub.output();
    assert!(got.contains("\"clientToken\":\"k9\""), "{got}");
    // Over HTTP with boto3: the 200 means it is on disk.
    as_owner(
        &hub,
        "import boto3; boto3.client('iot-data').update_thing_shadow(thingName='vault', shadowName='door', payload=b'{\"state\":{\"desired\":{\"open\":false}}}')",
    );
    // A retained message (QoS 1: answered once stored) keeps its time too.
    const RETAINED: &str = "import boto3; r = boto3.client('iot-data').get_retained_message(topic='vault/state'); print(r['payload'].decode(), r['lastModifiedTime'])";
    as_owner(
        &hub,
        "import boto3; boto3.client('iot-data').publish(topic='vault/state', qos=1, retain=True, payload=b'shut')",
    );
    let before = as_owner(&hub, RETAINED);
    assert!(before.starts_with("shut "), "{before}");
    hub.kill9();
    hub.launch();
    assert_eq!(as_owner(&hub, RETAINED), before);
    let doc = get_shadow(&hub, "vault");
    assert!(
        doc.contains("\"locked\":true") && doc.contains("\"version\":1"),
        "{doc}"
    );
    let named = as_owner(
        &hub,
        "import boto3; print(boto3.client('iot-data').get_thing_shadow(thingName='vault', shadowName='door')['payload'].read().decode())",
    );
    assert!(named.contains("\"open\":false"), "{named}");
}

#[test]
fn the_aws_sdk_for_javascript_works_against_the_hub_too() {
    // node_modules beside the npm Lambda runtime client scripts/test.sh
    // installs (it installs the SDK there too).
    let ric = std::env::var("ROOST_NODE_RIC").expect(
        "set ROOST_NODE_RIC to aws-lambda-ric's bin/index.mjs (scripts/test.sh installs it and the AWS SDK for JavaScript beside it)",
    );
    let modules = Path::new(&ric).ancestors().nth(3).unwrap().to_owned();
    let hub = TestHub::start(&[]);
    let pkg = Package::new(&owner_manifest(), &["echo.wat", "trap.wat", "stderr.wat"]);
    let out = deploy_with(&hub, &pkg.manifest(), &[("DB_PASSWORD", "js-pw")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run_ok(
        &hub,
        Command::new("node")
            .arg(script("owner_sdk.cjs"))
            .env("NODE_PATH", &modules)
            .env("NODE_NO_WARNINGS", "1")
            .envs(owner_env(&hub))
            .env("EXPECT_SECRET", "js-pw")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_REGION"),
    );
}

#[test]
fn the_cli_reads_and_changes_shadows_with_the_owners_keys() {
    let hub = TestHub::start(&[]);
    let d = hub.data_dir.display().to_string();
    let shadow = |args: &[&str]| {
        let out = hub.cli(&[&["shadow"], args, &["--data-dir", &d]].concat());
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = shadow(&["update", "lamp-1", r#"{"state":{"desired":{"on":true}}}"#]);
    assert!(ok, "{err}");
    assert!(out.contains("\"version\": 1"), "{out}");
    let (ok, out, _) = shadow(&[
        "update",
        "lamp-1",
        "--name",
        "cfg",
        r#"{"state":{"reported":{"x":1}}}"#,
    ]);
    assert!(ok, "{out}");
    let (ok, out, _) = shadow(&["get", "lamp-1"]);
    assert!(ok && out.contains("\"delta\""), "{out}");
    let (ok, out, _) = shadow(&["list", "lamp-1"]);
    assert!(ok && out.contains("\"cfg\""), "{out}");
    let (ok, _, err) = shadow(&[
        "update",
        "lamp-1",
        r#"{"state":{"desired":{"on":false}},"version":7}"#,
    ]);
    assert!(!ok && err.contains("ConflictException"), "{err}");
    let (ok, _, _) = shadow(&["delete", "lamp-1"]);
    assert!(ok);
    let (ok, _, err) = shadow(&["get", "lamp-1"]);
    assert!(!ok && err.contains("ResourceNotFoundException"), "{err}");
    // Without the hub's profile files there is nothing to sign with.
    let out = hub.cli(&["shadow", "get", "lamp-1", "--data-dir", "/nonexistent"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("aws-credentials"));
}

trait Publish {
    fn kill9_safe_publish(&self, topic: &str, payload: &str) -> Output;
}

impl Publish for TestHub {
    /// A QoS 1 publish with mosquitto_pub, waiting for its PUBACK.
    fn kill9_safe_publish(&self, topic: &str, payload: &str) -> Output {
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                self.mqtt_port(),
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                payload,
            ])
            .output()
            .expect("mosquitto_pub (apt install mosquitto-clients)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}
