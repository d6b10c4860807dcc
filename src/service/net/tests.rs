//! Host tests of the interface alone: a DHCP guest's [`Network`] on smoltcp's loopback device,
//! the peer's frames (QEMU's user-mode network: its DHCP server and a forwarded connection)
//! written and the guest's read by hand, in the order QEMU sends them.

use alloc::vec;
use alloc::vec::Vec;
use smoltcp::phy::{ChecksumCapabilities, Device, Loopback, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Address, Ipv4Packet,
    Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

use super::{DEFAULT_BUFFER_BUDGET, Network, Tap};
use crate::config::Config;

const GUEST_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
const PEER_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);
const GUEST_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
const PEER_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
const PEER_PORT: u16 = 40000;

/// The guest's frames sent since the last call (the loopback's queue holds only those: the
/// peer's frames are taken in by the guest's poll before it sends anything).
fn from_guest(tap: &mut Tap<Loopback>) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    while let Some((rx, _)) = tap.inner.receive(Instant::ZERO) {
        frames.push(rx.consume(|f| f.to_vec()));
    }
    frames
}

/// Queues `frame` for the guest.
fn to_guest(tap: &mut Tap<Loopback>, frame: &[u8]) {
    let tx = tap.inner.transmit(Instant::ZERO).expect("loopback room");
    tx.consume(frame.len(), |buf| buf.copy_from_slice(frame));
}

/// An Ethernet frame from the peer to `dst` around `payload_len` bytes written by `emit`.
fn from_peer(
    dst: EthernetAddress,
    ethertype: EthernetProtocol,
    payload_len: usize,
    emit: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: PEER_MAC,
        dst_addr: dst,
        ethertype,
    };
    let mut buf = vec![0; eth.buffer_len() + payload_len];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    emit(frame.payload_mut());
    buf
}

/// An IPv4 packet from the peer to `dst` (broadcast MAC for the broadcast address).
fn ipv4_from_peer(
    dst: Ipv4Address,
    protocol: IpProtocol,
    len: usize,
    emit: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: PEER_IP,
        dst_addr: dst,
        next_header: protocol,
        payload_len: len,
        hop_limit: 64,
    };
    let mac = if dst == Ipv4Address::BROADCAST {
        EthernetAddress::BROADCAST
    } else {
        GUEST_MAC
    };
    from_peer(mac, EthernetProtocol::Ipv4, ip.buffer_len() + len, |buf| {
        let mut packet = Ipv4Packet::new_unchecked(buf);
        ip.emit(&mut packet, &ChecksumCapabilities::default());
        emit(packet.payload_mut());
    })
}

/// The peer's DHCP OFFER or ACK of 10.0.2.15/24 (gateway and server 10.0.2.2).
fn dhcp_reply(message_type: DhcpMessageType, transaction_id: u32) -> Vec<u8> {
    let dhcp = DhcpRepr {
        message_type,
        transaction_id,
        secs: 0,
        client_hardware_address: GUEST_MAC,
        client_ip: Ipv4Address::UNSPECIFIED,
        your_ip: GUEST_IP,
        server_ip: PEER_IP,
        router: Some(PEER_IP),
        subnet_mask: Some(Ipv4Address::new(255, 255, 255, 0)),
        relay_agent_ip: Ipv4Address::UNSPECIFIED,
        broadcast: true,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(PEER_IP),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: Some(86_400),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let udp = UdpRepr {
        src_port: 67,
        dst_port: 68,
    };
    let len = 8 + dhcp.buffer_len();
    ipv4_from_peer(Ipv4Address::BROADCAST, IpProtocol::Udp, len, |buf| {
        udp.emit(
            &mut UdpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(PEER_IP),
            &IpAddress::Ipv4(Ipv4Address::BROADCAST),
            dhcp.buffer_len(),
            |payload| {
                dhcp.emit(&mut DhcpPacket::new_unchecked(payload))
                    .expect("DHCP message")
            },
            &ChecksumCapabilities::default(),
        )
    })
}

/// The peer's SYN to the guest's `port`.
fn syn(port: u16) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: PEER_PORT,
        dst_port: port,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 65535,
        window_scale: None,
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    ipv4_from_peer(GUEST_IP, IpProtocol::Tcp, tcp.buffer_len(), |buf| {
        tcp.emit(
            &mut TcpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(PEER_IP),
            &IpAddress::Ipv4(GUEST_IP),
            &ChecksumCapabilities::default(),
        )
    })
}

