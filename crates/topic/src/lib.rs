//! MQTT topic rules: which topic names and filters are valid (MQTT 4.7),
//! whether a filter matches a topic or lies within another filter, and the
//! subscription trie that finds every filter matching a topic, and the
//! topic tree that finds every topic (a retained message's) a filter matches.
//!
//! The broker, the manifest checker and the route table all apply these
//! rules, so they live here, with no dependencies, and a change to them
//! touches this crate only.
//!
//! Matching is a walk down a trie of filter levels (one branch per literal
//! level, one for `+`, and subscribers of `#` kept at the node they hang
//! from), so publishing costs the depth of the topic, not the number of
//! subscriptions.

use std::collections::{BTreeMap, HashMap};

/// Longest topic or filter accepted (the protocol's UTF-8 string limit).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Most levels a topic or filter may have. The protocol sets none; the
/// tries are walked level by level, recursively, so a topic of tens of
/// thousands of empty levels (`////...`, within the length limit) would
/// overflow the stack. AWS IoT allows 8 levels; this is far more than any
/// real topic needs.
pub const MAX_TOPIC_LEVELS: usize = 128;

fn levels_within_limit(t: &str) -> bool {
    t.bytes().filter(|&b| b == b'/').count() < MAX_TOPIC_LEVELS
}

/// A topic a message is published to: no wildcards, no NUL, not empty, at
/// most `MAX_TOPIC_LEVELS` levels.
pub fn valid_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TOPIC_LEN
        && !t.contains(['+', '#', '\0'])
        && levels_within_limit(t)
}

