//! The guest's TCP/IP stack: a smoltcp [`Interface`] on the network device, its address
//! (DHCP or static, from the [`Config`]; a static one is announced with a gratuitous ARP as
//! the interface comes up), and a pool of listening TCP sockets per port.
//!
//! Each service port gets several sockets listening on it at once (smoltcp hands an incoming
//! SYN to the first idle listener of the port, and answers a SYN that finds none with RST),
//! so that many clients can connect together. The pool keeps [`SPARE_LISTENERS`] sockets
//! listening on each port while it may grow: up to the port's maximum ([`PortPolicy`]) and
//! within the budget of socket buffer memory. Frames are taken in one at a time
//! ([`Network::ingress_one`]) and the device is wrapped in a [`Tap`] that notices SYNs, so
//! the caller tops the pool up between two frames ([`Network::top_up`]): a burst of SYNs in
//! one batch finds listeners. A socket whose connection has ended is put back to listening
//! by [`Network::relisten`]. A socket that has sent its own FIN acknowledges the peer's FIN at
//! once instead of after smoltcp's delay, and then stays in `TIME-WAIT` for [`TIME_WAIT_MS`]
//! (not smoltcp's 10 s: the guest only ever accepts connections, so an old duplicate segment
//! cannot be mistaken for a new connection of its own): if that ACK was lost (an egress that
//! stopped on a full device), the peer's FIN sent again is acknowledged, not answered with
//! RST by a listening socket. A port left without a listener that cannot grow reuses its
//! sockets in `TIME-WAIT`, oldest first, before it evicts anyone
//! ([`Network::reuse_time_wait`]). Sockets grown for a burst are
//! released when the port has not needed them for a while ([`Network::shrink`]), so their
//! memory returns. [`PortStats`] counts what happened to each port's connections.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use log::{info, warn};
use smoltcp::iface::{
    Config as IfaceConfig, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::{self, DeviceCapabilities, TxToken as _};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr,
};

pub use super::telemetry::PortStats;
use super::telemetry::{ConnectionFigures, PortFigures};
use crate::config::{Config, IpConfig};

/// How a port's pool is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortPolicy {
    /// Sockets opened at boot (always, whatever the budget).
    pub initial: usize,
    /// Most sockets the pool grows to.
    pub max: usize,
    /// Receive buffer of each socket, bytes.
    pub rx: usize,
    /// Send buffer of each socket, bytes.
    pub tx: usize,
}

impl PortPolicy {
    /// Buffer bytes one socket holds.
    pub const fn socket_bytes(&self) -> u64 {
        (self.rx + self.tx) as u64
    }
}

/// The metrics (HTTP) port: requests are small; a scrape answer is written in pieces. Many
/// scrapers may connect at once, each costs 72 KiB.
pub const HTTP_POLICY: PortPolicy = PortPolicy {
    initial: 16,
    max: 256,
    rx: 8 << 10,
    tx: 64 << 10,
};

/// The NBD port: large buffers, so a 1 MiB read or write streams without stalls (the window
/// is scaled past 64 KiB automatically).
pub const NBD_POLICY: PortPolicy = PortPolicy {
    initial: 8,
    max: 64,
    rx: 256 << 10,
    tx: 256 << 10,
};

/// Listening sockets kept free on each port (while the pool may grow), so that a burst of
/// connections finds listeners.
pub const SPARE_LISTENERS: usize = 4;

/// Default budget of socket buffer memory: at most this, and at most a quarter of the heap.
pub const DEFAULT_BUFFER_BUDGET: u64 = 64 << 20;

/// How long each port's pool is watched before the sockets it did not need are released: at
/// the end of every window of this length, listening sockets above the window's peak of
/// sockets in use plus [`SPARE_LISTENERS`] (and above the boot-time count) are removed and
/// their buffers freed ([`Network::shrink`]). A pool grown for a burst is back at its size
/// before the burst one to two windows after the burst ended.
pub const SHRINK_WINDOW_MS: u64 = 30_000;

/// How long a socket whose connection closed cleanly stays in `TIME-WAIT` before it listens
/// again (smoltcp's own limit is 10 s): long enough for a peer whose ACK of its FIN was lost
/// (a full transmit queue) to send its FIN again and be answered with that ACK rather than a
/// RST. A port that runs out of listeners reuses these sockets, oldest first, before it
/// evicts a connection ([`Network::reuse_time_wait`]).
pub const TIME_WAIT_MS: u64 = 2_000;

