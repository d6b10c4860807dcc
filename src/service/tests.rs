//! Host tests of the guest's main loop: the library's [`Guest`] on one end of an in-memory
//! Ethernet link, smoltcp clients on the other, a qcow2 image on a memory disk, and a
//! virtual clock that moves only when the test or an idle guest moves it.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use super::disk::open_disk;
use super::guest::{Guest, GuestSetup, Platform};
use super::session::MIN_IDLE_MS;
use crate::blkqueue::queue::{BlockQueue, Completion, CompletionOrder, MemQueue, QueuedOp};
use crate::block::{BlockDevice, BlockError, MemDisk};
use crate::config::{Config, GuestExit};
use crate::nbd::proto::*;
use crate::net::NetStats;
use crate::qcow2::{CreateOptions, OpenOptions, Qcow2};
use crate::telemetry::{GuestConfig, GuestMetrics, SystemFigures};

type Frames = Rc<RefCell<VecDeque<Vec<u8>>>>;

/// One end of an in-memory Ethernet link.
struct LinkEnd {
    rx: Frames,
    tx: Frames,
}

/// Two ends joined: what one sends, the other receives.
fn link() -> (LinkEnd, LinkEnd) {
    let (a, b) = (Frames::default(), Frames::default());
    (
        LinkEnd {
            rx: a.clone(),
            tx: b.clone(),
        },
        LinkEnd { rx: b, tx: a },
    )
}

struct RxFrame(Vec<u8>);
struct TxFrame(Frames);

impl phy::RxToken for RxFrame {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxFrame {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.borrow_mut().push_back(frame);
        r
    }
}

impl phy::Device for LinkEnd {
    type RxToken<'a> = RxFrame;
    type TxToken<'a> = TxFrame;

    fn receive(&mut self, _: Instant) -> Option<(RxFrame, TxFrame)> {
        let frame = self.rx.borrow_mut().pop_front()?;
        Some((RxFrame(frame), TxFrame(self.tx.clone())))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxFrame> {
        Some(TxFrame(self.tx.clone()))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// The virtual clock, in nanoseconds.
type Clock = Rc<Cell<u64>>;

/// The test machine: a virtual clock, a power button the test presses.
struct TestPlatform {
    clock: Clock,
    button: Rc<Cell<bool>>,
    net_stats: NetStats,
}

/// Longest jump of the virtual clock in one idle wait.
const IDLE_STEP_NS: u64 = 5_000_000;

impl Platform for TestPlatform {
    type Net = LinkEnd;

    fn now_ns(&self) -> u64 {
        self.clock.get()
    }

    fn idle_until(&mut self, net: &mut LinkEnd, deadline_ms: u64) {
        if !net.rx.borrow().is_empty() {
            return;
        }
        let now = self.clock.get();
        let until = deadline_ms
            .saturating_mul(1_000_000)
            .min(now + IDLE_STEP_NS)
            .max(now);
        self.clock.set(until);
    }

    fn power_button_pressed(&mut self) -> bool {
        self.button.replace(false)
    }

    fn system(&self) -> SystemFigures {
        SystemFigures {
            uptime_seconds: self.clock.get() as f64 / 1e9,
            ..SystemFigures::default()
        }
    }

    fn net_stats(&self) -> &NetStats {
        &self.net_stats
    }
}

/// A memory disk the test keeps a handle on after the guest closed it.
#[derive(Clone)]
struct SharedDisk(Rc<RefCell<MemDisk>>);

impl BlockDevice for SharedDisk {
    fn capacity(&self) -> u64 {
        self.0.borrow().capacity()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.0.borrow_mut().read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.0.borrow_mut().write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.0.borrow_mut().flush()
    }
    fn zeroes_from(&self) -> Option<u64> {
        self.0.borrow().zeroes_from()
    }
    fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
        self.0.borrow_mut().grow(need, want, wait)
    }
}

/// The guest's block device: a [`MemQueue`] over the shared memory disk (completing in a
/// shuffled order), which tells the test how many requests it holds and held at once, and
/// completes nothing while the test holds it.
struct TestQueue {
    queue: MemQueue<SharedDisk>,
    probe: QueueProbe,
}

/// The test's side of a [`TestQueue`].
#[derive(Clone, Default)]
struct QueueProbe {
    max_in_flight: Rc<Cell<usize>>,
    in_flight: Rc<Cell<usize>>,
    /// While set, queued requests do not complete.
    hold: Rc<Cell<bool>>,
}

impl BlockDevice for TestQueue {
    fn capacity(&self) -> u64 {
        self.queue.capacity()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.queue.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.queue.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.queue.flush()
    }
    fn zeroes_from(&self) -> Option<u64> {
        self.queue.zeroes_from()
    }
    fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
        self.queue.grow(need, want, wait)
    }
}

impl BlockQueue for TestQueue {
    fn queue_alignment(&self) -> u64 {
        self.queue.queue_alignment()
    }
    fn queue_depth(&self) -> usize {
        self.queue.queue_depth()
    }
    fn submit(&mut self, tag: u64, op: QueuedOp) -> Result<(), QueuedOp> {
        let r = self.queue.submit(tag, op);
        let n = self.queue.in_flight();
        self.probe.in_flight.set(n);
        self.probe
            .max_in_flight
            .set(self.probe.max_in_flight.get().max(n));
        r
    }
    fn poll(&mut self) -> Option<Completion> {
        if self.probe.hold.get() {
            return None;
        }
        let c = self.queue.poll();
        self.probe.in_flight.set(self.queue.in_flight());
        c
    }
    fn in_flight(&self) -> usize {
        self.queue.in_flight()
    }
}

const GUEST_IP: [u8; 4] = [10, 0, 0, 1];
const CLIENT_IP: [u8; 4] = [10, 0, 0, 2];
const HTTP_PORT: u16 = 9090;
const NBD_PORT: u16 = 10809;
const VIRTUAL_SIZE: u64 = 16 << 20;

/// The guest, its clients' interface, and the clock they share.
struct Harness {
    guest: Guest<TestPlatform, TestQueue>,
    clock: Clock,
    button: Rc<Cell<bool>>,
    disk: SharedDisk,
    /// What the guest's block device holds.
    probe: QueueProbe,
    iface: Interface,
    dev: LinkEnd,
    sockets: SocketSet<'static>,
    next_port: u16,
    exit: Option<GuestExit>,
}

fn now(clock: &Clock) -> Instant {
    Instant::from_micros((clock.get() / 1000) as i64)
}

impl Harness {
    /// A guest serving a fresh qcow2 image (16 MiB) at 10.0.0.1.
    fn new() -> Harness {
        Harness::with(VIRTUAL_SIZE, "")
    }

