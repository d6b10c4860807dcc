//! The guest's TCP/IP stack: a smoltcp [`Interface`] on the network device, its address
//! (DHCP or static, from the [`Config`]), and a pool of listening TCP sockets.
//!
//! Each service port gets several sockets listening on it at once (smoltcp hands an incoming
//! SYN to the first idle listener of the port), so that many clients can connect together.
//! A socket whose connection has ended is put back to listening by [`Network::relisten`];
//! one in `TIME-WAIT` is recycled at once (the guest only ever accepts connections, so an
//! old duplicate segment cannot be mistaken for a new connection of its own).

use alloc::vec;
use alloc::vec::Vec;
use log::{info, warn};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy;
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::config::{Config, IpConfig};

/// Sockets on the metrics (HTTP) port at boot, and at most.
pub const HTTP_SOCKETS: (usize, usize) = (16, 64);
/// Sockets on the NBD port at boot, and at most.
pub const NBD_SOCKETS: (usize, usize) = (8, 16);
/// Listening sockets kept free on each port (while below the maximum), so that a burst of
/// connections finds listeners: smoltcp answers a SYN for which no socket listens with RST.
const SPARE_LISTENERS: usize = 4;
/// HTTP socket buffers: requests are small; a scrape answer is written in pieces.
const HTTP_RX: usize = 8 << 10;
const HTTP_TX: usize = 64 << 10;
/// NBD socket buffers: large, so a 1 MiB read or write streams without stalls (the window
/// is scaled past 64 KiB automatically).
const NBD_RX: usize = 256 << 10;
const NBD_TX: usize = 256 << 10;

/// The service a listening socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Prometheus metrics over HTTP.
    Http,
    /// The NBD export.
    Nbd,
}

/// One socket of the pool.
pub struct Listener {
    /// The smoltcp socket.
    pub handle: SocketHandle,
    /// What it serves.
    pub service: Service,
    /// The port it listens on.
    pub port: u16,
}

/// The interface, its sockets and how it gets its address.
pub struct Network {
    /// The smoltcp interface.
    pub iface: Interface,
    /// Every socket: DHCP (if used) and the TCP pool.
    pub sockets: SocketSet<'static>,
    /// The TCP pool, HTTP listeners first.
    pub listeners: Vec<Listener>,
    dhcp: Option<SocketHandle>,
    /// The address in use, once there is one.
    address: Option<Ipv4Cidr>,
    /// The service ports.
    ports: [(Service, u16); 2],
}

/// Sockets of a service at boot, and at most.
fn limits(service: Service) -> (usize, usize) {
    match service {
        Service::Http => HTTP_SOCKETS,
        Service::Nbd => NBD_SOCKETS,
    }
}

impl Network {
    /// Builds the interface on `dev` (whose MAC address is `mac`) with the address of
    /// `config` and opens the listeners. `seed` randomises TCP initial sequence numbers and
    /// DHCP transaction ids.
    pub fn new<D: phy::Device + ?Sized>(
        dev: &mut D,
        mac: [u8; 6],
        config: &Config,
        now: Instant,
        seed: u64,
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
        };
        for (service, port) in network.ports {
            let count = limits(service).0;
            for _ in 0..count {
                network.add_listener(service, port);
            }
            info!("{count} sockets listening on TCP port {port} ({service:?})");
        }
        network
    }

    /// Adds one listening socket to the pool.
    fn add_listener(&mut self, service: Service, port: u16) {
        let (rx, tx) = match service {
            Service::Http => (HTTP_RX, HTTP_TX),
            Service::Nbd => (NBD_RX, NBD_TX),
        };
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; rx]),
            tcp::SocketBuffer::new(vec![0u8; tx]),
        );
        tune(&mut socket);
        if let Err(e) = socket.listen(port) {
            warn!("cannot listen on port {port}: {e:?}");
        }
        let handle = self.sockets.add(socket);
        self.listeners.push(Listener {
            handle,
            service,
            port,
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

    /// The guest's address, once configured.
    pub fn address(&self) -> Option<Ipv4Cidr> {
        self.address
    }

    /// Moves packets between the device and the sockets, and applies DHCP results.
    /// Returns whether any socket may have changed state.
    pub fn poll<D: phy::Device + ?Sized>(&mut self, dev: &mut D, now: Instant) -> bool {
        let changed = self.iface.poll(now, dev, &mut self.sockets);
        self.apply_dhcp();
        changed == smoltcp::iface::PollResult::SocketStateChanged
    }

    /// How long the interface can wait before it must be polled again (`None`: only when a
    /// packet arrives).
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.iface.poll_delay(now, &self.sockets)
    }

    /// Puts every pool socket whose connection is over back to listening, and grows a port's
    /// pool (up to its maximum) when fewer than [`SPARE_LISTENERS`] of its sockets listen.
    /// Returns whether sockets were added (the caller's per-socket state must follow).
    pub fn relisten(&mut self) -> bool {
        for l in &self.listeners {
            let socket = self.sockets.get_mut::<tcp::Socket>(l.handle);
            match socket.state() {
                // Aborted, and its RST not sent yet (the next poll sends it; listening now
                // would forget the peer and leave it waiting).
                tcp::State::Closed if socket.remote_endpoint().is_some() => continue,
                tcp::State::Closed => {}
                tcp::State::TimeWait => socket.abort(),
                _ => continue,
            }
            tune(socket);
            if let Err(e) = socket.listen(l.port) {
                warn!("cannot listen again on port {}: {e:?}", l.port);
            }
        }
        let mut added = false;
        for (service, port) in self.ports {
            let (mut total, mut listening) = (0, 0);
            for l in self.listeners.iter().filter(|l| l.service == service) {
                total += 1;
                if self.sockets.get::<tcp::Socket>(l.handle).is_listening() {
                    listening += 1;
                }
            }
            let max = limits(service).1;
            if listening < SPARE_LISTENERS && total < max {
                for _ in listening..SPARE_LISTENERS.min(listening + max - total) {
                    self.add_listener(service, port);
                }
                info!(
                    "{} sockets on TCP port {port} ({service:?}) for a burst of connections",
                    self.listeners
                        .iter()
                        .filter(|l| l.service == service)
                        .count()
                );
                added = true;
            }
        }
        added
    }

    fn apply_dhcp(&mut self) {
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

/// Socket options of every pool socket: no Nagle (replies are written whole and must leave
/// at once), keep-alive so dead peers free their socket.
fn tune(socket: &mut tcp::Socket<'_>) {
    socket.set_nagle_enabled(false);
    socket.set_keep_alive(Some(Duration::from_secs(30)));
    socket.set_timeout(Some(Duration::from_secs(120)));
}
