//! Bounded work before authentication: how many password checks (argon2,
//! memory-hard on purpose) run at once, how long a CONNECT may wait for
//! one, and the failure back-off per source address and per device that
//! refuses a guesser without hashing anything.

use crate::policy::verify_password;
use hashlink::LruCache;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The limits on logins, from the hub's flags.
#[derive(Clone, Debug)]
pub struct LoginLimits {
    /// Password checks that may run at once. Each holds the hash's memory
    /// cost (19 MiB for `roost passwd` hashes) while it runs.
    pub concurrency: usize,
    /// How long a CONNECT may wait for a password check before it is
    /// refused as busy (the server is busy: try again later).
    pub wait: Duration,
    /// Failed password checks a source address, or a device, may have
    /// before it must wait between tries; 0 turns the back-off off.
    pub backoff_after: u32,
    /// The longest wait between tries (the wait doubles from one second).
    pub backoff_max: Duration,
    /// Largest CONNECT packet, and over WebSocket the bytes a client may
    /// send before it has logged in. A CONNECT is a client id, a user
    /// name, a password and perhaps a will: a few hundred bytes; 64 KiB
    /// leaves room for a big will and MQTT 5 properties while a thousand
    /// half-sent CONNECTs hold under 64 MiB.
    pub max_connect_bytes: usize,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            concurrency: Self::default_concurrency(),
            wait: Duration::from_secs(5),
            backoff_after: 5,
            backoff_max: Duration::from_secs(60),
            max_connect_bytes: 64 << 10,
        }
    }
}

impl LoginLimits {
    /// One password check per core, at most 4: argon2 takes one core and
    /// its memory cost each, so more at once only adds memory, not
    /// throughput.
    pub fn default_concurrency() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    }
}

/// The first wait once the back-off starts; it doubles with each failure.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Source addresses and devices the back-off remembers. An entry is under
/// 200 bytes, so the table stays under a megabyte whatever the flood; past
/// it the least recently seen is forgotten.
const LEDGER_ENTRIES: usize = 4096;
/// Addresses from which a device last logged in, kept per device: a
/// device's own back-off does not apply to them, so strangers failing as
/// that device cannot lock it out.
const KNOWN_SOURCES: usize = 4;
/// At most one warning about refused logins per this period; the others
/// are counted into the next one (and logged at debug).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a login was refused: the `reason` label of
/// `roost_mqtt_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// The password check failed, or the device has a password and none was given.
    BadPassword,
    /// The user name is no deployed device.
    UnknownDevice,
    /// No user name and anonymous clients are not allowed.
    NoCredentials,
    /// The client certificate names no deployed device, or another user name.
    BadCertificate,
    /// An MQTT 5 authentication method the hub does not support.
    BadAuthMethod,
    /// The source address or the device is waiting out a back-off.
    Backoff,
    /// No password check came free within the wait.
    Busy,
}

impl AuthFailure {
    pub(crate) const ALL: [AuthFailure; 7] = [
        AuthFailure::BadPassword,
        AuthFailure::UnknownDevice,
        AuthFailure::NoCredentials,
        AuthFailure::BadCertificate,
        AuthFailure::BadAuthMethod,
        AuthFailure::Backoff,
        AuthFailure::Busy,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            AuthFailure::BadPassword => "bad_password",
            AuthFailure::UnknownDevice => "unknown_device",
            AuthFailure::NoCredentials => "no_credentials",
            AuthFailure::BadCertificate => "bad_certificate",
            AuthFailure::BadAuthMethod => "bad_auth_method",
            AuthFailure::Backoff => "backoff",
            AuthFailure::Busy => "busy",
        }
    }

    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every reason is in ALL")
    }
}