    /// A guest serving a fresh qcow2 image of `virtual_size` bytes at 10.0.0.1.
    fn with_size(virtual_size: u64) -> Harness {
        Harness::with(virtual_size, "")
    }

    /// Like [`Harness::new`], with more kernel arguments.
    fn with_args(args: &str) -> Harness {
        Harness::with(VIRTUAL_SIZE, args)
    }

    /// A guest serving a fresh qcow2 image of `virtual_size` bytes, with more kernel
    /// arguments.
    fn with(virtual_size: u64, args: &str) -> Harness {
        let disk = SharedDisk(Rc::new(RefCell::new(MemDisk::growable())));
        let opts = CreateOptions {
            virtual_size,
            ..CreateOptions::default()
        };
        Qcow2::create(disk.clone(), &opts)
            .expect("create the image")
            .close()
            .expect("close the new image");
        let (config, _) =
            Config::parse(&format!("ip=10.0.0.1/24 log=warn {args}")).expect("command line");
        let clock = Clock::new(Cell::new(1_000_000_000));
        let button = Rc::new(Cell::new(false));
        let metrics = GuestMetrics::new(&GuestConfig {
            disk: &config.export,
            device: "vda",
            interface: "eth0",
            version: "test",
            mirage: false,
            clock: || 0,
        });
        let probe = QueueProbe::default();
        let device = TestQueue {
            queue: MemQueue::new(disk.clone(), 32, CompletionOrder::Shuffled(7)),
            probe: probe.clone(),
        };
        let guest_disk = open_disk(Some(device), Vec::new(), &config, &metrics, || 0);
        let (guest_end, client_end) = link();
        let platform = TestPlatform {
            clock: clock.clone(),
            button: button.clone(),
            net_stats: NetStats::default(),
        };
        let setup = GuestSetup {
            config,
            version: "test",
            mac: [2, 0, 0, 0, 0, 1],
            seed: 1,
            heap_bytes: 1 << 30,
        };
        let guest = Guest::new(platform, guest_end, guest_disk, metrics, setup);

        let mut dev = client_end;
        let mut cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress([
            2, 0, 0, 0, 0, 2,
        ])));
        cfg.random_seed = 2;
        let mut iface = Interface::new(cfg, &mut dev, now(&clock));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                IpAddress::Ipv4(Ipv4Address::from(CLIENT_IP)),
                24,
            ));
        });
        Harness {
            guest,
            clock,
            button,
            disk,
            probe,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            next_port: 40000,
            exit: None,
        }
    }

    /// One turn of the guest and one poll of the clients; the clock moves 1 ms.
    fn step(&mut self) {
        self.iface
            .poll(now(&self.clock), &mut self.dev, &mut self.sockets);
        if self.exit.is_none() {
            self.exit = self.guest.turn();
        }
        self.iface
            .poll(now(&self.clock), &mut self.dev, &mut self.sockets);
        self.clock.set(self.clock.get() + 1_000_000);
    }

    /// Steps until `done` holds; panics after `max_steps`, naming `what`.
    fn until(&mut self, what: &str, max_steps: usize, mut done: impl FnMut(&mut Harness) -> bool) {
        for _ in 0..max_steps {
            if done(self) {
                return;
            }
            self.step();
        }
        panic!("{what}: not done after {max_steps} steps");
    }

    /// Opens a connection to the guest's `port` and waits until it is established.
    fn connect(&mut self, port: u16) -> SocketHandle {
        let handle = self.start_connect(port);
        for _ in 0..10_000 {
            if self.socket(handle).state() == tcp::State::Established {
                return handle;
            }
            self.step();
        }
        panic!(
            "connection to port {port} not established: {}",
            self.socket(handle).state()
        );
    }

    /// Starts a connection to the guest's `port` (the SYN leaves on the next step).
    fn start_connect(&mut self, port: u16) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 256 << 10]),
            tcp::SocketBuffer::new(vec![0; 256 << 10]),
        );
        self.next_port += 1;
        socket
            .connect(
                self.iface.context(),
                (Ipv4Address::from(GUEST_IP), port),
                self.next_port,
            )
            .expect("connect");
        self.sockets.add(socket)
    }

    /// Closes a connection the guest has closed already, and forgets it.
    fn hang_up(&mut self, handle: SocketHandle) {
        self.socket(handle).close();
        self.until("connection closed", 10_000, |h| {
            matches!(
                h.socket(handle).state(),
                tcp::State::Closed | tcp::State::TimeWait
            )
        });
        self.sockets.remove(handle);
    }

    /// Lets `ms` milliseconds pass in steps of 50 ms (quicker than [`Harness::advance`];
    /// for waits where nothing needs a finer clock).
    fn idle(&mut self, ms: u64) {
        let end = self.clock.get() + ms * 1_000_000;
        while self.clock.get() < end {
            self.clock.set(self.clock.get() + 49_000_000);
            self.step();
        }
    }

    /// Steps until the virtual clock has moved `ms` milliseconds.
    fn advance(&mut self, ms: u64) {
        let end = self.clock.get() + ms * 1_000_000;
        self.until("time passed", usize::MAX, |h| h.clock.get() >= end);
    }

    fn socket(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Sends all of `data`.
    fn send(&mut self, handle: SocketHandle, data: &[u8]) {
        let mut sent = 0;
        self.until("data sent", 100_000, |h| {
            sent += h.socket(handle).send_slice(&data[sent..]).unwrap_or(0);
            sent == data.len()
        });
    }

    /// Receives exactly `len` bytes.
    fn recv_exact(&mut self, handle: SocketHandle, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        self.until("data received", 100_000, |h| {
            let want = len - out.len();
            let s = h.socket(handle);
            if s.can_recv() {
                let _ = s.recv(|buf| {
                    let n = buf.len().min(want);
                    out.extend_from_slice(&buf[..n]);
                    (n, ())
                });
            }
            out.len() == len
        });
        out
    }

    /// Receives until the guest closes the connection.
    fn recv_to_end(&mut self, handle: SocketHandle) -> Vec<u8> {
        let mut out = Vec::new();
        self.until("connection closed by the guest", 100_000, |h| {
            h.recv_some(handle, &mut out)
        });
        out
    }

    /// Appends what has arrived on `handle` to `out`; returns whether the guest closed it.
    fn recv_some(&mut self, handle: SocketHandle, out: &mut Vec<u8>) -> bool {
        let s = self.socket(handle);
        if s.can_recv() {
            let _ = s.recv(|buf| {
                out.extend_from_slice(buf);
                (buf.len(), ())
            });
        }
        !s.may_recv()
    }

    /// NBD: fixed-newstyle handshake with `NBD_OPT_EXPORT_NAME`; returns the export size.
    fn nbd_handshake(&mut self, handle: SocketHandle) -> u64 {
        let greeting = self.recv_exact(handle, 18);
        assert_eq!(greeting[..8], NBDMAGIC.to_be_bytes());
        assert_eq!(greeting[8..16], IHAVEOPT.to_be_bytes());
        let mut hello = Vec::new();
        hello.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        hello.extend_from_slice(&0u32.to_be_bytes());
        self.send(handle, &hello);
        let info = self.recv_exact(handle, 10);
        u64::from_be_bytes(info[..8].try_into().unwrap())
    }

    /// NBD: one request (simple reply); returns the error and the read data.
    fn nbd_request(
        &mut self,
        handle: SocketHandle,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> (u32, Vec<u8>) {
        self.nbd_send(handle, cmd, cookie, offset, len, data);
        self.nbd_reply(handle, cookie, if cmd == CMD_READ { len } else { 0 })
    }

    fn nbd_send(
        &mut self,
        handle: SocketHandle,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        self.send(handle, &nbd_request_bytes(cmd, cookie, offset, len, data));
    }

    fn nbd_reply(&mut self, handle: SocketHandle, cookie: u64, data_len: u32) -> (u32, Vec<u8>) {
        let head = self.recv_exact(handle, 16);
        assert_eq!(head[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        assert_eq!(head[8..16], cookie.to_be_bytes());
        let data = if error == 0 && data_len > 0 {
            self.recv_exact(handle, data_len as usize)
        } else {
            Vec::new()
        };
        (error, data)
    }

    /// An NBD client past the handshake that has written `pattern(1 MiB, seed)` at 0 (the
    /// engine's path, allocating): overwrites of the first MiB can then go to the queue.
    fn nbd_client_over_first_mib(&mut self, seed: u8) -> (SocketHandle, Vec<u8>) {
        let c = self.connect(NBD_PORT);
        self.nbd_handshake(c);
        let base = pattern(1 << 20, seed);
        let (err, _) = self.nbd_request(c, CMD_WRITE, 1, 0, base.len() as u32, &base);
        assert_eq!(err, 0);
        (c, base)
    }

    /// `n` scrapers connect to the metrics port at once (all in one batch of frames), each
    /// asks for `/healthz`, gets its answer and hangs up.
    fn http_burst(&mut self, n: usize) {
        let burst: Vec<_> = (0..n).map(|_| self.start_connect(HTTP_PORT)).collect();
        self.until("the burst established", 100_000, |h| {
            burst
                .iter()
                .all(|&c| h.sockets.get::<tcp::Socket>(c).state() == tcp::State::Established)
        });
        for &c in &burst {
            self.send(
                c,
                b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
            );
        }
        for &c in &burst {
            assert!(self.recv_to_end(c).starts_with(b"HTTP/1.1 200 OK\r\n"));
            self.hang_up(c);
        }
    }

    /// Presses the power button and steps until the guest has shut down.
    fn power_off(&mut self) -> GuestExit {
        self.button.set(true);
        self.until("guest shut down", 100_000, |h| h.exit.is_some());
        self.exit.unwrap()
    }

    /// The image as the guest left it: header not dirty, `check` clean; returns the engine.
    fn reopen_clean(&self) -> Qcow2<MemDisk> {
        let bytes = self.disk.0.borrow().bytes().to_vec();
        let incompatible = u64::from_be_bytes(bytes[72..80].try_into().unwrap());
        assert_eq!(incompatible & 1, 0, "the image is still marked dirty");
        let mut engine = Qcow2::open(MemDisk::from_bytes(bytes, false), OpenOptions::default())
            .expect("reopen the image");
        let report = engine.check().expect("check");
        assert!(report.is_clean(), "check found problems: {report:?}");
        engine
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn scrape_answers_with_the_registry() {
    let mut h = Harness::new();
    let c = h.connect(HTTP_PORT);
    h.send(
        c,
        b"GET /metrics HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n",
    );
    let reply = h.recv_to_end(c);
    let text = core::str::from_utf8(&reply).expect("UTF-8 reply");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:.200}");
    assert!(text.contains("qcow_metal_build_info{"), "{text}");
    assert!(text.contains("qcow_metal_http_requests_total"), "{text}");
    assert!(
        text.contains("qcow_metal_connections_accepted_total{service=\"http\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("qcow_metal_connections_refused_total{service=\"nbd\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("qcow_metal_listener_sockets{service=\"nbd\",state=\"listening\"} 8\n"),
        "{text}"
    );
}

#[test]
fn a_static_address_is_announced_when_the_network_comes_up() {
    use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol};
    let h = Harness::new();
    // Before anyone asked: a broadcast ARP request for the guest's own address, from it, so
    // a peer whose ARP request was lost before the network was up learns the address.
    let guest_mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
    let announcements: Vec<ArpRepr> = h
        .dev
        .rx
        .borrow()
        .iter()
        .filter_map(|f| {
            let frame = EthernetFrame::new_checked(&f[..]).ok()?;
            if frame.ethertype() != EthernetProtocol::Arp
                || frame.dst_addr() != EthernetAddress::BROADCAST
                || frame.src_addr() != guest_mac
            {
                return None;
            }
            ArpRepr::parse(&ArpPacket::new_checked(frame.payload()).ok()?).ok()
        })
        .collect();
    let guest_ip = Ipv4Address::from(GUEST_IP);
    assert_eq!(
        announcements,
        [ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: guest_mac,
            source_protocol_addr: guest_ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: guest_ip,
        }]
    );
}

#[test]
fn a_peer_whose_fin_ack_was_lost_gets_it_again_not_a_reset() {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket};
    // The guest's flags on a TCP frame it sent from the metrics port: (RST, a lone ACK).
    fn guest_tcp(frame: &[u8]) -> Option<(bool, bool)> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return None;
        }
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        if ip.next_header() != IpProtocol::Tcp {
            return None;
        }
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        if tcp.src_port() != HTTP_PORT {
            return None;
        }
        let lone_ack = tcp.ack() && !tcp.syn() && !tcp.fin() && !tcp.rst();
        Some((tcp.rst(), lone_ack && tcp.payload().is_empty()))
    }

    let mut h = Harness::new();
    let c = h.connect(HTTP_PORT);
    h.send(
        c,
        b"GET /metrics HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n",
    );
    let reply = h.recv_to_end(c);
    assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"));
    // The guest closed first; the client's FIN follows, and the guest's ACK of it is lost
    // (as when the transmit queue is full): the client sends its FIN again.
    h.socket(c).close();
    let (mut dropped, mut resets) = (0, 0);
    for _ in 0..10_000 {
        if dropped > 0 && h.socket(c).state() == tcp::State::Closed {
            break;
        }
        h.iface.poll(now(&h.clock), &mut h.dev, &mut h.sockets);
        assert!(h.guest.turn().is_none());
        let mut frames = h.dev.rx.borrow_mut();
        frames.retain(|f| match guest_tcp(f) {
            Some((true, _)) => {
                resets += 1;
                true
            }
            Some((false, true)) if dropped == 0 => {
                dropped += 1;
                false
            }
            _ => true,
        });
        drop(frames);
        h.iface.poll(now(&h.clock), &mut h.dev, &mut h.sockets);
        h.clock.set(h.clock.get() + 1_000_000);
    }
    assert_eq!(dropped, 1, "the guest never acknowledged the client's FIN");
    assert_eq!(h.socket(c).state(), tcp::State::Closed);
    assert_eq!(resets, 0, "the client's second FIN was answered with RST");
    // The socket listens again afterwards: a new scrape is answered.
    h.idle(3_000);
    let text = scrape(&mut h);
    assert!(text.starts_with(b"HTTP/1.1 200 OK\r\n"));
}

#[test]
fn nbd_write_read_then_power_off_leaves_a_clean_image() {
    let mut h = Harness::new();
    let c = h.connect(NBD_PORT);
    assert_eq!(h.nbd_handshake(c), VIRTUAL_SIZE);
    let data = pattern(256 << 10, 7);
    let (err, _) = h.nbd_request(c, CMD_WRITE, 1, 1 << 20, data.len() as u32, &data);
    assert_eq!(err, 0);
    assert_eq!(h.nbd_request(c, CMD_FLUSH, 2, 0, 0, &[]).0, 0);
    let (err, back) = h.nbd_request(c, CMD_READ, 3, 1 << 20, data.len() as u32, &[]);
    assert_eq!(err, 0);
    assert!(back == data, "read back differs from what was written");
    assert_eq!(h.guest.nbd_stats().requests.iter().sum::<u64>(), 3);

    assert_eq!(h.power_off(), GuestExit::Clean);
    let mut engine = h.reopen_clean();
    let mut stored = vec![0; data.len()];
    crate::disk::VirtualDisk::read(&mut engine, 1 << 20, &mut stored).unwrap();
    assert!(stored == data, "the image does not hold the written data");
}

#[test]
fn power_off_drains_a_write_in_flight() {
    let mut h = Harness::new();
    let c = h.connect(NBD_PORT);
    h.nbd_handshake(c);
    let data = pattern(64 << 10, 3);
    // The request is on its way when the button is pressed: it is served, its reply
    // reaches the client, then the guest closes the disk.
    h.nbd_send(c, CMD_WRITE, 9, 4 << 20, data.len() as u32, &data);
    h.button.set(true);
    let (err, _) = h.nbd_reply(c, 9, 0);
    assert_eq!(err, 0);
    h.until("guest shut down", 100_000, |h| h.exit.is_some());
    assert_eq!(h.exit, Some(GuestExit::Clean));
    let mut engine = h.reopen_clean();
    let mut stored = vec![0; data.len()];
    crate::disk::VirtualDisk::read(&mut engine, 4 << 20, &mut stored).unwrap();
    assert!(stored == data, "the drained write is not on the disk");
}

#[test]
fn a_scrape_is_answered_while_a_32_mib_write_is_in_progress() {
    const LEN: usize = 32 << 20;
    let mut h = Harness::with_size(64 << 20);
    let nbd = h.connect(NBD_PORT);
    h.nbd_handshake(nbd);
    let payload = pattern(LEN, 5);
    // The request header and the first 4 MiB of its payload.
    h.nbd_send(nbd, CMD_WRITE, 1, 8 << 20, LEN as u32, &[]);
    let mut sent = 0;
    h.until("4 MiB of the payload sent", 100_000, |h| {
        sent += h
            .socket(nbd)
            .send_slice(&payload[sent..4 << 20])
            .unwrap_or(0);
        sent == 4 << 20
    });
    // A scrape on a fresh connection while the rest of the payload keeps flowing.
    let http = h.connect(HTTP_PORT);
    h.send(
        http,
        b"GET /metrics HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n",
    );
    let mut scrape = Vec::new();
    h.until("scrape answered", 100_000, |h| {
        sent += h.socket(nbd).send_slice(&payload[sent..]).unwrap_or(0);
        h.recv_some(http, &mut scrape)
    });
    let text = core::str::from_utf8(&scrape).expect("UTF-8 scrape");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:.200}");
    assert!(
        text.contains("qcow_metal_nbd_"),
        "no NBD families in the scrape"
    );
    // The write was still in progress: part of its payload not even sent, no reply yet.
    assert!(
        sent < LEN,
        "the whole payload went out before the scrape was answered"
    );
    assert_eq!(
        h.socket(nbd).recv_queue(),
        0,
        "the write finished before the scrape"
    );
    assert_eq!(h.guest.nbd_stats().bytes_written, 0);
    // The write completes, and everything it wrote is there.
    h.until("payload sent", 1_000_000, |h| {
        sent += h.socket(nbd).send_slice(&payload[sent..]).unwrap_or(0);
        sent == LEN
    });
    assert_eq!(h.nbd_reply(nbd, 1, 0).0, 0);
    assert_eq!(h.guest.nbd_stats().bytes_written, LEN as u64);
    assert_eq!(h.power_off(), GuestExit::Clean);
    let mut engine = h.reopen_clean();
    let mut stored = vec![0; LEN];
    crate::disk::VirtualDisk::read(&mut engine, 8 << 20, &mut stored).unwrap();
    assert!(
        stored == payload,
        "the image does not hold the 32 MiB write"
    );
}

