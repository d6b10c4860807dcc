//! The guest's main loop: [`Guest`], single-threaded and polled, on a smoltcp interface.
//!
//! [`Guest::new`] takes the platform ([`Platform`]: clock, halting, power button, system
//! figures), the network device, the opened [`Disk`] and the metrics registry, and opens the
//! listener pools ([`Network`]). [`Guest::run`] then turns the loop until the power button
//! has been pressed and the disk closed, and returns how the machine should power off.
//! A turn ([`Guest::turn`]):
//!
//! 1. read the clock;
//! 2. poll the interface: frames in and out of the device, TCP timers, DHCP;
//! 3. move the loop's NBD pipeline along (never waiting for the device) and hand finished
//!    requests to their sessions; for every socket of the pool, advance its session: a new
//!    connection gets a fresh HTTP or NBD state machine, bytes move between the socket and
//!    the state machine, and a session whose connection ended is dropped; sockets listen
//!    again, the pools grow when few listeners are left (and give back, after a while, the
//!    sockets a burst left unneeded), and a full port closes its longest-idle connection
//!    ([`Guest::make_room`]); the pipeline again;
//! 4. if anything moved, the turn ends (the next one polls the interface at once: replies
//!    wait in socket buffers until it is polled); every [`HOUSEKEEPING_MS`], busy or not, the
//!    power button is looked at (NBD clients told to go, replies drained for at most
//!    [`DRAIN_MS`], requests in flight finished, disk closed clean: see [`Guest::turn`]);
//! 5. when nothing moved but requests are in flight, the device's queue waits for a
//!    completion; when nothing moved and nothing is in flight: every
//!    [`BACKGROUND_INTERVAL_MS`] the engine writes dirty metadata back; online compaction
//!    takes a step when its [`Scheduler`] allows one (a pass is on, no NBD request for
//!    `compact_idle`, the rate limit has room); then the platform halts until the earliest
//!    deadline (smoltcp's `poll_delay`, the HTTP idle timeouts, the engine timer, the next
//!    compaction step) or until a frame arrives ([`Platform::idle_until`]).
//!
//! NBD requests: the reads (at most 256 KiB) and writes (at most 1 MiB) every client
//! pipelined (32 per client, [`PIPELINE_DEPTH`] in all) join one [`Pipeline`] that stays in flight across
//! turns ([`crate::nbd::Connection::take_queued`]); each is answered as it finishes. Anything
//! else (handshakes, flush, trim, write-zeroes, block status, bigger requests, a snapshot
//! view's reads) takes the ordinary path ([`crate::nbd::Connection::process_ordinary`]),
//! which may change mappings, so it runs only when nothing of any client is in flight: a
//! client waiting for it stops new requests from joining the pipeline until it has drained.
//! Engine background work and compaction steps also wait for an idle pipeline.
//!
//! Metrics: the block-device counters are updated by the block device itself, the request
//! counters of the virtual disk by the `Instrumented` wrapper, and everything else (engine,
//! NBD, HTTP, network, heap) is copied into the registry when a scrape asks.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use log::{error, info, warn};
use smoltcp::phy;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;

use super::disk::{Disk, SpaceCache};
use super::http::{GuestSite, HttpSession};
use super::nbd::{NbdSession, NoDisk};
use super::net::{DEFAULT_BUFFER_BUDGET, Network, PortStats, Service, Tap};
use super::session::{Evictable, Session};
use super::telemetry::ConnectionFigures;
use crate::blkqueue::pipeline::Pipeline;
use crate::blkqueue::queue::BlockQueue;
use crate::block::BlockDevice;
use crate::compaction::Scheduler;
use crate::config::{Config, GuestExit};
use crate::disk::telemetry::DiskFigures;
use crate::http::{Health, HttpStats};
use crate::metrics::Format;
use crate::nbd::{MAX_BATCH, NbdStats, QueuedRequest, ServerConfig};
use crate::net::NetStats;
use crate::telemetry::{GuestMetrics, Scrape, SystemFigures};

/// How often the engine's background work runs while the guest is otherwise idle.
pub const BACKGROUND_INTERVAL_MS: u64 = 5000;

