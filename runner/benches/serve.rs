//! `qcow-metal serve` against `qemu-nbd`: the same kind of qcow2 image exported by each, and
//! the same fio job (fio's `nbd` engine, libnbd) against each, in the same run, with ratios.
//!
//! Rows (each fio job runs one connection at queue depth 32 for a fixed time):
//! 1. 4 KiB random read on a fully written image;
//! 2. 4 KiB random write on an empty image (clusters are allocated as the job goes);
//! 3. 1 MiB sequential read on a fully written image;
//! 4. 1 MiB sequential write on an empty image.
//!
//! Both servers use the host's page cache: `qemu-nbd -f qcow2 --cache=writeback`, and ours
//! through buffered file I/O. Images are made by `qemu-img create -f qcow2` (64 KiB clusters)
//! and, for the read rows, filled with `qemu-img convert -n` from random data, once; every
//! run gets its own copy. Each row runs `--repeat N` times (default 3), the two servers
//! alternately; the best run of each counts (a loaded machine only ever slows a run down).
//! After each run the server is stopped (SIGTERM for qemu-nbd, SIGINT for ours) and the
//! image must pass `qemu-img check`.
//!
//! Options (after `--`): `--quick` (128 MiB images and 2 s jobs instead of 512 MiB and 5 s;
//! also `QCOW_METAL_BENCH_QUICK=1`), `--repeat N`, `--json FILE`. `QCOW_METAL_BENCH_DIR`
//! picks the scratch directory. Needs `fio` (with its `nbd` engine), `qemu-nbd` and
//! `qemu-img` (Debian packages `fio`, `qemu-utils`).

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The `qcow-metal` binary (release when run by `cargo bench`).
const OURS: &str = env!("CARGO_BIN_EXE_qcow-metal");

mod common;
use common::{parse_args, s, tool};

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Contender {
    Ours,
    QemuNbd,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Ours => "qcow-metal serve",
            Contender::QemuNbd => "qemu-nbd",
        }
    }
}

/// A server started on `image`, listening on `port`; stopped by [`stop`].
fn start(who: Contender, image: &Path, port: u16) -> Child {
    let p = port.to_string();
    let mut cmd = match who {
        Contender::Ours => {
            let mut c = Command::new(OURS);
            let m = free_port().to_string();
            c.args(["serve", s(image), "--nbd-port", &p, "--metrics-port", &m]);
            c
        }
        Contender::QemuNbd => {
            let mut c = Command::new("qemu-nbd");
            c.args([
                "-f",
                "qcow2",
                "--cache=writeback",
                "-x",
                "disk",
                "-b",
                "127.0.0.1",
            ])
            .args(["-p", &p, "--shared=8", "-t", s(image)]);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Quiet: the readiness probe below is a connection that says nothing, which
        // qemu-nbd reports as a failed negotiation.
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!(
                "cannot run {} ({e}): install the Debian package qemu-utils",
                who.name()
            );
            std::process::exit(2)
        });
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{} exited ({status}) before listening", who.name());
        }
        assert!(Instant::now() < deadline, "{} does not listen", who.name());
        thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Stops a server (SIGINT for ours: a clean close; SIGTERM for qemu-nbd) and waits for it.
fn stop(who: Contender, mut child: Child) {
    let signal = if who == Contender::Ours {
        "-INT"
    } else {
        "-TERM"
    };
    tool("kill", &[signal, &child.id().to_string()]);
    let status = child.wait().expect("waiting for the server");
    assert!(
        who == Contender::QemuNbd || status.success(),
        "{} exited {status}",
        who.name()
    );
}

struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    /// Runs on a fully written image (reads) or an empty one (writes).
    full: bool,
}

const JOBS: [Job; 4] = [
    Job {
        name: "4 KiB random read, QD32",
        rw: "randread",
        bs: "4k",
        full: true,
    },
    Job {
        name: "4 KiB random write, QD32 (allocating)",
        rw: "randwrite",
        bs: "4k",
        full: false,
    },
    Job {
        name: "1 MiB sequential read, QD32",
        rw: "read",
        bs: "1m",
        full: true,
    },
    Job {
        name: "1 MiB sequential write, QD32 (allocating)",
        rw: "write",
        bs: "1m",
        full: false,
    },
];

/// One fio run against `port`: (IOPS, bytes per second).
fn fio(job: &Job, port: u16, seconds: u64) -> (f64, f64) {
    let uri = format!("--uri=nbd://127.0.0.1:{port}/disk");
    let out = tool(
        "fio",
        &[
            "--name=serve",
            "--ioengine=nbd",
            &uri,
            &format!("--rw={}", job.rw),
            &format!("--bs={}", job.bs),
            "--iodepth=32",
            "--numjobs=1",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--ramp_time=0",
            "--randrepeat=1",
            "--norandommap",
            "--output-format=json",
        ],
    );
    let doc: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("fio's JSON ({e}): {out}"));
    let job0 = &doc["jobs"][0];
    let side = if job.rw.contains("read") {
        &job0["read"]
    } else {
        &job0["write"]
    };
    let iops = side["iops"].as_f64().expect("fio iops");
    let bw = side["bw_bytes"].as_f64().expect("fio bw_bytes");
    assert!(iops > 0.0, "fio did no I/O: {out}");
    (iops, bw)
}

