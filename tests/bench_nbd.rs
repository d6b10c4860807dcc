//! NBD throughput benchmark: `cargo bench -p qcow-metal-e2e --bench nbd`.
//!
//! Boots three guests under the same accelerator and runs the same workload against each
//! guest's NBD export, the three in turn for every repetition of every row (so that a change
//! in the machine's load hits all three alike; idle guests halt their CPU):
//!
//! - (a) `engine`: our qcow2 engine in the guest, on a qcow2 image given to QEMU as raw bytes;
//! - (b) `qemu-qcow2`: the guest in raw mode, QEMU's own qcow2 driver under it
//!   (`-drive format=qcow2`);
//! - (c) `raw-file`: the guest in raw mode on a raw file.
//!
//! Workload (in this order, same offsets everywhere): 1 MiB sequential writes (repetition `i`
//! writes region `i`, allocating it), 1 MiB sequential reads of the same regions, then 4 KiB
//! random reads and 4 KiB random writes over all regions, each with `DEPTH` requests in
//! flight through this crate's NBD client, writes followed by a flush, and the two random rows
//! again at depth 32 (the `QD32` rows). Each row keeps the
//! best of its repetitions. It prints MiB/s or IOPS per row and the ratios a/b and a/c
//! (target: at least 0.9).
//!
//! Environment: `NBD_BENCH_MIB` (region size, default 32), `NBD_BENCH_REPS` (repetitions,
//! default 3), `NBD_BENCH_OPS` (4 KiB requests per random run, default 4000),
//! `NBD_BENCH_DEPTH` (default 8), `NBD_BENCH_ACCEL` (`tcg`, `kvm` or `auto`; default `tcg`).
//!
//! Options after `--`: `--quick` (defaults of 8 MiB regions, 2 repetitions and 1000 random
//! ops, for `qcow-metal bench --quick`; the variables still win) and `--json FILE` (also
//! write the results as JSON, read by `qcow-metal bench`).

use qcow_metal::nbd::client::Client;
use qcow_metal::nbd::proto::{CMD_FLUSH, CMD_READ, CMD_WRITE};
use qcow_metal_e2e::{Accel, ScratchDir, boot, guest, nbd_client, require_tool};
use qcow_metal_runner::disk::{GuestFormat, create_qcow2};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Options after `--` on the `cargo bench` line.
struct Options {
    quick: bool,
    json: Option<PathBuf>,
}

impl Options {
    fn parse() -> Options {
        let mut o = Options {
            quick: false,
            json: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--json" => {
                    let v = args
                        .next()
                        .unwrap_or_else(|| panic!("--json needs a file name"));
                    o.json = Some(PathBuf::from(v));
                }
                // `cargo bench` passes `--bench`.
                "--bench" => {}
                other => panic!("unknown argument {other:?} (known: --quick, --json FILE)"),
            }
        }
        o
    }
}

/// The number in environment variable `name`, or `default` when it is not set.
fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: expected a number")),
        Err(_) => default,
    }
}

/// The workload's sizes (see the environment variables above).
#[derive(Clone, Copy)]
struct Params {
    region: u64,
    reps: u64,
    ops: u64,
    depth: usize,
}

/// One row of the table: a request pattern run against every setup.
#[derive(Clone, Copy, Debug)]
enum Row {
    SeqWrite1M,
    SeqRead1M,
    RandRead4K,
    RandWrite4K,
    RandRead4KDeep,
    RandWrite4KDeep,
}

/// The rows, in the order they run (the reads read what the sequential writes wrote).
const ROWS: [Row; 6] = [
    Row::SeqWrite1M,
    Row::SeqRead1M,
    Row::RandRead4K,
    Row::RandWrite4K,
    Row::RandRead4KDeep,
    Row::RandWrite4KDeep,
];