/// How often the busy loop looks at the power button and the engine's timer.
pub const HOUSEKEEPING_MS: u64 = 10;

/// Longest wait for NBD clients to receive their last replies at power-off.
pub const DRAIN_MS: u64 = 2000;

/// Most NBD requests of all clients waiting or in flight in the loop's pipeline.
pub const PIPELINE_DEPTH: usize = 64;

/// What the loop needs of the machine it runs on.
pub trait Platform {
    /// The network device the interface runs on.
    type Net: phy::Device;

    /// Nanoseconds of a monotonic clock (the guest's: since power-on).
    fn now_ns(&self) -> u64;

    /// Waits until `deadline_ms` (on the [`Platform::now_ns`] scale, in milliseconds) or
    /// until a frame arrives on `net`, whichever comes first; may return earlier (the loop
    /// looks at the power button between waits). Returns at once if a frame is waiting.
    fn idle_until(&mut self, net: &mut Self::Net, deadline_ms: u64);

    /// Whether the power button was pressed since the last call.
    fn power_button_pressed(&mut self) -> bool;

    /// The machine's figures for the metrics: uptime, heap.
    fn system(&self) -> SystemFigures;

    /// The network device's counters, for the metrics.
    fn net_stats(&self) -> &NetStats;
}

/// What a [`Guest`] is given besides its devices.
pub struct GuestSetup {
    /// The parsed command line.
    pub config: Config,
    /// The build's version, shown on `/`.
    pub version: &'static str,
    /// The network device's MAC address.
    pub mac: [u8; 6],
    /// Randomises TCP initial sequence numbers and DHCP transaction ids.
    pub seed: u64,
    /// Bytes of heap: the socket buffers' budget is a share of it (unless `net_buffers=`
    /// says otherwise).
    pub heap_bytes: u64,
}

/// Where the main loop spends its time, logged at `debug` level every
/// [`LoopProfile::PERIOD_MS`] while the guest is doing something.
#[derive(Default)]
struct LoopProfile {
    turns: u64,
    poll_ns: u64,
    serve_ns: u64,
    idle_ns: u64,
    since_ms: u64,
}

impl LoopProfile {
    const PERIOD_MS: u64 = 10_000;

    fn report(&mut self, now_ms: u64) {
        if now_ms < self.since_ms + Self::PERIOD_MS {
            return;
        }
        let busy_ns = self.poll_ns + self.serve_ns;
        if busy_ns > 0 && log::log_enabled!(log::Level::Debug) {
            let total = (now_ms - self.since_ms).max(1) * 1_000_000;
            log::debug!(
                "loop: {} turns in {} ms: network {}%, sessions and disk {}%, halted {}%",
                self.turns,
                now_ms - self.since_ms,
                self.poll_ns * 100 / total,
                self.serve_ns * 100 / total,
                self.idle_ns * 100 / total,
            );
        }
        *self = LoopProfile {
            since_ms: now_ms,
            ..LoopProfile::default()
        };
    }
}