/// smoltcp's delay before a lone ACK (its default), restored when a socket listens again.
const ACK_DELAY: Duration = Duration::from_millis(10);

/// The most sockets of one port in use (not listening) during the current window of
/// [`SHRINK_WINDOW_MS`], and when that window began.
#[derive(Debug, Clone, Copy)]
struct PoolWatch {
    since_ms: u64,
    peak_in_use: usize,
}

/// SYNs kept at most while the guest waits for its DHCP lease ([`Tap`]).
pub const HELD_SYNS: usize = 8;

/// A network device wrapped so that the interface's caller learns, frame by frame, whether
/// the frame just taken in was a TCP SYN (a connection attempt) and to which port.
///
/// While the guest has no address yet (it waits for its DHCP lease) the tap also keeps the
/// SYNs it sees (at most [`HELD_SYNS`], one per connection), which the interface drops, and
/// [`Network::ingress_one`] takes them in again once the lease is there. QEMU's user-mode
/// network sends a connection's SYN to the guest as soon as it knows the guest's MAC address,
/// which it learns from the guest's DHCP DISCOVER, that is before the guest has its address:
/// dropped, the SYN would be sent again only after about 6 s.
pub struct Tap<D> {
    /// The device.
    pub inner: D,
    syn: Cell<Option<u16>>,
    hold: Cell<bool>,
    held: RefCell<VecDeque<Vec<u8>>>,
}

impl<D> Tap<D> {
    /// Wraps `inner`.
    pub fn new(inner: D) -> Self {
        Tap {
            inner,
            syn: Cell::new(None),
            hold: Cell::new(false),
            held: RefCell::new(VecDeque::new()),
        }
    }

    /// How many SYNs are kept for when the guest has its address.
    pub fn held(&self) -> usize {
        self.held.borrow().len()
    }
}

/// The destination port of `frame` if it is an Ethernet/IPv4/TCP segment with SYN set and
/// ACK clear (the first segment of a connection).
pub fn syn_port(frame: &[u8]) -> Option<u16> {
    let tcp = tcp_segment(frame)?;
    let flags = *tcp.get(13)?;
    let (syn, ack) = (0x02, 0x10);
    (flags & syn != 0 && flags & ack == 0).then(|| u16::from_be_bytes([tcp[2], tcp[3]]))
}

/// The TCP segment of `frame` if it is an unfragmented Ethernet/IPv4/TCP frame.
fn tcp_segment(frame: &[u8]) -> Option<&[u8]> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    let fragment = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x1fff;
    if ip[0] >> 4 != 4 || ihl < 20 || *ip.get(9)? != 6 || fragment != 0 {
        return None;
    }
    let tcp = ip.get(ihl..)?;
    tcp.get(..14)?;
    Some(tcp)
}

/// What names a held SYN's connection: source address and port, destination address and
/// port (a SYN sent again replaces the one held).
fn connection_key(frame: &[u8]) -> Option<([u8; 8], [u8; 4])> {
    let addrs: [u8; 8] = frame.get(26..34)?.try_into().ok()?;
    let ports: [u8; 4] = tcp_segment(frame)?.get(..4)?.try_into().ok()?;
    Some((addrs, ports))
}

/// Keeps `frame`, a SYN that arrived before the guest had an address.
fn hold(held: &RefCell<VecDeque<Vec<u8>>>, frame: &[u8]) {
    let Some(key) = connection_key(frame) else {
        return;
    };
    let mut held = held.borrow_mut();
    held.retain(|f| connection_key(f) != Some(key));
    if held.len() == HELD_SYNS {
        held.pop_front();
    }
    held.push_back(frame.to_vec());
}

/// The receive token of a [`Tap`]: a frame from the device, or a held SYN taken in again.
pub struct TapRx<'a, R> {
    source: Source<R>,
    syn: &'a Cell<Option<u16>>,
    hold: bool,
    held: &'a RefCell<VecDeque<Vec<u8>>>,
}

/// Where a [`TapRx`]'s frame comes from.
enum Source<R> {
    Device(R),
    Held(Vec<u8>),
}

impl<R: phy::RxToken> phy::RxToken for TapRx<'_, R> {
    fn consume<T, F: FnOnce(&[u8]) -> T>(self, f: F) -> T {
        let (syn, held, keep) = (self.syn, self.held, self.hold);
        let look = |frame: &[u8]| {
            syn.set(syn_port(frame));
            if keep && syn.get().is_some() {
                hold(held, frame);
            }
            f(frame)
        };
        match self.source {
            Source::Device(rx) => rx.consume(look),
            Source::Held(frame) => look(&frame),
        }
    }
}

