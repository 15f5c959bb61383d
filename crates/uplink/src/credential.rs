//! A hub's place in a fleet: at its first start with `--cloud URL --enrol
//! TOKEN` it makes an ed25519 key pair, sends the public half with the
//! one-time token to the cloud, and keeps the answer and the private key
//! in `DATA_DIR/cloud-credential.json` (0600). Later starts with `--cloud`
//! read that file.
//!
//! When the cloud serves TLS, the token carries the pin of its key and
//! the enrolment itself is made over TLS pinned to it; the pin is kept in
//! the credential, so this hub never trusts another key for its cloud.

use anyhow::{bail, Context, Result};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What a hub keeps of its enrolment.
#[derive(Clone, Serialize, Deserialize)]
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
    /// The SHA-256 of the cloud's TLS public key (hex), when it serves TLS.
    #[serde(default)]
    pub pin: Option<String>,
    /// The fleet's package-signing public key (hex): a package is applied
    /// only with its signature.
    #[serde(default)]
    pub signing_key: Option<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("cloud", &self.cloud)
            .field("hub", &self.hub)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// The hub's signing key.
    pub fn key(&self) -> Result<ed25519_dalek::SigningKey> {
        roost_fleet::signing_key(&self.secret_key)
            .context("the cloud credential's secret_key is damaged; enrol the hub again")
    }
}

/// The file a hub's credential is kept in.
pub const FILE: &str = "cloud-credential.json";

/// The hub's credential for `cloud`: read, or made by enrolling with
/// `token` when there is none yet. Blocking (call it before the runtime).
pub fn credential(data_dir: &Path, cloud: &str, token: Option<&str>) -> Result<Credential> {
    refuse_plain_off_loopback(cloud)?;
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
    let pin = roost_fleet::token_pin(token).map(str::to_owned);
    if cloud.starts_with("https://") && pin.is_none() {
        tracing::warn!("the enrolment token carries no pin of the cloud's TLS key: the cloud is trusted by the system's certificate authorities");
    }
    if cloud.starts_with("http://") && pin.is_some() {
        bail!("the enrolment token is for a cloud serving TLS, but --cloud {cloud} is plain http: use https://");
    }
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    let public_key = roost_fleet::public_hex(&key);
    let resp = crate::blocking_client(pin.as_deref())?
        .post(format!("{}/v1/enrol", cloud.trim_end_matches('/')))
        .json(&serde_json::json!({"token": token, "public_key": public_key}))
        .send()
        .with_context(|| format!("cannot reach the cloud at {cloud} to enrol (with a pinned token, the cloud must hold the key it was issued by)"))?;
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
        pin,
        signing_key: v["signing_key"].as_str().map(str::to_owned),
    };
    roost_fleet::write_private(&path, &serde_json::to_vec_pretty(&c)?)?;
    tracing::info!(hub = %c.hub, groups = ?c.groups, cloud, "enrolled in the fleet");
    Ok(c)
}

/// Hub-to-cloud traffic is TLS: plain http only to this machine.
fn refuse_plain_off_loopback(cloud: &str) -> Result<()> {
    let url = reqwest::Url::parse(cloud)
        .with_context(|| format!("--cloud {cloud} is not a URL (https://HOST:PORT)"))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => bail!("--cloud {cloud} is plain http to another machine: the fleet's traffic is TLS, use https:// (the cloud serves it with --tls-cert/--tls-key)"),
        other => bail!("--cloud must be https:// (or http:// on this machine), not {other}://"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_only_for_this_machine() {
        for ok in [
            "https://cloud.example:8430",
            "http://127.0.0.1:8430",
            "http://localhost:8430",
            "http://[::1]:8430",
        ] {
            assert!(refuse_plain_off_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.5:8430",
            "http://cloud.example",
            "ftp://127.0.0.1",
            "not a url",
            "",
        ] {
            assert!(refuse_plain_off_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_credential_for_another_cloud_or_a_garbled_one_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let e = credential(dir.path(), "http://127.0.0.1:1", None).unwrap_err();
        assert!(format!("{e:#}").contains("--enrol"), "{e:#}");
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let e = credential(dir.path(), "http://127.0.0.1:1", None).unwrap_err();
        assert!(format!("{e:#}").contains("not a cloud credential"), "{e:#}");
        let c = Credential {
            cloud: "http://127.0.0.1:1".into(),
            hub: "a".into(),
            groups: vec![],
            public_key: "00".into(),
            secret_key: "00".into(),
            pin: None,
            signing_key: None,
        };
        std::fs::write(dir.path().join(FILE), serde_json::to_vec(&c).unwrap()).unwrap();
        let e = credential(dir.path(), "http://127.0.0.1:2", None).unwrap_err();
        assert!(format!("{e:#}").contains("enrolled with"), "{e:#}");
        let e = c.key().unwrap_err();
        assert!(!format!("{e:#}").is_empty());
    }
}