struct Row {
    name: &'static str,
    /// Best (IOPS, bytes/s) of ours and of qemu-nbd.
    best: [(f64, f64); 2],
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

fn main() {
    let opts = parse_args("serve").unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let engines = tool("fio", &["--enghelp"]);
    if !engines.lines().any(|l| l.trim() == "nbd") {
        eprintln!(
            "this fio has no nbd engine (Debian's fio has it): install the Debian package fio"
        );
        std::process::exit(2);
    }
    let qemu = tool("qemu-nbd", &["--version"]);
    let qemu = qemu.lines().next().unwrap_or("").to_string();
    let fio_version = tool("fio", &["--version"]).trim().to_string();
    let base = std::env::var_os("QCOW_METAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base).expect("scratch directory");
    let (size, seconds) = if opts.quick {
        (128u64 << 20, 2u64)
    } else {
        (512u64 << 20, 5u64)
    };

    eprintln!("serve bench: preparing {} images...", human(size));
    let empty = dir.path().join("empty.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            s(&empty),
            &size.to_string(),
        ],
    );
    let full = dir.path().join("full.qcow2");
    std::fs::copy(&empty, &full).expect("copying the empty image");
    let raw = dir.path().join("data.raw");
    {
        // Incompressible data (the project's seeded generator), written once.
        let mut data = vec![0u8; size as usize];
        fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15).fill(&mut data);
        std::fs::write(&raw, &data).expect("writing the data file");
    }
    tool(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&full),
        ],
    );
    std::fs::remove_file(&raw).expect("removing the data file");

    let work = dir.path().join("work.qcow2");
    let mut rows = Vec::new();
    for job in &JOBS {
        let mut best = [(0.0f64, 0.0f64); 2];
        for run in 0..opts.repeat {
            // Alternate who goes first, so neither always runs on a warmer cache.
            let order = if run % 2 == 0 {
                [Contender::QemuNbd, Contender::Ours]
            } else {
                [Contender::Ours, Contender::QemuNbd]
            };
            for who in order {
                std::fs::copy(if job.full { &full } else { &empty }, &work)
                    .expect("copying the image");
                let port = free_port();
                let server = start(who, &work, port);
                let (iops, bw) = fio(job, port, seconds);
                stop(who, server);
                tool("qemu-img", &["check", "-q", "-f", "qcow2", s(&work)]);
                let i = usize::from(who == Contender::QemuNbd);
                eprintln!(
                    "serve bench: {:<44} {:<17} run {}: {:>9.0} IOPS {:>8.1} MiB/s",
                    job.name,
                    who.name(),
                    run + 1,
                    iops,
                    bw / f64::from(1 << 20)
                );
                if iops > best[i].0 {
                    best[i] = (iops, bw);
                }
            }
        }
        rows.push(Row {
            name: job.name,
            best,
        });
    }

    println!(
        "{:<44} {:>12} {:>12} {:>11} {:>11} {:>6}",
        "row", "ours IOPS", "peer IOPS", "ours MiB/s", "peer MiB/s", "ratio"
    );
    for r in &rows {
        let [(oi, ob), (pi, pb)] = r.best;
        println!(
            "{:<44} {:>12.0} {:>12.0} {:>11.1} {:>11.1} {:>6.2}",
            r.name,
            oi,
            pi,
            ob / f64::from(1 << 20),
            pb / f64::from(1 << 20),
            oi / pi
        );
    }
    println!(
        "(ratio = ours / peer; peer: {qemu} -f qcow2 --cache=writeback; client: {fio_version}, \
         ioengine=nbd, one connection, iodepth 32, {seconds} s per run, best of {}, {} images)",
        opts.repeat,
        human(size)
    );
    if let Some(path) = &opts.json {
        let doc = serde_json::json!({
            "bench": "serve",
            "quick": opts.quick,
            "peer": qemu,
            "client": fio_version,
            "image_bytes": size,
            "seconds": seconds,
            "repeat": opts.repeat,
            "rows": rows.iter().map(|r| serde_json::json!({
                "name": r.name,
                "ours_iops": r.best[0].0,
                "peer_iops": r.best[1].0,
                "ours_bytes_per_s": r.best[0].1,
                "peer_bytes_per_s": r.best[1].1,
                "ratio": r.best[0].0 / r.best[1].0,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("JSON"))
            .expect("writing the JSON report");
    }
}