/// Sends a scrape on a fresh connection and returns the status line.
fn scrape(h: &mut Harness) -> Vec<u8> {
    let c = h.connect(HTTP_PORT);
    h.send(
        c,
        b"GET /metrics HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n",
    );
    let reply = h.recv_to_end(c);
    h.hang_up(c);
    reply
}

#[test]
fn a_burst_of_connections_in_one_batch_is_accepted_without_reset() {
    use super::net::{HTTP_POLICY, Service};
    let mut h = Harness::new();
    // 80 SYNs reach the guest in the same batch of frames: far more than the 16 listening
    // sockets the pool starts with.
    let burst = 80;
    let handles: Vec<_> = (0..burst).map(|_| h.start_connect(HTTP_PORT)).collect();
    h.until("every connection established", 100_000, |h| {
        for &c in &handles {
            let state = h.socket(c).state();
            assert_ne!(state, tcp::State::Closed, "a connection was reset");
        }
        handles
            .iter()
            .all(|&c| h.sockets.get::<tcp::Socket>(c).state() == tcp::State::Established)
    });
    let stats = h.guest.port_stats(Service::Http);
    assert_eq!(stats.refused, 0);
    assert_eq!(stats.evicted, 0);
    let pool = h.guest.network().pool_size(Service::Http);
    assert!(pool >= burst && pool <= HTTP_POLICY.max, "pool of {pool}");
    // Every one of them is served.
    for &c in &handles {
        h.send(
            c,
            b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
        );
    }
    for &c in &handles {
        let reply = h.recv_to_end(c);
        assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"));
    }
    assert_eq!(h.guest.port_stats(Service::Http).accepted, burst as u64);
}

