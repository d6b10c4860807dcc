//! `qcow-metal serve`: the project's qcow2 engine as a native NBD server on the host, with
//! the guest's `/metrics` next to it.
//!
//! The guest's service layer does the work: its sessions ([`NbdSession`], [`HttpSession`],
//! which drive the sans-I/O NBD server and HTTP responder), its disk ([`Disk`]: the engine
//! with its request metrics and figures), its `/metrics` site ([`GuestSite`]) and registry
//! ([`GuestMetrics`], fed a [`Scrape`] of every layer's counters), here on std TCP sockets
//! ([`StdSocket`]) and on the image file ([`FileDisk`]) instead of smoltcp and virtio-blk.
//!
//! Threads: one accepting thread per port, one thread per connection, and a pool of
//! [`IO_THREADS`] for the data of NBD reads and writes. A connection's pipelined reads and
//! writes are served in batches ([`Connection::process_queued`]): each is mapped under the
//! engine's mutex (held for the mapping only), then its data moves by positioned I/O on the
//! pool (and on the connection's own thread while it waits), in parallel with the other
//! requests of the batch and with other connections. Requests that change mappings (writes
//! that allocate, discard, write-zeroes) and flushes wait until no mapped data is moving
//! ([`conn_disk`] says how). Replies are written after the turn, with no lock held, so a
//! client that does not read stalls only itself.
//!
//! [`Connection::process_queued`]: qcow_metal::nbd::Connection::process_queued
//!
//! [`Server::stop`] (Ctrl-C or SIGTERM in the CLI) tells NBD clients the server is going
//! (`NBD_ESHUTDOWN` / `NBD_REP_ERR_SHUTDOWN` from then on), waits up to [`DRAIN`] for them to
//! leave, closes what is left, then closes the image clean: dirty metadata written, the
//! dirty bit cleared, the file synced.

mod conn_disk;
mod io_pool;
mod std_socket;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use qcow_metal::block::telemetry::{BlockDeviceMetrics, InstrumentedDevice};
use qcow_metal::block::{BlockDevice, FileDisk};
use qcow_metal::compaction::CompactionState;
use qcow_metal::disk::RawDisk;
use qcow_metal::disk::telemetry::{DiskFigures, Instrumented};
use qcow_metal::http::{Health, HttpStats};
use qcow_metal::metrics::Format;
use qcow_metal::nbd::{NbdStats, ServerConfig};
use qcow_metal::net::NetStats;
use qcow_metal::qcow2::chain::files as chain_files;
use qcow_metal::qcow2::telemetry::EngineFigures;
use qcow_metal::qcow2::{OpenOptions, Qcow2, SpaceInfo};
use qcow_metal::service::disk::{Disk, SpaceCache};
use qcow_metal::service::http::{GuestSite, HttpSession};
use qcow_metal::service::nbd::{NbdSession, NoDisk};
use qcow_metal::service::session::Session;
use qcow_metal::telemetry::{GuestConfig, GuestMetrics, Scrape, SystemFigures};

use crate::disk::GuestFormat;
use crate::error::{Error, Result};
use crate::guard;
use crate::units::format_size;
use conn_disk::{ConnDisk, Counted, Engine};
pub use io_pool::IO_THREADS;
use io_pool::{IoPool, PoolQueue};
pub use std_socket::StdSocket;

/// How long [`Server::stop`] waits for NBD clients to disconnect after being told the
/// server is shutting down; connections still open then are closed.
pub const DRAIN: Duration = Duration::from_secs(2);

/// How often a connection thread blocked on a silent client looks at the stop flag and
/// the session's timers.
const STOP_POLL: Duration = Duration::from_millis(100);

/// At most this many connections per port are served at once; more are closed at accept
/// (and logged), so a flood of clients cannot exhaust the host's threads.
pub const MAX_CONNECTIONS_PER_PORT: usize = 512;

