//! The control plane (`roost cloud`): the fleet's registry of hubs and
//! the operators' HTTP API over it. This first part holds the hubs and
//! their one-time enrolment tokens in embedded SQLite (`store.rs`,
//! versioned migrations), guards the API with the admin token it writes
//! at first start, and serves its own OpenAPI document. Deployments, the
//! hubs' connection and PostgreSQL come next (issue 11).

pub mod api;
pub mod db;
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

/// The running control plane. Cheap to clone.
#[derive(Clone)]
pub struct Cloud {
    pub(crate) store: Arc<Store>,
    pub(crate) admin_token: Arc<String>,
}

impl Cloud {
    /// Opens the data dir: the database (migrated) and the admin token,
    /// written (0600) on first start. `database`: a `postgres://` URL, or
    /// None for SQLite under the data dir.
    pub fn open(data_dir: &Path, database: Option<&str>) -> Result<Self, CloudError> {
        let dir_err = |e| CloudError::DataDir(data_dir.to_owned(), e);
        std::fs::create_dir_all(data_dir).map_err(dir_err)?;
        let db = match database {
            None => Db::open_sqlite(&data_dir.join("cloud.db"))?,
            Some(url) => Db::open_postgres(url)?,
        };
        let store = Store::new(db);
        let admin_token = admin_token(&data_dir.join("admin-token")).map_err(dir_err)?;
        Ok(Cloud {
            store: Arc::new(store),
            admin_token: Arc::new(admin_token),
        })
    }

    /// The operators' token (what `DATA_DIR/admin-token` holds).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
}

/// Reads the admin token, or makes one (32 random bytes, hex) in a file
/// only the cloud's user can read.
fn admin_token(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = random_hex(32);
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(token)
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
