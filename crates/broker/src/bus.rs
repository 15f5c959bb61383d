//! The broker as the hub's message bus: `roost-bus`'s trait, answered by
//! the broker's own methods.

use crate::{Broker, Device, DeviceState, Devices, Done, Message, MessageBus, Reserved, Tap};
use crate::{RetainedMessage, RetainedSummary};
use prometheus_client::registry::Registry;

impl MessageBus for Broker {
    fn publish(&self, message: Message) -> Option<Done> {
        Broker::publish(self, message)
    }

    fn set_tap(&self, tap: Tap) {
        Broker::set_tap(self, tap)
    }

    fn set_reserved(&self, reserved: Reserved) {
        Broker::set_reserved(self, reserved)
    }

    fn set_devices(&self, devices: Vec<Device>) {
        Broker::set_devices(self, Devices::new(devices))
    }

    fn devices(&self) -> Vec<DeviceState> {
        Broker::devices(self)
    }

    fn retained_message(&self, topic: &str) -> Option<RetainedMessage> {
        Broker::retained_message(self, topic)
    }

    fn retained_page(
        &self,
        after: Option<&str>,
        limit: usize,
        visible: &dyn Fn(&str) -> bool,
    ) -> (Vec<RetainedSummary>, Option<String>) {
        Broker::retained_page(self, after, limit, visible)
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.config.max_packet_bytes
    }

    fn register_metrics(&self, registry: &mut Registry) {
        Broker::register_metrics(self, registry)
    }
}