/// A guest whose pools cannot grow (a budget below the boot-time pools: 16 HTTP, 8 NBD
/// sockets), `silent` HTTP clients connected and idle long enough to be evicted, then
/// `scrapes` scrapes answered on fresh connections. Returns the guest and the silent clients.
fn full_http_port(silent: usize, scrapes: usize) -> (Harness, Vec<SocketHandle>) {
    let mut h = Harness::with_args("net_buffers=1M");
    let clients: Vec<_> = (0..silent).map(|_| h.connect(HTTP_PORT)).collect();
    h.advance(MIN_IDLE_MS);
    for _ in 0..scrapes {
        let reply = scrape(&mut h);
        assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"));
    }
    (h, clients)
}

#[test]
fn a_full_port_evicts_the_connection_idle_longest() {
    use super::net::Service;
    // Every HTTP socket holds a silent client; 20 scrapes on fresh connections each evict
    // the one idle longest (the silent ones first, then earlier scrapers' closed sockets
    // are listening again anyway).
    let (mut h, silent) = full_http_port(16, 20);
    let stats = h.guest.port_stats(Service::Http);
    assert_eq!(stats.refused, 0, "{stats:?}");
    assert!(stats.evicted >= 1, "{stats:?}");
    // The first silent client went first: it has been reset.
    h.step();
    assert_eq!(h.socket(silent[0]).state(), tcp::State::Closed);
    assert_eq!(h.guest.network().pool_size(Service::Http), 16);

    // NBD: 8 clients finish the handshake and go quiet; a 9th is served after the
    // others have been idle long enough to be evicted: one makes room for it, one more
    // keeps a socket listening for the next client.
    let idle: Vec<_> = (0..8)
        .map(|_| {
            let c = h.connect(NBD_PORT);
            h.nbd_handshake(c);
            c
        })
        .collect();
    h.advance(super::session::NBD_EVICTABLE_IDLE_MS + 100);
    let c = h.connect(NBD_PORT);
    assert_eq!(h.nbd_handshake(c), VIRTUAL_SIZE);
    let data = pattern(4096, 1);
    assert_eq!(h.nbd_request(c, CMD_WRITE, 1, 0, 4096, &data).0, 0);
    let stats = h.guest.port_stats(Service::Nbd);
    assert_eq!((stats.evicted, stats.refused), (2, 0), "{stats:?}");
    let closed = idle
        .iter()
        .filter(|&&c| h.sockets.get::<tcp::Socket>(c).state() == tcp::State::Closed)
        .count();
    assert_eq!(closed, 2);
}