/// Where a login comes from, as the back-off counts it: an IPv4 address,
/// or an IPv6 /64 (one host's share of a network, which it can fill with
/// addresses of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Source(IpAddr);

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Source(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

/// Failed checks since the last success, and when the last one failed.
#[derive(Clone, Copy, Debug)]
struct Strikes {
    failures: u32,
    last: Instant,
}

impl Strikes {
    /// Until when tries must wait, if they must.
    fn until(&self, after: u32, max: Duration) -> Option<Instant> {
        if after == 0 || self.failures < after {
            return None;
        }
        let doublings = (self.failures - after).min(16);
        let wait = BACKOFF_BASE.saturating_mul(1 << doublings).min(max);
        Some(self.last + wait)
    }
}

#[derive(Debug)]
struct DeviceRecord {
    strikes: Option<Strikes>,
    known: VecDeque<Source>,
}

/// The back-off's memory: strikes per source and per device, bounded (the
/// least recently seen entry goes first). Pure: the time is passed in.
#[derive(Debug)]
pub(crate) struct Ledger {
    after: u32,
    max: Duration,
    sources: LruCache<Source, Strikes>,
    devices: LruCache<String, DeviceRecord>,
}

impl Ledger {
    pub(crate) fn new(after: u32, max: Duration, entries: usize) -> Self {
        Self {
            after,
            max,
            sources: LruCache::new(entries.max(1)),
            devices: LruCache::new(entries.max(1)),
        }
    }

    /// Strikes older than this are forgotten: the back-off has long run
    /// out, and the next failure starts afresh.
    fn forget_after(&self) -> Duration {
        self.max.saturating_mul(2).max(BACKOFF_BASE * 60)
    }

    fn live(&self, s: Option<Strikes>, now: Instant) -> Option<Strikes> {
        s.filter(|s| now.saturating_duration_since(s.last) < self.forget_after())
    }

    /// Until when `source` must wait before trying `device` again, if it
    /// must: its own back-off, or the device's unless the device logged
    /// in from there before.
    pub(crate) fn backed_off(&self, source: Source, device: &str, now: Instant) -> Option<Instant> {
        let by_source = self
            .live(self.sources.peek(&source).copied(), now)
            .and_then(|s| s.until(self.after, self.max));
        let by_device = self.devices.peek(device).and_then(|d| {
            if d.known.contains(&source) {
                return None;
            }
            self.live(d.strikes, now)
                .and_then(|s| s.until(self.after, self.max))
        });
        by_source.max(by_device).filter(|t| *t > now)
    }

    /// Whether `device` has logged in from `source` (lately).
    pub(crate) fn known(&self, source: Source, device: &str) -> bool {
        self.devices
            .peek(device)
            .is_some_and(|d| d.known.contains(&source))
    }

    pub(crate) fn failed(&mut self, source: Source, device: &str, now: Instant) {
        let bump = |s: Option<Strikes>| Strikes {
            failures: s.map_or(0, |s| s.failures).saturating_add(1),
            last: now,
        };
        let s = self.sources.get(&source).copied();
        let s = self.live(s, now);
        self.sources.insert(source, bump(s));
        let d = self.devices.get(device).and_then(|d| d.strikes);
        let d = self.live(d, now);
        match self.devices.get_mut(device) {
            Some(r) => r.strikes = Some(bump(d)),
            None => {
                self.devices.insert(
                    device.to_owned(),
                    DeviceRecord {
                        strikes: Some(bump(None)),
                        known: VecDeque::new(),
                    },
                );
            }
        }
    }

    pub(crate) fn succeeded(&mut self, source: Source, device: &str) {
        self.sources.remove(&source);
        let r = match self.devices.get_mut(device) {
            Some(r) => r,
            None => {
                self.devices.insert(
                    device.to_owned(),
                    DeviceRecord {
                        strikes: None,
                        known: VecDeque::new(),
                    },
                );
                self.devices.get_mut(device).expect("just inserted")
            }
        };
        r.strikes = None;
        r.known.retain(|s| *s != source);
        r.known.push_front(source);
        r.known.truncate(KNOWN_SOURCES);
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.sources.len(), self.devices.len())
    }
}

/// The broker's login gate: the password-check slots, the back-off
/// ledger, the refusal counts and their rate-limited log.
pub(crate) struct Logins {
    limits: LoginLimits,
    checks: Arc<Semaphore>,
    /// What a login not known for its device passes before it may queue
    /// for `checks`: at most `concurrency` such logins are in the checks'
    /// queue, so a device logging in from an address it used before waits
    /// behind a check or two, never behind a whole flood.
    strangers: Semaphore,
    ledger: Mutex<Ledger>,
    refused: [AtomicU64; AuthFailure::ALL.len()],
    log: RefusalLog,
}

impl Logins {
    pub(crate) fn new(limits: LoginLimits) -> Self {
        Self {
            checks: Arc::new(Semaphore::new(limits.concurrency.max(1))),
            strangers: Semaphore::new(limits.concurrency.max(1)),
            ledger: Mutex::new(Ledger::new(
                limits.backoff_after,
                limits.backoff_max,
                LEDGER_ENTRIES,
            )),
            limits,
            refused: Default::default(),
            log: RefusalLog::default(),
        }
    }

