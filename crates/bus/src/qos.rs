//! The MQTT quality of service a message is published, subscribed and
//! delivered at, as a type: the wire's 0, 1 and 2 become numbers again only
//! at the edges (the store, JSON answers, metric labels).

/// How hard the broker tries to deliver a message (MQTT 4.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// Sent once, never acknowledged (0).
    #[default]
    AtMostOnce,
    /// Acknowledged, sent again until it is (1).
    AtLeastOnce,
    /// Delivered once, by a two-step handshake (2).
    ExactlyOnce,
}

/// A number that is not an MQTT QoS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("QoS {0} is not 0, 1 or 2")]
pub struct InvalidQoS(pub u8);

impl QoS {
    /// Its number on the wire.
    pub const fn as_u8(self) -> u8 {
        match self {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce => 1,
            QoS::ExactlyOnce => 2,
        }
    }

    /// Whether delivery is acknowledged (QoS 1 or 2).
    pub const fn is_acknowledged(self) -> bool {
        !matches!(self, QoS::AtMostOnce)
    }
}

impl From<QoS> for u8 {
    fn from(q: QoS) -> u8 {
        q.as_u8()
    }
}

impl TryFrom<u8> for QoS {
    type Error = InvalidQoS;
    fn try_from(n: u8) -> Result<Self, InvalidQoS> {
        match n {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            n => Err(InvalidQoS(n)),
        }
    }
}

impl From<mqtt5_protocol::QoS> for QoS {
    fn from(q: mqtt5_protocol::QoS) -> Self {
        match q {
            mqtt5_protocol::QoS::AtMostOnce => QoS::AtMostOnce,
            mqtt5_protocol::QoS::AtLeastOnce => QoS::AtLeastOnce,
            mqtt5_protocol::QoS::ExactlyOnce => QoS::ExactlyOnce,
        }
    }
}

impl From<QoS> for mqtt5_protocol::QoS {
    fn from(q: QoS) -> Self {
        match q {
            QoS::AtMostOnce => mqtt5_protocol::QoS::AtMostOnce,
            QoS::AtLeastOnce => mqtt5_protocol::QoS::AtLeastOnce,
            QoS::ExactlyOnce => mqtt5_protocol::QoS::ExactlyOnce,
        }
    }
}

impl std::fmt::Display for QoS {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_u8())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_order_follows_them() {
        for n in 0..3u8 {
            assert_eq!(QoS::try_from(n).map(u8::from), Ok(n));
        }
        assert_eq!(QoS::try_from(3), Err(InvalidQoS(3)));
        assert!(QoS::AtMostOnce < QoS::AtLeastOnce && QoS::AtLeastOnce < QoS::ExactlyOnce);
        assert_eq!(
            QoS::ExactlyOnce.min(QoS::AtLeastOnce),
            QoS::AtLeastOnce,
            "delivery is at the lower of publish and subscription"
        );
    }
}
