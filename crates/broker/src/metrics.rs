//! The broker's Prometheus metrics (`roost_mqtt_*` under the hub's
//! `roost` prefix): a collector registered in the hub's registry, which
//! reads the broker's counters and state at each scrape, so the hot path
//! only bumps atomics.

use crate::{Broker, RetainedLimit};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

impl Broker {
    /// Registers the broker's metrics in `registry`, under `mqtt_`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry
            .sub_registry_with_prefix("mqtt")
            .register_collector(Box::new(BrokerMetrics(self.clone())));
    }
}

struct BrokerMetrics(Broker);

impl std::fmt::Debug for BrokerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerMetrics")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: &AtomicU64) -> std::fmt::Result {
    let c = ConstCounter::new(v.load(Ordering::Relaxed));
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: usize) -> std::fmt::Result {
    let g = ConstGauge::new(v as i64);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter per QoS, every QoS shown (zero or not), labelled `qos`.
fn by_qos(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: &[AtomicU64; 3],
) -> std::fmt::Result {
    let mut family = e.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (q, n) in ["0", "1", "2"].into_iter().zip(v) {
        ConstCounter::new(n.load(Ordering::Relaxed))
            .encode(family.encode_family(&[("qos", q)])?)?;
    }
    Ok(())
}

/// Retained messages refused, labelled by the `limit` they would have passed.
fn retained_refused(e: &mut DescriptorEncoder, v: &[AtomicU64; 2]) -> std::fmt::Result {
    let mut family = e.encode_descriptor(
        "retained_refused",
        "Retained messages refused for passing a limit (device: the publisher's quota, total: the broker's)",
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (limit, n) in [RetainedLimit::Device, RetainedLimit::Total]
        .into_iter()
        .zip(v)
    {
        ConstCounter::new(n.load(Ordering::Relaxed))
            .encode(family.encode_family(&[("limit", limit.label())])?)?;
    }
    Ok(())
}

impl Collector for BrokerMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let b = &self.0;
        let s = &b.inner.stats;
        counter(
            &mut e,
            "connections",
            "MQTT connections accepted",
            &s.connections,
        )?;
        counter(
            &mut e,
            "connects_refused",
            "CONNECTs refused (bad credentials, policy)",
            &s.connects_refused,
        )?;
        {
            let mut family = e.encode_descriptor(
                "auth_failures",
                "MQTT logins refused, by reason: bad_password, unknown_device, no_credentials, bad_certificate, bad_auth_method, backoff (refused unchecked: too many failures from the address or as the device), busy (no password check came free in time)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (reason, n) in b.inner.logins.refusals() {
                ConstCounter::new(n)
                    .encode(family.encode_family(&[("reason", reason.label())])?)?;
            }
        }
        counter(
            &mut e,
            "oversize_before_login",
            "Connections closed for sending more than --mqtt-max-connect-bytes before logging in",
            &s.oversize_before_login,
        )?;
        gauge(
            &mut e,
            "clients_connected",
            "MQTT clients connected now",
            b.connected_count(),
        )?;
        gauge(
            &mut e,
            "sessions",
            "Sessions held (connected or persistent)",
            b.session_count(),
        )?;
        gauge(&mut e, "retained", "Retained messages", b.retained_count())?;
        gauge(
            &mut e,
            "retained_bytes",
            "Bytes of retained messages (topics, payloads, properties)",
            b.retained_bytes(),
        )?;
        retained_refused(&mut e, &s.retained_refused)?;
        by_qos(
            &mut e,
            "messages_in",
            "PUBLISH packets received, by QoS",
            &s.messages_in,
        )?;
        by_qos(
            &mut e,
            "messages_out",
            "PUBLISH packets sent, by QoS",
            &s.messages_out,
        )?;
        counter(
            &mut e,
            "dropped_by_policy",
            "Publishes dropped because the device's policy does not allow the topic",
            &s.dropped_by_policy,
        )?;
        counter(
            &mut e,
            "dropped_queue_full",
            "Messages dropped from a full offline session queue",
            &s.dropped_queue_full,
        )?;
        counter(
            &mut e,
            "slow_clients_dropped",
            "Clients disconnected for not reading",
            &s.slow_clients_dropped,
        )?;
        counter(
            &mut e,
            "dropped_slow_client",
            "Messages not delivered because the client's buffer was full",
            &s.dropped_slow,
        )?;
        counter(&mut e, "bytes_in", "Bytes received", &s.bytes_in)?;
        counter(&mut e, "bytes_out", "Bytes sent", &s.bytes_out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BrokerConfig;

    #[test]
    fn the_broker_shows_its_metrics_under_the_hubs_prefix() {
        let b = Broker::new(BrokerConfig::default());
        b.inner
            .stats
            .connects_refused
            .fetch_add(3, Ordering::Relaxed);
        b.inner.stats.messages_in[1].fetch_add(2, Ordering::Relaxed);
        b.inner.logins.refused(
            crate::login::AuthFailure::Backoff,
            "127.0.0.1:1".parse().unwrap(),
            Some("d"),
            "test",
        );
        let mut r = Registry::with_prefix("roost");
        b.register_metrics(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        for line in [
            "# HELP roost_mqtt_connections MQTT connections accepted\n",
            "# TYPE roost_mqtt_connections counter\n",
            "roost_mqtt_connections_total 0\n",
            "roost_mqtt_connects_refused_total 3\n",
            "roost_mqtt_auth_failures_total{reason=\"bad_password\"} 0\n",
            "roost_mqtt_auth_failures_total{reason=\"backoff\"} 1\n",
            "roost_mqtt_auth_failures_total{reason=\"busy\"} 0\n",
            "roost_mqtt_oversize_before_login_total 0\n",
            "# TYPE roost_mqtt_clients_connected gauge\n",
            "roost_mqtt_clients_connected 0\n",
            "roost_mqtt_sessions 0\n",
            "roost_mqtt_retained 0\n",
            "roost_mqtt_retained_bytes 0\n",
            "roost_mqtt_retained_refused_total{limit=\"device\"} 0\n",
            "roost_mqtt_retained_refused_total{limit=\"total\"} 0\n",
            "roost_mqtt_messages_in_total{qos=\"0\"} 0\n",
            "roost_mqtt_messages_in_total{qos=\"1\"} 2\n",
            "roost_mqtt_messages_in_total{qos=\"2\"} 0\n",
            "roost_mqtt_messages_out_total{qos=\"2\"} 0\n",
            "roost_mqtt_dropped_by_policy_total 0\n",
            "roost_mqtt_dropped_queue_full_total 0\n",
            "roost_mqtt_slow_clients_dropped_total 0\n",
            "roost_mqtt_dropped_slow_client_total 0\n",
            "roost_mqtt_bytes_in_total 0\n",
            "roost_mqtt_bytes_out_total 0\n",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