/// Requests in flight in the deep rows.
const DEEP: usize = 32;

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::SeqWrite1M => "1 MiB sequential write",
            Row::SeqRead1M => "1 MiB sequential read",
            Row::RandRead4K => "4 KiB random read",
            Row::RandWrite4K => "4 KiB random write",
            Row::RandRead4KDeep => "4 KiB random read QD32",
            Row::RandWrite4KDeep => "4 KiB random write QD32",
        }
    }

    /// Requests in flight: `NBD_BENCH_DEPTH` except in the deep rows.
    fn depth(self, p: Params) -> usize {
        match self {
            Row::RandRead4KDeep | Row::RandWrite4KDeep => DEEP,
            _ => p.depth,
        }
    }

    /// (offset, length, is_write) of every request of repetition `rep`.
    fn requests(self, p: Params, rep: u64) -> Vec<(u64, u32, bool)> {
        let mut rng = fastrand::Rng::with_seed(
            0x9e37_79b9_7f4a_7c15 ^ (rep + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
        );
        let mut rand = move || rng.u64(..);
        let blocks = p.region * p.reps / 4096;
        let base = rep * p.region;
        match self {
            Row::SeqWrite1M => (0..p.region / MIB)
                .map(|i| (base + i * MIB, MIB as u32, true))
                .collect(),
            Row::SeqRead1M => (0..p.region / MIB)
                .map(|i| (base + i * MIB, MIB as u32, false))
                .collect(),
            Row::RandRead4K | Row::RandRead4KDeep => (0..p.ops)
                .map(|_| (rand() % blocks * 4096, 4096, false))
                .collect(),
            Row::RandWrite4K | Row::RandWrite4KDeep => (0..p.ops)
                .map(|_| (rand() % blocks * 4096, 4096, true))
                .collect(),
        }
    }
}

/// Runs one row with [`Row::depth`] requests in flight; returns the elapsed time (a final flush of
/// the writes included).
fn run_row(c: &mut Client, row: Row, p: Params, rep: u64) -> Duration {
    let reqs = row.requests(p, rep);
    let payload: Vec<u8> = (0..MIB as usize).map(|i| (i % 253) as u8 + 1).collect();
    let mut scratch = Vec::new();
    let started = Instant::now();
    let mut next = 0;
    let mut done = 0;
    while done < reqs.len() {
        while next < reqs.len() && c.in_flight() < row.depth(p) {
            let (off, len, write) = reqs[next];
            let r = if write {
                c.send(CMD_WRITE, 0, off, len, &payload[..len as usize])
            } else {
                c.send(CMD_READ, 0, off, len, &[])
            };
            r.expect("sending a request");
            next += 1;
        }
        let reply = c.recv(&mut scratch).expect("receiving a reply");
        assert_eq!(reply.error, 0, "{} failed", row.name());
        done += 1;
    }
    if reqs.iter().any(|r| r.2) {
        c.send(CMD_FLUSH, 0, 0, 0, &[]).expect("flush");
        assert_eq!(c.recv(&mut scratch).expect("flush reply").error, 0);
    }
    started.elapsed()
}

/// One of the three guests the workload runs against.
struct Setup {
    label: &'static str,
    what: &'static str,
}

/// The setups (a), (b) and (c) of the module documentation.
const SETUPS: [Setup; 3] = [
    Setup {
        label: "a",
        what: "engine: qcow2 in the guest, drive format=raw",
    },
    Setup {
        label: "b",
        what: "raw guest over QEMU's qcow2 driver (drive format=qcow2)",
    },
    Setup {
        label: "c",
        what: "raw guest on a raw file",
    },
];

