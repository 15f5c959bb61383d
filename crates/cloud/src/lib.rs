//! The control plane (`roost cloud`): the fleet's registry of hubs, its
//! packages and deployments, and the hubs' connections.
//!
//! - `db.rs`/`store.rs`: the state, in embedded SQLite or PostgreSQL, and
//!   every rule that changes it (rollouts included), written once.
//! - `api.rs`: the operators' HTTP API (the admin token) and its OpenAPI
//!   document.
//! - `packages.rs`: a package is validated with the hub's own manifest
//!   code, content addressed and signed with the fleet's key.
//! - `hubs.rs`: the hubs' side: the WebSocket each hub keeps open, and
//!   the signed requests by which it fetches its packages and secrets.
//!
//! No replica holds state another needs: what a replica knows of a hub
//! beyond the database is only the socket it holds, and every change
//! reaches the replica holding the socket as a database event.

pub mod api;
pub mod db;
pub mod hubs;
pub mod packages;
pub mod store;

use db::Db;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
pub use store::{HubRecord, Store, StoreError};

/// How long an enrolment token works unless told otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("cannot use the data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How the cloud serves, beyond its data.
#[derive(Clone, Debug)]
pub struct CloudOptions {
    /// How often a connected hub sends a heartbeat; a hub silent for three
    /// of them is taken as gone.
    pub heartbeat: Duration,
    /// Largest package accepted.
    pub max_package_bytes: usize,
    /// The pin (SHA-256 of the public key) of the TLS certificate the
    /// cloud serves, put in every enrolment token so hubs trust only it.
    pub tls_pin: Option<String>,
    /// A hub sent a deployment that does not move for this long gives up
    /// its place in the rollout (`timed_out`); none: it waits for good.
    pub rollout_hub_timeout: Option<Duration>,
}

impl Default for CloudOptions {
    fn default() -> Self {
        CloudOptions {
            heartbeat: Duration::from_secs(60),
            max_package_bytes: 64 << 20,
            tls_pin: None,
            rollout_hub_timeout: Some(Duration::from_secs(1800)),
        }
    }
}

/// The running control plane. Cheap to clone.
#[derive(Clone)]
pub struct Cloud {
    pub(crate) store: Arc<Store>,
    pub(crate) admin_token: Arc<String>,
    pub(crate) signing_key: Arc<ed25519_dalek::SigningKey>,
    pub(crate) secrets_key: Arc<[u8; 32]>,
    pub(crate) options: Arc<CloudOptions>,
    pub(crate) sessions: Arc<hubs::Sessions>,
}

impl Cloud {
    /// Opens the data dir: the database (migrated), the fleet's keys (made
    /// on first start, kept in the database so every replica shares them)
    /// and the admin token, also written to `DATA_DIR/admin-token` (0600)
    /// for operators. `database`: a `postgres://` URL, or None for SQLite
    /// under the data dir.
    pub fn open(data_dir: &Path, database: Option<&str>) -> Result<Self, CloudError> {
        Self::open_with(data_dir, database, CloudOptions::default())
    }