/// A subscription filter: `+` fills a whole level, `#` only the whole last
/// level; at most `MAX_TOPIC_LEVELS` levels.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() || f.len() > MAX_TOPIC_LEN || f.contains('\0') || !levels_within_limit(f) {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether `topic` matches `filter`; wildcards at the first level do not
/// match topics starting with `$` (MQTT 4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `inner` matches is also matched by `outer` (used to
/// check a SUBSCRIBE against a device's allowed filters).
pub fn filter_within(inner: &str, outer: &str) -> bool {
    let mut i = inner.split('/');
    let mut o = outer.split('/');
    loop {
        match (i.next(), o.next()) {
            (_, Some("#")) => return true,
            (Some("#"), _) => return false,
            (Some(_), Some("+")) => {}
            (Some("+"), Some(_)) => return false,
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[derive(Debug)]
struct Node<V> {
    children: HashMap<String, Node<V>>,
    plus: Option<Box<Node<V>>>,
    /// Subscribers whose filter ends here.
    here: HashMap<String, V>,
    /// Subscribers whose filter ends with `#` right below here.
    hash: HashMap<String, V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            plus: None,
            here: HashMap::new(),
            hash: HashMap::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.here.is_empty()
            && self.hash.is_empty()
    }
}

/// Subscriptions: filter → (subscriber key → value).
#[derive(Debug)]
pub struct Trie<V> {
    root: Node<V>,
    len: usize,
}

impl<V> Default for Trie<V> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V: Clone> Trie<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `key`'s subscription to `filter` (a valid filter).
    pub fn insert(&mut self, filter: &str, key: &str, value: V) {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                if node.hash.insert(key.to_owned(), value).is_none() {
                    self.len += 1;
                }
                return;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.to_owned()).or_default()
            };
            if levels.peek().is_none() {
                if node.here.insert(key.to_owned(), value).is_none() {
                    self.len += 1;
                }
                return;
            }
        }
    }

    /// Removes `key`'s subscription to `filter`; true if there was one.
    pub fn remove(&mut self, filter: &str, key: &str) -> bool {
        fn walk<V>(node: &mut Node<V>, levels: &[&str], key: &str) -> bool {
            let Some((first, rest)) = levels.split_first() else {
                return node.here.remove(key).is_some();
            };
            if *first == "#" {
                return node.hash.remove(key).is_some();
            }
            let removed;
            if *first == "+" {
                let Some(child) = node.plus.as_mut() else {
                    return false;
                };
                removed = walk(child, rest, key);
                if child.is_empty() {
                    node.plus = None;
                }
            } else {
                let Some(child) = node.children.get_mut(*first) else {
                    return false;
                };
                removed = walk(child, rest, key);
                if child.is_empty() {
                    node.children.remove(*first);
                }
            }
            removed
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = walk(&mut self.root, &levels, key);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Every (key, value) whose filter matches `topic`; a key subscribed
    /// through several filters appears once per filter.
    pub fn matching(&self, topic: &str, out: &mut Vec<(String, V)>) {
        fn walk<V: Clone>(
            node: &Node<V>,
            levels: &[&str],
            first: bool,
            dollar: bool,
            out: &mut Vec<(String, V)>,
        ) {
            let wild_ok = !(first && dollar);
            if wild_ok {
                out.extend(node.hash.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            let Some((level, rest)) = levels.split_first() else {
                out.extend(node.here.iter().map(|(k, v)| (k.clone(), v.clone())));
                return;
            };
            if let Some(child) = node.children.get(*level) {
                walk(child, rest, false, dollar, out);
            }
            if wild_ok {
                if let Some(child) = &node.plus {
                    walk(child, rest, false, dollar, out);
                }
            }
        }
        let levels: Vec<&str> = topic.split('/').collect();
        walk(&self.root, &levels, true, topic.starts_with('$'), out);
    }
}

/// Topic names (retained messages' topics), one node per level, so the
/// topics a filter matches are found by walking the filter's levels: the
/// work is the size of the answer and the filter's depth, not the number of
/// topics held. Children are kept in order, so a walk visits topics in
/// level order (level by level, each compared as a string) and can go on
/// after the last topic of an earlier walk.
#[derive(Debug)]
pub struct TopicTree<V> {
    root: TopicNode<V>,
    len: usize,
}

#[derive(Debug)]
struct TopicNode<V> {
    children: BTreeMap<String, TopicNode<V>>,
    /// The value of the topic that ends here.
    value: Option<V>,
}

impl<V> Default for TopicNode<V> {
    fn default() -> Self {
        Self {
            children: BTreeMap::new(),
            value: None,
        }
    }
}

impl<V> Default for TopicTree<V> {
    fn default() -> Self {
        Self {
            root: TopicNode::default(),
            len: 0,
        }
    }
}

impl<V> TopicTree<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets `topic`'s value (a valid topic name); the old one, if any.
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.to_owned()).or_default();
        }
        let old = node.value.replace(value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.value.as_ref()
    }

    /// Removes `topic` (and the levels only it used); its value, if any.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        fn walk<V>(node: &mut TopicNode<V>, levels: &[&str]) -> Option<V> {
            let Some((first, rest)) = levels.split_first() else {
                return node.value.take();
            };
            let child = node.children.get_mut(*first)?;
            let old = walk(child, rest);
            if child.value.is_none() && child.children.is_empty() {
                node.children.remove(*first);
            }
            old
        }
        let levels: Vec<&str> = topic.split('/').collect();
        let old = walk(&mut self.root, &levels);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Up to `limit` (topic, value) that `filter` (a valid filter) matches,
    /// in level order, after `after` (the last topic of an earlier walk
    /// with the same filter) if given. Fewer than `limit`: there are no
    /// more. Leading wildcards skip `$` topics (MQTT 4.7.2).
    pub fn matching<'a>(
        &'a self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        out: &mut Vec<(String, &'a V)>,
    ) {
        let filter: Vec<&str> = filter.split('/').collect();
        let after: Option<Vec<&str>> = after.map(|a| a.split('/').collect());
        let mut path = Vec::new();
        let mut walk = Walk { limit, out };
        walk.filter(&self.root, &filter, after.as_deref(), true, &mut path);
    }
}

/// One `TopicTree::matching` walk: where it stops and what it found.
struct Walk<'o, 'a, V> {
    limit: usize,
    out: &'o mut Vec<(String, &'a V)>,
}

