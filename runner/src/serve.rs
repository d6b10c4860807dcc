//! `qcow-metal serve`: the project's qcow2 engine as a native NBD server on the host, with
//! the guest's `/metrics` next to it.
//!
//! The same library code as in the guest does the work: the sans-I/O NBD server
//! ([`qcow_metal::nbd::Connection`]), the HTTP responder ([`qcow_metal::http`]), the metrics
//! registry ([`GuestMetrics`]) and the engine ([`Qcow2`]), here on std TCP sockets and on the
//! image file ([`FileDisk`]) instead of smoltcp and virtio-blk.
//!
//! Threads: one accepting thread per port and one thread per connection. The engine has a
//! single owner: a mutex around it, held while one connection's buffered requests are served
//! (a whole batch of pipelined requests per lock, replies written after the lock is let go).
//!
//! [`Server::stop`] (Ctrl-C or SIGTERM in the CLI) tells NBD clients the server is going
//! (`NBD_ESHUTDOWN` / `NBD_REP_ERR_SHUTDOWN` from then on), waits up to [`DRAIN`] for them to
//! leave, closes what is left, then closes the image clean: dirty metadata written, the
//! dirty bit cleared, the file synced.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use qcow_metal::block::telemetry::{BlockDeviceMetrics, InstrumentedDevice};
use qcow_metal::block::{BlockDevice, FileDisk};
use qcow_metal::compaction::CompactionState;
use qcow_metal::disk::VirtualDisk;
use qcow_metal::disk::telemetry::{DiskFigures, Instrumented};
use qcow_metal::http::{self, Health, HttpStats, IndexPage, Site};
use qcow_metal::nbd::{Connection, NbdStats, ServerConfig};
use qcow_metal::net::NetStats;
use qcow_metal::qcow2::telemetry::EngineFigures;
use qcow_metal::qcow2::{OpenOptions, Qcow2, SpaceInfo, Stats};
use qcow_metal::telemetry::{GuestConfig, GuestMetrics, Scrape, SystemFigures};

use crate::error::{Error, Result};
use crate::guard;
use crate::units::format_size;

/// How long [`Server::stop`] waits for NBD clients to disconnect after being told the
/// server is shutting down; connections still open then are closed.
pub const DRAIN: Duration = Duration::from_secs(2);

/// How often a connection thread blocked on a silent client looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Receive buffer of an NBD connection: many pipelined requests (or a good part of a large
/// write) are taken in one `read`.
const NBD_READ_BUFFER: usize = 256 * 1024;

/// At most this many connections per port are served at once; more are closed at accept
/// (and logged), so a flood of clients cannot exhaust the host's threads.
pub const MAX_CONNECTIONS_PER_PORT: usize = 512;

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
}

/// The block device under the engine: the image file, counted as the guest counts
/// virtio-blk.
type Device = InstrumentedDevice<FileDisk, BlockDeviceMetrics>;

/// The engine, its requests counted.
type Engine = Instrumented<Qcow2<Device>>;

/// A monotonic clock in nanoseconds since the server's first use of it (the metrics'
/// clock: a plain `fn`).
fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The engine's space figures (they walk the tables) and the allocation counters they were
/// computed at: recomputed only when those counters move.
type SpaceCache = ([u64; 4], SpaceInfo);