    pub fn open_with(
        data_dir: &Path,
        database: Option<&str>,
        options: CloudOptions,
    ) -> Result<Self, CloudError> {
        let dir_err = |e| CloudError::DataDir(data_dir.to_owned(), e);
        std::fs::create_dir_all(data_dir).map_err(dir_err)?;
        let db = match database {
            None => Db::open_sqlite(&data_dir.join("cloud.db"))?,
            Some(url) => Db::open_postgres(url)?,
        };
        let store = Store::new(db);
        let token_file = data_dir.join("admin-token");
        let on_disk = read_token(&token_file).map_err(dir_err)?;
        let admin_token = store.fleet_value("admin_token", || {
            on_disk.clone().unwrap_or_else(|| random_hex(32))
        })?;
        if on_disk.as_deref() != Some(admin_token.as_str()) {
            roost_fleet::write_private(&token_file, admin_token.as_bytes()).map_err(dir_err)?;
        }
        let signing = store.fleet_value("signing_key", || random_hex(32))?;
        let signing_key = roost_fleet::signing_key(&signing)
            .map_err(|e| StoreError::Schema(format!("the fleet's signing key: {e}")))?;
        let secrets: [u8; 32] = hex::decode(store.fleet_value("secrets_key", || random_hex(32))?)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| StoreError::Schema("the fleet's secrets key is not 32 bytes".into()))?;
        Ok(Cloud {
            store: Arc::new(store),
            admin_token: Arc::new(admin_token),
            signing_key: Arc::new(signing_key),
            secrets_key: Arc::new(secrets),
            options: Arc::new(options),
            sessions: Arc::new(hubs::Sessions::default()),
        })
    }

    /// The operators' token (what `DATA_DIR/admin-token` holds).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The fleet's package-signing public key, hex.
    pub fn signing_public_key(&self) -> String {
        roost_fleet::public_hex(&self.signing_key)
    }

    /// Which database holds the fleet: `sqlite` or `postgres`.
    pub fn database_kind(&self) -> &'static str {
        self.store.db.kind()
    }

    /// Runs a store operation on a blocking thread (a database call may
    /// wait on disk or the network; the async workers never do).
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Database(format!("a store task failed: {e}")))?
    }

    /// Resumes every rollout the database holds unfinished (after a
    /// crash), then keeps stepping them now and then, in case an event was
    /// missed. Runs until the cloud stops.
    pub async fn keep_rollouts_moving(self) {
        let timeout = self.options.rollout_hub_timeout;
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            let r = self
                .run(move |s| {
                    // One deployment that cannot step does not hold the others.
                    for id in s.rolling_out()? {
                        let stepped = match timeout {
                            Some(t) => s.time_out(id, t.as_millis() as i64, now_ms()).map(|_| ()),
                            None => s.advance(id, now_ms()),
                        };
                        if let Err(e) = stepped {
                            tracing::warn!(deployment = id, error = %e, "cannot step a rollout; trying again in 30 s");
                        }
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot step the rollouts; trying again in 30 s");
            }
        }
    }

    /// Seals a deployment's secret values (a JSON object of strings) with
    /// the fleet's key: nonce, then ciphertext.
    pub(crate) fn seal(&self, values: &[u8]) -> Vec<u8> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = chacha20poly1305::ChaCha20Poly1305::new(self.secrets_key.as_ref().into())
            .encrypt(
                chacha20poly1305::Nonce::from_slice(&nonce),
                Payload {
                    msg: values,
                    aad: b"roost-deployment-secrets-v1",
                },
            )
            .expect("sealing in memory cannot fail");
        [nonce.as_slice(), &ct].concat()
    }

    /// Opens what [`Cloud::seal`] sealed.
    pub(crate) fn open_sealed(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        if sealed.len() < 12 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(12);
        chacha20poly1305::ChaCha20Poly1305::new(self.secrets_key.as_ref().into())
            .decrypt(
                chacha20poly1305::Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: b"roost-deployment-secrets-v1",
                },
            )
            .ok()
    }
}

fn read_token(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Tokens are kept as their SHA-256 only: a copy of the database enrols
/// no one.
pub(crate) fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A hub or group name: 1 to 64 of letters, digits, `-` and `_` (what a
/// thing name may hold, so a hub's name is usable in topics and shadows).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_admin_token_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = Cloud::open(dir.path(), None).unwrap();
        let path = dir.path().join("admin-token");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(a.admin_token().len(), 64);
        drop(a);
        let b = Cloud::open(dir.path(), None).unwrap();
        assert_eq!(
            b.admin_token(),
            std::fs::read_to_string(&path).unwrap().trim()
        );
    }

    #[test]
    fn names_are_short_and_plain() {
        assert!(valid_name("shop-12_a"));
        for bad in ["", "a/b", "a b", "ünï", &"x".repeat(65), "+", "#"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