#[test]
fn a_full_port_reuses_sockets_in_time_wait_before_it_evicts_anyone() {
    use super::net::Service;
    // 16 HTTP sockets and no room to grow: 14 silent clients, then two scrapes whose
    // sockets stay in TIME-WAIT after their clean close.
    let (mut h, silent) = full_http_port(14, 2);
    // The second scrape took the last listener: a socket in TIME-WAIT listens again instead
    // of a silent client being evicted; a 15th silent client takes it and the other one.
    let late = h.connect(HTTP_PORT);
    h.step();
    let stats = h.guest.port_stats(Service::Http);
    assert_eq!((stats.evicted, stats.refused), (0, 0), "{stats:?}");
    for &c in silent.iter().chain([&late]) {
        assert_eq!(h.socket(c).state(), tcp::State::Established);
    }
    // Nothing left in TIME-WAIT: the next client evicts the one idle longest.
    let _next = h.connect(HTTP_PORT);
    h.step();
    let stats = h.guest.port_stats(Service::Http);
    assert_eq!((stats.evicted, stats.refused), (1, 0), "{stats:?}");
    assert_eq!(h.socket(silent[0]).state(), tcp::State::Closed);
    assert_eq!(h.guest.network().pool_size(Service::Http), 16);
}

#[test]
fn idle_nbd_clients_time_out_and_are_counted() {
    use super::net::Service;
    let mut h = Harness::with_args("nbd_idle=2s");
    let c = h.connect(NBD_PORT);
    h.nbd_handshake(c);
    // Busy clients are not timed out: a request every second for 5 s.
    for i in 0..5 {
        assert_eq!(h.nbd_request(c, CMD_FLUSH, i, 0, 0, &[]).0, 0);
        h.advance(1000);
    }
    assert_eq!(h.guest.port_stats(Service::Nbd).timed_out, 0);
    h.until("idle client disconnected", 1_000_000, |h| {
        !h.socket(c).may_recv()
    });
    let stats = h.guest.port_stats(Service::Nbd);
    assert_eq!(stats.timed_out, 1, "{stats:?}");
    assert_eq!(h.guest.nbd_stats().connections_active, 0);
}