fn main() {
    let opts = Options::parse();
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("qemu-img", "qemu-utils");
    let (mib, reps, ops) = if opts.quick {
        (8, 2, 1000)
    } else {
        (32, 3, 4000)
    };
    let p = Params {
        region: env_u64("NBD_BENCH_MIB", mib).max(1) * MIB,
        reps: env_u64("NBD_BENCH_REPS", reps).max(1),
        ops: env_u64("NBD_BENCH_OPS", ops).max(1),
        depth: env_u64("NBD_BENCH_DEPTH", 8).max(1) as usize,
    };
    let accel: Accel = match std::env::var("NBD_BENCH_ACCEL") {
        Ok(v) => v.parse().unwrap_or_else(|e| panic!("NBD_BENCH_ACCEL: {e}")),
        Err(_) => Accel::Tcg,
    };
    let size = p.region * p.reps;
    let scratch = ScratchDir::new("bench-nbd");
    let dir = scratch.path();

    let mut guests = Vec::new();
    for (i, setup) in SETUPS.iter().enumerate() {
        let builder = guest().accel(accel).size(size).memory_mib(512);
        let builder = match i {
            0 => builder,
            1 => {
                let path: PathBuf = dir.join("qemu-qcow2.qcow2");
                create_qcow2(&path, size, 64 << 10, 16).expect("qemu-img create");
                builder
                    .disk(path)
                    .qemu_drive_format("qcow2")
                    .format(GuestFormat::Raw)
            }
            _ => {
                let path: PathBuf = dir.join("raw-file.raw");
                std::fs::File::create(&path)
                    .and_then(|f| f.set_len(size))
                    .expect("raw file");
                builder.disk(path).format(GuestFormat::Raw)
            }
        };
        eprintln!("({}) booting: {}", setup.label, setup.what);
        let (g, _) = boot(builder);
        let c = nbd_client(g.nbd_port());
        assert_eq!(c.size(), size, "({}) export size", setup.label);
        guests.push((g, c));
    }

    // The accelerator the guests really run on (`auto` resolves to one of them).
    let used_accel = guests[0].0.accel().as_str();
    // best[row][setup]
    let mut best = vec![[Duration::MAX; 3]; ROWS.len()];
    for (r, row) in ROWS.iter().enumerate() {
        for rep in 0..p.reps {
            for (s, (_, c)) in guests.iter_mut().enumerate() {
                let t = run_row(c, *row, p, rep);
                eprintln!(
                    "({}) {:<24} #{rep} {:>8.3} s",
                    SETUPS[s].label,
                    row.name(),
                    t.as_secs_f64()
                );
                best[r][s] = best[r][s].min(t);
            }
        }
    }
    for (s, (mut g, c)) in guests.into_iter().enumerate() {
        c.disconnect().expect("NBD disconnect");
        let outcome = g.shutdown().expect("shutdown");
        assert!(
            outcome.is_clean(),
            "({}) unclean shutdown: {outcome}",
            SETUPS[s].label
        );
    }
    drop(scratch);

    println!();
    println!(
        "NBD throughput ({accel:?}; {} x {} MiB regions, {} random ops, depth {} (QD32 rows {DEEP}); best of {})",
        p.reps,
        p.region / MIB,
        p.ops,
        p.depth,
        p.reps
    );
    for s in &SETUPS {
        println!("  ({}) {}", s.label, s.what);
    }
    println!(
        "{:<24} {:>16} {:>16} {:>16} {:>7} {:>7}",
        "workload", "(a) engine", "(b) qemu-qcow2", "(c) raw-file", "a/b", "a/c"
    );
    let mut worst = f64::INFINITY;
    let mut json_rows = Vec::new();
    for (r, row) in ROWS.iter().enumerate() {
        let reqs = row.requests(p, 0);
        let bytes: u64 = reqs.iter().map(|q| u64::from(q.1)).sum();
        json_rows.push(serde_json::json!({
            "row": row.name(),
            "unit": match row {
                Row::SeqWrite1M | Row::SeqRead1M => "MiB/s",
                _ => "IOPS",
            },
            "bytes": bytes,
            "requests": reqs.len(),
            "depth": row.depth(p),
            "seconds": { "a": best[r][0].as_secs_f64(), "b": best[r][1].as_secs_f64(), "c": best[r][2].as_secs_f64() },
        }));
        let rate = |t: Duration| match row {
            Row::SeqWrite1M | Row::SeqRead1M => {
                format!("{:.1} MiB/s", bytes as f64 / MIB as f64 / t.as_secs_f64())
            }
            _ => format!("{:.0} IOPS", reqs.len() as f64 / t.as_secs_f64()),
        };
        // Throughput ratio = inverse time ratio (same work in each setup).
        let t = best[r];
        let ab = t[1].as_secs_f64() / t[0].as_secs_f64();
        let ac = t[2].as_secs_f64() / t[0].as_secs_f64();
        worst = worst.min(ab).min(ac);
        println!(
            "{:<24} {:>16} {:>16} {:>16} {:>7.2} {:>7.2}",
            row.name(),
            rate(t[0]),
            rate(t[1]),
            rate(t[2]),
            ab,
            ac
        );
    }
    println!(
        "lowest ratio {worst:.2} (target 0.90): {}",
        if worst >= 0.9 { "met" } else { "NOT met" }
    );
    if let Some(path) = &opts.json {
        let doc = serde_json::json!({
            "bench": "nbd",
            "accel": used_accel,
            "region_mib": p.region / MIB,
            "reps": p.reps,
            "ops": p.ops,
            "depth": p.depth,
            "setups": SETUPS.iter().map(|s| serde_json::json!({"label": s.label, "what": s.what})).collect::<Vec<_>>(),
            "rows": json_rows,
        });
        std::fs::write(path, format!("{doc:#}\n"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
