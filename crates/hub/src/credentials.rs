//! Who may use the hub's local AWS APIs: the hub's key (a random file in
//! the data dir, mode 0600), the credentials derived from it for the owner
//! and for each task, and the sealing of deployed secrets at rest.
//!
//! Credentials are derived (HMAC of the hub key and the task's name) rather
//! than stored, so a restarted hub gives every task the same keys without
//! keeping any; deleting `hub.key` rotates them all.

use hmac::{Hmac, Mac};
use roost_model::TaskName;
use sha2::Sha256;
use std::io::Write;
use std::path::Path;

/// The file under the data dir that holds the hub's key.
pub const KEY_FILE: &str = "hub.key";

/// One access key pair, as the AWS SDKs take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub access_key_id: String,
    pub secret_access_key: String,
}

pub use roost_model::Principal;

/// The hub's secret key, and what is derived from it.
pub struct HubKey([u8; 32]);

impl HubKey {
    /// Reads `DATA_DIR/hub.key`, creating it (0600) on first start.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(b) if b.len() == 32 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(&b);
                return Ok(Self(k));
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} is not a hub key (32 bytes); move it away to make a new one (task credentials and deployed secrets made with the old one stop working)",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
        let tmp = path.with_extension("partial");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&k)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(Self(k))
    }

    fn derive(&self, label: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn credential(&self, who: &str) -> Credential {
        // 20 characters like AWS's own key ids; base32 keeps them to A-Z2-7.
        let id = base32(&self.derive(&format!("access-key-id\0{who}")));
        let secret = hex::encode(self.derive(&format!("secret-access-key\0{who}")));
        Credential {
            access_key_id: format!("RST{}", &id[..17]),
            secret_access_key: secret[..40].to_owned(),
        }
    }

    /// The owner's credentials (full rights).
    pub fn owner(&self) -> Credential {
        self.credential("owner")
    }

    /// A task's credentials.
    pub fn task(&self, task: &TaskName) -> Credential {
        self.credential(&format!("task\0{task}"))
    }

    /// The key that seals deployed secrets.
    pub fn sealing_key(&self) -> [u8; 32] {
        self.derive("secrets-at-rest")
    }
}

fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0);
    for &b in bytes {
        buf = (buf << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    out
}

/// Seals and opens deployed secrets (ChaCha20-Poly1305, a random nonce per
/// secret, the secret's name as associated data so sealed values cannot be
/// swapped between names).
pub mod sealing {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::{ChaCha20Poly1305, Nonce};

    pub fn seal(key: &[u8; 32], name: &str, value: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut nonce = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let ct = ChaCha20Poly1305::new(key.into())
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: name.as_bytes(),
                },
            )
            .expect("sealing cannot fail for in-memory values");
        (nonce.to_vec(), ct)
    }

    pub fn open(key: &[u8; 32], name: &str, nonce: &[u8], ct: &[u8]) -> Option<Vec<u8>> {
        if nonce.len() != 12 {
            return None;
        }
        ChaCha20Poly1305::new(key.into())
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: name.as_bytes(),
                },
            )
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_stable_distinct_and_the_key_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let k = HubKey::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let again = HubKey::load_or_create(dir.path()).unwrap();
        let t = TaskName::parse("echo").unwrap();
        assert_eq!(k.task(&t), again.task(&t));
        assert_ne!(k.task(&t), k.owner());
        assert_ne!(k.task(&t), k.task(&TaskName::parse("echo2").unwrap()));
        assert_eq!(k.owner().access_key_id.len(), 20);
        assert_eq!(k.owner().secret_access_key.len(), 40);
    }

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_name() {
        let key = [7u8; 32];
        let (n, ct) = sealing::seal(&key, "db", b"hunter2");
        assert!(!ct.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(sealing::open(&key, "db", &n, &ct).unwrap(), b"hunter2");
        assert!(sealing::open(&key, "other", &n, &ct).is_none());
        assert!(sealing::open(&[8u8; 32], "db", &n, &ct).is_none());
        assert!(sealing::open(&key, "db", &n[..4], &ct).is_none());
    }
}