/// Everything the loop owns.
pub struct Guest<P: Platform, B: BlockDevice> {
    platform: P,
    metrics: GuestMetrics,
    disk: Disk<B>,
    dev: Tap<P::Net>,
    net: Network,
    sessions: Vec<Option<Session>>,
    nbd_config: ServerConfig,
    nbd_stats: NbdStats,
    http_stats: HttpStats,
    facts: Vec<(&'static str, String)>,
    /// Last space figures of the engine, and when they were computed.
    space_cache: Option<SpaceCache>,
    /// The power button was pressed: NBD clients are being sent away until this deadline
    /// (ms), then the disk is closed.
    draining_until: Option<u64>,
    /// Online compaction: when to take a step.
    compaction: Scheduler,
    /// The image's cluster size (the unit of compaction; 0 without a qcow2 image).
    cluster_size: u64,
    /// NBD clients in the transmission phase silent this long (ms) are disconnected (0:
    /// never).
    nbd_idle_ms: u64,
    next_background: u64,
    next_housekeeping: u64,
    profile: LoopProfile,
    /// The NBD reads and writes of every client, in flight together across turns.
    pipeline: Pipeline,
    /// Pipeline tag -> the pool socket (where the session was when the request started),
    /// session id and request it answers.
    routes: BTreeMap<u64, (usize, u64, QueuedRequest)>,
    next_tag: u64,
    next_session_id: u64,
    /// A client waits for the ordinary path (which runs only when nothing is in flight):
    /// no new request joins the pipeline until it has drained.
    barrier: bool,
}

impl<P: Platform, B: BlockDevice + BlockQueue> Guest<P, B> {
    /// Builds the interface on `dev`, opens the listener pools and readies the services.
    pub fn new(
        platform: P,
        mut dev: P::Net,
        mut disk: Disk<B>,
        metrics: GuestMetrics,
        setup: GuestSetup,
    ) -> Self {
        let config = setup.config;
        let now_ms = platform.now_ns() / 1_000_000;
        let now = Instant::from_millis(now_ms as i64);
        let budget = config
            .net_buffers
            .unwrap_or(DEFAULT_BUFFER_BUDGET.min(setup.heap_bytes / 4));
        let net = Network::new(&mut dev, setup.mac, &config, now, setup.seed, budget);

        let size = disk.size();
        let read_only = config.read_only || disk.is_read_only();
        let mut facts = vec![
            ("version", String::from(setup.version)),
            ("export", config.export.clone()),
            ("format", String::from(disk.format_name())),
            ("virtual size", human_size(size)),
            ("NBD port", format!("{}", config.nbd_port)),
            ("metrics port", format!("{}", config.metrics_port)),
            ("read-only", format!("{read_only}")),
        ];
        if let Disk::Unavailable(why) = &disk {
            facts.push(("disk error", why.clone()));
        }
        let nbd_config = ServerConfig {
            export_name: config.export.clone(),
            description: format!("qcow-metal {} disk", disk.format_name()),
            read_only,
            ..ServerConfig::default()
        };
        let sessions = (0..net.listeners.len()).map(|_| None).collect();
        let (compaction, cluster_size) =
            compaction_scheduler(&mut disk, &config, read_only, now_ms);
        info!(
            "main loop: serving metrics on :{} and NBD on :{}",
            config.metrics_port, config.nbd_port
        );
        Guest {
            platform,
            metrics,
            disk,
            dev: Tap::new(dev),
            net,
            sessions,
            nbd_config,
            nbd_stats: NbdStats::default(),
            http_stats: HttpStats::new(),
            facts,
            space_cache: None,
            draining_until: None,
            compaction,
            cluster_size,
            nbd_idle_ms: config.nbd_idle_ms,
            next_background: now_ms + BACKGROUND_INTERVAL_MS,
            next_housekeeping: 0,
            profile: LoopProfile::default(),
            pipeline: Pipeline::new(),
            routes: BTreeMap::new(),
            next_tag: 0,
            next_session_id: 0,
            barrier: false,
        }
    }

    /// Runs the services until the power button was pressed and the disk is closed; returns
    /// how the machine should power off.
    pub fn run(mut self) -> GuestExit {
        loop {
            if let Some(exit) = self.turn() {
                return exit;
            }
        }
    }