    /// Checks `password` for `device` from `source`: refused without a
    /// check while either is in back-off or when no check comes free in
    /// time; a failed check counts towards both back-offs.
    pub(crate) async fn check_password(
        &self,
        source: IpAddr,
        device: &str,
        hash: String,
        password: Vec<u8>,
    ) -> Result<(), AuthFailure> {
        let source = Source::of(source);
        let known = {
            let ledger = self.ledger.lock();
            if ledger.backed_off(source, device, Instant::now()).is_some() {
                return Err(AuthFailure::Backoff);
            }
            ledger.known(source, device)
        };
        let deadline = tokio::time::Instant::now() + self.limits.wait;
        let _stranger = match known {
            true => None,
            false => Some(
                tokio::time::timeout_at(deadline, self.strangers.acquire())
                    .await
                    .map_err(|_| AuthFailure::Busy)?
                    .map_err(|_| AuthFailure::Busy)?,
            ),
        };
        let permit = tokio::time::timeout_at(deadline, self.checks.clone().acquire_owned())
            .await
            .map_err(|_| AuthFailure::Busy)?
            .map_err(|_| AuthFailure::Busy)?;
        // Others may have failed as this device, or from this address,
        // while this one waited: no check for it then either.
        if self
            .ledger
            .lock()
            .backed_off(source, device, Instant::now())
            .is_some()
        {
            return Err(AuthFailure::Backoff);
        }
        // The permit goes with the check: a client that hangs up while it
        // runs does not free its slot before the memory is.
        let ok = tokio::task::spawn_blocking(move || {
            let ok = verify_password(&hash, &password);
            drop(permit);
            ok
        })
        .await
        .unwrap_or(false);
        let mut ledger = self.ledger.lock();
        if ok {
            ledger.succeeded(source, device);
            Ok(())
        } else {
            ledger.failed(source, device, Instant::now());
            Err(AuthFailure::BadPassword)
        }
    }

    /// Counts and logs a refused login.
    pub(crate) fn refused(
        &self,
        reason: AuthFailure,
        peer: SocketAddr,
        device: Option<&str>,
        why: &str,
    ) {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.log.note(reason, peer, device, why);
    }

    /// Refused logins so far, by reason.
    pub(crate) fn refusals(&self) -> impl Iterator<Item = (AuthFailure, u64)> + '_ {
        AuthFailure::ALL
            .into_iter()
            .map(|r| (r, self.refused[r.index()].load(Ordering::Relaxed)))
    }
}