/// Reply bytes a connection may have waiting before it takes no more reads (see
/// [`ServerConfig::output_high_water`]).
const SERVE_OUTPUT_HIGH_WATER: u32 = 4 << 20;

/// What `qcow-metal serve` serves and where.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The qcow2 image.
    pub image: PathBuf,
    /// Address and port of the NBD server (port 0: any free port).
    pub nbd: SocketAddr,
    /// Address and port of the metrics server (port 0: any free port).
    pub metrics: SocketAddr,
    /// The NBD export name (the empty name selects it too).
    pub export: String,
    /// Open the image read-only and export it read-only.
    pub read_only: bool,
    /// How to take the file's bytes: qcow2 (over its backing chain) or raw.
    pub format: GuestFormat,
    /// An NBD client that finished the handshake and sent nothing for this long, with no
    /// request of its own in progress, is disconnected (`None`: never), as the guest's
    /// `nbd_idle=` does.
    pub nbd_idle: Option<Duration>,
}

/// The block device under the engine: the image file, counted as the guest counts
/// virtio-blk.
type Device = InstrumentedDevice<FileDisk, BlockDeviceMetrics>;

/// A monotonic clock in nanoseconds since the server's first use of it (the metrics'
/// clock: a plain `fn`).
fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The state the connection threads share.
struct Shared {
    /// The disk; `None` once it is closed.
    disk: Engine,
    /// Closed while a request that changes mappings runs (see [`conn_disk`]).
    gate: RwLock<()>,
    /// The data I/O of batched requests; `None` once the server stops.
    pool: Mutex<Option<IoPool>>,
    /// The disk's size and whether it is read-only (fixed while it is served).
    disk_size: u64,
    disk_read_only: bool,
    /// Where queued requests are counted as the disk's.
    counted: Counted,
    space_cache: Mutex<Option<SpaceCache>>,
    nbd_config: ServerConfig,
    /// NBD counters of the connections that ended.
    nbd_stats: Mutex<NbdStats>,
    /// NBD counters of each open connection, by id (copied there after every turn).
    nbd_live: Mutex<HashMap<u64, NbdStats>>,
    http_stats: HttpStats,
    metrics: GuestMetrics,
    facts: Vec<(&'static str, String)>,
    stopping: AtomicBool,
    /// TCP payload bytes received and sent, both ports.
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// Open connections by id (clones of their sockets, to close them at stop), per port.
    open: Mutex<HashMap<u64, (Port, TcpStream)>>,
    next_id: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// [`ServeOptions::nbd_idle`] in milliseconds (0: never).
    nbd_idle_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Nbd,
    Metrics,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn open_count(&self, port: Port) -> usize {
        lock(&self.open)
            .values()
            .filter(|(p, _)| *p == port)
            .count()
    }

    /// The guest's scrape: every layer's figures, read where the layer keeps them, rendered
    /// by the guest's registry. The engine's figures are copied under its lock, so the
    /// encoding does not hold it.
    fn render(&self, format: Format, out: &mut Vec<u8>) {
        let (space, stats) = match lock(&self.disk).as_mut() {
            Some(disk) => {
                let figures = disk.figures(&mut lock(&self.space_cache));
                (figures.space, figures.stats.cloned())
            }
            None => (SpaceInfo::default(), None),
        };
        // No compaction scheduler here: the engine's own state (running while its last
        // step left work).
        let compaction = match stats.as_ref().map(|s| s.compaction_state) {
            Some(qcow_metal::qcow2::CompactionState::Running) => CompactionState::Running,
            _ => CompactionState::Idle,
        };
        // TCP payload bytes of both ports. No heap of its own and no frames: the process
        // uses the host's allocator, and the host's network stack sees the packets.
        let net = NetStats::default();
        net.rx_bytes
            .store(self.rx_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        net.tx_bytes
            .store(self.tx_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        let mut nbd = lock(&self.nbd_stats).clone();
        for live in lock(&self.nbd_live).values() {
            nbd.add(live);
        }
        let scrape = Scrape {
            disk: DiskFigures {
                engine: EngineFigures {
                    space,
                    stats: stats.as_ref(),
                },
                compaction,
                compaction_passes: 0,
            },
            nbd: &nbd,
            http: &self.http_stats,
            net: &net,
            system: SystemFigures {
                uptime_seconds: now_ns() as f64 / 1e9,
                ..SystemFigures::default()
            },
            connections: None,
        };
        self.metrics.render_into(format, &scrape, out);
    }
}

/// A running `qcow-metal serve`: listening, serving, until [`Server::stop`].
pub struct Server {
    shared: Arc<Shared>,
    nbd_addr: SocketAddr,
    metrics_addr: SocketAddr,
    acceptors: Vec<JoinHandle<()>>,
    /// The disk lock, and the backing layers' shared locks (released when the server is
    /// dropped).
    _lock: File,
    _layer_locks: Vec<File>,
    image: PathBuf,
}

/// What [`Server::stop`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// NBD connections still open after [`DRAIN`] and closed by the server.
    pub nbd_closed: usize,
}

/// The disk `serve` opened: the engine (or the raw file), a second handle on the image file
/// for the I/O pool, and the shared locks on the backing layers (held while it is served).
struct Opened {
    disk: Disk<Device>,
    pool_file: FileDisk,
    layer_locks: Vec<File>,
}

/// Opens the disk: a qcow2 image with the engine, over its backing chain (resolved as QEMU
/// does, every layer locked shared and opened read-only), or a raw file whose bytes are the
/// disk (its size is the file's length). `format` picks which; `auto` takes a file with the
/// qcow2 magic for qcow2 and refuses one whose magic looks damaged. The image and its
/// requests are counted in `metrics` (the layers' own reads are not, as in the guest).
fn open_disk(
    path: &Path,
    format: GuestFormat,
    read_only: bool,
    metrics: &GuestMetrics,
) -> Result<Opened> {
    let err = |action: &'static str, reason: String| Error::Disk {
        path: path.to_path_buf(),
        action,
        reason,
    };
    guard::ensure_regular(path)?;
    if format == GuestFormat::Auto {
        guard::check_auto_format(path)?;
    }
    let mut file = FileDisk::open(path, read_only).map_err(|e| err("open", e.to_string()))?;
    if file.len().map_err(|e| err("open", e.to_string()))? == 0 {
        return Err(guard::empty(path));
    }
    let mut magic = [0u8; 4];
    file.read_at(0, &mut magic)
        .map_err(|e| err("read", e.to_string()))?;
    let is_qcow2 = magic == *b"QFI\xfb";
    let qcow2 = match format {
        GuestFormat::Auto => is_qcow2,
        GuestFormat::Qcow2 if !is_qcow2 => {
            return Err(err(
                "serve",
                "--format qcow2, but it does not start with the qcow2 magic".into(),
            ));
        }
        GuestFormat::Qcow2 => true,
        GuestFormat::Raw => false,
    };
    let clone = |file: &FileDisk| {
        file.file()
            .try_clone()
            .map(|f| FileDisk::from_file(f, read_only))
            .map_err(|e| err("open", e.to_string()))
    };
    let count = |file: FileDisk| InstrumentedDevice::new(file, metrics.blockdev.clone(), now_ns);
    if !qcow2 {
        let file = file.fixed_size().map_err(|e| err("open", e.to_string()))?;
        let pool_file = clone(&file)?
            .fixed_size()
            .map_err(|e| err("open", e.to_string()))?;
        let disk = Disk::Raw(Box::new(Instrumented::new(
            RawDisk::new(count(file)),
            metrics.disk.clone(),
            now_ns,
        )));
        return Ok(Opened {
            disk,
            pool_file,
            layer_locks: Vec::new(),
        });
    }
    let pool_file = clone(&file)?;
    let opts = OpenOptions {
        read_only,
        ..OpenOptions::default()
    };
    let (chain, layer_locks) = crate::disk::backing_chain(path)?;
    // The layers' reads are not counted: the device metrics are the image file's.
    let uncounted = Arc::new(BlockDeviceMetrics::new("backing"));
    let below = chain_files::open_layers_with(&chain, &opts, |f| {
        InstrumentedDevice::new(f, uncounted.clone(), now_ns)
    })
    .map_err(|e| err("open the backing chain of", e))?;
    let engine = Qcow2::open_with_backing(count(file), opts, below)
        .map_err(|e| err("open", e.to_string()))?;
    let disk = Disk::Qcow2(Box::new(Instrumented::new(
        engine,
        metrics.disk.clone(),
        now_ns,
    )));
    Ok(Opened {
        disk,
        pool_file,
        layer_locks,
    })
}

fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener> {
    TcpListener::bind(addr).map_err(|source| Error::PortInUse {
        port: addr.port(),
        flag,
        source,
    })
}

/// Where to connect to reach a listener bound to `addr` (an unspecified address is reached
/// on loopback).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

impl Server {
    /// Locks and opens the image, binds both ports and starts serving.
    pub fn start(opts: &ServeOptions) -> Result<Server> {
        let path = &opts.image;
        if !path.exists() {
            return Err(Error::disk(
                path,
                "open",
                "no such file (create one with `qcow-metal image create PATH --size SIZE` or \
                 `qemu-img create -f qcow2 PATH SIZE`)",
            ));
        }
        let lock_file = guard::lock_disk(path, opts.read_only)?;
        let nbd_listener = bind(opts.nbd, "--nbd-port")?;
        let metrics_listener = bind(opts.metrics, "--metrics-port")?;
        let local = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| Error::io("reading a listening address", e))
        };
        let (nbd_addr, metrics_addr) = (local(&nbd_listener)?, local(&metrics_listener)?);