/// The state the connection threads share.
struct Shared {
    /// The engine; `None` once the image is closed.
    disk: Mutex<Option<Engine>>,
    space_cache: Mutex<Option<SpaceCache>>,
    nbd_config: ServerConfig,
    nbd_stats: Mutex<NbdStats>,
    http_stats: HttpStats,
    metrics: GuestMetrics,
    facts: Vec<(&'static str, String)>,
    stopping: AtomicBool,
    /// TCP payload bytes received and sent on the NBD port.
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// Open connections by id (clones of their sockets, to close them at stop), per port.
    open: Mutex<HashMap<u64, (Port, TcpStream)>>,
    next_id: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
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

    /// Renders the exposition from every layer's counters.
    fn render(&self, accept: &str, out: &mut Vec<u8>) -> &'static str {
        let (space, stats) = self.engine_figures();
        let engine_compaction = stats.as_ref().map(|s| s.compaction_state);
        let http = self.http_stats.snapshot();
        // TCP payload bytes of both ports. No heap of its own and no frames: the process
        // uses the host's allocator, and the host's network stack sees the packets.
        let net = NetStats::default();
        net.rx_bytes.store(
            self.rx_bytes.load(Ordering::Relaxed) + http.bytes_received,
            Ordering::Relaxed,
        );
        net.tx_bytes.store(
            self.tx_bytes.load(Ordering::Relaxed) + http.bytes_sent,
            Ordering::Relaxed,
        );
        let nbd = lock(&self.nbd_stats).clone();
        let scrape = Scrape {
            disk: DiskFigures {
                engine: EngineFigures {
                    space,
                    stats: stats.as_ref(),
                },
                // No compaction scheduler here: the engine's own state (running while its
                // last step left work).
                compaction: match engine_compaction {
                    Some(qcow_metal::qcow2::CompactionState::Running) => CompactionState::Running,
                    _ => CompactionState::Idle,
                },
                compaction_passes: 0,
            },
            nbd: &nbd,
            http: &self.http_stats,
            net: &net,
            system: SystemFigures {
                uptime_seconds: now_ns() as f64 / 1e9,
                ..SystemFigures::default()
            },
        };
        self.metrics.serve(accept, &scrape, out)
    }

    /// The engine's space (cached: it walks the tables) and a copy of its counters, read
    /// under the engine's lock so the scrape does not hold it while it encodes.
    fn engine_figures(&self) -> (SpaceInfo, Option<Stats>) {
        let mut disk = lock(&self.disk);
        let Some(disk) = disk.as_mut() else {
            return (SpaceInfo::default(), None);
        };
        let engine = disk.inner_mut();
        let st = engine.stats();
        let key = [
            st.clusters_allocated,
            st.clusters_freed,
            st.l2_tables_allocated,
            st.refcount_blocks_allocated,
        ];
        let mut cache = lock(&self.space_cache);
        if cache.is_none_or(|(k, _)| k != key) {
            match engine.space() {
                Ok(space) => *cache = Some((key, space)),
                Err(e) => log::warn!("qcow2: space accounting failed: {e}"),
            }
        }
        let space = cache.map(|(_, s)| s).unwrap_or_default();
        (space, Some(engine.stats().clone()))
    }
}

/// The metrics port's [`Site`]: the guest's registry, the facts of `/`, the health.
struct ServeSite<'a>(&'a Shared);

impl Site for ServeSite<'_> {
    fn metrics(&mut self, accept: &str, out: &mut Vec<u8>) -> &'static str {
        self.0.render(accept, out)
    }

    fn index(&mut self, page: &mut IndexPage) {
        page.title("qcow-metal serve");
        for (label, value) in &self.0.facts {
            page.fact(label, value);
        }
    }

    fn healthz(&mut self) -> Health {
        if self.0.stopping() {
            Health::Unavailable("shutting down".into())
        } else {
            Health::Ok
        }
    }

    fn http_stats(&self) -> &HttpStats {
        &self.0.http_stats
    }
}

/// A running `qcow-metal serve`: listening, serving, until [`Server::stop`].
pub struct Server {
    shared: Arc<Shared>,
    nbd_addr: SocketAddr,
    metrics_addr: SocketAddr,
    acceptors: Vec<JoinHandle<()>>,
    /// The disk lock (released when the server is dropped).
    _lock: File,
    image: PathBuf,
}

/// What [`Server::stop`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// NBD connections still open after [`DRAIN`] and closed by the server.
    pub nbd_closed: usize,
}

