//! Serving a [`VirtualDisk`] over NBD from std TCP sockets: one thread per client, the disk
//! and the counters behind mutexes. This drives the same [`Connection`] as the guest does,
//! so host tests talk to the real server code with real clients.

use super::{Connection, NbdStats, ServerConfig};
use crate::disk::VirtualDisk;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one client on `stream` until it disconnects.
pub fn serve_connection<D: VirtualDisk + ?Sized>(
    mut stream: TcpStream,
    disk: &Mutex<D>,
    config: &ServerConfig,
    stats: &Mutex<NbdStats>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut conn = Connection::new(config);
    let mut buf = vec![0u8; 256 * 1024];
    let (mut have, mut used) = (0usize, 0usize);
    let result = loop {
        if used < have {
            used += conn.receive(&buf[used..have]);
        }
        let progressed = {
            let mut d = lock(disk);
            conn.process(&mut *d, &mut lock(stats))
        };
        let mut failed = None;
        while !conn.output().is_empty() {
            match stream.write(conn.output()) {
                Ok(0) => {
                    failed = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => conn.consume_output(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if conn.is_closed() {
            break Ok(());
        }
        if progressed || (used < have && conn.input_space() > 0) {
            continue;
        }
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                have = n;
                used = 0;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    conn.close(&mut lock(stats));
    let _ = stream.shutdown(std::net::Shutdown::Both);
    result
}

/// Accepts clients on `listener` forever, each served on its own thread.
pub fn serve_std<D: VirtualDisk + Send + 'static>(
    listener: TcpListener,
    disk: Arc<Mutex<D>>,
    config: ServerConfig,
    stats: Arc<Mutex<NbdStats>>,
) -> io::Result<()> {
    let config = Arc::new(config);
    for stream in listener.incoming() {
        let stream = stream?;
        let (disk, config, stats) = (disk.clone(), config.clone(), stats.clone());
        thread::spawn(move || {
            if let Err(e) = serve_connection(stream, &disk, &config, &stats) {
                log::debug!("nbd client ended with an error: {e}");
            }
        });
    }
    Ok(())
}

/// A server on a loopback port, started on a background thread (for tests and tools).
pub struct HostServer<D> {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The served disk.
    pub disk: Arc<Mutex<D>>,
    /// The export's counters.
    pub stats: Arc<Mutex<NbdStats>>,
}

impl<D: VirtualDisk + Send + 'static> HostServer<D> {
    /// Listens on 127.0.0.1 on a free port and serves `disk` with `config`.
    pub fn start(disk: D, config: ServerConfig) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let disk = Arc::new(Mutex::new(disk));
        let stats = Arc::new(Mutex::new(NbdStats::default()));
        let (d, s) = (disk.clone(), stats.clone());
        thread::spawn(move || serve_std(listener, d, config, s));
        Ok(HostServer { addr, disk, stats })
    }

    /// The `nbd://` URI of an export on this server.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// A copy of the counters.
    pub fn stats(&self) -> NbdStats {
        lock(&self.stats).clone()
    }
}