        let metrics = GuestMetrics::new(&GuestConfig {
            disk: &opts.export,
            device: "file",
            interface: "host",
            version: env!("CARGO_PKG_VERSION"),
            mirage: false,
            clock: now_ns,
        });
        let Opened {
            disk,
            pool_file,
            layer_locks,
        } = open_disk(path, opts.format, opts.read_only, &metrics)?;
        let pool = IoPool::new(
            pool_file,
            IO_THREADS,
            io_pool::Metrics {
                device: metrics.blockdev.clone(),
                clock: now_ns,
            },
        );
        metrics.disk.set_up(true);
        let read_only = opts.read_only || disk.is_read_only();
        let format_name = disk.format_name();
        let size = disk.size();
        let facts = vec![
            ("version", String::from(env!("CARGO_PKG_VERSION"))),
            ("image", path.display().to_string()),
            ("export", opts.export.clone()),
            ("format", String::from(format_name)),
            (
                "virtual size",
                format!("{} ({size} bytes)", format_size(size)),
            ),
            ("NBD", nbd_addr.to_string()),
            ("metrics", metrics_addr.to_string()),
            ("read-only", read_only.to_string()),
        ];
        let shared = Arc::new(Shared {
            disk: Mutex::new(Some(disk)),
            gate: RwLock::new(()),
            pool: Mutex::new(Some(pool)),
            disk_size: size,
            disk_read_only: read_only,
            counted: Counted {
                disk: metrics.disk.clone(),
                clock: now_ns,
            },
            space_cache: Mutex::new(None),
            nbd_config: ServerConfig {
                export_name: opts.export.clone(),
                description: format!("qcow-metal serve: {format_name} disk"),
                read_only,
                // A batch takes reads while their replies fit under this: 4 MiB lets four
                // 1 MiB reads move on the pool at once (the guest's 256 KiB, sized for its
                // heap, allows one), and matches StdSocket's send buffer.
                output_high_water: SERVE_OUTPUT_HIGH_WATER,
                ..ServerConfig::default()
            },
            nbd_stats: Mutex::new(NbdStats::default()),
            nbd_live: Mutex::new(HashMap::new()),
            http_stats: HttpStats::new(),
            metrics,
            facts,
            stopping: AtomicBool::new(false),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            workers: Mutex::new(Vec::new()),
            nbd_idle_ms: opts
                .nbd_idle
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        });
        let acceptors = vec![
            spawn_acceptor(nbd_listener, Port::Nbd, shared.clone()),
            spawn_acceptor(metrics_listener, Port::Metrics, shared.clone()),
        ];
        Ok(Server {
            shared,
            nbd_addr,
            metrics_addr,
            acceptors,
            _lock: lock_file,
            _layer_locks: layer_locks,
            image: path.clone(),
        })
    }

    /// Where the NBD server listens.
    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd_addr
    }

    /// Where the metrics server listens.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The `nbd://` URI of the export.
    pub fn nbd_uri(&self) -> String {
        format!(
            "nbd://{}/{}",
            reachable(self.nbd_addr),
            self.shared.nbd_config.export_name
        )
    }

    /// The metrics URL.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", reachable(self.metrics_addr))
    }

    /// Stops serving and closes the image clean: NBD clients are told the server is
    /// shutting down and given [`DRAIN`] to leave, then every connection is closed, and the
    /// engine writes its metadata back, clears the dirty bit and syncs the file.
    pub fn stop(mut self) -> Result<StopReport> {
        let shared = self.shared.clone();
        shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accepting threads (blocked in accept) so they see the flag.
        for addr in [self.nbd_addr, self.metrics_addr] {
            let _ = TcpStream::connect_timeout(&reachable(addr), Duration::from_secs(1));
        }
        for a in self.acceptors.drain(..) {
            let _ = a.join();
        }
        // Metrics clients owe nothing: close them now. NBD clients get the drain.
        close_open(&shared, Some(Port::Metrics));
        let deadline = Instant::now() + DRAIN;
        while shared.open_count(Port::Nbd) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let nbd_closed = shared.open_count(Port::Nbd);
        if nbd_closed > 0 {
            log::warn!("serve: closing {nbd_closed} NBD connection(s) still open after the drain");
        }
        close_open(&shared, None);
        let workers = std::mem::take(&mut *lock(&shared.workers));
        for w in workers {
            let _ = w.join();
        }
        // Every piece has completed (connections finish their batches): stop the workers.
        drop(lock(&shared.pool).take());
        let disk = lock(&shared.disk).take();
        if let Some(disk) = disk {
            disk.close()
                .map_err(|reason| Error::disk(&self.image, "close", reason))?;
        }
        Ok(StopReport { nbd_closed })
    }
}