    /// One turn of the loop (see the module docs), halting at its end if nothing moved.
    /// Returns `Some` once the guest has shut down: the disk is closed (or failed to close)
    /// and the machine should power off with that status.
    pub fn turn(&mut self) -> Option<GuestExit> {
        if let Some(deadline) = self.draining_until {
            return self.drain_turn(deadline);
        }
        let t0 = self.platform.now_ns();
        let now = Instant::from_micros((t0 / 1000) as i64);
        let mut busy = self.poll_network(now);
        let t1 = self.platform.now_ns();
        busy |= self.drive_sessions(now);
        if self.net.relisten(now) {
            self.sessions.resize_with(self.net.listeners.len(), || None);
        }
        self.release_unneeded(now);
        self.make_room(now);
        let t2 = self.platform.now_ns();
        self.profile.poll_ns += t1 - t0;
        self.profile.serve_ns += t2 - t1;
        self.profile.turns += 1;
        let now_ms = t2 / 1_000_000;
        // Engine background work never meets a request in flight.
        let in_flight = !self.pipeline.is_idle();
        // Every few milliseconds, even while busy: power button, engine work, profile.
        if now_ms >= self.next_housekeeping || !busy {
            self.next_housekeeping = now_ms + HOUSEKEEPING_MS;
            if self.platform.power_button_pressed() {
                self.begin_power_off(now_ms);
                return None;
            }
            self.disk.keep_headroom();
            if now_ms >= self.next_background && !busy && !in_flight {
                self.disk.background();
                self.next_background = now_ms + BACKGROUND_INTERVAL_MS;
            }
            if !in_flight {
                busy |= self.compact(now_ms);
            }
            self.profile.report(now_ms);
        }
        if busy {
            // Replies wait in the socket buffers: poll the interface again at once.
            return None;
        }
        if in_flight {
            // Only the disk can move things on: wait for a completion (the device's wait
            // spins briefly, then halts until its interrupt).
            if let Some(disk) = self.disk.queued_disk() {
                disk.queue().wait();
            }
            return None;
        }
        let deadline = self.next_deadline_ms(now).min(self.next_background).min(
            self.compaction
                .next_deadline_ms(now_ms, self.cluster_size)
                .unwrap_or(u64::MAX),
        );
        let t3 = self.platform.now_ns();
        self.platform.idle_until(&mut self.dev.inner, deadline);
        self.profile.idle_ns += self.platform.now_ns().saturating_sub(t3);
        None
    }

    /// The metrics registry the guest renders.
    pub fn metrics(&self) -> &GuestMetrics {
        &self.metrics
    }

    /// What happened to the connections of `service`'s port.
    pub fn port_stats(&self, service: Service) -> PortStats {
        self.net.stats(service)
    }

    /// The NBD server's counts.
    pub fn nbd_stats(&self) -> &NbdStats {
        &self.nbd_stats
    }

    /// The interface and its socket pool.
    pub fn network(&self) -> &Network {
        &self.net
    }

    /// The platform the loop runs on.
    pub fn platform_mut(&mut self) -> &mut P {
        &mut self.platform
    }

    fn now_ms(&self) -> u64 {
        self.platform.now_ns() / 1_000_000
    }

    /// Online compaction: takes in the engine's and the NBD server's counts, and moves one
    /// step's worth of clusters when the scheduler allows it. Returns whether it moved any.
    fn compact(&mut self, now_ms: u64) -> bool {
        let Disk::Qcow2(d) = &mut self.disk else {
            return false;
        };
        let engine = d.inner_mut();
        let cs = self.cluster_size;
        let freed = || engine.stats().clusters_freed.saturating_mul(cs);
        let requests = self.nbd_stats.requests.iter().sum();
        self.compaction.observe(now_ms, freed(), requests);
        let Some(budget) = self.compaction.next_step(now_ms, cs) else {
            return false;
        };
        let passes = self.compaction.passes();
        match engine.compact_step((budget / cs).max(1)) {
            Ok(p) => {
                let freed = engine.stats().clusters_freed.saturating_mul(cs);
                self.compaction
                    .step_done(p.moved_clusters * cs, cs, p.done, freed);
                if p.done {
                    info!(
                        "compaction: pass {} done ({} bytes moved since boot); image extent {} bytes",
                        passes + 1,
                        self.compaction.moved_bytes(),
                        p.extent_after,
                    );
                }
                p.moved_clusters > 0
            }
            Err(e) => {
                warn!("compaction: step failed: {e}; the pass ends");
                let freed = engine.stats().clusters_freed.saturating_mul(cs);
                self.compaction.step_failed(freed);
                false
            }
        }
    }

    /// The power button: NBD clients are told the server is shutting down (requests being
    /// served complete and their replies are sent, for at most [`DRAIN_MS`]: see
    /// [`Guest::drain_turn`]), then the disk is closed.
    fn begin_power_off(&mut self, now_ms: u64) {
        info!("power button pressed: ending NBD sessions");
        for session in self.sessions.iter_mut().flatten() {
            if let Session::Nbd(s) = session {
                s.shutdown();
            }
        }
        self.draining_until = Some(now_ms + DRAIN_MS);
    }

