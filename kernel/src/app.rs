//! The guest's main loop: devices, disk, network, services.
//!
//! [`run`] brings up, in order: the metrics registry; the virtio devices found on the PCI
//! bus ([`crate::virtio::pci::probe`]); the disk on virtio-blk ([`open_disk`]: qcow2 when
//! the device starts with the qcow2 magic or the command line says so, raw otherwise); the
//! network ([`crate::net::Network`]: DHCP or a static address, a pool of listening sockets).
//! Then it loops forever, single-threaded and polled:
//!
//! 1. read the clock;
//! 2. poll the interface: frames in and out of virtio-net, TCP timers, DHCP;
//! 3. for every socket of the pool, advance its session: a new connection gets a fresh
//!    HTTP or NBD state machine, bytes move between the socket and the state machine, NBD
//!    requests run on the disk (synchronously: the virtio-blk driver waits for its
//!    requests), and a session whose connection ended is dropped; sockets listen again, the
//!    pools grow when few listeners are left, and a full port closes its longest-idle
//!    connection ([`Guest::make_room`]);
//! 4. if anything moved, go round again at once (replies wait in socket buffers until the
//!    interface is polled); every [`HOUSEKEEPING_MS`], busy or not, look at the power button
//!    ([`Guest::power_off`]: NBD clients told to go, replies drained, disk closed clean,
//!    power off);
//! 5. when nothing moved: every [`BACKGROUND_INTERVAL_MS`] the engine writes dirty metadata
//!    back; online compaction takes a step when its [`Scheduler`] allows one (a pass is on,
//!    no NBD request for `compact_idle`, the rate limit has room); then
//!    [`Guest::idle_until`] halts the CPU until the earliest deadline (smoltcp's
//!    `poll_delay`, the HTTP idle timeouts, the engine timer, the next compaction step, at
//!    most [`MAX_IDLE_MS`]) or until virtio-net's interrupt says a frame arrived.
//!
//! Metrics: the block-device counters are updated by the virtio-blk driver itself, the
//! request counters of the virtual disk by the `Instrumented` wrapper, and everything else
//! (engine, NBD, HTTP, network, heap) is copied into the registry when a scrape asks.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use log::{error, info, warn};
use qcow_metal::block::{BlockDevice, Sectored};
use qcow_metal::compaction::Scheduler;
use qcow_metal::config::{Config, DiskFormat, GuestExit};
use qcow_metal::disk::{RawDisk, VirtualDisk};
use qcow_metal::http::{Health, HttpStats};
use qcow_metal::metrics::families::{
    EngineSnapshot, GuestConfig, GuestMetrics, HttpSnapshot, NbdSnapshot, SystemSnapshot,
};
use qcow_metal::metrics::{Format, Instrumented};
use qcow_metal::nbd::{NbdStats, ServerConfig};
use qcow_metal::qcow2::{OpenOptions, Qcow2, SpaceInfo, probe};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;

use crate::net::{Network, Service};
use crate::services::Session;
use crate::services::http::{GuestSite, HttpSession};
use crate::services::nbd::{NbdSession, NoDisk};
use crate::virtio::blk::VirtioBlk;
use crate::virtio::net::{NetStats, VirtioNet};
use crate::{Platform, VERSION, apic, power, time};

/// The block device the disk sits on: virtio-blk, byte-addressed.
pub type Device = Sectored<VirtioBlk>;

/// The first bytes of every qcow2 image.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// How often the engine's background work runs while the guest is otherwise idle.
const BACKGROUND_INTERVAL_MS: u64 = 5000;

/// How often the busy loop looks at the power button and the engine's timer.
const HOUSEKEEPING_MS: u64 = 10;

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

/// Longest wait for NBD clients to receive their last replies at power-off.
const DRAIN_MS: u64 = 2000;

/// Longest halt of an idle guest (the power button is polled in between).
const MAX_IDLE_MS: u64 = 100;

