//! What a caller of the local services may do: the rights of a task's
//! manifest `allow`, judged here (the hub only finds who the caller is).
//! The owner may do everything.

use roost_model::{Grants, Principal};

/// The rights of `allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    Invoke,
    ShadowRead,
    ShadowUpdate,
    Publish,
    Secret,
    ReadRetained,
}

/// Whether a caller may do something.
pub trait Rights {
    /// Whether this principal may do `right` on `name` (a task, thing,
    /// secret name; for `publish` and retained reads, a topic).
    fn may(&self, right: Right, name: &str) -> bool;
}

impl Rights for Principal {
    fn may(&self, right: Right, name: &str) -> bool {
        let Principal::Task(_, g) = self else {
            return true;
        };
        match right {
            Right::Invoke => Grants::matches(&g.invoke, name),
            Right::ShadowRead => Grants::matches(&g.shadow_read, name),
            Right::ShadowUpdate => Grants::matches(&g.shadow_update, name),
            Right::Secret => Grants::matches(&g.secrets, name),
            Right::Publish => g.publish.iter().any(|f| roost_topic::matches(f, name)),
            Right::ReadRetained => g.retained.iter().any(|f| roost_topic::matches(f, name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_model::TaskName;

    #[test]
    fn task_rights_follow_the_grants() {
        let p = Principal::Task(
            TaskName::parse("t").unwrap(),
            Grants {
                invoke: vec!["echo".into()],
                shadow_read: vec!["*".into()],
                shadow_update: vec!["thermo*".into()],
                publish: vec!["alerts/#".into()],
                secrets: vec![],
                retained: vec!["state/+".into()],
            },
        );
        assert!(p.may(Right::Invoke, "echo"));
        assert!(!p.may(Right::Invoke, "other"));
        assert!(p.may(Right::ShadowRead, "anything"));
        assert!(p.may(Right::ShadowUpdate, "thermostat"));
        assert!(!p.may(Right::ShadowUpdate, "door"));
        assert!(p.may(Right::Publish, "alerts/fire"));
        assert!(!p.may(Right::Publish, "commands/x"));
        assert!(!p.may(Right::Secret, "db"));
        assert!(Principal::Owner.may(Right::Secret, "db"));
        assert!(p.may(Right::ReadRetained, "state/mode"));
        assert!(!p.may(Right::ReadRetained, "state/a/b"));
        assert!(!p.may(Right::ReadRetained, "alerts/fire"));
    }
}
