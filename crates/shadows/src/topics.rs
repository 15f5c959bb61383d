//! The reserved `$aws/things/.../shadow` MQTT topics: parsing the request
//! topics devices publish to, and building the response topics we publish on.

use crate::names::{ShadowId, ShadowName, ThingName};

/// A shadow operation a device can request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Read the whole shadow.
    Get,
    /// Merge a partial state into the shadow.
    Update,
    /// Delete the shadow (its version is kept).
    Delete,
}

impl Operation {
    /// The topic level naming this operation.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }

    fn from_level(level: &str) -> Option<Self> {
        match level {
            "get" => Some(Operation::Get),
            "update" => Some(Operation::Update),
            "delete" => Some(Operation::Delete),
            _ => None,
        }
    }
}

/// Which response topic an operation's outcome goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Response {
    /// The operation succeeded.
    Accepted,
    /// The operation failed; the body is an error document.
    Rejected,
}

impl Response {
    fn as_str(self) -> &'static str {
        match self {
            Response::Accepted => "accepted",
            Response::Rejected => "rejected",
        }
    }
}

/// Parses a request topic a device publishes to:
/// `$aws/things/T/shadow/{get,update,delete}` or
/// `$aws/things/T/shadow/name/N/{get,update,delete}`.
///
/// Anything else — response topics such as `.../update/accepted`, invalid
/// names, wildcards, empty or extra levels — is `None`, so the caller can
/// treat it as an ordinary topic.
pub fn parse_request_topic(topic: &str) -> Option<(ShadowId, Operation)> {
    let levels: Vec<&str> = topic.split('/').collect();
    let (thing, name, op) = match levels.as_slice() {
        ["$aws", "things", thing, "shadow", op] => (thing, None, op),
        ["$aws", "things", thing, "shadow", "name", name, op] => (thing, Some(name), op),
        _ => return None,
    };
    let op = Operation::from_level(op)?;
    let id = ShadowId {
        thing: ThingName::parse(thing).ok()?,
        name: match name {
            Some(n) => Some(ShadowName::parse(n).ok()?),
            None => None,
        },
    };
    Some((id, op))
}

impl ShadowId {
    /// `$aws/things/{thing}/shadow` or `$aws/things/{thing}/shadow/name/{name}`.
    pub fn topic_prefix(&self) -> String {
        match &self.name {
            None => format!("$aws/things/{}/shadow", self.thing),
            Some(n) => format!("$aws/things/{}/shadow/name/{}", self.thing, n),
        }
    }
}

/// The topic a device publishes `op` requests for `id` to.
pub fn request_topic(id: &ShadowId, op: Operation) -> String {
    format!("{}/{}", id.topic_prefix(), op.as_str())
}

/// `.../{op}/accepted` or `.../{op}/rejected`.
pub fn response_topic(id: &ShadowId, op: Operation, response: Response) -> String {
    format!(
        "{}/{}/{}",
        id.topic_prefix(),
        op.as_str(),
        response.as_str()
    )
}

/// `.../update/delta`: where the difference between desired and reported
/// goes after an update that touched desired.
pub fn delta_topic(id: &ShadowId) -> String {
    format!("{}/update/delta", id.topic_prefix())
}

/// `.../update/documents`: where every accepted update's before and after
/// documents go.
pub fn documents_topic(id: &ShadowId) -> String {
    format!("{}/update/documents", id.topic_prefix())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(thing: &str, name: Option<&str>) -> ShadowId {
        ShadowId::parse(thing, name).unwrap()
    }

    #[test]
    fn parses_classic_and_named_requests() {
        assert_eq!(
            parse_request_topic("$aws/things/lamp/shadow/update"),
            Some((id("lamp", None), Operation::Update))
        );
        assert_eq!(
            parse_request_topic("$aws/things/lamp/shadow/name/cfg/get"),
            Some((id("lamp", Some("cfg")), Operation::Get))
        );
        assert_eq!(
            parse_request_topic("$aws/things/lamp/shadow/name/cfg/delete"),
            Some((id("lamp", Some("cfg")), Operation::Delete))
        );
        // "name" is a legal thing name; only its position makes it a keyword.
        assert_eq!(
            parse_request_topic("$aws/things/name/shadow/get"),
            Some((id("name", None), Operation::Get))
        );
    }

    #[test]
    fn rejects_everything_else() {
        for t in [
            "",
            "/",
            "$aws/things/lamp/shadow",
            "$aws/things/lamp/shadow/",
            "$aws/things/lamp/shadow/list",
            "$aws/things/lamp/shadow/update/accepted",
            "$aws/things/lamp/shadow/update/delta",
            "$aws/things/lamp/shadow/name/cfg/update/documents",
            "$aws/things/lamp/shadow/name/get",
            "$aws/things/lamp/shadow/name//get",
            "$aws/things//shadow/get",
            "$aws/things/+/shadow/get",
            "$aws/things/#/shadow/get",
            "$aws/things/../shadow/get",
            "$aws/things/$foo/shadow/get",
            "$aws/things/lamp/shadow/name/+/get",
            "$aws/things/lamp/shadow/name/c#/get",
            "$aws/things/lämp/shadow/get",
            "$aws/things/lamp/shadow/GET",
            "$aws/things/lamp/shadow/get/",
            "/$aws/things/lamp/shadow/get",
            "$AWS/things/lamp/shadow/get",
            "$aws/things/lamp/shadow/nope/cfg/get",
            "aws/things/lamp/shadow/get",
        ] {
            assert_eq!(parse_request_topic(t), None, "{t:?}");
        }
        let long = format!("$aws/things/{}/shadow/get", "t".repeat(129));
        assert_eq!(parse_request_topic(&long), None);
        let long = format!("$aws/things/t/shadow/name/{}/get", "s".repeat(65));
        assert_eq!(parse_request_topic(&long), None);
    }

    #[test]
    fn builds_response_topics() {
        let classic = id("lamp", None);
        let named = id("lamp", Some("cfg"));
        assert_eq!(classic.topic_prefix(), "$aws/things/lamp/shadow");
        assert_eq!(named.topic_prefix(), "$aws/things/lamp/shadow/name/cfg");
        assert_eq!(
            response_topic(&classic, Operation::Update, Response::Accepted),
            "$aws/things/lamp/shadow/update/accepted"
        );
        assert_eq!(
            response_topic(&named, Operation::Delete, Response::Rejected),
            "$aws/things/lamp/shadow/name/cfg/delete/rejected"
        );
        assert_eq!(
            delta_topic(&classic),
            "$aws/things/lamp/shadow/update/delta"
        );
        assert_eq!(
            documents_topic(&named),
            "$aws/things/lamp/shadow/name/cfg/update/documents"
        );
    }

    fn op() -> impl Strategy<Value = Operation> {
        prop_oneof![
            Just(Operation::Get),
            Just(Operation::Update),
            Just(Operation::Delete)
        ]
    }

    proptest! {
        #[test]
        fn request_topics_round_trip(
            thing in "[a-zA-Z0-9:_-]{1,128}",
            name in proptest::option::of("[a-zA-Z0-9:_-]{1,64}"),
            op in op(),
        ) {
            let id = ShadowId::parse(&thing, name.as_deref()).unwrap();
            prop_assert_eq!(parse_request_topic(&request_topic(&id, op)), Some((id, op)));
        }

        #[test]
        fn arbitrary_topics_never_panic(topic in "\\PC{0,80}") {
            if let Some((id, op)) = parse_request_topic(&topic) {
                prop_assert_eq!(request_topic(&id, op), topic);
            }
        }
    }
}
