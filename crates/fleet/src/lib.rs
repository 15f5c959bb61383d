//! What a hub and its control plane (`roost cloud`) both speak.
//!
//! - The connection: a hub keeps one WebSocket to the cloud
//!   (`GET /v1/hub/connect`), JSON text frames of [`CloudMsg`] and
//!   [`HubMsg`]. The cloud opens with a challenge, the hub answers it
//!   signed with its enrolled key, and from then on the cloud pushes the
//!   hub's shadows and the hub reports. Issue 12's calls and messages are
//!   further message types on the same connection.
//! - Signatures (ed25519): of the challenge, of each HTTP request a hub
//!   makes on its own behalf (fetching its packages), and the fleet's
//!   signature over every package's SHA-256. Each signed text starts with
//!   its purpose, so one kind of signature can never pass for another.
//! - Pinned TLS: at enrolment the hub learns the SHA-256 of the cloud's
//!   public key (in the enrolment token) and from then on trusts only a
//!   server holding that key.

pub mod tls;

use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The connection's protocol version; a hub and a cloud that differ are
/// told so at the handshake.
pub const PROTOCOL: u32 = 1;
/// The path a hub connects to.
pub const CONNECT_PATH: &str = "/v1/hub/connect";
/// How far a signed request's time may be from the cloud's clock.
pub const REQUEST_WINDOW_MS: i64 = 5 * 60 * 1000;
/// The header scheme of a hub's signed HTTP requests.
pub const AUTH_SCHEME: &str = "Roost-Hub";
/// Largest text frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;

/// From the cloud to a hub.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CloudMsg {
    /// The first frame: sign this to prove who you are.
    Challenge { nonce: String, protocol: u32 },
    /// The hub is who it says; how often to send a heartbeat, and the
    /// fleet's package-signing key.
    Welcome {
        hub: String,
        groups: Vec<String>,
        heartbeat_s: u64,
        signing_key: String,
    },
    /// The connection is refused or ended, and why (`code`: `unknown_hub`,
    /// `removed`, `bad_signature`, `protocol`, `replaced`).
    Refused { code: String, reason: String },
    /// One of the hub's shadows as the cloud holds it (the GetThingShadow
    /// document: `state.desired/reported/delta`, `version`).
    Shadow { name: String, document: Value },
}

/// From a hub to the cloud.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubMsg {
    /// The answer to the challenge.
    Hello {
        hub: String,
        signature: String,
        protocol: u32,
    },
    /// Merged into the hub's `roost-deployment` shadow `state.reported`:
    /// `deployment`, `status`, `reason`, `applied`, `drift`.
    Report { reported: Value },
    /// I am here (also sent as WebSocket pings; this one carries no data
    /// and keeps proxies that drop control frames honest).
    Heartbeat,
}

/// What the hub signs to answer a challenge.
pub fn connect_text(hub: &str, nonce: &str) -> String {
    format!("roost-connect-v1\n{hub}\n{nonce}")
}

/// What a hub signs for one HTTP request.
pub fn request_text(method: &str, path: &str, time_ms: i64) -> String {
    format!("roost-request-v1\n{method}\n{path}\n{time_ms}")
}

/// What the fleet signs for a package.
pub fn package_text(sha256: &str) -> String {
    format!("roost-package-v1\n{sha256}")
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not an ed25519 key (64 hex digits)")]
    BadKey,
}

/// An ed25519 signing key from its 64 hex digits.
pub fn signing_key(secret_hex: &str) -> Result<ed25519_dalek::SigningKey, KeyError> {
    let b: [u8; 32] = hex::decode(secret_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(KeyError::BadKey)?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&b))
}

/// The public half of a signing key, hex.
pub fn public_hex(key: &ed25519_dalek::SigningKey) -> String {
    hex::encode(key.verifying_key().as_bytes())
}

/// Signs `text`; the signature as hex.
pub fn sign(key: &ed25519_dalek::SigningKey, text: &str) -> String {
    hex::encode(key.sign(text.as_bytes()).to_bytes())
}

