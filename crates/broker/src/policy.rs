//! Device identity and topic policies: who may connect, and where each
//! device may publish and subscribe. `{device}` in a filter stands for the
//! device's own name.

use crate::topic::{filter_within, matches, valid_filter};
use std::collections::HashMap;

pub use roost_bus::Device;

/// `{device}` in a device's filters stands for its own name.
fn expand(device: &Device, filters: &[String]) -> Vec<String> {
    filters
        .iter()
        .map(|f| f.replace("{device}", &device.name))
        .collect()
}

/// The devices of the active deployment, with their filters expanded.
#[derive(Clone, Debug, Default)]
pub struct Devices {
    by_name: HashMap<String, Policy>,
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub device: Device,
    publish: Vec<String>,
    subscribe: Vec<String>,
    /// Anonymous clients may use every topic, `$` topics included (which
    /// a `#` filter does not match).
    unrestricted: bool,
}

impl Policy {
    /// A client with no device identity (`--allow-anonymous`): anything.
    pub fn anonymous() -> Self {
        Policy {
            device: Device {
                name: String::new(),
                password_hash: None,
                publish: vec!["#".into()],
                subscribe: vec!["#".into()],
            },
            publish: vec!["#".into()],
            subscribe: vec!["#".into()],
            unrestricted: true,
        }
    }

    pub fn may_publish(&self, topic: &str) -> bool {
        self.unrestricted || self.publish.iter().any(|f| matches(f, topic))
    }

    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.unrestricted || self.subscribe.iter().any(|f| filter_within(filter, f))
    }
}

impl Devices {
    pub fn new(devices: Vec<Device>) -> Self {
        let by_name = devices
            .into_iter()
            .map(|d| {
                let publish = expand(&d, &d.publish)
                    .into_iter()
                    .filter(|f| valid_filter(f))
                    .collect();
                let subscribe = expand(&d, &d.subscribe)
                    .into_iter()
                    .filter(|f| valid_filter(f))
                    .collect();
                (
                    d.name.clone(),
                    Policy {
                        device: d,
                        publish,
                        subscribe,
                        unrestricted: false,
                    },
                )
            })
            .collect();
        Self { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Checks a password against an argon2 PHC hash. Slow on purpose: call it
/// off the async threads. Its working memory (the hash's memory cost,
/// 19 MiB for `roost passwd` hashes) is `CheckMemory`, returned to the
/// kernel when the check ends.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    use argon2::password_hash::{Output, PasswordHash};
    use argon2::{Algorithm, Argon2, Params, Version};
    let Ok(h) = PasswordHash::new(hash) else {
        return false;
    };
    let (Ok(algorithm), Some(salt), Some(expected)) =
        (Algorithm::try_from(h.algorithm), h.salt, h.hash)
    else {
        return false;
    };
    let (Ok(version), Ok(params)) = (
        h.version.map(Version::try_from).transpose(),
        Params::try_from(&h),
    ) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let Some(memory) = CheckMemory::map(params.block_count()) else {
        tracing::warn!(
            kib = params.block_count(),
            "cannot map memory for a password check"
        );
        return false;
    };
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    Argon2::new(algorithm, version.unwrap_or_default(), params)
        .hash_password_into_with_memory(password, salt, out, memory)
        .is_ok()
        // Output compares in constant time.
        && Output::new(out).is_ok_and(|o| o == expected)
}

/// Argon2's working memory for one check, mapped from the kernel and
/// unmapped when dropped. Through malloc, glibc keeps a freed block this
/// big in the arena of the thread that used it (its mmap threshold rises
/// past it), so checks spread over the blocking pool's threads left
/// 19 MiB resident per arena: 300 MiB after a few dozen wrong passwords.
struct CheckMemory {
    blocks: std::ptr::NonNull<argon2::Block>,
    len: usize,
}

impl CheckMemory {
    fn map(len: usize) -> Option<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<argon2::Block>())?;
        // SAFETY: a fresh private anonymous mapping, owned by this value
        // alone; nothing else aliases it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        Some(Self {
            blocks: std::ptr::NonNull::new(p.cast())?,
            len,
        })
    }
}

impl AsMut<[argon2::Block]> for CheckMemory {
    fn as_mut(&mut self) -> &mut [argon2::Block] {
        // SAFETY: the mapping holds `len` blocks, is page-aligned (more
        // than a block's 64 bytes) and zero-filled, and a block is plain
        // words, valid for any bits (all zeros is `Block::default()`).
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_ptr(), self.len) }
    }
}

impl Drop for CheckMemory {
    fn drop(&mut self) {
        let bytes = (self.len * std::mem::size_of::<argon2::Block>()).max(1);
        // SAFETY: unmaps exactly the mapping made in `map`, once.
        unsafe { libc::munmap(self.blocks.as_ptr().cast(), bytes) };
    }
}

// SAFETY: the mapping is owned, like a Vec's buffer.
unsafe impl Send for CheckMemory {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_filters_expand_their_own_name() {
        let devices = Devices::new(vec![Device {
            name: "s1".into(),
            password_hash: None,
            publish: vec!["sensors/{device}/#".into()],
            subscribe: vec!["commands/{device}/+".into()],
        }]);
        let p = devices.get("s1").unwrap();
        assert!(p.may_publish("sensors/s1/temp"));
        assert!(!p.may_publish("sensors/s2/temp"));
        assert!(p.may_subscribe("commands/s1/set"));
        assert!(p.may_subscribe("commands/s1/+"));
        assert!(!p.may_subscribe("commands/#"));
        assert!(!p.may_subscribe("commands/s2/set"));
    }

    #[test]
    fn passwords_verify_only_against_their_hash() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let hash = argon2::Argon2::default()
            .hash_password(b"secret", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password(&hash, b"secret"));
        assert!(!verify_password(&hash, b"Secret"));
        assert!(!verify_password("not a hash", b"secret"));
    }

    /// Our check (with its own memory) agrees with the crate's own
    /// `verify_password` for every algorithm, version and cost.
    #[test]
    fn the_check_agrees_with_argon2s_own_verification() {
        use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
        use argon2::{Algorithm, Argon2, Params, Version};
        let salt = SaltString::encode_b64(b"another salt 123").unwrap();
        for algorithm in [Algorithm::Argon2id, Algorithm::Argon2i, Algorithm::Argon2d] {
            for version in [Version::V0x10, Version::V0x13] {
                for (m, t, p, len) in [(64, 1, 1, 32), (256, 3, 2, 16), (19456, 2, 1, 64)] {
                    let params = Params::new(m, t, p, Some(len)).unwrap();
                    let hasher = Argon2::new(algorithm, version, params);
                    let hash = hasher.hash_password(b"pw", &salt).unwrap().to_string();
                    for guess in [&b"pw"[..], b"pW", b""] {
                        let theirs = Argon2::default()
                            .verify_password(guess, &PasswordHash::new(&hash).unwrap())
                            .is_ok();
                        assert_eq!(verify_password(&hash, guess), theirs, "{hash} {guess:?}");
                    }
                }
            }
        }
    }
}
