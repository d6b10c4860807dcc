//! Scrape latency under load: one guest, `N` concurrent scrapers fetching `/metrics` back to
//! back for a while on the idle guest, then again while an NBD client keeps 4 KiB random
//! writes (and a flush now and then) in flight. Reports p50 and p99 of both; the report's
//! ratio is idle latency over loaded latency (1.0: the load does not slow scrapes down).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use qcow_metal::nbd::client::{Client, ClientOptions};
use qcow_metal::nbd::proto::{CMD_FLUSH, CMD_WRITE};
use qcow_metal_runner::Guest;
use qcow_metal_runner::qemu::Accel;

use super::report::{Row, Value};

/// How long one scrape or NBD reply may take before the run is given up (a hang guard).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Concurrent scrapers.
    pub scrapers: usize,
    /// How long each phase (idle, loaded) scrapes.
    pub phase: Duration,
}

/// Latencies of the scrapes of one phase.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    /// Milliseconds per successful scrape (connect to last byte), sorted.
    pub ms: Vec<f64>,
    /// Scrapes that failed (refused, reset, not `200`).
    pub errors: usize,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

impl Latencies {
    /// The `p`-th percentile (0..=100) by nearest rank, or `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        percentile(&self.ms, p)
    }
}

/// The `p`-th percentile (0..=100) of sorted `samples` by nearest rank.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * samples.len() as f64).ceil() as usize;
    Some(samples[rank.clamp(1, samples.len()) - 1])
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The accelerator the guest ran on.
    pub accel: &'static str,
    /// Scrapes of the idle guest.
    pub idle: Latencies,
    /// Scrapes while the NBD writer ran.
    pub loaded: Latencies,
    /// The NBD writer's throughput while being scraped, in 4 KiB writes per second.
    pub nbd_iops: f64,
}

impl Outcome {
    /// The report's rows: p50 and p99, loaded against idle.
    pub fn rows(&self, p: Params) -> Vec<Row> {
        [50.0, 99.0]
            .iter()
            .map(|&q| {
                let workload = format!("GET /metrics p{q:.0}, {} concurrent scrapers", p.scrapers);
                match (self.loaded.percentile(q), self.idle.percentile(q)) {
                    (Some(l), Some(i)) => Row::measured(
                        "scrape",
                        &workload,
                        "with NBD writes",
                        "idle guest",
                        Value::ms(l),
                        Value::ms(i),
                    ),
                    _ => Row::failed(
                        "scrape",
                        &workload,
                        "with NBD writes",
                        "idle guest",
                        "no successful scrape",
                    ),
                }
            })
            .collect()
    }
}

/// One `GET /metrics` on a fresh connection, read to its end; its latency in milliseconds.
fn scrape_once(addr: SocketAddr, buf: &mut Vec<u8>) -> Result<f64, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    buf.clear();
    s.read_to_end(buf).map_err(|e| e.to_string())?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if !buf.starts_with(b"HTTP/1.1 200") {
        let head = String::from_utf8_lossy(&buf[..buf.len().min(40)]).into_owned();
        return Err(format!("answer `{}`", head.lines().next().unwrap_or("")));
    }
    Ok(ms)
}

