//! Retained messages: kept in topic order (for the data plane's listing),
//! indexed by a topic tree (so a SUBSCRIBE finds its matches without a
//! scan), and bounded per device and in total, by count and by bytes.

use crate::{Message, QoS};
use roost_topic::TopicTree;
use std::collections::{BTreeMap, HashMap};

/// How many retained messages, and how many bytes of them, may be kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Retained messages one device (or, for a client with no device, one
    /// client id) may keep.
    pub per_device: usize,
    /// Bytes (topics, payloads and properties) of one device's retained messages.
    pub per_device_bytes: usize,
    /// Retained messages kept in all.
    pub total: usize,
    /// Bytes of all retained messages.
    pub total_bytes: usize,
}

impl Default for RetainedLimits {
    fn default() -> Self {
        Self {
            per_device: 1_000,
            per_device_bytes: 8 << 20,
            total: 100_000,
            total_bytes: 128 << 20,
        }
    }
}

/// Which limit a refused retained message would have passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetainedLimit {
    /// The publishing device's count or bytes.
    Device,
    /// The broker's count or bytes in all.
    Total,
}

impl RetainedLimit {
    pub fn label(self) -> &'static str {
        match self {
            RetainedLimit::Device => "device",
            RetainedLimit::Total => "total",
        }
    }
}

/// A retained message with when it was kept, who owns it, and its size as
/// counted against the limits.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub message: Message,
    /// When it was retained (wall clock, ms).
    pub at: i64,
    /// The device (or client id) whose quota it counts against; none: the
    /// hub's own (the owner's data-plane publishes, tasks), which counts
    /// against the total only.
    pub owner: Option<String>,
    pub bytes: usize,
}

#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    count: usize,
    bytes: usize,
    /// Whether a refusal was logged since the owner last got one in: a
    /// flood of refusals logs once, not once per message.
    warned: bool,
}

/// The size of a retained message as counted against the limits.
pub(crate) fn size_of(topic: &str, payload: usize, properties: usize) -> usize {
    topic.len() + payload + properties
}

#[derive(Debug, Default)]
pub(crate) struct RetainedStore {
    /// In topic order, so `ListRetainedMessages` pages without sorting.
    pub by_topic: BTreeMap<String, Entry>,
    /// The same topics, level by level, for SUBSCRIBE.
    index: TopicTree<()>,
    by_owner: HashMap<String, Usage>,
    total: Usage,
    pub limits: RetainedLimits,
}