#[test]
fn slow_clients_cannot_hold_the_metrics_port() {
    use super::net::Service;
    // 16 sockets and no growth: 40 slowloris clients dribble their request heads.
    let mut h = Harness::with_args("net_buffers=1M");
    let mut slow = Vec::new();
    for _ in 0..40 {
        let c = h.start_connect(HTTP_PORT);
        slow.push(c);
        h.advance(20);
    }
    for round in 0..20 {
        for &c in &slow {
            if h.socket(c).can_send() {
                let _ = h.socket(c).send_slice(if round == 0 {
                    b"GET /metrics HTTP/1.1\r\n"
                } else {
                    b"X"
                });
            }
        }
        h.advance(200);
        // Scrapes keep being answered all along.
        if round % 4 == 3 {
            let reply = scrape(&mut h);
            assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"), "round {round}");
        }
    }
    let stats = h.guest.port_stats(Service::Http);
    assert_eq!(stats.refused, 0, "{stats:?}");
    assert!(stats.evicted > 0, "{stats:?}");
}

/// One NBD request (header and payload) as a client puts it on the wire.
fn nbd_request_bytes(cmd: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> Vec<u8> {
    let mut req = Vec::new();
    req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&cmd.to_be_bytes());
    req.extend_from_slice(&cookie.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&len.to_be_bytes());
    req.extend_from_slice(data);
    req
}

/// Splits simple replies off the front of `buf`: (cookie, error, data), in arrival order;
/// `read_len(cookie)` is how many data bytes a successful reply to that cookie carries.
/// Leaves an incomplete reply in `buf`.
fn take_replies(buf: &mut Vec<u8>, read_len: impl Fn(u64) -> usize) -> Vec<(u64, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 16 {
        let head = &buf[at..at + 16];
        assert_eq!(head[..4], SIMPLE_REPLY_MAGIC.to_be_bytes(), "reply magic");
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let n = if error == 0 { read_len(cookie) } else { 0 };
        if buf.len() - at < 16 + n {
            break;
        }
        out.push((cookie, error, buf[at + 16..at + 16 + n].to_vec()));
        at += 16 + n;
    }
    buf.drain(..at);
    out
}

/// The value of `series` (name and labels, as rendered) in a text scrape.
fn scraped_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// 3 clients each pipeline 16 overwrites and 16 reads of allocated clusters: the requests
/// go to the device's queue together, the replies come back as the device completes them
/// (out of order), the data is right, and the disk's counters count every request once.
#[test]
fn pipelined_requests_of_several_clients_are_in_flight_together() {
    const CLIENTS: u64 = 3;
    const BLOCK: usize = 4096;
    let mut h = Harness::new();
    let (first, base) = h.nbd_client_over_first_mib(1);
    let mut clients = vec![first];
    for _ in 1..CLIENTS {
        let c = h.connect(NBD_PORT);
        h.nbd_handshake(c);
        clients.push(c);
    }
    let slot = |k: u64, i: u64| (k * 16 + i) * 2 * BLOCK as u64;
    let block = |k: u64, i: u64| pattern(BLOCK, (k * 16 + i) as u8 + 100);
    for (k, &c) in clients.iter().enumerate() {
        let k = k as u64;
        let mut wire = Vec::new();
        for i in 0..16 {
            wire.extend(nbd_request_bytes(
                CMD_WRITE,
                100 + i,
                slot(k, i),
                BLOCK as u32,
                &block(k, i),
            ));
        }
        for i in 0..16 {
            wire.extend(nbd_request_bytes(
                CMD_READ,
                200 + i,
                slot(k, i) + BLOCK as u64,
                BLOCK as u32,
                &[],
            ));
        }
        assert_eq!(h.socket(c).send_slice(&wire), Ok(wire.len()));
    }
    let read_len = |cookie: u64| if cookie >= 200 { BLOCK } else { 0 };
    let mut bufs = vec![Vec::new(); clients.len()];
    let mut replies: Vec<Vec<(u64, u32, Vec<u8>)>> = vec![Vec::new(); clients.len()];
    h.until("every reply received", 100_000, |h| {
        for (k, &c) in clients.iter().enumerate() {
            h.recv_some(c, &mut bufs[k]);
            replies[k].extend(take_replies(&mut bufs[k], read_len));
        }
        replies.iter().all(|r| r.len() == 32)
    });
    let mut out_of_order = 0;
    for (k, got) in replies.iter().enumerate() {
        let k = k as u64;
        let cookies: Vec<u64> = got.iter().map(|r| r.0).collect();
        let mut sorted = cookies.clone();
        sorted.sort_unstable();
        let want: Vec<u64> = (100..116).chain(200..216).collect();
        assert_eq!(sorted, want, "client {k}: every request answered once");
        if cookies != want {
            out_of_order += 1;
        }
        for (cookie, error, data) in got {
            assert_eq!(*error, 0, "client {k}, request {cookie}");
            if *cookie >= 200 {
                let at = (slot(k, cookie - 200) as usize) + BLOCK;
                assert!(
                    data[..] == base[at..at + BLOCK],
                    "client {k}: read {cookie} returned other bytes"
                );
            }
        }
    }
    assert!(out_of_order > 0, "every client's replies came in order");
    let max = h.probe.max_in_flight.get();
    assert!(
        max >= 16,
        "at most {max} requests were on the device at once"
    );
    // The disk's counters: every request once, whichever path served it.
    let reply = scrape(&mut h);
    let text = core::str::from_utf8(&reply).expect("UTF-8 scrape");
    let disk = |op: &str| {
        scraped_value(
            text,
            &format!("qcow_metal_disk_requests_total{{disk=\"disk\",op=\"{op}\"}}"),
        )
    };
    assert_eq!(disk("write"), Some((1 + 16 * CLIENTS) as f64), "{text}");
    assert_eq!(disk("read"), Some((16 * CLIENTS) as f64), "{text}");
    assert_eq!(
        scraped_value(
            text,
            "qcow_metal_disk_bytes_total{disk=\"disk\",op=\"read\"}"
        ),
        Some((16 * CLIENTS * BLOCK as u64) as f64)
    );
    assert_eq!(h.power_off(), GuestExit::Clean);
    let mut engine = h.reopen_clean();
    let mut stored = vec![0; BLOCK];
    for k in 0..CLIENTS {
        for i in 0..16 {
            crate::disk::VirtualDisk::read(&mut engine, slot(k, i), &mut stored).unwrap();
            assert!(
                stored == block(k, i),
                "client {k}: write {i} is not on the disk"
            );
        }
    }
}