/// `scrapers` threads scraping `addr` back to back for `phase`.
fn scrape_for(addr: SocketAddr, scrapers: usize, phase: Duration) -> Latencies {
    let deadline = Instant::now() + phase;
    let threads: Vec<_> = (0..scrapers)
        .map(|_| {
            thread::spawn(move || {
                let mut l = Latencies::default();
                let mut buf = Vec::new();
                while Instant::now() < deadline {
                    match scrape_once(addr, &mut buf) {
                        Ok(ms) => l.ms.push(ms),
                        Err(e) => {
                            l.errors += 1;
                            l.first_error.get_or_insert(e);
                            // Do not spin on a refusing port.
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                l
            })
        })
        .collect();
    let mut all = Latencies::default();
    for t in threads {
        let l = t.join().unwrap_or_default();
        all.ms.extend(l.ms);
        all.errors += l.errors;
        if all.first_error.is_none() {
            all.first_error = l.first_error;
        }
    }
    all.ms.sort_by(f64::total_cmp);
    all
}

/// Keeps 8 random 4 KiB writes in flight (a flush every 256) until `stop`; the writes done.
fn nbd_writer(mut c: Client, stop: &AtomicBool) -> Result<u64, String> {
    const DEPTH: usize = 8;
    let blocks = c.size() / 4096;
    let payload = vec![0x5au8; 4096];
    let mut scratch = Vec::new();
    let mut rng = fastrand::Rng::with_seed(0x2545_f491_4f6c_dd1d);
    let mut done = 0u64;
    let mut sent = 0u64;
    let err = |e: std::io::Error| format!("NBD: {e}");
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        while !stopping && c.in_flight() < DEPTH {
            sent += 1;
            if sent.is_multiple_of(256) {
                c.send(CMD_FLUSH, 0, 0, 0, &[]).map_err(err)?;
            } else {
                c.send(CMD_WRITE, 0, rng.u64(..blocks) * 4096, 4096, &payload)
                    .map_err(err)?;
            }
        }
        if c.in_flight() == 0 {
            break;
        }
        let reply = c.recv(&mut scratch).map_err(err)?;
        if reply.error != 0 {
            return Err(format!("NBD request failed with error {}", reply.error));
        }
        done += 1;
    }
    c.disconnect().map_err(err)?;
    Ok(done)
}

/// Boots a guest on `kernel` and measures both phases.
pub fn run(kernel: &Path, accel: Accel, p: Params) -> Result<Outcome, String> {
    let mut guest = Guest::builder()
        .kernel(kernel)
        .accel(accel)
        .size(256 << 20)
        .shutdown_timeout(Duration::from_secs(60))
        .start()
        .map_err(|e| format!("starting the guest: {e}"))?;
    guest
        .wait_for_banner(Duration::from_secs(300))
        .map_err(|e| format!("the guest did not come up: {e}"))?;
    guest
        .wait_for_metrics(Duration::from_secs(60), || false)
        .map_err(|e| format!("/metrics did not answer: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], guest.metrics_port()));

    eprintln!(
        "  idle guest: {} scrapers for {:.0} s",
        p.scrapers,
        p.phase.as_secs_f64()
    );
    let idle = scrape_for(addr, p.scrapers, p.phase);

    let opts = ClientOptions {
        timeout: Some(IO_TIMEOUT),
        ..ClientOptions::new("disk")
    };
    let client = Client::connect_with(("127.0.0.1", guest.nbd_port()), &opts)
        .map_err(|e| format!("NBD handshake: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        thread::spawn(move || nbd_writer(client, &stop))
    };
    // Let the writer get going before the clock starts.
    thread::sleep(Duration::from_millis(200));
    eprintln!(
        "  with NBD writes: {} scrapers for {:.0} s",
        p.scrapers,
        p.phase.as_secs_f64()
    );
    let started = Instant::now();
    let loaded = scrape_for(addr, p.scrapers, p.phase);
    let elapsed = started.elapsed() + Duration::from_millis(200);
    stop.store(true, Ordering::Relaxed);
    let writes = writer
        .join()
        .map_err(|_| "the NBD writer panicked".to_string())??;

    let accel = guest.accel().as_str();
    let outcome = guest
        .shutdown()
        .map_err(|e| format!("shutting the guest down: {e}"))?;
    if !outcome.is_clean() {
        return Err(format!("the guest did not shut down cleanly: {outcome}"));
    }
    Ok(Outcome {
        accel,
        idle,
        loaded,
        nbd_iops: writes as f64 / elapsed.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), Some(50.0));
        assert_eq!(percentile(&s, 99.0), Some(99.0));
        assert_eq!(percentile(&s, 100.0), Some(100.0));
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn rows_compare_loaded_with_idle() {
        let o = Outcome {
            accel: "tcg",
            idle: Latencies {
                ms: vec![1.0, 2.0, 3.0, 4.0],
                ..Latencies::default()
            },
            loaded: Latencies {
                ms: vec![2.0, 4.0, 6.0, 8.0],
                ..Latencies::default()
            },
            nbd_iops: 1000.0,
        };
        let p = Params {
            scrapers: 4,
            phase: Duration::from_secs(1),
        };
        let rows = o.rows(p);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].workload, "GET /metrics p50, 4 concurrent scrapers");
        assert_eq!(rows[0].ratio_text(), "0.50");
        assert_eq!(rows[1].ratio_text(), "0.50");
        let none = Outcome {
            loaded: Latencies::default(),
            ..o
        };
        assert_eq!(none.rows(p)[0].ratio_text(), "failed");
    }
}