/// The engine's space figures (computing them walks the tables), with the allocation
/// counters they were computed at: they can only change when those counters do.
type SpaceCache = ([u64; 4], SpaceInfo);

/// The disk the NBD export serves, or why there is none.
pub enum Disk {
    /// The qcow2 engine on the device.
    Qcow2(Box<Instrumented<Qcow2<Device>>>),
    /// The device's bytes served as they are.
    Raw(Box<Instrumented<RawDisk<Device>>>),
    /// No usable disk: the reason is logged, shown on `/`, `/healthz` and in the metrics.
    Unavailable(String),
}

impl Disk {
    /// The disk to serve, if there is one.
    pub fn virtual_disk(&mut self) -> Option<&mut dyn VirtualDisk> {
        match self {
            Disk::Qcow2(d) => Some(&mut **d),
            Disk::Raw(d) => Some(&mut **d),
            Disk::Unavailable(_) => None,
        }
    }

    /// `"qcow2"`, `"raw"` or `"none"`.
    pub fn format_name(&self) -> &'static str {
        match self {
            Disk::Qcow2(_) => "qcow2",
            Disk::Raw(_) => "raw",
            Disk::Unavailable(_) => "none",
        }
    }

    /// Whether writes are refused (by the command line, the image or the device).
    pub fn is_read_only(&self) -> bool {
        match self {
            Disk::Qcow2(d) => d.is_read_only(),
            Disk::Raw(d) => d.is_read_only(),
            Disk::Unavailable(_) => true,
        }
    }

    /// Size of the virtual disk in bytes (0 without a disk).
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(d) => d.size(),
            Disk::Raw(d) => d.size(),
            Disk::Unavailable(_) => 0,
        }
    }

    /// What the engine reports, for the metrics. The space figures walk the tables, so they
    /// are recomputed only after clusters or tables were allocated or freed (`cache`).
    fn snapshot(&mut self, cache: &mut Option<SpaceCache>) -> EngineSnapshot {
        match self {
            Disk::Qcow2(d) => {
                let engine = d.inner_mut();
                let st = engine.stats();
                let key = [
                    st.clusters_allocated,
                    st.clusters_freed,
                    st.l2_tables_allocated,
                    st.refcount_blocks_allocated,
                ];
                if cache.is_none_or(|(k, _)| k != key) {
                    match engine.space() {
                        Ok(space) => *cache = Some((key, space)),
                        Err(e) => warn!("qcow2: space accounting failed: {e}"),
                    }
                }
                let space = cache.map(|(_, s)| s).unwrap_or_default();
                EngineSnapshot::from_qcow2(&space, engine.stats())
            }
            Disk::Raw(d) => {
                let size = d.size();
                EngineSnapshot {
                    virtual_size: size,
                    data_bytes: size,
                    image_extent: size,
                    ..EngineSnapshot::default()
                }
            }
            Disk::Unavailable(_) => EngineSnapshot::default(),
        }
    }

    /// Periodic engine work while the guest is idle: dirty metadata is written back (in
    /// crash-safe order), so a crash loses little.
    fn background(&mut self) {
        if let Disk::Qcow2(d) = self
            && let Err(e) = d.inner_mut().flush_metadata()
        {
            warn!("qcow2: metadata write-back failed: {e}");
        }
    }

    /// Growth of the host file ahead of need (qcow2 on a device that grows on demand): asks
    /// for room when the image nears the device's end, and takes a capacity that grew.
    fn keep_headroom(&mut self) {
        if let Disk::Qcow2(d) = self {
            d.inner_mut().keep_headroom();
        }
    }

    /// Makes everything durable and leaves the image clean (qcow2: metadata and refcounts
    /// written, dirty bit cleared; then the device's cache flushed).
    fn close(self) -> Result<(), String> {
        match self {
            Disk::Qcow2(d) => {
                let mut dev = d.into_inner().close().map_err(|e| format!("{e}"))?;
                dev.flush().map_err(|e| format!("{e}"))
            }
            Disk::Raw(d) => {
                let mut dev = d.into_inner().into_inner();
                dev.flush().map_err(|e| format!("{e}"))
            }
            Disk::Unavailable(_) => Ok(()),
        }
    }
}