/// A client keeps hundreds of reads pipelined; a scrape on a fresh connection is answered
/// while most of them are still unanswered: batches end, and the loop serves the others in
/// between.
#[test]
fn a_scrape_is_answered_while_a_client_keeps_hundreds_of_requests_pipelined() {
    const READS: u64 = 1024;
    let mut h = Harness::new();
    let (nbd, base) = h.nbd_client_over_first_mib(9);
    let mut wire = Vec::new();
    for i in 0..READS {
        wire.extend(nbd_request_bytes(
            CMD_READ,
            10 + i,
            (i % 256) * 4096,
            4096,
            &[],
        ));
    }
    assert_eq!(h.socket(nbd).send_slice(&wire), Ok(wire.len()));
    let http = h.connect(HTTP_PORT);
    h.send(
        http,
        b"GET /metrics HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n",
    );
    let mut buf = Vec::new();
    let mut answered = 0;
    let mut scrape = Vec::new();
    h.until("scrape answered", 100_000, |h| {
        h.recv_some(nbd, &mut buf);
        answered += take_replies(&mut buf, |_| 4096).len();
        h.recv_some(http, &mut scrape)
    });
    let text = core::str::from_utf8(&scrape).expect("UTF-8 scrape");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:.200}");
    assert!(
        (answered as u64) < READS / 2,
        "{answered} of {READS} reads were answered before the scrape"
    );
    h.until("every read answered", 1_000_000, |h| {
        h.recv_some(nbd, &mut buf);
        for (cookie, error, data) in take_replies(&mut buf, |_| 4096) {
            assert_eq!(error, 0);
            let at = ((cookie - 10) % 256) as usize * 4096;
            assert!(data[..] == base[at..at + 4096], "read {cookie}");
            answered += 1;
        }
        answered as u64 == READS
    });
    assert!(
        h.probe.max_in_flight.get() >= 16,
        "{}",
        h.probe.max_in_flight.get()
    );
}

/// The power button is pressed while a client's pipelined writes are on their way: every
/// one of them is served and answered, then the disk is closed clean with all of them.
#[test]
fn power_off_drains_pipelined_requests() {
    let mut h = Harness::new();
    let (c, _) = h.nbd_client_over_first_mib(2);
    let mut wire = Vec::new();
    for i in 0..24u64 {
        wire.extend(nbd_request_bytes(
            CMD_WRITE,
            100 + i,
            i * 16384,
            8192,
            &pattern(8192, i as u8 + 50),
        ));
    }
    assert_eq!(h.socket(c).send_slice(&wire), Ok(wire.len()));
    // The button is pressed while 16 or more of them are on the device.
    h.probe.hold.set(true);
    h.until("writes on the device", 10_000, |h| {
        h.probe.in_flight.get() >= 16
    });
    h.button.set(true);
    for _ in 0..20 {
        h.step();
    }
    assert!(
        h.exit.is_none(),
        "the guest shut down with requests in flight"
    );
    h.probe.hold.set(false);
    let mut buf = Vec::new();
    let mut got = Vec::new();
    h.until("every write answered", 100_000, |h| {
        h.recv_some(c, &mut buf);
        got.extend(take_replies(&mut buf, |_| 0));
        got.len() == 24
    });
    assert!(got.iter().all(|r| r.1 == 0), "{got:?}");
    h.until("guest shut down", 100_000, |h| h.exit.is_some());
    assert_eq!(h.exit, Some(GuestExit::Clean));
    assert!(
        h.probe.max_in_flight.get() >= 16,
        "{}",
        h.probe.max_in_flight.get()
    );
    let mut engine = h.reopen_clean();
    let mut stored = vec![0; 8192];
    for i in 0..24u64 {
        crate::disk::VirtualDisk::read(&mut engine, i * 16384, &mut stored).unwrap();
        assert!(stored == pattern(8192, i as u8 + 50), "write {i} lost");
    }
}