impl<D: phy::Device> phy::Device for Tap<D> {
    type RxToken<'a>
        = TapRx<'a, D::RxToken<'a>>
    where
        Self: 'a;
    type TxToken<'a>
        = D::TxToken<'a>
    where
        Self: 'a;

    /// The held SYNs first once the guest has its address (an answer to one goes out on the
    /// device), then the device's frames.
    fn receive(&mut self, timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let held = if self.hold.get() {
            None
        } else {
            self.held.get_mut().pop_front()
        };
        let (source, tx) = match held {
            Some(frame) => match self.inner.transmit(timestamp) {
                Some(tx) => (Source::Held(frame), tx),
                None => {
                    // No room for an answer: taken in at the next poll.
                    self.held.get_mut().push_front(frame);
                    return None;
                }
            },
            None => {
                let (rx, tx) = self.inner.receive(timestamp)?;
                (Source::Device(rx), tx)
            }
        };
        Some((
            TapRx {
                source,
                syn: &self.syn,
                hold: self.hold.get(),
                held: &self.held,
            },
            tx,
        ))
    }

    fn transmit(&mut self, timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.inner.transmit(timestamp)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.inner.capabilities()
    }
}

/// The service a listening socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Prometheus metrics over HTTP.
    Http,
    /// The NBD export.
    Nbd,
}

impl Service {
    /// Both services.
    pub const ALL: [Service; 2] = [Service::Http, Service::Nbd];

    /// Index of the service in per-service arrays.
    pub const fn index(self) -> usize {
        match self {
            Service::Http => 0,
            Service::Nbd => 1,
        }
    }

    /// How its pool is sized.
    pub const fn policy(self) -> PortPolicy {
        match self {
            Service::Http => HTTP_POLICY,
            Service::Nbd => NBD_POLICY,
        }
    }

    /// Lower-case name (`http`, `nbd`), for logs and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Service::Http => "http",
            Service::Nbd => "nbd",
        }
    }
}

/// One socket of the pool.
pub struct Listener {
    /// The smoltcp socket.
    pub handle: SocketHandle,
    /// What it serves.
    pub service: Service,
    /// The port it listens on.
    pub port: u16,
    /// Since when (ms) its socket has been in `TIME-WAIT`, as [`Network::relisten`] saw it.
    time_wait_since: Option<u64>,
}

/// The interface, its sockets and how it gets its address.
pub struct Network {
    /// The smoltcp interface.
    pub iface: Interface,
    /// Every socket: DHCP (if used) and the TCP pool.
    pub sockets: SocketSet<'static>,
    /// The TCP pool, in the order the sockets were added.
    pub listeners: Vec<Listener>,
    dhcp: Option<SocketHandle>,
    /// The address in use, once there is one.
    address: Option<Ipv4Cidr>,
    /// The service ports.
    ports: [(Service, u16); 2],
    /// Most bytes of socket buffers the pools may hold.
    budget: u64,
    /// Bytes of socket buffers the pools hold.
    buffer_bytes: u64,
    /// Whether each port had a listening socket after the last top-up (a SYN arriving
    /// while it had none is refused).
    has_listener: [bool; 2],
    /// Per port, by [`Service::index`].
    stats: [PortStats; 2],
    /// Per port, by [`Service::index`]: how many sockets the current window needed.
    watch: [PoolWatch; 2],
}

impl Network {
    /// Builds the interface on `dev` (whose MAC address is `mac`) with the address of
    /// `config` and opens the listeners. `seed` randomises TCP initial sequence numbers and
    /// DHCP transaction ids. The pools grow within `budget` bytes of socket buffers.
    pub fn new<D: phy::Device + ?Sized>(
        dev: &mut D,
        mac: [u8; 6],
        config: &Config,
        now: Instant,
        seed: u64,
        budget: u64,
    ) -> Network {
        let mac = EthernetAddress(mac);
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(mac));
        iface_config.random_seed = seed;
        let mut iface = Interface::new(iface_config, dev, now);
        let mut sockets = SocketSet::new(Vec::new());
        let mut address = None;