/// One warning per `LOG_EVERY` at most, saying how many were left out:
/// a flood of bad logins must not become a flood of log lines. (Written
/// here: it is a few lines, and a rate-limiting crate would be more.)
#[derive(Default)]
struct RefusalLog {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    fn note(&self, reason: AuthFailure, peer: SocketAddr, device: Option<&str>, why: &str) {
        let device = device.unwrap_or("");
        let mut st = self.state.lock();
        let due = st.0.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if !due {
            st.1 += 1;
            drop(st);
            tracing::debug!(%peer, device, reason = reason.label(), "refused an MQTT login: {why}");
            return;
        }
        let suppressed = std::mem::take(&mut st.1);
        st.0 = Some(Instant::now());
        drop(st);
        tracing::warn!(
            %peer,
            device,
            reason = reason.label(),
            refused_since_last_warning = suppressed,
            "refused an MQTT login: {why} (roost_mqtt_auth_failures_total counts them all; at most one warning per {}s)",
            LOG_EVERY.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Source {
        Source::of(s.parse().unwrap())
    }

    #[test]
    fn a_source_backs_off_after_its_free_failures_and_the_wait_doubles() {
        let mut l = Ledger::new(3, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        let a = ip("10.0.0.2");
        for _ in 0..3 {
            assert!(l.backed_off(a, "d", t0).is_none());
            l.failed(a, "d", t0);
        }
        assert_eq!(l.backed_off(a, "d", t0), Some(t0 + Duration::from_secs(1)));
        assert!(l.backed_off(a, "d", t0 + Duration::from_secs(1)).is_none());
        l.failed(a, "d", t0 + Duration::from_secs(1));
        assert_eq!(
            l.backed_off(a, "other", t0 + Duration::from_secs(1)),
            Some(t0 + Duration::from_secs(3)),
            "the source's own back-off covers every device"
        );
        for _ in 0..30 {
            l.failed(a, "d", t0 + Duration::from_secs(2));
        }
        assert_eq!(
            l.backed_off(a, "x", t0 + Duration::from_secs(2)),
            Some(t0 + Duration::from_secs(62)),
            "capped at the maximum"
        );
    }

    #[test]
    fn strangers_failing_as_a_device_do_not_lock_out_its_known_address() {
        let mut l = Ledger::new(2, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        let home = ip("10.0.0.1");
        l.succeeded(home, "sensor");
        for i in 0..10 {
            l.failed(ip(&format!("10.0.1.{i}")), "sensor", t0);
        }
        assert!(
            l.backed_off(ip("10.0.2.1"), "sensor", t0).is_some(),
            "a new stranger waits"
        );
        assert!(
            l.backed_off(home, "sensor", t0).is_none(),
            "the device's own address does not"
        );
        assert!(
            l.backed_off(ip("10.0.2.1"), "other", t0).is_none(),
            "other devices are untouched"
        );
        // A success clears the device's strikes for everyone.
        l.succeeded(home, "sensor");
        assert!(l.backed_off(ip("10.0.2.1"), "sensor", t0).is_none());
    }

    #[test]
    fn a_success_clears_the_source_and_old_strikes_are_forgotten() {
        let mut l = Ledger::new(1, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        let a = ip("10.0.0.2");
        l.failed(a, "d", t0);
        assert!(l.backed_off(a, "d", t0).is_some());
        l.succeeded(a, "d");
        assert!(l.backed_off(a, "d", t0).is_none());
        l.failed(a, "d", t0);
        l.failed(a, "d", t0);
        let later = t0 + Duration::from_secs(3600);
        assert!(l.backed_off(a, "d", later).is_none());
        l.failed(a, "d", later);
        assert_eq!(
            l.backed_off(a, "d", later),
            Some(later + Duration::from_secs(1)),
            "a forgotten history starts again at the first wait"
        );
    }

    #[test]
    fn zero_free_failures_turns_the_back_off_off() {
        let mut l = Ledger::new(0, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for _ in 0..100 {
            l.failed(ip("10.0.0.2"), "d", t0);
        }
        assert!(l.backed_off(ip("10.0.0.2"), "d", t0).is_none());
    }

    #[test]
    fn the_ledger_stays_bounded_whatever_the_flood() {
        let mut l = Ledger::new(1, Duration::from_secs(60), 64);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let [a, b, c, d] = i.to_be_bytes();
            let src = Source::of(IpAddr::from([10 + a, b, c, d]));
            l.failed(src, &format!("device-{}", i % 500), t0);
        }
        assert_eq!(l.len(), (64, 64));
        // The newest are remembered.
        assert!(l
            .backed_off(Source::of(IpAddr::from([10, 0, 39, 15])), "x", t0)
            .is_some());
    }

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64_and_mapped_v4_as_v4() {
        assert_eq!(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff::9"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:10.0.0.7"), ip("10.0.0.7"));
    }

    #[tokio::test]
    async fn a_source_in_back_off_is_refused_without_a_password_check() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let hash = argon2::Argon2::default()
            .hash_password(b"secret", &salt)
            .unwrap()
            .to_string();
        let logins = Logins::new(LoginLimits {
            backoff_after: 2,
            ..LoginLimits::default()
        });
        let from: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            assert_eq!(
                logins
                    .check_password(from, "d", hash.clone(), b"wrong".to_vec())
                    .await,
                Err(AuthFailure::BadPassword)
            );
        }
        // Even the right password: no check runs while it waits.
        let started = Instant::now();
        assert_eq!(
            logins
                .check_password(from, "d", hash.clone(), b"secret".to_vec())
                .await,
            Err(AuthFailure::Backoff)
        );
        assert!(started.elapsed() < Duration::from_millis(5));
        let home: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            logins
                .check_password(home, "e", hash.clone(), b"secret".to_vec())
                .await,
            Ok(())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_at_a_known_address_waits_behind_a_check_not_behind_the_flood() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        use std::sync::atomic::AtomicUsize;
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let hash = argon2::Argon2::default()
            .hash_password(b"secret", &salt)
            .unwrap()
            .to_string();
        let logins = Arc::new(Logins::new(LoginLimits {
            concurrency: 1,
            wait: Duration::from_secs(60),
            backoff_after: 0,
            ..LoginLimits::default()
        }));
        let home: IpAddr = "10.0.0.1".parse().unwrap();
        let own = |p: &[u8]| logins.check_password(home, "sensor", hash.clone(), p.to_vec());
        assert_eq!(own(b"secret").await, Ok(()));
        let done = Arc::new(AtomicUsize::new(0));
        let flood: Vec<_> = (0..12)
            .map(|i| {
                let (logins, hash, done) = (logins.clone(), hash.clone(), done.clone());
                tokio::spawn(async move {
                    let from = IpAddr::from([10, 0, 1, i as u8]);
                    let r = logins
                        .check_password(from, &format!("d{i}"), hash, b"guess".to_vec())
                        .await;
                    done.fetch_add(1, Ordering::SeqCst);
                    r
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(own(b"secret").await, Ok(()));
        let ahead = done.load(Ordering::SeqCst);
        assert!(ahead <= 2, "{ahead} strangers' checks went first");
        for f in flood {
            assert_eq!(f.await.unwrap(), Err(AuthFailure::BadPassword));
        }
    }

    #[tokio::test]
    async fn a_check_that_does_not_come_free_in_time_is_busy() {
        let logins = Arc::new(Logins::new(LoginLimits {
            concurrency: 1,
            wait: Duration::from_millis(50),
            ..LoginLimits::default()
        }));
        let held = logins.checks.clone().acquire_owned().await.unwrap();
        assert_eq!(
            logins
                .check_password("10.0.0.2".parse().unwrap(), "d", "x".into(), b"p".to_vec())
                .await,
            Err(AuthFailure::Busy)
        );
        drop(held);
    }
}