#[test]
fn pools_grown_for_a_burst_shrink_back_when_no_longer_needed() {
    use super::net::{HTTP_POLICY, NBD_POLICY, SHRINK_WINDOW_MS, SPARE_LISTENERS, Service};
    let mut h = Harness::new();
    let boot_bytes = h.guest.network().buffer_bytes().0;
    // 20 NBD clients stay connected all along (well within the 600 s idle timeout).
    let held: Vec<_> = (0..20)
        .map(|_| {
            let c = h.connect(NBD_PORT);
            h.nbd_handshake(c);
            c
        })
        .collect();
    let nbd_grown = h.guest.network().pool_size(Service::Nbd);
    assert!(nbd_grown >= 20 + SPARE_LISTENERS, "NBD pool of {nbd_grown}");
    // A burst of 80 scrapers on the metrics port, served and gone.
    h.http_burst(80);
    let http_grown = h.guest.network().pool_size(Service::Http);
    assert!(http_grown >= 80, "HTTP pool of {http_grown}");

    // Two windows later the metrics port is back at its boot-time pool; the NBD port keeps
    // a socket for each of its clients and its spare listeners.
    h.idle(2 * SHRINK_WINDOW_MS + 5000);
    let net = h.guest.network();
    assert_eq!(net.pool_size(Service::Http), HTTP_POLICY.initial);
    assert_eq!(net.pool_size(Service::Nbd), 20 + SPARE_LISTENERS);
    let extra_nbd = (20 + SPARE_LISTENERS - NBD_POLICY.initial) as u64;
    assert_eq!(
        net.buffer_bytes().0,
        boot_bytes + extra_nbd * NBD_POLICY.socket_bytes()
    );

    // The held clients are still served, and once they leave the NBD pool shrinks too.
    let data = pattern(4096, 7);
    assert_eq!(h.nbd_request(held[3], CMD_WRITE, 1, 0, 4096, &data).0, 0);
    for &c in &held {
        h.nbd_send(c, CMD_DISC, 0, 0, 0, &[]);
        h.until("the guest closes", 100_000, |h| !h.socket(c).may_recv());
        h.hang_up(c);
    }
    h.idle(2 * SHRINK_WINDOW_MS + 5000);
    let net = h.guest.network();
    assert_eq!(net.pool_size(Service::Nbd), NBD_POLICY.initial);
    assert_eq!(net.buffer_bytes().0, boot_bytes);
    let stats = h.guest.port_stats(Service::Http);
    assert_eq!((stats.refused, stats.evicted), (0, 0), "{stats:?}");

    // A new burst grows the pool again, and every connection is accepted.
    let again: Vec<_> = (0..40).map(|_| h.start_connect(HTTP_PORT)).collect();
    h.until("the second burst established", 100_000, |h| {
        again
            .iter()
            .all(|&c| h.sockets.get::<tcp::Socket>(c).state() == tcp::State::Established)
    });
    assert_eq!(h.guest.port_stats(Service::Http).refused, 0);
}

/// Two clients' reads stay on the device across turns (the test holds their completions):
/// a scrape is answered meanwhile, a flush behind them waits, and once the device completes
/// them every reply comes, the flush last.
#[test]
fn requests_of_two_clients_stay_in_flight_while_the_loop_serves_others() {
    let mut h = Harness::new();
    let (a, base) = h.nbd_client_over_first_mib(6);
    let b = h.connect(NBD_PORT);
    h.nbd_handshake(b);
    h.probe.hold.set(true);
    for (k, &c) in [a, b].iter().enumerate() {
        let mut wire = Vec::new();
        for i in 0..8u64 {
            let at = (k as u64 * 8 + i) * 4096;
            wire.extend(nbd_request_bytes(CMD_READ, 10 + i, at, 4096, &[]));
        }
        if c == b {
            wire.extend(nbd_request_bytes(CMD_FLUSH, 99, 0, 0, &[]));
        }
        assert_eq!(h.socket(c).send_slice(&wire), Ok(wire.len()));
    }
    h.until("both clients' reads on the device", 10_000, |h| {
        h.probe.in_flight.get() == 16
    });
    // A scrape while they are in flight.
    let reply = scrape(&mut h);
    assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(h.probe.in_flight.get(), 16, "the reads completed meanwhile");
    for &c in &[a, b] {
        assert_eq!(
            h.socket(c).recv_queue(),
            0,
            "a reply before the device completed"
        );
    }
    h.probe.hold.set(false);
    let mut bufs = [Vec::new(), Vec::new()];
    let mut got: [Vec<(u64, u32, Vec<u8>)>; 2] = [Vec::new(), Vec::new()];
    let read_len = |cookie: u64| if cookie == 99 { 0 } else { 4096 };
    h.until("every reply", 100_000, |h| {
        for (k, &c) in [a, b].iter().enumerate() {
            h.recv_some(c, &mut bufs[k]);
            got[k].extend(take_replies(&mut bufs[k], read_len));
        }
        got[0].len() == 8 && got[1].len() == 9
    });
    for (k, replies) in got.iter().enumerate() {
        for (cookie, error, data) in replies {
            assert_eq!(*error, 0, "client {k}, request {cookie}");
            if *cookie != 99 {
                let at = (k * 8 + (*cookie as usize - 10)) * 4096;
                assert!(data[..] == base[at..at + 4096], "client {k}: read {cookie}");
            }
        }
    }
    assert_eq!(
        got[1][8].0, 99,
        "the flush is answered after the reads before it"
    );
    assert_eq!(h.power_off(), GuestExit::Clean);
    h.reopen_clean();
}

/// A client's requests are in flight while the metrics port's pool shrinks and the client's
/// socket moves down the pool: the replies still reach it.
#[test]
fn replies_find_their_client_after_the_pool_shrank() {
    use super::net::{SHRINK_WINDOW_MS, Service};
    let mut h = Harness::new();
    let (_first, base) = h.nbd_client_over_first_mib(8);
    // A burst grows the metrics port's pool, then NBD clients grow the NBD pool after it.
    h.http_burst(40);
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let c = h.connect(NBD_PORT);
            h.nbd_handshake(c);
            c
        })
        .collect();
    let last = *clients.last().unwrap();
    let http_grown = h.guest.network().pool_size(Service::Http);
    h.probe.hold.set(true);
    let mut wire = Vec::new();
    for i in 0..8u64 {
        wire.extend(nbd_request_bytes(CMD_READ, 10 + i, i * 4096, 4096, &[]));
    }
    assert_eq!(h.socket(last).send_slice(&wire), Ok(wire.len()));
    h.until("the reads on the device", 10_000, |h| {
        h.probe.in_flight.get() == 8
    });
    h.idle(2 * SHRINK_WINDOW_MS + 5000);
    assert!(
        h.guest.network().pool_size(Service::Http) < http_grown,
        "the metrics port's pool did not shrink"
    );
    h.probe.hold.set(false);
    let mut buf = Vec::new();
    let mut got = Vec::new();
    h.until("every reply", 100_000, |h| {
        h.recv_some(last, &mut buf);
        got.extend(take_replies(&mut buf, |_| 4096));
        got.len() == 8
    });
    for (cookie, error, data) in &got {
        assert_eq!(*error, 0);
        let at = (*cookie as usize - 10) * 4096;
        assert!(data[..] == base[at..at + 4096], "read {cookie}");
    }
}