/// Brings up the disk on the virtio-blk device, following `config.format`.
pub fn open_disk(dev: Option<Device>, config: &Config, metrics: &GuestMetrics) -> Disk {
    let Some(mut dev) = dev else {
        return Disk::Unavailable(String::from("no virtio-blk device"));
    };
    let mut magic = [0u8; 4];
    let is_qcow2 =
        dev.capacity() >= 4 && dev.read_at(0, &mut magic).is_ok() && magic == QCOW2_MAGIC;
    if config.format == DiskFormat::Auto && !is_qcow2 {
        // A qcow2 image whose magic was damaged must not be served as a writable raw disk
        // (a client would overwrite its metadata): only an explicit format=raw does that.
        let mut first = [0u8; probe::PROBE_LEN];
        let len = first
            .len()
            .min(usize::try_from(dev.capacity()).unwrap_or(usize::MAX));
        if dev.read_at(0, &mut first[..len]).is_ok()
            && probe::looks_like_damaged_qcow2(&first[..len])
        {
            return Disk::Unavailable(String::from(
                "the disk looks like a qcow2 image with a damaged magic; not exported \
                 (format=raw exports its bytes as they are)",
            ));
        }
    }
    let want_qcow2 = match config.format {
        DiskFormat::Auto => is_qcow2,
        DiskFormat::Qcow2 => true,
        DiskFormat::Raw => false,
    };
    if !want_qcow2 {
        return Disk::Raw(Box::new(Instrumented::new(
            RawDisk::new(dev),
            metrics.disk.clone(),
            time::now_ns,
        )));
    }
    if !is_qcow2 {
        return Disk::Unavailable(String::from(
            "format=qcow2, but the device does not start with the qcow2 magic",
        ));
    }
    let options = OpenOptions {
        read_only: config.read_only,
        l2_cache_bytes: config.l2_cache,
        refcount_cache_bytes: config.refcount_cache,
        // virtio-blk cannot say that bytes past the image read as zeros: zero them once
        // (WRITE_ZEROES requests) so that new clusters need no padding.
        zero_tail: !config.read_only,
        ..OpenOptions::default()
    };
    match Qcow2::open(dev, options) {
        Ok(engine) => Disk::Qcow2(Box::new(Instrumented::new(
            engine,
            metrics.disk.clone(),
            time::now_ns,
        ))),
        Err(e) => Disk::Unavailable(format!("the qcow2 image cannot be opened: {e}")),
    }
}