    /// A turn while powering off: sessions are driven until every NBD client has its last
    /// reply (or the drain deadline passed), then the disk is closed.
    fn drain_turn(&mut self, deadline_ms: u64) -> Option<GuestExit> {
        let now_ms = self.now_ms();
        if now_ms < deadline_ms {
            let now = Instant::from_millis(now_ms as i64);
            self.net.poll(&mut self.dev, now);
            self.drive_sessions(now);
            let drained = self.pipeline.is_idle()
                && self
                    .net
                    .listeners
                    .iter()
                    .zip(&self.sessions)
                    .all(|(l, s)| match s {
                        Some(Session::Nbd(s)) => {
                            s.is_quiescent()
                                && self.net.sockets.get::<tcp::Socket>(l.handle).send_queue() == 0
                        }
                        _ => true,
                    });
            if !drained {
                let wait = self.next_deadline_ms(now).min(deadline_ms);
                let now_ms = self.now_ms();
                self.platform
                    .idle_until(&mut self.dev.inner, wait.min(now_ms + 1));
                return None;
            }
        }
        self.finish_pipeline();
        let disk = core::mem::replace(&mut self.disk, Disk::Unavailable(String::new()));
        Some(shut_down(disk))
    }

    /// Moves the loop's pipeline along without waiting for the device, and hands what
    /// finished to its session (a request of a session that is gone is dropped). Returns
    /// whether anything moved.
    fn pump_pipeline(&mut self) -> bool {
        let Some(disk) = self.disk.queued_disk() else {
            return false;
        };
        let mut moved = self.pipeline.run(disk);
        while let Some(done) = self.pipeline.next_finished() {
            moved = true;
            let Some((i, id, q)) = self.routes.remove(&done.tag) else {
                continue;
            };
            // The session is at pool socket `i`, unless the pool shrank meanwhile (sockets
            // after a released one move down).
            let is_it = |s: &Option<Session>| matches!(s, Some(Session::Nbd(n)) if n.id() == id);
            let at = match self.sessions.get(i) {
                Some(s) if is_it(s) => Some(i),
                _ => self.sessions.iter().position(is_it),
            };
            if let Some(Some(Session::Nbd(s))) = at.and_then(|i| self.sessions.get_mut(i)) {
                s.finish_queued(q, done, &mut self.nbd_stats);
            }
        }
        moved
    }

    /// Waits until nothing is in flight in the loop's pipeline (before the disk is closed).
    fn finish_pipeline(&mut self) {
        while !self.pipeline.is_idle() {
            let moved = self.pump_pipeline();
            let Some(disk) = self.disk.queued_disk() else {
                return;
            };
            if self.pipeline.is_idle() {
                return;
            }
            if disk.queue().in_flight() > 0 {
                disk.queue().wait();
            } else if !moved {
                error!(
                    "{} NBD requests are stuck in the pipeline",
                    self.pipeline.waiting()
                );
                return;
            }
        }
    }

    /// Moves frames between the device and the sockets. After every connection attempt
    /// the port's pool is topped up at once, and when it cannot grow a connection is
    /// evicted ([`Guest::evict`]), so that the next attempt in the same batch of frames finds
    /// a listener. Returns whether any socket may have changed state.
    fn poll_network(&mut self, now: Instant) -> bool {
        self.net.iface.poll_maintenance(now);
        let mut changed = false;
        while let Some((c, syn)) = self.net.ingress_one(&mut self.dev, now) {
            changed |= c;
            if let Some(service) = syn {
                self.keep_listening(service, now);
            }
        }
        changed |= self.net.egress(&mut self.dev, now);
        self.net.apply_dhcp();
        changed
    }

    /// Makes sure `service`'s port has a listening socket: grows the pool, or evicts a
    /// connection when it cannot grow.
    fn keep_listening(&mut self, service: Service, now: Instant) {
        if self.net.top_up(service) {
            self.sessions.resize_with(self.net.listeners.len(), || None);
        }
        if self.net.listening(service) == 0 {
            self.evict(service, now);
        }
    }

