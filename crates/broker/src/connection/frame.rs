//! Framing: cutting whole MQTT packets out of the bytes a client sends,
//! refusing oversize and malformed ones before they are buffered whole.

use super::TcpStream;
use crate::Broker;
use bytes::BytesMut;
use mqtt5_protocol::{FixedHeader, Packet, PacketType};
use std::sync::atomic::Ordering;
use tokio::io::AsyncReadExt;

#[derive(Debug)]
pub(super) enum Frame {
    Packet(Packet),
    /// Larger than the broker accepts.
    TooLarge,
    Malformed(String),
}

/// Pulls one whole packet off the front of `buf`, if there is one.
pub(super) fn next_frame(buf: &mut BytesMut, max: usize, version: u8) -> Option<Frame> {
    if buf.len() < 2 {
        return None;
    }
    // The remaining length is a variable-length integer of 1 to 4 bytes.
    let mut len: usize = 0;
    let mut header = 1;
    loop {
        if header >= buf.len() {
            return None;
        }
        let b = buf[header];
        len |= ((b & 0x7f) as usize) << (7 * (header - 1));
        header += 1;
        if b & 0x80 == 0 {
            break;
        }
        if header > 4 {
            return Some(Frame::Malformed(
                "remaining length longer than 4 bytes".into(),
            ));
        }
    }
    let total = header + len;
    if total > max {
        return Some(Frame::TooLarge);
    }
    if buf.len() < total {
        return None;
    }
    let mut frame = buf.split_to(total).freeze();
    let fixed = match FixedHeader::decode(&mut frame) {
        Ok(h) => h,
        Err(e) => return Some(Frame::Malformed(e.to_string())),
    };
    if !fixed.validate_flags() {
        return Some(Frame::Malformed("reserved flags set".into()));
    }
    let decoded = if fixed.packet_type == PacketType::Connect {
        Packet::decode_from_body(fixed.packet_type, &fixed, &mut frame)
    } else {
        Packet::decode_from_body_with_version(fixed.packet_type, &fixed, &mut frame, version)
    };
    Some(match decoded {
        Ok(p) => Frame::Packet(p),
        Err(e) => Frame::Malformed(e.to_string()),
    })
}

/// Reads until one whole packet is buffered (a free function so the packet
/// loop can borrow the connection's other fields at the same time).
pub(super) async fn read_frame(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    broker: &Broker,
    version: u8,
    max: usize,
) -> Option<Frame> {
    loop {
        if let Some(f) = next_frame(rbuf, max, version) {
            return Some(f);
        }
        if rbuf.capacity() - rbuf.len() < 256 {
            rbuf.reserve(if rbuf.is_empty() { 512 } else { 4096 });
        }
        let n = stream.read_buf(rbuf).await.ok()?;
        if n == 0 {
            return None;
        }
        broker
            .inner
            .stats
            .bytes_in
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt5_protocol::packet::publish::PublishPacket;
    use mqtt5_protocol::packet::MqttPacket;
    use mqtt5_protocol::QoS;
    use proptest::prelude::*;

    fn drain(bytes: &[u8], max: usize, version: u8) -> Vec<String> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = next_frame(&mut buf, max, version) {
            let stop = !matches!(f, Frame::Packet(_));
            out.push(format!("{f:?}").chars().take(40).collect());
            if stop {
                break;
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Whatever arrives, the decoder returns a packet, "need more",
        /// "too large" or "malformed": it never panics or loops.
        #[test]
        fn arbitrary_bytes_never_break_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512), v5 in any::<bool>()) {
            let _ = drain(&bytes, 256, if v5 { 5 } else { 4 });
        }

        /// Arbitrary bytes behind a valid fixed header of each packet type.
        #[test]
        fn arbitrary_bodies_never_break_the_decoder(kind in 1u8..16, flags in 0u8..16, body in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut bytes = vec![(kind << 4) | flags, body.len() as u8];
            bytes.extend(body);
            let _ = drain(&bytes, 1 << 20, 5);
            let _ = drain(&bytes, 1 << 20, 4);
        }

        /// Valid publishes survive encode, framing at any split, and decode.
        #[test]
        fn publishes_round_trip(topic in "[a-z]{1,8}(/[a-z0-9]{1,8}){0,4}", payload in proptest::collection::vec(any::<u8>(), 0..300), qos in 0u8..3, split in 0usize..400, v5 in any::<bool>()) {
            let mut p = if v5 {
                PublishPacket::new(topic.clone(), payload.clone(), QoS::from(qos))
            } else {
                PublishPacket::new_v311(topic.clone(), payload.clone(), QoS::from(qos))
            };
            if qos > 0 {
                p.packet_id = Some(7);
            }
            let mut wire = BytesMut::new();
            p.encode(&mut wire).unwrap();
            let split = split.min(wire.len());
            let mut buf = BytesMut::from(&wire[..split]);
            let version = if v5 { 5 } else { 4 };
            let first = next_frame(&mut buf, 1 << 20, version);
            if split < wire.len() {
                prop_assert!(first.is_none(), "a partial packet must wait for more bytes");
                buf.extend_from_slice(&wire[split..]);
            } else {
                prop_assert!(first.is_some());
                buf = BytesMut::from(&wire[..]);
            }
            match next_frame(&mut buf, 1 << 20, version) {
                Some(Frame::Packet(Packet::Publish(d))) => {
                    prop_assert_eq!(d.topic_name, topic);
                    prop_assert_eq!(d.payload, payload);
                    prop_assert_eq!(d.qos as u8, qos);
                }
                other => prop_assert!(false, "decoded {:?}", other.map(|f| format!("{f:?}"))),
            }
        }
    }

    #[test]
    fn a_huge_remaining_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0x7f][..]);
        assert!(matches!(
            next_frame(&mut buf, 1 << 20, 4),
            Some(Frame::TooLarge)
        ));
        let mut buf = BytesMut::from(&[0x30u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(matches!(
            next_frame(&mut buf, 1 << 20, 4),
            Some(Frame::Malformed(_))
        ));
    }
}