fn open_engine(path: &Path, read_only: bool, metrics: &GuestMetrics) -> Result<Engine> {
    let err = |action: &'static str, reason: String| Error::Disk {
        path: path.to_path_buf(),
        action,
        reason,
    };
    let mut file = FileDisk::open(path, read_only).map_err(|e| err("open", e.to_string()))?;
    let mut magic = [0u8; 4];
    if file.len().map_err(|e| err("open", e.to_string()))? == 0 {
        return Err(guard::empty(path));
    }
    file.read_at(0, &mut magic)
        .map_err(|e| err("read", e.to_string()))?;
    if magic != *b"QFI\xfb" {
        return Err(err(
            "serve",
            "it is not a qcow2 image (no qcow2 magic); `qcow-metal serve` exports qcow2 \
             images (for a raw file use `qemu-nbd -f raw`, or `qcow-metal run --format raw`)"
                .into(),
        ));
    }
    let dev = InstrumentedDevice::new(file, metrics.blockdev.clone(), now_ns);
    let opts = OpenOptions {
        read_only,
        ..OpenOptions::default()
    };
    let engine = Qcow2::open(dev, opts).map_err(|e| err("open", e.to_string()))?;
    Ok(Instrumented::new(engine, metrics.disk.clone(), now_ns))
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
        let engine = open_engine(path, opts.read_only, &metrics)?;
        metrics.disk.set_up(true);
        let read_only = opts.read_only || engine.is_read_only();
        let size = engine.size();
        let facts = vec![
            ("version", String::from(env!("CARGO_PKG_VERSION"))),
            ("image", path.display().to_string()),
            ("export", opts.export.clone()),
            ("format", String::from("qcow2")),
            (
                "virtual size",
                format!("{} ({size} bytes)", format_size(size)),
            ),
            ("NBD", nbd_addr.to_string()),
            ("metrics", metrics_addr.to_string()),
            ("read-only", read_only.to_string()),
        ];
        let shared = Arc::new(Shared {
            disk: Mutex::new(Some(engine)),
            space_cache: Mutex::new(None),
            nbd_config: ServerConfig {
                export_name: opts.export.clone(),
                description: String::from("qcow-metal serve: qcow2 disk"),
                read_only,
                ..ServerConfig::default()
            },
            nbd_stats: Mutex::new(NbdStats::default()),
            http_stats: HttpStats::new(),
            metrics,
            facts,
            stopping: AtomicBool::new(false),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            workers: Mutex::new(Vec::new()),
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
        let engine = lock(&shared.disk).take();
        if let Some(engine) = engine {
            let err = |reason: String| Error::Disk {
                path: self.image.clone(),
                action: "close",
                reason,
            };
            let mut dev = engine
                .into_inner()
                .close()
                .map_err(|e| err(e.to_string()))?;
            dev.flush().map_err(|e| err(e.to_string()))?;
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
                let result = match port {
                    Port::Nbd => serve_nbd(&stream, &worker_shared),
                    Port::Metrics => serve_metrics(&stream, &worker_shared),
                };
                if let Err(e) = result {
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

fn serve_metrics(stream: &TcpStream, shared: &Shared) -> io::Result<()> {
    let mut site = ServeSite(shared);
    http::std_io::serve_stream(stream, http::Config::default(), &mut site)
}

/// Serves one NBD client: reads what it sent, lets the state machine serve every complete
/// request under one engine lock, writes the replies, until the client leaves (or the
/// socket is shut by [`Server::stop`]).
fn serve_nbd(stream: &TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STOP_POLL))?;
    let mut stream = stream;
    let mut conn = Connection::new(&shared.nbd_config);
    let mut buf = vec![0u8; NBD_READ_BUFFER];
    let (mut have, mut used) = (0usize, 0usize);
    let mut told_to_go = false;
    let result = loop {
        if used < have {
            used += conn.receive(&buf[used..have]);
        }
        let progressed = {
            let mut disk = lock(&shared.disk);
            let mut stats = lock(&shared.nbd_stats);
            match disk.as_mut() {
                Some(d) => conn.process(d, &mut stats),
                None => {
                    conn.close(&mut stats);
                    true
                }
            }
        };
        if let Err(e) = write_output(&mut stream, &mut conn, shared) {
            break Err(e);
        }
        if conn.is_closed() {
            break Ok(());
        }
        if progressed || (used < have && conn.input_space() > 0) {
            continue;
        }
        if !told_to_go && shared.stopping() {
            // From now on options and requests are refused with the shutdown errors, so
            // that the client disconnects by itself.
            conn.shutdown();
            told_to_go = true;
        }
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                shared.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                have = n;
                used = 0;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    conn.close(&mut lock(&shared.nbd_stats));
    let _ = stream.shutdown(Shutdown::Both);
    match result {
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => Ok(()),
        other => other,
    }
}

/// Sends everything the connection has to send.
fn write_output(stream: &mut &TcpStream, conn: &mut Connection, shared: &Shared) -> io::Result<()> {
    while !conn.output().is_empty() {
        match stream.write(conn.output()) {
            Ok(0) => return Err(io::Error::from(ErrorKind::WriteZero)),
            Ok(n) => {
                shared.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                conn.consume_output(n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