    /// Closes the session of `service`'s port that is most readily closed (see
    /// [`Evictable`]), if any, and puts its socket back to listening at once (its RST is
    /// sent first). Returns whether one was closed.
    fn evict(&mut self, service: Service, now: Instant) -> bool {
        // A socket kept in TIME-WAIT goes first: nobody is evicted for it.
        if let Some(i) = self.net.reuse_time_wait(service, now) {
            self.close_session(i);
            return true;
        }
        let now_ms = now.total_millis() as u64;
        let victim = self
            .net
            .listeners
            .iter()
            .zip(&self.sessions)
            .enumerate()
            .filter(|(_, (l, _))| l.service == service)
            .filter_map(|(i, (l, s))| {
                let s = s.as_ref()?;
                if s.is_closing() {
                    let socket = self.net.sockets.get::<tcp::Socket>(l.handle);
                    return (socket.send_queue() == 0).then_some((i, Evictable::Finished));
                }
                Some((i, s.evictable(now_ms)?))
            })
            .min_by_key(|&(_, e)| e);
        let Some((i, why)) = victim else {
            return false;
        };
        self.close_session(i);
        self.net.evict(i);
        self.net.egress(&mut self.dev, now);
        if self.net.relisten(now) {
            self.sessions.resize_with(self.net.listeners.len(), || None);
        }
        match why {
            Evictable::Finished => {
                info!("{service:?}: every socket is taken; reset a finished connection")
            }
            Evictable::Idle(since) | Evictable::Stalled(since) => info!(
                "{service:?}: every socket is taken; closed a connection {} for {} ms",
                if matches!(why, Evictable::Idle(_)) {
                    "idle"
                } else {
                    "stalled"
                },
                now_ms.saturating_sub(since)
            ),
        }
        true
    }

    /// Releases the pool sockets a burst left unneeded ([`Network::shrink`]) with their
    /// (empty: they are listening) session slots.
    fn release_unneeded(&mut self, now: Instant) {
        for i in self.net.shrink(now) {
            self.close_session(i);
            self.sessions.remove(i);
        }
    }

    /// Drops the session of pool socket `i` (its connection is being reset).
    fn close_session(&mut self, i: usize) {
        if let Some(Session::Nbd(mut s)) = self.sessions[i].take() {
            s.end(&mut self.nbd_stats);
        }
    }

    /// Once per turn: a port left without a listener gets one by evicting a connection, and
    /// slow HTTP clients (a request arriving for more than `SLOW_REQUEST_MS`) are held to
    /// half of the metrics port's pool, the longest stalled closed first.
    fn make_room(&mut self, now: Instant) {
        for service in Service::ALL {
            if self.net.listening(service) == 0 {
                self.evict(service, now);
            }
        }
        let now_ms = now.total_millis() as u64;
        let share = Service::Http.policy().max / 2;
        let mut slow: Vec<(u64, usize)> = self
            .net
            .listeners
            .iter()
            .zip(&self.sessions)
            .enumerate()
            .filter(|(_, (l, _))| l.service == Service::Http)
            .filter_map(|(i, (_, s))| match s.as_ref()?.evictable(now_ms)? {
                Evictable::Stalled(since) => Some((since, i)),
                Evictable::Idle(_) | Evictable::Finished => None,
            })
            .collect();
        if slow.len() > share {
            slow.sort_unstable();
            let excess = slow.len() - share;
            for &(_, i) in &slow[..excess] {
                self.close_session(i);
                self.net.evict(i);
            }
            info!("HTTP: closed {excess} slow clients above their share of the pool");
            self.net.egress(&mut self.dev, now);
            if self.net.relisten(now) {
                self.sessions.resize_with(self.net.listeners.len(), || None);
            }
        }
    }