/// Everything the loop owns.
struct Guest {
    config: Config,
    metrics: GuestMetrics,
    disk: Disk,
    dev: VirtioNet,
    net: Network,
    net_stats: Arc<NetStats>,
    sessions: Vec<Option<Session>>,
    nbd_config: ServerConfig,
    nbd_stats: NbdStats,
    http_stats: HttpStats,
    facts: Vec<(&'static str, String)>,
    /// virtio-net's interrupt wakes the CPU from [`apic::idle_until`].
    net_wakes: bool,
    /// Last space figures of the engine, and when they were computed.
    space_cache: Option<SpaceCache>,
    /// The power button was pressed: NBD clients are being sent away.
    stopping: bool,
    /// Online compaction: when to take a step.
    compaction: Scheduler,
    /// The image's cluster size (the unit of compaction; 0 without a qcow2 image).
    cluster_size: u64,
}

/// Runs the guest's services forever (or until the power button powers it off).
pub fn run(platform: Platform) -> ! {
    let config = platform.config.clone();
    let metrics = GuestMetrics::new(&GuestConfig {
        disk: &config.export,
        device: "vda",
        interface: "eth0",
        version: VERSION,
        mirage: config.mirage_metrics,
        clock: time::now_ns,
    });

    let found = crate::virtio::pci::probe(&platform.pci_devices);
    let blk = found.blk.and_then(|(df, transport)| {
        match VirtioBlk::new(transport, metrics.blockdev.clone(), time::now_ns) {
            Ok(mut blk) => {
                let pci = platform
                    .pci_devices
                    .iter()
                    .find(|d| d.virtio_kind() == Some(crate::pci::VirtioKind::Block));
                if pci.and_then(apic::enable_wake).is_some() {
                    // Long waits for the device halt the CPU instead of spinning.
                    blk.set_waiter(apic::idle_until);
                }
                if config.grow && !config.read_only {
                    // The host file grows on demand: ask the runner (`crate::hostfile`).
                    blk.enable_growth();
                }
                Some(Sectored::new(blk))
            }
            Err(e) => {
                error!("virtio-blk at {df}: {e:?}");
                None
            }
        }
    });
    let mut disk = open_disk(blk, &config, &metrics);
    match &disk {
        Disk::Unavailable(why) => {
            error!("disk: unavailable: {why}; serving metrics only");
            metrics.disk.set_up(false);
        }
        d => {
            info!("disk: {} export {:?}", d.format_name(), config.export);
            metrics.disk.set_up(true);
        }
    }

    let net_stats = Arc::new(NetStats::default());
    let Some((df, transport)) = found.net else {
        error!("no virtio-net device: nothing to serve");
        park(disk);
    };
    let mut dev = match VirtioNet::new(transport, net_stats.clone()) {
        Ok(dev) => dev,
        Err(e) => {
            error!("virtio-net at {df}: {e}");
            park(disk);
        }
    };
    let net_device = platform
        .pci_devices
        .iter()
        .find(|d| d.virtio_kind() == Some(crate::pci::VirtioKind::Net));
    let net_wakes = match net_device.and_then(apic::enable_wake) {
        Some(pin) => {
            dev.enable_interrupts();
            info!("virtio-net wakes the idle CPU (I/O APIC pin {pin})");
            true
        }
        None => {
            warn!("virtio-net cannot wake the CPU: idling polls every millisecond");
            false
        }
    };
    let seed = crate::cpu::rdtsc();
    let net = Network::new(&mut dev, &config, now(), seed);

    let size = disk.size();
    let read_only = config.read_only || disk.is_read_only();
    let mut facts = vec![
        ("version", String::from(VERSION)),
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
    let (compaction, cluster_size) = compaction_scheduler(&mut disk, &config, read_only);
    let mut guest = Guest {
        config,
        metrics,
        disk,
        dev,
        net,
        net_stats,
        sessions,
        nbd_config,
        nbd_stats: NbdStats::default(),
        http_stats: HttpStats::new(),
        facts,
        net_wakes,
        space_cache: None,
        stopping: false,
        compaction,
        cluster_size,
    };
    info!(
        "main loop: serving metrics on :{} and NBD on :{}",
        guest.config.metrics_port, guest.config.nbd_port
    );
    guest.main_loop()
}

/// The compaction scheduler for `disk` (off without a writable qcow2 image), and the
/// image's cluster size. A pass starts at once when anything is compactable at boot: a
/// pass cut short by a crash or a power-off finishes, and what earlier boots freed counts.
fn compaction_scheduler(disk: &mut Disk, config: &Config, read_only: bool) -> (Scheduler, u64) {
    let now_ms = time::now_ms();
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

/// smoltcp's clock: the kernel's monotonic clock.
fn now() -> Instant {
    Instant::from_micros(time::now_us() as i64)
}

/// Without a network there is nothing to serve: wait for the power button.
fn park(disk: Disk) -> ! {
    loop {
        if power::power_button_pressed() {
            info!("power button pressed");
            shut_down(disk);
        }
        apic::idle_until(time::now_ns() + 100_000_000);
    }
}

/// Closes the disk (everything durable, image clean) and powers off.
fn shut_down(disk: Disk) -> ! {
    info!("closing the disk");
    match disk.close() {
        Ok(()) => {
            info!("disk closed and flushed; powering off");
            power::shutdown(GuestExit::Clean)
        }
        Err(e) => {
            error!("closing the disk failed: {e}; powering off with a disk error");
            power::shutdown(GuestExit::DiskError)
        }
    }
}

impl Guest {
    fn main_loop(&mut self) -> ! {
        let mut next_background = time::now_ms() + BACKGROUND_INTERVAL_MS;
        let mut next_housekeeping = 0;
        let mut profile = LoopProfile::default();
        loop {
            let t0 = time::now_ns();
            let now = Instant::from_micros((t0 / 1000) as i64);
            let mut busy = self.net.poll(&mut self.dev, now);
            let t1 = time::now_ns();
            busy |= self.drive_sessions(now);
            if self.net.relisten() {
                self.sessions.resize_with(self.net.listeners.len(), || None);
            }
            self.make_room(t1 / 1_000_000);
            let t2 = time::now_ns();
            profile.poll_ns += t1 - t0;
            profile.serve_ns += t2 - t1;
            profile.turns += 1;
            let now_ms = t2 / 1_000_000;
            // Every few milliseconds, even while busy: power button, engine work, profile.
            if now_ms >= next_housekeeping || !busy {
                next_housekeeping = now_ms + HOUSEKEEPING_MS;
                if power::power_button_pressed() {
                    self.power_off();
                }
                self.disk.keep_headroom();
                if now_ms >= next_background && !busy {
                    self.disk.background();
                    next_background = now_ms + BACKGROUND_INTERVAL_MS;
                }
                busy |= self.compact(now_ms);
                profile.report(now_ms);
            }
            if busy {
                // Replies wait in the socket buffers: poll the interface again at once.
                continue;
            }
            let deadline = self.next_deadline_ms(now).min(next_background).min(
                self.compaction
                    .next_deadline_ms(now_ms, self.cluster_size)
                    .unwrap_or(u64::MAX),
            );
            let t3 = time::now_ns();
            self.idle_until(deadline);
            profile.idle_ns += time::now_ns() - t3;
        }
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
    /// served complete and their replies are sent, for at most [`DRAIN_MS`]), then the disk
    /// is closed and the guest powers off.
    fn power_off(&mut self) -> ! {
        info!("power button pressed: ending NBD sessions");
        self.stopping = true;
        for session in self.sessions.iter_mut().flatten() {
            if let Session::Nbd(s) = session {
                s.shutdown();
            }
        }
        let deadline = time::now_ms() + DRAIN_MS;
        while time::now_ms() < deadline {
            let now = now();
            self.net.poll(&mut self.dev, now);
            self.drive_sessions(now);
            let drained = self
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
            if drained {
                break;
            }
            let wait = self.next_deadline_ms(now).min(deadline);
            self.idle_until(wait.min(time::now_ms() + 1));
        }
        let disk = core::mem::replace(&mut self.disk, Disk::Unavailable(String::new()));
        shut_down(disk)
    }

    /// When every socket of a port is taken and its pool cannot grow, closes the session of
    /// that port that has been idle longest (if any is idle), so that new clients are not
    /// refused while silent ones hold the sockets.
    fn make_room(&mut self, now_ms: u64) {
        for service in [Service::Http, Service::Nbd] {
            if self.net.listening(service) > 0 {
                continue;
            }
            let victim = self
                .net
                .listeners
                .iter()
                .zip(&self.sessions)
                .enumerate()
                .filter(|(_, (l, _))| l.service == service)
                .filter_map(|(i, (_, s))| Some((i, s.as_ref()?.idle_since_ms()?)))
                .min_by_key(|&(_, since)| since);
            if let Some((i, since)) = victim {
                let handle = self.net.listeners[i].handle;
                self.net.sockets.get_mut::<tcp::Socket>(handle).abort();
                if let Some(Session::Nbd(mut s)) = self.sessions[i].take() {
                    s.end(&mut self.nbd_stats);
                }
                info!(
                    "{service:?}: every socket is taken; closed a connection idle for {} ms",
                    now_ms.saturating_sub(since)
                );
            }
        }
    }

    /// Advances every session; returns whether anything moved.
    fn drive_sessions(&mut self, now: Instant) -> bool {
        let now_ms = now.total_millis() as u64;
        let mut busy = false;
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
                *slot = Some(match listener.service {
                    Service::Http => Session::Http(Box::new(HttpSession::new(now_ms))),
                    Service::Nbd => Session::Nbd(Box::new(match self.disk {
                        _ if self.stopping => NbdSession::refusing(&self.nbd_config, now_ms),
                        Disk::Unavailable(ref why) => {
                            warn!("NBD: turning a client away: {why}");
                            NbdSession::refusing(&self.nbd_config, now_ms)
                        }
                        _ => NbdSession::new(&self.nbd_config, now_ms),
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
                    let mut render = |format: Format, out: &mut Vec<u8>| {
                        let mut engine = self.disk.snapshot(&mut self.space_cache);
                        (engine.compaction, engine.compaction_passes) = compaction;
                        update_metrics(
                            &self.metrics,
                            &engine,
                            &self.nbd_stats,
                            &self.http_stats,
                            &self.net_stats,
                        );
                        self.metrics.render_into(format, out);
                    };
                    let mut site = GuestSite {
                        render: &mut render,
                        facts: &self.facts,
                        health,
                        stats: &self.http_stats,
                    };
                    busy |= s.drive(socket, now_ms, &mut site);
                }
                Some(Session::Nbd(s)) => match self.disk.virtual_disk() {
                    Some(disk) => busy |= s.drive(socket, disk, &mut self.nbd_stats, now_ms),
                    // No disk: a refusing session turns the client away.
                    None => busy |= s.drive(socket, &mut NoDisk, &mut self.nbd_stats, now_ms),
                },
                None => {}
            }
        }
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
            if let Session::Http(h) = s
                && let Some(d) = h.next_deadline_ms()
            {
                deadline = deadline.min(d);
            }
        }
        deadline
    }

    /// Waits until `deadline_ms` or until a frame arrives, whichever comes first, with the
    /// CPU halted ([`apic::idle_until`]): virtio-net's interrupt ends the wait early when it
    /// is wired ([`apic::enable_wake`]); otherwise the wait is cut into short slices that
    /// look at the receive ring. The power button is polled, so a wait is never longer than
    /// [`MAX_IDLE_MS`].
    fn idle_until(&mut self, deadline_ms: u64) {
        if self.dev.has_rx() {
            return;
        }
        let slice_ms = if self.net_wakes { MAX_IDLE_MS } else { 1 };
        let now_ms = time::now_ms();
        let until_ms = deadline_ms.min(now_ms + slice_ms);
        apic::idle_until(until_ms.saturating_mul(1_000_000));
        if apic::take_device_wake() {
            self.dev.ack_interrupt();
        }
    }
}

/// Copies the figures kept outside the registry into it, just before a scrape renders it.
fn update_metrics(
    metrics: &GuestMetrics,
    engine: &EngineSnapshot,
    nbd: &NbdStats,
    http: &HttpStats,
    net: &NetStats,
) {
    let heap = crate::heap::stats();
    use core::sync::atomic::Ordering::Relaxed;
    metrics.disk.update(engine);
    metrics.nbd.update(&NbdSnapshot::from(nbd));
    metrics.http.update(&HttpSnapshot::from(&http.snapshot()));
    metrics.system.update(&SystemSnapshot {
        uptime_seconds: time::now_ns() as f64 / 1e9,
        heap_size: heap.claimed_bytes,
        heap_used: heap.allocated_bytes,
        rx_packets: net.rx_packets.load(Relaxed),
        tx_packets: net.tx_packets.load(Relaxed),
        rx_bytes: net.rx_bytes.load(Relaxed),
        tx_bytes: net.tx_bytes.load(Relaxed),
    });
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
