//! What the local service overrides (the AWS-compatible APIs) and the API
//! ask of the hub: who holds an access key, shadows, deployed secrets,
//! publishing, and what a task identity may do on `/v1`. The HTTP shapes
//! live in the overrides and api crates; this is the hub's side.

use crate::credentials::{Credential, Principal};
use crate::shadows::{self, Origin, ShadowFailure};
use crate::Hub;
use bytes::Bytes;
use roost_shadows::{Operation, ShadowId};
use serde_json::Value;

/// How the hub publishes a message: QoS (0 or 1), retain, and the MQTT 5
/// properties subscribers see.
#[derive(Default)]
pub struct PublishOptions {
    pub qos: u8,
    pub retain: bool,
    pub properties: roost_bus::Properties,
    /// MQTT 5 message expiry.
    pub expiry: Option<std::time::Duration>,
    /// Whether `device:` routes see it, as they see an MQTT client's
    /// message: true for the owner's (a local program), never for a task's
    /// (a task publishing to a topic routed back to it would loop).
    pub feeds_routes: bool,
}

/// Why the hub could not publish a message.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker could not store a QoS 1 message for the sessions that
    /// should get it.
    #[error("the broker could not store the message: {0}")]
    NotStored(#[from] roost_bus::PersistError),
}

/// Why a deployed secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the hub's store failed: {0}")]
    Store(#[from] roost_store::StoreError),
    #[error("the sealed secret {0:?} does not open with this hub's key (was hub.key replaced?)")]
    DoesNotOpen(String),
}

/// A deployed secret, opened.
pub struct SecretValue {
    pub value: String,
    pub created_ms: i64,
    /// The deployment it came with (its version, as Secrets Manager sees it).
    pub deployment: i64,
}

impl Hub {
    /// The owner's credentials (written to `DATA_DIR/aws-credentials`).
    pub fn owner_credential(&self) -> Credential {
        self.inner.owner.clone()
    }

    /// Who holds `access_key_id`, and its secret key.
    pub fn principal(&self, access_key_id: &str) -> Option<(Principal, String)> {
        let owner = &self.inner.owner;
        if access_key_id == owner.access_key_id {
            return Some((Principal::Owner, owner.secret_access_key.clone()));
        }
        let active = self.inner.active.read().clone();
        let (task, cred) = active.credentials.get(access_key_id)?;
        let allow = active.tasks.get(task)?.spec().allow.clone();
        Some((
            Principal::Task(task.clone(), allow),
            cred.secret_access_key.clone(),
        ))
    }

    /// Runs a shadow request in order with every other request to that
    /// shadow; the accepted document or why not.
    pub async fn shadow(
        &self,
        id: ShadowId,
        op: Operation,
        payload: Bytes,
    ) -> Result<Value, ShadowFailure> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        shadows::submit(&self.inner, id, op, payload, Origin::Caller(tx));
        rx.await
            .unwrap_or_else(|_| Err(ShadowFailure::Store("the hub is shutting down".into())))
    }

    /// Runs a shadow request as if a device had published it: the answer
    /// goes to the `/accepted` or `/rejected` topic.
    pub fn shadow_over_mqtt(&self, id: ShadowId, op: Operation, payload: Bytes) {
        shadows::submit(&self.inner, id, op, payload, Origin::Mqtt);
    }

    /// A thing's named shadows after `after`, at most `limit`.
    pub fn shadow_names(
        &self,
        thing: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, roost_store::StoreError> {
        self.inner.store.shadow_names(thing, after, limit)
    }

    /// A secret of the active deployment, opened; `None` if it has none of
    /// that name.
    pub fn secret(&self, name: &str) -> Result<Option<SecretValue>, SecretError> {
        let Some(deployment) = self.inner.active.read().id else {
            return Ok(None);
        };
        let sealed = self.inner.store.secrets_of(deployment)?;
        let Some(s) = sealed.into_iter().find(|s| s.name == name) else {
            return Ok(None);
        };
        let key = self.inner.key.sealing_key();
        let plain = crate::credentials::sealing::open(&key, &s.name, &s.nonce, &s.ciphertext)
            .ok_or_else(|| SecretError::DoesNotOpen(s.name.clone()))?;
        Ok(Some(SecretValue {
            value: String::from_utf8_lossy(&plain).into_owned(),
            created_ms: s.created_ms,
            deployment,
        }))
    }

    /// Publishes through the hub's broker as the hub; resolves once a
    /// QoS 1 message is stored for the sessions that will get it.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        options: PublishOptions,
    ) -> Result<(), PublishError> {
        let mut m = roost_bus::Message::from_hub(topic, payload);
        if options.feeds_routes {
            // Routes see it the way they see a client's message: through
            // the broker's tap.
            m.from = roost_bus::Publisher::Outside;
        }
        m.qos = if options.qos == 0 {
            roost_bus::QoS::AtMostOnce
        } else {
            roost_bus::QoS::AtLeastOnce
        };
        m.retain = options.retain;
        m.properties = options.properties;
        m.expires_at = options.expiry.map(|d| std::time::Instant::now() + d);
        match self.inner.bus.publish(m) {
            Some(done) => done.await.map_err(PublishError::NotStored),
            None => Ok(()),
        }
    }

    /// Counts a request to a local service, for the metrics.
    pub fn count_local_request(&self, service: &str, status: u16) {
        self.inner
            .metrics
            .local_requests
            .get_or_create(&crate::metrics::ServiceLabels {
                service: service.into(),
                status: status.to_string(),
            })
            .inc();
    }
}