    /// Advances every session, and the loop's pipeline before and after; returns whether
    /// anything moved.
    fn drive_sessions(&mut self, now: Instant) -> bool {
        let now_ms = now.total_millis() as u64;
        let stopping = self.draining_until.is_some();
        let mut busy = self.pump_pipeline();
        let mut want_barrier = false;
        let mut accepted = [0u64; 2];
        let mut timed_out = [0u64; 2];
        // The pools as they were when the turn began, with the connections accepted since
        // (a scrape reads them).
        let mut port_figures = self.net.port_figures();
        let connection_figures = self.net.connection_figures(&[]);
        for (i, listener) in self.net.listeners.iter().enumerate() {
            let socket = self.net.sockets.get_mut::<tcp::Socket>(listener.handle);
            let slot = &mut self.sessions[i];
            // A socket that left its connection loses its session.
            let connected = matches!(
                socket.state(),
                tcp::State::Established
                    | tcp::State::FinWait1
                    | tcp::State::FinWait2
                    | tcp::State::CloseWait
                    | tcp::State::Closing
                    | tcp::State::LastAck
            );
            if !connected {
                if let Some(Session::Nbd(mut s)) = slot.take() {
                    s.end(&mut self.nbd_stats);
                }
                continue;
            }
            if slot.is_none() {
                accepted[listener.service.index()] += 1;
                port_figures[listener.service.index()].stats.accepted += 1;
                *slot = Some(match listener.service {
                    Service::Http => Session::Http(Box::new(HttpSession::new(now_ms))),
                    Service::Nbd => Session::Nbd(Box::new(match self.disk {
                        _ if stopping => NbdSession::refusing(&self.nbd_config, now_ms),
                        Disk::Unavailable(ref why) => {
                            warn!("NBD: turning a client away: {why}");
                            NbdSession::refusing(&self.nbd_config, now_ms)
                        }
                        _ => {
                            self.next_session_id += 1;
                            NbdSession::new(&self.nbd_config, now_ms).with_id(self.next_session_id)
                        }
                    })),
                });
                busy = true;
            }
            match slot {
                Some(Session::Http(s)) => {
                    let health = match &self.disk {
                        Disk::Unavailable(why) => Health::Unavailable(why.clone()),
                        _ => Health::Ok,
                    };
                    let compaction = (self.compaction.state(), self.compaction.passes());
                    let platform = &self.platform;
                    let ports = &port_figures;
                    let connections = &connection_figures;
                    let mut render = |format: Format, out: &mut Vec<u8>| {
                        let scrape = Scrape {
                            disk: DiskFigures {
                                engine: self.disk.figures(&mut self.space_cache),
                                compaction: compaction.0,
                                compaction_passes: compaction.1,
                            },
                            nbd: &self.nbd_stats,
                            http: &self.http_stats,
                            net: platform.net_stats(),
                            system: platform.system(),
                            connections: Some(ConnectionFigures {
                                ports,
                                ..*connections
                            }),
                        };
                        self.metrics.render_into(format, &scrape, out);
                    };
                    let mut site = GuestSite {
                        render: &mut render,
                        facts: &self.facts,
                        health,
                        stats: &self.http_stats,
                    };
                    let was_closing = s.is_closing();
                    busy |= s.drive(socket, now_ms, &mut site);
                    if !was_closing && s.timed_out() {
                        timed_out[Service::Http.index()] += 1;
                    }
                }
                Some(Session::Nbd(s)) => {
                    match self.disk.queued_disk() {
                        Some(disk) => {
                            let size = disk.size();
                            let id = s.id();
                            let barrier = self.barrier;
                            let pipeline = &mut self.pipeline;
                            let routes = &mut self.routes;
                            let next_tag = &mut self.next_tag;
                            let want_barrier = &mut want_barrier;
                            busy |= s.drive_with(socket, &mut self.nbd_stats, now_ms, |c, st| {
                                let mut moved = false;
                                if !barrier {
                                    let room = PIPELINE_DEPTH
                                        .saturating_sub(pipeline.in_flight() + pipeline.waiting());
                                    let max =
                                        MAX_BATCH.saturating_sub(c.queued_in_flight()).min(room);
                                    for (q, op) in c.take_queued(size, max, st) {
                                        routes.insert(*next_tag, (i, id, q));
                                        pipeline.submit(*next_tag, op);
                                        *next_tag += 1;
                                        moved = true;
                                    }
                                }
                                // The ordinary path may change mappings: only when nothing
                                // of any client is in flight.
                                if pipeline.is_idle() {
                                    moved |= c.process_ordinary(disk, st);
                                } else if c.wants_ordinary(size) {
                                    *want_barrier = true;
                                }
                                moved
                            })
                        }
                        // No disk: a refusing session turns the client away.
                        None => busy |= s.drive(socket, &mut NoDisk, &mut self.nbd_stats, now_ms),
                    }
                    if let Some(since) = s.idle_in_transmission_since()
                        && self.nbd_idle_ms > 0
                        && now_ms.saturating_sub(since) >= self.nbd_idle_ms
                    {
                        info!("NBD: disconnecting a client idle for {} ms", now_ms - since);
                        s.disconnect(socket, &mut self.nbd_stats);
                        timed_out[Service::Nbd.index()] += 1;
                        busy = true;
                    }
                }
                None => {}
            }
        }
        for service in Service::ALL {
            let stats = self.net.stats_mut(service);
            stats.accepted += accepted[service.index()];
            stats.timed_out += timed_out[service.index()];
        }
        self.barrier = want_barrier;
        busy |= self.pump_pipeline();
        busy
    }