/// Shuts down the sockets of open connections (of one port, or all), so their threads see
/// the end of the stream and finish.
fn close_open(shared: &Shared, port: Option<Port>) {
    for (p, stream) in lock(&shared.open).values() {
        if port.is_none_or(|want| want == *p) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn spawn_acceptor(listener: TcpListener, port: Port, shared: Arc<Shared>) -> JoinHandle<()> {
    thread::spawn(move || {
        for stream in listener.incoming() {
            if shared.stopping() {
                break;
            }
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors or an aborted handshake: log, breathe, go on.
                    log::warn!("serve: accept failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if shared.open_count(port) >= MAX_CONNECTIONS_PER_PORT {
                log::warn!(
                    "serve: {MAX_CONNECTIONS_PER_PORT} connections open on {port:?}; \
                     refusing a new one"
                );
                continue;
            }
            let Ok(clone) = stream.try_clone() else {
                continue;
            };
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            lock(&shared.open).insert(id, (port, clone));
            let worker_shared = shared.clone();
            let worker = thread::spawn(move || {
                if let Err(e) = serve_connection(stream, port, id, &worker_shared) {
                    log::debug!("serve: {port:?} client ended with an error: {e}");
                }
                lock(&worker_shared.open).remove(&id);
            });
            let mut workers = lock(&shared.workers);
            workers.retain(|w| !w.is_finished());
            workers.push(worker);
        }
    })
}

/// Serves one connection with the guest's session for its port: each turn lets the session
/// take what the client sent and queue its replies, then the replies are written and, when
/// the session had nothing to do, the next bytes are awaited (at most [`STOP_POLL`], so the
/// stop flag, the session's timers and the NBD idle timeout are seen).
fn serve_connection(stream: TcpStream, port: Port, id: u64, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STOP_POLL))?;
    let mut socket = StdSocket::new(stream);
    let mut session = match port {
        Port::Nbd => Session::Nbd(Box::new(NbdSession::new(&shared.nbd_config, now_ms()))),
        Port::Metrics => Session::Http(Box::new(HttpSession::new(now_ms()))),
    };
    let mut told_to_go = false;
    // This connection's NBD counters, and its side of the I/O pool.
    let mut stats = NbdStats::default();
    let mut queue: Option<PoolQueue> = match port {
        Port::Nbd => lock(&shared.pool).as_ref().map(IoPool::queue),
        Port::Metrics => None,
    };
    let result = loop {
        let progressed = match &mut session {
            Session::Nbd(s) => {
                let moved = match &mut queue {
                    Some(q) => {
                        let mut disk = ConnDisk::new(
                            &shared.disk,
                            &shared.gate,
                            q,
                            &shared.counted,
                            shared.disk_size,
                            shared.disk_read_only,
                        );
                        s.drive_with(&mut socket, &mut stats, now_ms(), |conn, stats| {
                            conn.process_queued(&mut disk, stats)
                        })
                    }
                    None => s.drive(&mut socket, &mut NoDisk, &mut stats, now_ms()),
                };
                lock(&shared.nbd_live).insert(id, stats.clone());
                moved
            }
            Session::Http(s) => {
                let mut render = |format: Format, out: &mut Vec<u8>| shared.render(format, out);
                let mut site = GuestSite {
                    render: &mut render,
                    facts: &shared.facts,
                    health: if shared.stopping() {
                        Health::Unavailable("shutting down".into())
                    } else {
                        Health::Ok
                    },
                    stats: &shared.http_stats,
                };
                s.drive(&mut socket, now_ms(), &mut site)
            }
        };
        socket.flush();
        let (rx, tx) = socket.take_moved();
        shared.rx_bytes.fetch_add(rx, Ordering::Relaxed);
        shared.tx_bytes.fetch_add(tx, Ordering::Relaxed);
        if socket.is_done() {
            break Ok(());
        }
        if progressed {
            continue;
        }
        if let Session::Nbd(s) = &mut session
            && shared.nbd_idle_ms > 0
            && let Some(since) = s.idle_in_transmission_since()
            && now_ms().saturating_sub(since) >= shared.nbd_idle_ms
        {
            log::info!(
                "serve: disconnecting an NBD client idle for {} ms",
                now_ms() - since
            );
            s.disconnect(&mut socket, &mut stats);
            lock(&shared.nbd_live).insert(id, stats.clone());
            continue;
        }
        if let Session::Nbd(s) = &mut session
            && !told_to_go
            && shared.stopping()
        {
            // From now on options and requests are refused with the shutdown errors, so
            // that the client disconnects by itself.
            s.shutdown();
            told_to_go = true;
            continue;
        }
        if socket.peer_closed() {
            // The session has seen the end of the stream and finishes on its own timer.
            thread::sleep(STOP_POLL);
            continue;
        }
        if let Err(e) = socket.fill() {
            break Err(e);
        }
    };
    if let Session::Nbd(s) = &mut session {
        s.end(&mut stats);
        lock(&shared.nbd_stats).add(&stats);
        lock(&shared.nbd_live).remove(&id);
    }
    socket.finish();
    result
}