impl<'a, V> Walk<'_, 'a, V> {
    fn full(&self) -> bool {
        self.out.len() >= self.limit
    }

    /// Children of `node` in order, skipping those before `after`'s next
    /// level; each with what is left of `after` below it (none: the whole
    /// child comes after it).
    fn children<'n, 'l>(
        node: &'n TopicNode<V>,
        after: Option<&'l [&'l str]>,
    ) -> impl Iterator<Item = (&'n String, &'n TopicNode<V>, Option<&'l [&'l str]>)> {
        let first = after.and_then(|a| a.first().copied());
        let range = match first {
            Some(f) => node
                .children
                .range::<str, _>((std::ops::Bound::Included(f), std::ops::Bound::Unbounded)),
            None => node.children.range::<str, _>(..),
        };
        range.map(move |(level, child)| {
            let below = match (first, after) {
                (Some(f), Some(a)) if level == f => Some(&a[1..]),
                _ => None,
            };
            (level, child, below)
        })
    }

    /// Matches `filter`'s remaining levels below `node`. `after`: the part
    /// of the resume point below this node (its own topic, a prefix of the
    /// resume point, was already given).
    fn filter(
        &mut self,
        node: &'a TopicNode<V>,
        filter: &[&str],
        after: Option<&[&str]>,
        first: bool,
        path: &mut Vec<&'a str>,
    ) {
        if self.full() {
            return;
        }
        let Some((level, rest)) = filter.split_first() else {
            if after.is_none() {
                self.emit(node, path);
            }
            return;
        };
        match *level {
            "#" => {
                // `a/#` matches `a` itself too (MQTT 4.7.1.2).
                if !first && after.is_none() {
                    self.emit(node, path);
                }
                self.subtree(node, after, first, path);
            }
            "+" => {
                for (l, child, below) in Self::children(node, after) {
                    if first && l.starts_with('$') {
                        continue;
                    }
                    path.push(l);
                    self.filter(child, rest, below, false, path);
                    path.pop();
                    if self.full() {
                        return;
                    }
                }
            }
            literal => {
                let below = match after {
                    None => None,
                    Some(a) => match a.first() {
                        Some(f) if *f == literal => Some(&a[1..]),
                        Some(f) if *f > literal => return,
                        _ => None,
                    },
                };
                if let Some((l, child)) = node.children.get_key_value(literal) {
                    path.push(l);
                    self.filter(child, rest, below, false, path);
                    path.pop();
                }
            }
        }
    }

    /// Every topic below `node` (not `node` itself), in order.
    fn subtree(
        &mut self,
        node: &'a TopicNode<V>,
        after: Option<&[&str]>,
        first: bool,
        path: &mut Vec<&'a str>,
    ) {
        for (l, child, below) in Self::children(node, after) {
            if first && l.starts_with('$') {
                continue;
            }
            path.push(l);
            if below.is_none() {
                self.emit(child, path);
            }
            if !self.full() {
                self.subtree(child, below, false, path);
            }
            path.pop();
            if self.full() {
                return;
            }
        }
    }

    fn emit(&mut self, node: &'a TopicNode<V>, path: &[&str]) {
        if let Some(v) = &node.value {
            if !self.full() {
                self.out.push((path.join("/"), v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters_are_validated() {
        assert!(valid_topic_name("a/b"));
        assert!(valid_topic_name("/"));
        for bad in ["", "a/+", "a/#", "a\0b"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
        for ok in ["#", "+", "a/+/c", "a/#", "+/+", "/#"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a+", "a/b#", "#/a", "a/++"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn wildcards_match_as_the_spec_says() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(!matches("a/b", "a/b/c"));
    }

    #[test]
    fn filter_containment_is_conservative() {
        assert!(filter_within("sensors/s1/temp", "sensors/s1/#"));
        assert!(filter_within("sensors/s1/#", "sensors/s1/#"));
        assert!(filter_within("sensors/+/temp", "sensors/#"));
        assert!(!filter_within("sensors/#", "sensors/s1/#"));
        assert!(!filter_within("sensors/+/temp", "sensors/s1/+"));
        assert!(!filter_within("#", "sensors/#"));
    }

    #[test]
    fn the_trie_finds_exactly_the_matching_subscriptions() {
        let mut t = Trie::default();
        let subs = ["a/b", "a/+", "a/#", "#", "+/b", "a/b/c", "$SYS/#"];
        for (i, f) in subs.iter().enumerate() {
            t.insert(f, &format!("c{i}"), i);
        }
        assert_eq!(t.len(), subs.len());
        for topic in ["a/b", "a", "a/b/c", "x/b", "$SYS/load", "b"] {
            let mut got: Vec<usize> = Vec::new();
            let mut out = Vec::new();
            t.matching(topic, &mut out);
            got.extend(out.into_iter().map(|(_, v)| v));
            got.sort();
            let want: Vec<usize> = subs
                .iter()
                .enumerate()
                .filter(|(_, f)| matches(f, topic))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(got, want, "topic {topic}");
        }
        assert!(t.remove("a/+", "c1"));
        assert!(!t.remove("a/+", "c1"));
        assert_eq!(t.len(), subs.len() - 1);
    }

    #[test]
    fn empty_levels_are_levels() {
        // "a//b" has an empty middle level: valid, and only `+` or an empty
        // literal level fills it.
        assert!(valid_topic_name("a//b"));
        assert!(valid_topic_name("a/"));
        assert!(valid_filter("a//b"));
        assert!(valid_filter("//"));
        assert!(matches("a/+/b", "a//b"));
        assert!(matches("a//b", "a//b"));
        assert!(!matches("a/b", "a//b"));
        assert!(matches("+/+", "/"));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/+", "a"));
        let mut t = Trie::default();
        t.insert("a/+/b", "k", ());
        let mut out = Vec::new();
        t.matching("a//b", &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn hash_must_be_the_whole_last_level() {
        for bad in ["#/", "#/#", "a/#/", "#a", "a#", "a/#b", "a/b/#/c"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
        assert!(valid_filter("a/b/#"));
    }

    #[test]
    fn plus_must_be_a_whole_level() {
        for bad in ["+a", "a+", "a/+b", "a/b+/c", "++", "+/a+"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
        for bad in ["+a", "a+b", "a/+"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn nul_is_refused_anywhere() {
        for bad in ["\0", "a\0", "\0/a", "a/\0/b", "a/+/\0"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
            assert!(!valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn oversize_is_refused_at_the_protocol_limit() {
        let at = "a".repeat(MAX_TOPIC_LEN);
        let over = "a".repeat(MAX_TOPIC_LEN + 1);
        assert!(valid_topic_name(&at));
        assert!(valid_filter(&at));
        assert!(!valid_topic_name(&over));
        assert!(!valid_filter(&over));
        // The limit counts UTF-8 bytes, not characters.
        let wide = "é".repeat(MAX_TOPIC_LEN / 2 + 1);
        assert!(!valid_topic_name(&wide));
        assert!(!valid_filter(&wide));
    }

    #[test]
    fn dollar_topics_escape_leading_wildcards_only() {
        for f in ["#", "+", "+/#", "+/x", "+/+"] {
            assert!(!matches(f, "$SYS/x"), "{f}");
        }
        assert!(matches("$SYS/+", "$SYS/x"));
        assert!(matches(
            "$aws/things/+/shadow/#",
            "$aws/things/t1/shadow/get"
        ));
        // A `$` past the first level is an ordinary character.
        assert!(matches("a/+", "a/$x"));
        assert!(matches("#", "a/$x"));
        let mut t = Trie::default();
        for f in ["#", "+/x", "$SYS/#", "$SYS/+"] {
            t.insert(f, f, ());
        }
        let mut out = Vec::new();
        t.matching("$SYS/x", &mut out);
        let mut got: Vec<String> = out.into_iter().map(|(k, _)| k).collect();
        got.sort();
        assert_eq!(got, ["$SYS/#", "$SYS/+"]);
    }

    #[test]
    fn a_key_is_counted_once_per_filter() {
        let mut t = Trie::default();
        t.insert("a/#", "k", 1);
        t.insert("a/#", "k", 2);
        assert_eq!(t.len(), 1);
        t.insert("a/+", "k", 3);
        assert_eq!(t.len(), 2);
        let mut out = Vec::new();
        t.matching("a/b", &mut out);
        out.sort();
        assert_eq!(out, [("k".to_owned(), 2), ("k".to_owned(), 3)]);
        assert!(!t.remove("a/b", "k"));
        assert!(!t.remove("x/#", "k"));
        assert!(t.remove("a/#", "k"));
        assert!(t.remove("a/+", "k"));
        assert!(t.is_empty());
    }

    #[test]
    fn the_topic_tree_finds_exactly_the_matching_topics_in_pages() {
        let topics = [
            "a", "a/b", "a/b/c", "a/c", "a//b", "a/", "b/b", "$SYS/x", "$SYS", "a-b", "a/b/c/d",
            "x/y/z", "/", "/a",
        ];
        let mut t = TopicTree::default();
        for (i, topic) in topics.iter().enumerate() {
            assert!(t.insert(topic, i).is_none());
        }
        assert_eq!(t.insert("a/b", 1), Some(1));
        assert_eq!(t.len(), topics.len());
        assert_eq!(t.get("a/b/c"), Some(&2));
        assert_eq!(t.get("a/b/x"), None);
        for filter in [
            "#",
            "a/#",
            "a/+",
            "+",
            "+/+",
            "a/+/c",
            "$SYS/#",
            "$SYS",
            "+/b",
            "a//b",
            "/#",
            "a/b/c/d/#",
            "nothing/#",
            "a/b",
        ] {
            let mut want: Vec<&str> = topics
                .iter()
                .copied()
                .filter(|topic| matches(filter, topic))
                .collect();
            want.sort_by(|x, y| x.split('/').cmp(y.split('/')));
            for page in [1, 2, 3, 100] {
                let mut got: Vec<String> = Vec::new();
                loop {
                    let mut out = Vec::new();
                    t.matching(filter, got.last().map(String::as_str), page, &mut out);
                    let n = out.len();
                    got.extend(out.into_iter().map(|(topic, _)| topic));
                    if n < page {
                        break;
                    }
                }
                assert_eq!(got, want, "filter {filter}, pages of {page}");
            }
        }
        assert_eq!(t.remove("a/b"), Some(1));
        assert_eq!(t.remove("a/b"), None);
        assert_eq!(t.get("a/b/c"), Some(&2));
        for topic in topics.iter().filter(|x| **x != "a/b") {
            assert!(t.remove(topic).is_some(), "{topic}");
        }
        assert!(t.is_empty());
        assert!(t.root.children.is_empty(), "no levels are left behind");
    }

    #[test]
    fn a_topic_of_too_many_levels_is_refused_before_any_trie_walks_it() {
        let at = vec!["a"; MAX_TOPIC_LEVELS].join("/");
        let over = vec![""; MAX_TOPIC_LEVELS + 1].join("/");
        assert!(valid_topic_name(&at) && valid_filter(&at));
        assert!(!valid_topic_name(&over) && !valid_filter(&over));
        // At the limit, both tries walk it (recursively) and drop it.
        let mut subs = Trie::default();
        subs.insert(&at, "k", ());
        let mut out = Vec::new();
        subs.matching(&at, &mut out);
        assert_eq!(out.len(), 1);
        assert!(subs.remove(&at, "k"));
        let mut topics = TopicTree::default();
        topics.insert(&at, ());
        let mut out = Vec::new();
        topics.matching("#", None, 10, &mut out);
        assert_eq!(out.len(), 1);
        assert!(topics.remove(&at).is_some());
    }
}