/// Whether `signature_hex` is `public_hex`'s signature of `text`. Any
/// malformed input is simply not a valid signature.
pub fn verify(public_hex: &str, text: &str, signature_hex: &str) -> bool {
    let Some(key) = hex::decode(public_hex)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
    else {
        return false;
    };
    let Some(sig) = hex::decode(signature_hex)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return false;
    };
    key.verify_strict(text.as_bytes(), &ed25519_dalek::Signature::from_bytes(&sig))
        .is_ok()
}

/// The `Authorization` header of a hub's signed request.
pub fn authorization(
    key: &ed25519_dalek::SigningKey,
    hub: &str,
    method: &str,
    path: &str,
    time_ms: i64,
) -> String {
    let sig = sign(key, &request_text(method, path, time_ms));
    format!("{AUTH_SCHEME} {hub}:{time_ms}:{sig}")
}

/// A signed request's header, read: (hub, time, signature). None when it
/// is not one.
pub fn parse_authorization(header: &str) -> Option<(&str, i64, &str)> {
    let rest = header.strip_prefix(AUTH_SCHEME)?.strip_prefix(' ')?;
    let mut parts = rest.splitn(3, ':');
    let hub = parts.next()?;
    let time = parts.next()?.parse().ok()?;
    let sig = parts.next()?;
    (!hub.is_empty() && sig.len() == 128).then_some((hub, time, sig))
}

/// An enrolment token: the one-time secret, and after a `.` the pin of
/// the cloud's TLS key when it serves TLS.
pub fn token_pin(token: &str) -> Option<&str> {
    token
        .split_once('.')
        .map(|(_, pin)| pin)
        .filter(|p| p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Writes a file only this user can read, atomically (a temporary file
/// made 0600, synced, then renamed over `path`): the hub's credential and
/// agent state, the cloud's admin token.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
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
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_hold_only_for_their_own_text_and_key() {
        let k = signing_key(&"11".repeat(32)).unwrap();
        let other = signing_key(&"22".repeat(32)).unwrap();
        let sig = sign(&k, &package_text("abc"));
        assert!(verify(&public_hex(&k), &package_text("abc"), &sig));
        assert!(!verify(&public_hex(&k), &package_text("abd"), &sig));
        assert!(!verify(&public_hex(&other), &package_text("abc"), &sig));
        // A package signature is not a connect signature for the same bytes.
        assert!(!verify(&public_hex(&k), &connect_text("abc", ""), &sig));
        for bad in ["", "zz", &"00".repeat(64), &sig[..100]] {
            assert!(!verify(&public_hex(&k), &package_text("abc"), bad));
        }
        assert!(!verify("nothex", &package_text("abc"), &sig));
        assert!(signing_key("short").is_err());
    }

    #[test]
    fn authorization_headers_round_trip_and_junk_is_refused() {
        let k = signing_key(&"33".repeat(32)).unwrap();
        let h = authorization(&k, "shop-1", "GET", "/v1/hub/packages/x", 42);
        let (hub, t, sig) = parse_authorization(&h).unwrap();
        assert_eq!((hub, t), ("shop-1", 42));
        assert!(verify(
            &public_hex(&k),
            &request_text("GET", "/v1/hub/packages/x", t),
            sig
        ));
        for bad in [
            "",
            "Bearer x",
            "Roost-Hub",
            "Roost-Hub :1:sig",
            "Roost-Hub a:notanumber:sig",
            "Roost-Hub a:1:short",
        ] {
            assert!(parse_authorization(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn messages_have_a_stable_shape() {
        let m: HubMsg =
            serde_json::from_str(r#"{"type":"report","reported":{"status":"succeeded"}}"#).unwrap();
        assert_eq!(
            m,
            HubMsg::Report {
                reported: serde_json::json!({"status": "succeeded"})
            }
        );
        assert!(serde_json::from_str::<HubMsg>(r#"{"type":"nope"}"#).is_err());
        let c = serde_json::to_value(CloudMsg::Refused {
            code: "removed".into(),
            reason: "r".into(),
        })
        .unwrap();
        assert_eq!(c["type"], "refused");
    }

    #[test]
    fn a_token_carries_the_pin_when_there_is_one() {
        assert_eq!(token_pin("abc"), None);
        let pin = "ab".repeat(32);
        assert_eq!(token_pin(&format!("secret.{pin}")), Some(pin.as_str()));
        assert_eq!(token_pin("secret.nothex"), None);
    }
}