        let dhcp = match config.ip {
            IpConfig::Dhcp => Some(sockets.add(dhcpv4::Socket::new())),
            IpConfig::Static { addr, prefix_len } => {
                let cidr = Ipv4Cidr::new(addr, prefix_len);
                iface.update_ip_addrs(|addrs| {
                    let _ = addrs.push(IpCidr::Ipv4(cidr));
                });
                if let Some(gw) = config.gw
                    && iface.routes_mut().add_default_ipv4_route(gw).is_err()
                {
                    warn!("cannot add the default route via {gw}");
                }
                info!(
                    "static address {cidr}{}",
                    config
                        .gw
                        .map(|g| alloc::format!(", gateway {g}"))
                        .unwrap_or_default()
                );
                address = Some(cidr);
                announce(dev, mac, addr, now);
                None
            }
        };
        info!("MAC {mac}");

        let mut network = Network {
            iface,
            sockets,
            listeners: Vec::new(),
            dhcp,
            address,
            ports: [
                (Service::Http, config.metrics_port),
                (Service::Nbd, config.nbd_port),
            ],
            budget,
            buffer_bytes: 0,
            has_listener: [true; 2],
            stats: [PortStats::default(); 2],
            watch: [PoolWatch {
                since_ms: now.total_millis() as u64,
                peak_in_use: 0,
            }; 2],
        };
        for (service, port) in network.ports {
            let count = service.policy().initial;
            for _ in 0..count {
                network.add_listener(service, port);
            }
            info!("{count} sockets listening on TCP port {port} ({service:?})");
        }
        if network.buffer_bytes > budget {
            warn!(
                "the boot-time listeners hold {} bytes of socket buffers, above the budget of \
                 {budget}: the pools will not grow (raise net_buffers=)",
                network.buffer_bytes
            );
        }
        network
    }

    /// Adds one listening socket to the pool.
    fn add_listener(&mut self, service: Service, port: u16) {
        let policy = service.policy();
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; policy.rx]),
            tcp::SocketBuffer::new(vec![0u8; policy.tx]),
        );
        tune(&mut socket);
        if let Err(e) = socket.listen(port) {
            warn!("cannot listen on port {port}: {e:?}");
        }
        let handle = self.sockets.add(socket);
        self.buffer_bytes += policy.socket_bytes();
        self.listeners.push(Listener {
            handle,
            service,
            port,
            time_wait_since: None,
        });
    }

    /// How many sockets of `service` are listening now.
    pub fn listening(&self, service: Service) -> usize {
        self.listeners
            .iter()
            .filter(|l| l.service == service)
            .filter(|l| self.sockets.get::<tcp::Socket>(l.handle).is_listening())
            .count()
    }

    /// How many sockets the pool of `service` has.
    pub fn pool_size(&self, service: Service) -> usize {
        self.listeners
            .iter()
            .filter(|l| l.service == service)
            .count()
    }

    /// Bytes of socket buffers the pools hold, and the budget they grow within.
    pub fn buffer_bytes(&self) -> (u64, u64) {
        (self.buffer_bytes, self.budget)
    }

    /// What happened to the connections of `service`'s port.
    pub fn stats(&self, service: Service) -> PortStats {
        self.stats[service.index()]
    }

    /// The counts of `service`'s port, to update.
    pub fn stats_mut(&mut self, service: Service) -> &mut PortStats {
        &mut self.stats[service.index()]
    }

    /// Per port: its counts and sockets, for the metrics.
    pub fn port_figures(&self) -> [PortFigures; 2] {
        Service::ALL.map(|service| PortFigures {
            service: service.name(),
            stats: self.stats(service),
            sockets: self.pool_size(service),
            listening: self.listening(service),
        })
    }

    /// The pools' figures for a scrape, over `ports` (from [`Network::port_figures`]).
    pub fn connection_figures<'a>(&self, ports: &'a [PortFigures]) -> ConnectionFigures<'a> {
        ConnectionFigures {
            ports,
            buffer_bytes: self.buffer_bytes,
            buffer_budget: self.budget,
        }
    }

    /// The guest's address, once configured.
    pub fn address(&self) -> Option<Ipv4Cidr> {
        self.address
    }

    /// The service listening on `port`, if any.
    fn service_of(&self, port: u16) -> Option<Service> {
        self.ports.iter().find(|(_, p)| *p == port).map(|(s, _)| *s)
    }

    /// Takes in one frame from the device, if one is waiting. Returns `None` when none was,
    /// else whether a socket may have changed state and, if the frame was a connection
    /// attempt on a service port, that service: the caller should then [`Network::top_up`]
    /// its pool before the next frame. A connection attempt that found no listener (and so
    /// was answered with RST) is counted as refused. Under DHCP, a lease is applied as soon
    /// as the frame that brings it is taken in, and the SYNs the [`Tap`] held until then are
    /// taken in next, before the device's frames.
    pub fn ingress_one<D: phy::Device>(
        &mut self,
        dev: &mut Tap<D>,
        now: Instant,
    ) -> Option<(bool, Option<Service>)> {
        dev.syn.set(None);
        dev.hold.set(self.dhcp.is_some() && self.address.is_none());
        let result = self.iface.poll_ingress_single(now, dev, &mut self.sockets);
        // A lease is applied before the next frame (a held SYN) is taken in.
        self.apply_dhcp();
        let changed = match result {
            PollIngressSingleResult::None => return None,
            PollIngressSingleResult::PacketProcessed => false,
            PollIngressSingleResult::SocketStateChanged => true,
        };
        let syn = dev.syn.take().and_then(|port| self.service_of(port));
        if let Some(service) = syn
            && !self.has_listener[service.index()]
        {
            self.stats[service.index()].refused += 1;
        }
        Some((changed, syn))
    }

    /// Sends what the sockets have queued (data, ACKs, RSTs of aborted sockets) as far as
    /// the device takes it. Returns whether any socket may have changed state.
    pub fn egress<D: phy::Device + ?Sized>(&mut self, dev: &mut D, now: Instant) -> bool {
        let mut changed = false;
        while self.iface.poll_egress(now, dev, &mut self.sockets) == PollResult::SocketStateChanged
        {
            changed = true;
        }
        changed
    }

    /// Moves packets between the device and the sockets (all waiting frames in, everything
    /// queued out), tops the pools up after every connection attempt, and applies DHCP
    /// results. Returns whether any socket may have changed state, and whether sockets
    /// were added to the pool.
    pub fn poll<D: phy::Device>(&mut self, dev: &mut Tap<D>, now: Instant) -> bool {
        self.iface.poll_maintenance(now);
        let mut changed = false;
        while let Some((c, syn)) = self.ingress_one(dev, now) {
            changed |= c;
            if let Some(service) = syn {
                self.top_up(service);
            }
        }
        changed |= self.egress(dev, now);
        self.apply_dhcp();
        changed
    }

    /// How long the interface can wait before it must be polled again (`None`: only when a
    /// packet arrives).
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.iface.poll_delay(now, &self.sockets)
    }

    /// Puts every pool socket whose connection is over back to listening, and grows each
    /// port's pool towards [`SPARE_LISTENERS`] listeners (see [`Network::top_up`]).
    /// Returns whether sockets were added (the caller's per-socket state must follow).
    pub fn relisten(&mut self, now: Instant) -> bool {
        let now_ms = now.total_millis() as u64;
        for l in &mut self.listeners {
            let socket = self.sockets.get_mut::<tcp::Socket>(l.handle);
            if socket.state() != tcp::State::TimeWait {
                l.time_wait_since = None;
            }
            match socket.state() {
                // Aborted, and its RST not sent yet (the next egress sends it; listening now
                // would forget the peer and leave it waiting).
                tcp::State::Closed if socket.remote_endpoint().is_some() => continue,
                tcp::State::Closed => {}
                // Its own FIN is sent or about to be: the peer's FIN will be acknowledged in
                // the same turn it arrives (the egress after it), not after a delay, for the
                // socket is recycled in TIME-WAIT right after that egress. An ACK not sent
                // would be lost with it: the peer would send its FIN again and get a RST.
                tcp::State::FinWait1 | tcp::State::FinWait2 | tcp::State::Closing => {
                    socket.set_ack_delay(None);
                    continue;
                }
                // In TIME-WAIT: its ACK of the peer's FIN is due now (no delay), but the
                // egress of a busy turn may stop on a full device before it. The socket
                // stays for TIME_WAIT_MS, so a FIN the peer sends again is acknowledged
                // (a listening socket would answer it with RST), unless the port needs it
                // first (`reuse_time_wait`).
                tcp::State::TimeWait => {
                    socket.set_ack_delay(None);
                    let since = *l.time_wait_since.get_or_insert(now_ms);
                    if now_ms < since.saturating_add(TIME_WAIT_MS) {
                        continue;
                    }
                    l.time_wait_since = None;
                    socket.abort();
                }
                _ => continue,
            }
            tune(socket);
            if let Err(e) = socket.listen(l.port) {
                warn!("cannot listen again on port {}: {e:?}", l.port);
            }
        }
        let mut added = false;
        for service in Service::ALL {
            added |= self.grow(service);
        }
        added
    }

    /// Puts the socket of `service`'s port that has been in `TIME-WAIT` longest back to
    /// listening, for a port that has no listener left and cannot grow: before a connection
    /// is evicted. Returns its pool index (the caller drops the session of that slot), or
    /// `None` when the port has no socket in `TIME-WAIT`.
    pub fn reuse_time_wait(&mut self, service: Service, now: Instant) -> Option<usize> {
        let now_ms = now.total_millis() as u64;
        let (i, l) = self
            .listeners
            .iter_mut()
            .enumerate()
            .filter(|(_, l)| {
                l.service == service
                    && self.sockets.get::<tcp::Socket>(l.handle).state() == tcp::State::TimeWait
            })
            .min_by_key(|(_, l)| l.time_wait_since.unwrap_or(now_ms))?;
        l.time_wait_since = None;
        let socket = self.sockets.get_mut::<tcp::Socket>(l.handle);
        socket.abort();
        tune(socket);
        if let Err(e) = socket.listen(l.port) {
            warn!("cannot listen again on port {}: {e:?}", l.port);
        }
        self.has_listener[service.index()] = true;
        Some(i)
    }

    /// After a connection attempt on `service`'s port: grows its pool towards
    /// [`SPARE_LISTENERS`] listeners, within its maximum and the buffer budget, and notes
    /// whether a listener is left for the next attempt. Returns whether sockets were added.
    /// (Sockets of ended connections listen again in [`Network::relisten`], once per turn.)
    pub fn top_up(&mut self, service: Service) -> bool {
        self.grow(service)
    }

    /// How many sockets `service`'s pool has, and how many of them are listening.
    fn counts(&self, service: Service) -> (usize, usize) {
        let (mut total, mut listening) = (0, 0);
        for l in self.listeners.iter().filter(|l| l.service == service) {
            total += 1;
            if self.sockets.get::<tcp::Socket>(l.handle).is_listening() {
                listening += 1;
            }
        }
        (total, listening)
    }

    fn grow(&mut self, service: Service) -> bool {
        let policy = service.policy();
        let (total, listening) = self.counts(service);
        let watch = &mut self.watch[service.index()];
        watch.peak_in_use = watch.peak_in_use.max(total - listening);
        let port = self.ports[service.index()].1;
        let mut added = 0;
        while listening + added < SPARE_LISTENERS
            && total + added < policy.max
            && self.buffer_bytes + policy.socket_bytes() <= self.budget
        {
            self.add_listener(service, port);
            added += 1;
        }
        if added > 0 {
            info!(
                "{} sockets on TCP port {port} ({service:?}) for a burst of connections",
                total + added
            );
        }
        self.has_listener[service.index()] = listening + added > 0;
        added > 0
    }

    /// Notes how many sockets of each port are in use and, at the end of each window of
    /// [`SHRINK_WINDOW_MS`], removes the listening sockets above what the window needed:
    /// the most sockets in use during it plus [`SPARE_LISTENERS`], and at least the
    /// boot-time count. Their buffers are freed and leave the budget. Call once per turn,
    /// after [`Network::relisten`]. Returns the pool indices removed, in the order they were
    /// removed: the caller removes its per-socket state at the same indices in that order
    /// (each index counts in the pool as it was after the previous removals).
    pub fn shrink(&mut self, now: Instant) -> Vec<usize> {
        let now_ms = now.total_millis() as u64;
        let mut removed = Vec::new();
        for service in Service::ALL {
            let (total, listening) = self.counts(service);
            let in_use = total - listening;
            let watch = &mut self.watch[service.index()];
            watch.peak_in_use = watch.peak_in_use.max(in_use);
            if now_ms < watch.since_ms.saturating_add(SHRINK_WINDOW_MS) {
                continue;
            }
            let policy = service.policy();
            let keep = policy.initial.max(watch.peak_in_use + SPARE_LISTENERS);
            *watch = PoolWatch {
                since_ms: now_ms,
                peak_in_use: in_use,
            };
            let mut excess = total.saturating_sub(keep);
            if excess == 0 {
                continue;
            }
            let before = removed.len();
            // The newest sockets go first (the boot-time ones are at the front).
            for i in (0..self.listeners.len()).rev() {
                if excess == 0 {
                    break;
                }
                let l = &self.listeners[i];
                if l.service != service || !self.sockets.get::<tcp::Socket>(l.handle).is_listening()
                {
                    continue;
                }
                self.sockets.remove(l.handle);
                self.listeners.remove(i);
                self.buffer_bytes -= policy.socket_bytes();
                removed.push(i);
                excess -= 1;
            }
            info!(
                "{} sockets on TCP port {} ({service:?}): released {} not needed for {} s",
                total - (removed.len() - before),
                self.ports[service.index()].1,
                removed.len() - before,
                SHRINK_WINDOW_MS / 1000
            );
        }
        removed
    }

    /// Closes the connection of pool socket `index` at once (RST) to make room, and counts it
    /// as evicted. The socket listens again once the RST is sent ([`Network::egress`], then
    /// [`Network::relisten`]).
    pub fn evict(&mut self, index: usize) {
        let Some(l) = self.listeners.get(index) else {
            return;
        };
        self.sockets.get_mut::<tcp::Socket>(l.handle).abort();
        self.stats[l.service.index()].evicted += 1;
    }

    /// Applies what the DHCP socket learnt (a lease, or its loss) to the interface.
    pub fn apply_dhcp(&mut self) {
        let Some(handle) = self.dhcp else {
            return;
        };
        let event = self.sockets.get_mut::<dhcpv4::Socket>(handle).poll();
        match event {
            None => {}
            Some(dhcpv4::Event::Configured(lease)) => {
                let cidr = lease.address;
                self.iface.update_ip_addrs(|addrs| {
                    addrs.clear();
                    let _ = addrs.push(IpCidr::Ipv4(cidr));
                });
                match lease.router {
                    Some(router) => {
                        if self
                            .iface
                            .routes_mut()
                            .add_default_ipv4_route(router)
                            .is_err()
                        {
                            warn!("cannot add the default route via {router}");
                        }
                    }
                    None => {
                        self.iface.routes_mut().remove_default_ipv4_route();
                    }
                }
                info!(
                    "DHCP lease {cidr}{}",
                    lease
                        .router
                        .map(|r: Ipv4Address| alloc::format!(", gateway {r}"))
                        .unwrap_or_default()
                );
                self.address = Some(cidr);
            }
            Some(dhcpv4::Event::Deconfigured) => {
                if self.address.is_some() {
                    info!("DHCP lease lost");
                }
                self.iface.update_ip_addrs(|addrs| addrs.clear());
                self.iface.routes_mut().remove_default_ipv4_route();
                self.address = None;
            }
        }
    }
}

