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
/// off the async threads.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password, &h)
                .is_ok()
        })
        .unwrap_or(false)
}

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
}