    /// The earliest time (ms) something must happen: a TCP timer, DHCP, an HTTP timeout.
    fn next_deadline_ms(&mut self, now: Instant) -> u64 {
        let now_ms = now.total_millis() as u64;
        let mut deadline = u64::MAX;
        if let Some(delay) = self.net.poll_delay(now) {
            deadline = now_ms + delay.total_millis();
        }
        for s in self.sessions.iter().flatten() {
            let next = match s {
                Session::Http(h) => h.next_deadline_ms(),
                Session::Nbd(n) if self.nbd_idle_ms > 0 => n
                    .idle_in_transmission_since()
                    .map(|since| since.saturating_add(self.nbd_idle_ms)),
                Session::Nbd(_) => None,
            };
            if let Some(d) = next {
                deadline = deadline.min(d);
            }
        }
        deadline
    }
}

/// The compaction scheduler for `disk` (off without a writable qcow2 image), and the
/// image's cluster size. A pass starts at once when anything is compactable at boot: a
/// pass cut short by a crash or a power-off finishes, and what earlier boots freed counts.
fn compaction_scheduler<B: BlockDevice>(
    disk: &mut Disk<B>,
    config: &Config,
    read_only: bool,
    now_ms: u64,
) -> (Scheduler, u64) {
    let mut policy = config.compaction;
    let Disk::Qcow2(d) = disk else {
        policy.enabled = false;
        return (Scheduler::new(policy, now_ms, 0, 0), 0);
    };
    let engine = d.inner_mut();
    let cs = engine.cluster_size();
    if read_only {
        policy.enabled = false;
    }
    let freed = engine.stats().clusters_freed.saturating_mul(cs);
    let mut scheduler = Scheduler::new(policy, now_ms, freed, 0);
    if policy.enabled {
        match engine.compactable_bytes() {
            Ok(bytes) if bytes > 0 => {
                info!("compaction: {bytes} bytes compactable at boot; starting a pass");
                scheduler.arm();
            }
            Ok(_) => {}
            Err(e) => warn!("compaction: cannot tell what is compactable: {e}"),
        }
    }
    (scheduler, cs)
}

/// Closes the disk (everything durable, image clean) and says how to power off.
pub fn shut_down<B: BlockDevice>(disk: Disk<B>) -> GuestExit {
    info!("closing the disk");
    match disk.close() {
        Ok(()) => {
            info!("disk closed and flushed; powering off");
            GuestExit::Clean
        }
        Err(e) => {
            error!("closing the disk failed: {e}; powering off with a disk error");
            GuestExit::DiskError
        }
    }
}

/// A byte count for people: `64 MiB (67108864 bytes)`, one decimal where the unit does not
/// divide it.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let Some((i, _)) = UNITS
        .iter()
        .enumerate()
        .rev()
        .find(|(i, _)| bytes >> (10 * (i + 1)) > 0)
    else {
        return format!("{bytes} bytes");
    };
    let unit = 1u64 << (10 * (i + 1));
    let tenths = (bytes % unit) * 10 / unit;
    if bytes.is_multiple_of(unit) {
        format!("{} {} ({bytes} bytes)", bytes / unit, UNITS[i])
    } else {
        format!("{}.{tenths} {} ({bytes} bytes)", bytes / unit, UNITS[i])
    }
}