impl RetainedStore {
    pub fn new(limits: RetainedLimits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    pub fn bytes(&self) -> usize {
        self.total.bytes
    }

    pub fn get(&self, topic: &str) -> Option<&Entry> {
        self.by_topic.get(topic)
    }

    /// Whether `entry` may replace what `entry.topic` holds now; which limit
    /// it would pass if not. The hub's own messages are never refused (the
    /// owner and the tasks the owner deployed make them), but they count
    /// against the total, so a hub that holds many leaves devices less.
    pub fn admits(&self, entry: &Entry) -> Result<(), RetainedLimit> {
        let old = self.by_topic.get(&entry.message.topic);
        let Some(owner) = &entry.owner else {
            return Ok(());
        };
        let freed = |same_owner: bool| match old {
            Some(o) if !same_owner || o.owner.as_ref() == Some(owner) => (1, o.bytes),
            _ => (0, 0),
        };
        let usage = self.by_owner.get(owner).copied().unwrap_or_default();
        let (n, b) = freed(false);
        let (total_n, total_b) = (self.total.count - n + 1, self.total.bytes - b + entry.bytes);
        let (n, b) = freed(true);
        let (own_n, own_b) = (usage.count - n + 1, usage.bytes - b + entry.bytes);
        if own_n > self.limits.per_device || own_b > self.limits.per_device_bytes {
            return Err(RetainedLimit::Device);
        }
        // A message no bigger than the one it replaces is always let in:
        // it takes nothing more.
        let grows = total_n > self.total.count || total_b > self.total.bytes;
        if grows && (total_n > self.limits.total || total_b > self.limits.total_bytes) {
            return Err(RetainedLimit::Total);
        }
        Ok(())
    }

    /// Whether a refusal of `owner`'s message for passing `limit` should be
    /// logged: the first since a message of theirs (or, for the total, any
    /// message) last got in.
    pub fn first_refusal(&mut self, owner: Option<&str>, limit: RetainedLimit) -> bool {
        let usage = match (limit, owner) {
            (RetainedLimit::Device, Some(o)) => match self.by_owner.get_mut(o) {
                Some(u) => u,
                // It keeps nothing (a single message over its bytes):
                // nothing to remember it by.
                None => return true,
            },
            _ => &mut self.total,
        };
        !std::mem::replace(&mut usage.warned, true)
    }

    /// Keeps `entry` (already admitted), replacing its topic's message.
    pub fn insert(&mut self, entry: Entry) {
        self.remove(&entry.message.topic);
        self.index.insert(&entry.message.topic, ());
        self.count(entry.owner.as_deref(), 1, entry.bytes as isize);
        if let Some(o) = &entry.owner {
            if let Some(u) = self.by_owner.get_mut(o) {
                u.warned = false;
            }
        }
        self.total.warned = false;
        self.by_topic.insert(entry.message.topic.clone(), entry);
    }

    /// Forgets `topic`'s retained message, if any.
    pub fn remove(&mut self, topic: &str) -> Option<Entry> {
        let old = self.by_topic.remove(topic)?;
        self.index.remove(topic);
        self.count(old.owner.as_deref(), -1, -(old.bytes as isize));
        Some(old)
    }

    fn count(&mut self, owner: Option<&str>, n: isize, bytes: isize) {
        let apply = |u: &mut Usage| {
            u.count = u.count.saturating_add_signed(n);
            u.bytes = u.bytes.saturating_add_signed(bytes);
        };
        apply(&mut self.total);
        if let Some(o) = owner {
            let u = self.by_owner.entry(o.to_owned()).or_default();
            apply(u);
            if u.count == 0 {
                self.by_owner.remove(o);
            }
        }
    }

    /// Up to `limit` unexpired retained messages `filter` matches, after
    /// `after` (the last topic of the previous chunk), each at no more than
    /// `qos` and flagged retained; and the last topic looked at (none: no
    /// more follow). Costs the size of the chunk, not the number of
    /// retained messages.
    pub fn chunk(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        qos: QoS,
    ) -> (Vec<Message>, Option<String>) {
        let mut found = Vec::new();
        self.index.matching(filter, after, limit, &mut found);
        let more = found.len() == limit;
        let now = std::time::Instant::now();
        let last = more.then(|| found.last().map(|(t, _)| t.clone())).flatten();
        let messages = found
            .iter()
            .filter_map(|(t, _)| self.by_topic.get(t))
            .filter(|e| e.message.expires_at.is_none_or(|t| t > now))
            .map(|e| {
                let mut m = e.message.clone();
                m.qos = m.qos.min(qos);
                m.retain = true;
                m
            })
            .collect();
        (messages, last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(topic: &str, payload: usize, owner: Option<&str>) -> Entry {
        let mut message = Message::from_hub(topic, Bytes::from(vec![b'x'; payload]));
        message.retain = true;
        Entry {
            bytes: size_of(topic, payload, 0),
            message,
            at: 0,
            owner: owner.map(str::to_owned),
        }
    }

    fn store(per_device: usize, total: usize) -> RetainedStore {
        RetainedStore::new(RetainedLimits {
            per_device,
            per_device_bytes: 1000,
            total,
            total_bytes: 10_000,
        })
    }

    #[test]
    fn a_device_keeps_up_to_its_quota_and_may_still_replace_its_own() {
        let mut s = store(2, 100);
        for t in ["d/1", "d/2"] {
            let e = entry(t, 10, Some("d"));
            assert_eq!(s.admits(&e), Ok(()));
            s.insert(e);
        }
        assert_eq!(
            s.admits(&entry("d/3", 10, Some("d"))),
            Err(RetainedLimit::Device)
        );
        // Replacing one of its own topics takes nothing more.
        assert_eq!(s.admits(&entry("d/1", 10, Some("d"))), Ok(()));
        // Another device has its own quota.
        assert_eq!(s.admits(&entry("e/1", 10, Some("e"))), Ok(()));
        // Bytes count too: 3 + 990 past 1000 with d/2 still there.
        assert_eq!(
            s.admits(&entry("d/1", 990, Some("d"))),
            Err(RetainedLimit::Device)
        );
        // Clearing gives the quota back.
        s.remove("d/2");
        assert_eq!(s.admits(&entry("d/3", 10, Some("d"))), Ok(()));
        assert!(s.first_refusal(Some("d"), RetainedLimit::Device));
        assert!(!s.first_refusal(Some("d"), RetainedLimit::Device));
        s.insert(entry("d/3", 10, Some("d")));
        assert!(
            s.first_refusal(Some("d"), RetainedLimit::Device),
            "logs again after a message got in"
        );
    }

    #[test]
    fn the_hub_counts_against_the_total_and_is_never_refused() {
        let mut s = store(10, 2);
        s.insert(entry("h/1", 10, None));
        s.insert(entry("h/2", 10, None));
        assert_eq!(s.admits(&entry("h/3", 10, None)), Ok(()));
        assert_eq!(
            s.admits(&entry("d/1", 10, Some("d"))),
            Err(RetainedLimit::Total)
        );
        s.insert(entry("h/3", 10, None));
        assert_eq!((s.len(), s.bytes()), (3, 39));
        // A device may replace a message with one no bigger, even past the total.
        assert_eq!(s.admits(&entry("h/1", 10, Some("d"))), Ok(()));
        s.insert(entry("h/1", 10, Some("d")));
        assert_eq!(s.by_owner["d"].count, 1);
        s.remove("h/1");
        assert!(
            !s.by_owner.contains_key("d"),
            "an owner with nothing left is forgotten"
        );
    }

    #[test]
    fn a_subscribe_takes_its_matches_in_chunks() {
        let mut s = store(1000, 1000);
        for i in 0..10 {
            s.insert(entry(&format!("a/{i}"), 1, None));
        }
        s.insert(entry("b/0", 1, None));
        let mut got = Vec::new();
        let mut after = None;
        loop {
            let (chunk, last) = s.chunk("a/+", after.as_deref(), 3, QoS::AtMostOnce);
            assert!(chunk.len() <= 3);
            got.extend(chunk.into_iter().map(|m| (m.topic, m.qos, m.retain)));
            match last {
                Some(l) => after = Some(l),
                None => break,
            }
        }
        let want: Vec<_> = (0..10)
            .map(|i| (format!("a/{i}"), QoS::AtMostOnce, true))
            .collect();
        assert_eq!(got, want);
    }
}