/// Announces the guest's static address `addr` on the link: a gratuitous ARP request (sender
/// and target both `addr`, RFC 5227's announcement), broadcast once when the interface is set
/// up. A peer that asked for the address before the guest could answer learns it now: QEMU's
/// user-mode network sends its ARP request for the guest when the first connection comes
/// in, which is lost when that is before the guest's network is up (just after the banner),
/// and holds the connection's SYN for only a second before it drops it and resends it 6 s
/// later. On a DHCP lease the DHCP request has told the link already.
fn announce<D: phy::Device + ?Sized>(
    dev: &mut D,
    mac: EthernetAddress,
    addr: Ipv4Address,
    now: Instant,
) {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: mac,
        source_protocol_addr: addr,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: addr,
    };
    let eth = EthernetRepr {
        src_addr: mac,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let Some(tx) = dev.transmit(now) else {
        warn!("cannot announce {addr}: the device has no room to transmit");
        return;
    };
    tx.consume(eth.buffer_len() + arp.buffer_len(), |buf| {
        let mut frame = EthernetFrame::new_unchecked(buf);
        eth.emit(&mut frame);
        arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    });
}

/// Socket options of every pool socket: no Nagle (replies are written whole and must leave
/// at once), keep-alive so dead peers free their socket, smoltcp's ACK delay (turned off
/// while a connection closes, see [`Network::relisten`]).
fn tune(socket: &mut tcp::Socket<'_>) {
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(Some(ACK_DELAY));
    socket.set_keep_alive(Some(Duration::from_secs(30)));
    socket.set_timeout(Some(Duration::from_secs(120)));
}

#[cfg(test)]
mod tests;