/// Who is on the other end of a local connection to the hub's API, when
/// process tasks run under identities of their own.
#[derive(Debug, PartialEq)]
pub enum LocalUser {
    /// The worker of one or more deployed tasks (a code group shares one
    /// identity).
    Task { tasks: Vec<roost_model::TaskName> },
    /// A task identity no deployed task has (a worker of a retired
    /// deployment): nothing is allowed.
    RetiredTask,
    /// Any other user of the machine (the owner, the CLI, local programs).
    Other,
}

impl Hub {
    /// Whether the hub runs process tasks under identities of their own
    /// (then the API asks who a loopback connection belongs to).
    pub fn task_identities(&self) -> bool {
        self.inner
            .runtimes
            .values()
            .any(|r| r.task_identities().is_some())
    }

    /// Who `uid`, the owner of a local connection, is.
    pub fn local_user(&self, uid: u32) -> LocalUser {
        let is_task_uid = self.inner.runtimes.values().any(|r| {
            r.task_identities()
                .is_some_and(|identities| identities.is_task_uid(uid))
        });
        if !is_task_uid {
            return LocalUser::Other;
        }
        let active = self.inner.active.read().clone();
        let Some(tasks) = active.identities.get(&uid) else {
            return LocalUser::RetiredTask;
        };
        LocalUser::Task {
            tasks: tasks.clone(),
        }
    }

    /// The uid each process task of `tasks` runs as, when it runs under an
    /// identity of its own (as its runtime reports).
    pub(crate) fn task_identities_of(
        &self,
        tasks: &std::collections::HashMap<
            roost_model::TaskName,
            std::sync::Arc<dyn roost_runtime::PreparedTask>,
        >,
    ) -> std::collections::HashMap<u32, Vec<roost_model::TaskName>> {
        let mut by_uid: std::collections::HashMap<u32, Vec<roost_model::TaskName>> =
            Default::default();
        for (name, task) in tasks {
            if let Some(uid) = task.run_as_uid() {
                by_uid.entry(uid).or_default().push(name.clone());
            }
        }
        by_uid
    }
}

/// A `/v1` request as the hub judges it: its method and its path split at
/// `/` (so `/v1/deployments/active` is `["v1", "deployments", "active"]`).
/// The API builds it from the HTTP request; the hub knows nothing of HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest<'a> {
    pub method: ApiMethod,
    pub segments: Vec<&'a str>,
}

/// The methods the API tells apart: reads, and everything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiMethod {
    Get,
    /// POST, PUT, DELETE, HEAD or any other.
    Other,
}

impl<'a> ApiRequest<'a> {
    pub fn new(method: ApiMethod, path: &'a str) -> Self {
        ApiRequest {
            method,
            segments: path.split('/').filter(|s| !s.is_empty()).collect(),
        }
    }
}

/// Why a task identity may not do a `/v1` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskRefusal {
    #[error("deploying and rolling back are the hub owner's, not a task's")]
    Deployments,
    #[error("every task's logs are the hub owner's to read, not a task's")]
    Logs,
}

/// What a task may do on `/v1`: what INTERFACES.md gives tasks and local
/// programs (calling tasks, following calls, listing tasks and devices,
/// metrics, reading the active deployment), but not the owner's operations
/// (deploying, rolling back, reading every task's logs).
pub fn task_may(req: &ApiRequest<'_>) -> Result<(), TaskRefusal> {
    match req.segments.as_slice() {
        ["v1", "deployments", ..] if req.method != ApiMethod::Get => Err(TaskRefusal::Deployments),
        ["v1", "logs"] => Err(TaskRefusal::Logs),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn may(method: ApiMethod, path: &str) -> Result<(), TaskRefusal> {
        task_may(&ApiRequest::new(method, path))
    }

    #[test]
    fn a_task_may_call_follow_and_list() {
        use ApiMethod::*;
        for (m, p) in [
            (Get, "/v1/tasks"),
            (Other, "/v1/tasks/echo/calls"),
            (Get, "/v1/calls/abc"),
            (Get, "/v1/calls/abc/output"),
            (Get, "/v1/devices"),
            (Get, "/v1/deployments/active"),
            (Get, "/metrics"),
        ] {
            assert_eq!(may(m, p), Ok(()), "{p}");
        }
    }

    #[test]
    fn a_task_may_not_deploy_roll_back_or_read_every_log() {
        use ApiMethod::*;
        assert_eq!(may(Other, "/v1/deployments"), Err(TaskRefusal::Deployments));
        assert_eq!(
            may(Other, "/v1/deployments/rollback"),
            Err(TaskRefusal::Deployments)
        );
        // However the path is spelled.
        assert_eq!(
            may(Other, "//v1//deployments/"),
            Err(TaskRefusal::Deployments)
        );
        assert_eq!(may(Get, "/v1/logs"), Err(TaskRefusal::Logs));
        assert_eq!(may(Get, "/v1/logs/"), Err(TaskRefusal::Logs));
        assert_eq!(may(Other, "/v1/logs"), Err(TaskRefusal::Logs));
    }
}