/// The type and transaction id of the guest's DHCP message `frame`.
fn dhcp_message(frame: &[u8]) -> Option<(DhcpMessageType, u32)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp || udp.dst_port() != 67 {
        return None;
    }
    let packet = DhcpPacket::new_checked(udp.payload()).ok()?;
    let repr = DhcpRepr::parse(&packet).ok()?;
    Some((repr.message_type, repr.transaction_id))
}

/// The guest's TCP segment in `frame`: (SYN, ACK, RST, acknowledgement number).
fn tcp_segment(frame: &[u8]) -> Option<(bool, bool, bool, u32)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Tcp {
        return None;
    }
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    Some((tcp.syn(), tcp.ack(), tcp.rst(), tcp.ack_number().0 as u32))
}

/// The transaction id of the guest's DHCP `want` among `frames`.
fn find_dhcp(frames: &[Vec<u8>], want: DhcpMessageType) -> u32 {
    frames
        .iter()
        .filter_map(|f| dhcp_message(f))
        .find(|(t, _)| *t == want)
        .unwrap_or_else(|| panic!("no DHCP {want:?} from the guest"))
        .1
}

#[test]
fn a_syn_that_comes_before_the_dhcp_lease_is_answered_once_the_lease_is_applied() {
    // QEMU's user-mode network learns the guest's MAC address from its DHCP DISCOVER and
    // sends the SYN it held at once, before its OFFER: the SYN reaches a guest without an
    // address. The guest keeps it and takes it in once the lease is applied; it is answered
    // with SYN-ACK, not dropped (QEMU would send it again only after about 6 s).
    let (config, _) = Config::parse("ip=dhcp").expect("command line");
    let mut tap = Tap::new(Loopback::new(Medium::Ethernet));
    let mut t = Instant::from_millis(1000);
    let mut net = Network::new(&mut tap, GUEST_MAC.0, &config, t, 1, DEFAULT_BUFFER_BUDGET);
    let port = config.nbd_port;

    net.poll(&mut tap, t);
    let xid = find_dhcp(&from_guest(&mut tap), DhcpMessageType::Discover);
    to_guest(&mut tap, &syn(port));
    to_guest(&mut tap, &dhcp_reply(DhcpMessageType::Offer, xid));
    t += smoltcp::time::Duration::from_millis(1);
    net.poll(&mut tap, t);
    let frames = from_guest(&mut tap);
    assert!(
        frames.iter().all(|f| tcp_segment(f).is_none()),
        "no answer (RST) to a SYN before the lease"
    );
    assert_eq!(tap.held(), 1, "the SYN is kept");
    let xid = find_dhcp(&frames, DhcpMessageType::Request);

    to_guest(&mut tap, &dhcp_reply(DhcpMessageType::Ack, xid));
    t += smoltcp::time::Duration::from_millis(1);
    net.poll(&mut tap, t);
    assert_eq!(tap.held(), 0, "the SYN is taken in with the lease");
    // The guest asks for the peer's MAC address before it answers; the peer tells it.
    let asks = from_guest(&mut tap).iter().any(|f| {
        EthernetFrame::new_checked(&f[..])
            .ok()
            .filter(|e| e.ethertype() == EthernetProtocol::Arp)
            .and_then(|e| ArpRepr::parse(&ArpPacket::new_checked(e.payload()).ok()?).ok())
            .is_some_and(|arp| {
                matches!(arp, ArpRepr::EthernetIpv4 { target_protocol_addr, source_protocol_addr, .. }
                    if target_protocol_addr == PEER_IP && source_protocol_addr == GUEST_IP)
            })
    });
    assert!(asks, "no ARP request for the peer from the leased address");
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: PEER_MAC,
        source_protocol_addr: PEER_IP,
        target_hardware_addr: GUEST_MAC,
        target_protocol_addr: GUEST_IP,
    };
    to_guest(
        &mut tap,
        &from_peer(
            GUEST_MAC,
            EthernetProtocol::Arp,
            reply.buffer_len(),
            |buf| reply.emit(&mut ArpPacket::new_unchecked(buf)),
        ),
    );
    t += smoltcp::time::Duration::from_millis(1);
    net.poll(&mut tap, t);
    let answers: Vec<_> = from_guest(&mut tap)
        .iter()
        .filter_map(|f| tcp_segment(f))
        .collect();
    assert_eq!(
        answers,
        [(true, true, false, 1001)],
        "the held SYN is answered with SYN-ACK"
    );
}
