//! A hub's place in a fleet: at its first start with `--cloud URL --enrol
//! TOKEN` it makes an ed25519 key pair, sends the public half with the
//! one-time token to the cloud, and keeps the answer and the private key
//! in `DATA_DIR/cloud-credential.json` (0600). Later starts with `--cloud`
//! read that file.

use anyhow::{bail, Context, Result};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What a hub keeps of its enrolment.
#[derive(Serialize, Deserialize)]
pub struct Credential {
    /// The cloud it enrolled with.
    pub cloud: String,
    /// Its name in the fleet.
    pub hub: String,
    pub groups: Vec<String>,
    /// Its ed25519 key: the public half (hex), as the cloud recorded it,
    /// and the private half (hex), which never leaves this file.
    pub public_key: String,
    pub secret_key: String,
}

const FILE: &str = "cloud-credential.json";

/// The hub's credential for `cloud`: read, or made by enrolling with
/// `token` when there is none yet.
pub fn credential(data_dir: &Path, cloud: &str, token: Option<&str>) -> Result<Credential> {
    let path = data_dir.join(FILE);
    if path.exists() {
        let c: Credential = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("{} is not a cloud credential", path.display()))?;
        if c.cloud.trim_end_matches('/') != cloud.trim_end_matches('/') {
            bail!(
                "this hub is enrolled with {} as {}, not with {cloud}; start it with --cloud {}, or enrol it again in a new data dir",
                c.cloud,
                c.hub,
                c.cloud
            );
        }
        if token.is_some() {
            tracing::warn!(hub = %c.hub, "this hub is enrolled already; --enrol is ignored");
        }
        return Ok(c);
    }
    let Some(token) = token else {
        bail!("this hub is not enrolled in the fleet at {cloud}: start it once with --enrol TOKEN (an operator prints one with `roost cloud hubs add NAME`)");
    };
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let public_key = hex::encode(key.verifying_key().as_bytes());
    let resp = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?
        .post(format!("{}/v1/enrol", cloud.trim_end_matches('/')))
        .json(&serde_json::json!({"token": token, "public_key": public_key}))
        .send()
        .with_context(|| format!("cannot reach the cloud at {cloud} to enrol"))?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        bail!(
            "the cloud refused the enrolment: {} ({status})",
            v["error"]["message"].as_str().unwrap_or("no reason given")
        );
    }
    let c = Credential {
        cloud: cloud.to_owned(),
        hub: v["hub"].as_str().unwrap_or_default().to_owned(),
        groups: serde_json::from_value(v["groups"].clone()).unwrap_or_default(),
        public_key,
        secret_key: hex::encode(secret),
    };
    write_private(&path, &serde_json::to_vec_pretty(&c)?)?;
    tracing::info!(hub = %c.hub, groups = ?c.groups, cloud, "enrolled in the fleet");
    Ok(c)
}

/// Writes a file only this user can read, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
