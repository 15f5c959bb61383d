//! The route table's hooks into the hub: a routed message becomes a durable
//! async call, or a publish through the broker.

use crate::calls::CallError;
use crate::{Hub, HubInner};
use async_trait::async_trait;
use bytes::Bytes;
use roost_model::TaskName;
use roost_routes::DeliveryError;
use roost_scheduler::Rejected;
use std::sync::Weak;

pub(crate) struct HubHooks {
    pub hub: Weak<HubInner>,
}

#[async_trait]
impl roost_routes::Hooks for HubHooks {
    async fn call_task(
        &self,
        route: u32,
        task: &TaskName,
        input: Bytes,
        topic: Option<String>,
    ) -> Result<(), DeliveryError> {
        let inner = self.hub.upgrade().ok_or(DeliveryError::ShuttingDown)?;
        let env = topic
            .map(|t| vec![("ROOST_TOPIC".to_owned(), t)])
            .unwrap_or_default();
        Hub { inner }
            .call_async(
                &crate::calls::Caller::Route(route),
                task.as_str(),
                input,
                env,
            )
            .await
            .map(|_| ())
            .map_err(|e| match e {
                // The route's share of the queue is full: wait, not fail.
                CallError::Rejected(Rejected::QueueFull { .. }) => DeliveryError::Busy(e.into()),
                e => DeliveryError::Call(e.into()),
            })
    }

    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), DeliveryError> {
        let inner = self.hub.upgrade().ok_or(DeliveryError::ShuttingDown)?;
        let done = inner
            .bus
            .publish(roost_bus::Message::from_hub(topic, payload));
        if let Some(done) = done {
            tokio::spawn(async move {
                if let Err(e) = done.await {
                    tracing::error!(error = %e, "a routed message could not be stored");
                }
            });
        }
        Ok(())
    }

    async fn update_shadow(&self, thing: &str, document: Bytes) -> Result<(), DeliveryError> {
        let inner = self.hub.upgrade().ok_or(DeliveryError::ShuttingDown)?;
        let id = roost_shadows::ShadowId {
            thing: roost_shadows::ThingName::parse(thing)
                .map_err(|e| DeliveryError::Shadow(e.into()))?,
            name: None,
        };
        Hub { inner }
            .shadow(id, roost_shadows::Operation::Update, document)
            .await
            .map(|_| ())
            .map_err(|e| DeliveryError::Shadow(e.into()))
    }
}
