//! `qcow-metal bench`: every comparison the project has, in one run, as one table of ratios
//! (`report.md`) and one chart (`report.png`).
//!
//! - engine: `cargo bench -p qcow-metal-runner --bench engine -- --json FILE` (our engine
//!   against imago, qcow2-rs, `qemu-img bench` and a raw file), read back from its JSON;
//! - guest NBD: `cargo bench -p qcow-metal-e2e --bench nbd -- --json FILE` (the guest's
//!   export on our engine against QEMU's qcow2 driver and a raw file);
//! - compact and trim: `cargo bench -p qcow-metal-runner --bench compact -- --json FILE`
//!   (`image compact` against `qemu-img convert`, the engine's discard against `qemu-io`);
//! - serve: `cargo bench -p qcow-metal-runner --bench serve -- --json FILE` (`qcow-metal
//!   serve` against `qemu-nbd`, fio's nbd engine at queue depth 32);
//! - convert: `cargo bench -p qcow-metal-runner --bench convert -- --json FILE` (`image
//!   convert` against `qemu-img convert`: qcow2 to raw, raw to qcow2, compressed zlib/zstd);
//! - scrape latency under load ([`scrape`]), measured here.
//!
//! The benchmarks run as subprocesses so their peers stay dev-dependencies; their own output
//! goes to the terminal (progress) and to `engine.txt` / `nbd.txt` next to the report.

mod chart;
mod report;
mod scrape;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Deserialize;

use qcow_metal_runner::kernel::{self, BuildOutput};
use qcow_metal_runner::qemu::Accel;

use report::{Outcome, Row, Value};

/// Options of `qcow-metal bench`.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Small sizes and short phases: a few minutes on two cores, every row still measured
    #[arg(long)]
    pub quick: bool,
    /// Where report.md, report.png and the sub-benchmarks' outputs go
    /// [default: target/qcow-metal/bench]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Accelerator of the guests (NBD and scrape rows)
    #[arg(long, value_name = "auto|kvm|tcg", default_value = "auto")]
    pub accel: Accel,
}

/// The steps, for the `[i/N]` progress lines.
const STEPS: usize = 6;

/// Runs every comparison, writes the report and the chart, and prints the table. Fails
/// (exit status 1) when a measurement failed; the report still has every row.
pub fn run(args: &BenchArgs) -> ExitCode {
    match run_inner(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("qcow-metal bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the report says about the run besides the rows.
struct Context {
    command: String,
    machine: Machine,
    load_before: String,
    load_after: String,
    accel: String,
    took: Duration,
    details: Vec<String>,
}

fn run_inner(args: &BenchArgs) -> Result<bool, String> {
    let root = kernel::workspace_root();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target").join("qcow-metal").join("bench"));
    fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
    // Absolute: the benchmarks run in other directories (cargo runs them in their package's).
    let out = fs::canonicalize(&out).map_err(|e| format!("resolve {}: {e}", out.display()))?;
    let started = Instant::now();
    let machine = Machine::probe();
    let load_before = load_average();
    eprintln!(
        "qcow-metal bench{}: {}; load average {load_before}",
        if args.quick { " --quick" } else { "" },
        machine.summary()
    );

    let mut rows = Vec::new();
    let mut details = Vec::new();
    let mut accels = Vec::new();

    step(
        1,
        "engine: qcow-metal, imago, qcow2-rs, qemu-img bench, raw file",
    );
    let json = out.join("engine.json");
    let _ = fs::remove_file(&json);
    let mut flags = vec!["--json".to_string(), json.display().to_string()];
    if args.quick {
        flags.push("--quick".into());
    }
    match cargo_bench(&root, "qcow-metal-runner", "engine", &flags, &[], &out)
        .and_then(|()| read(&json))
        .and_then(|text| engine_rows(&text))
    {
        Ok((r, d)) => {
            rows.extend(r);
            details.push(d);
        }
        Err(e) => rows.push(Row::failed("engine", "all rows", "qcow-metal", "peers", &e)),
    }

    step(2, "guest NBD a/b/c: three guests, the same NBD workload");
    let json = out.join("nbd.json");
    let _ = fs::remove_file(&json);
    let mut flags = vec!["--json".to_string(), json.display().to_string()];
    if args.quick {
        flags.push("--quick".into());
    }
    let env = [("NBD_BENCH_ACCEL", args.accel.as_str())];
    match cargo_bench(&root, "qcow-metal-e2e", "nbd", &flags, &env, &out)
        .and_then(|()| read(&json))
        .and_then(|text| nbd_rows(&text))
    {
        Ok((r, d, accel)) => {
            rows.extend(r);
            details.push(d);
            accels.push(accel);
        }
        Err(e) => rows.push(Row::failed(
            "guest NBD",
            "all rows",
            "(a) qcow-metal",
            "(b), (c)",
            &e,
        )),
    }

    step(3, "serve against qemu-nbd");
    let json = out.join("serve.json");
    let _ = fs::remove_file(&json);
    let mut flags = vec!["--json".to_string(), json.display().to_string()];
    if args.quick {
        flags.push("--quick".into());
    }
    match cargo_bench(&root, "qcow-metal-runner", "serve", &flags, &[], &out)
        .and_then(|()| read(&json))
        .and_then(|text| serve_rows(&text))
    {
        Ok((r, d)) => {
            rows.extend(r);
            details.push(d);
        }
        Err(e) => rows.push(Row::failed(
            "serve",
            "fio over NBD, QD32",
            "qcow-metal serve",
            "qemu-nbd",
            &e,
        )),
    }
    step(4, "convert against qemu-img convert");
    match tool_bench(&root, &out, args.quick, "convert") {
        Ok((r, d)) => {
            rows.extend(r);
            details.push(d);
        }
        Err(e) => rows.push(Row::failed(
            "convert",
            "image convert",
            "qcow-metal image convert",
            "qemu-img convert",
            &e,
        )),
    }
    step(5, "compact and trim: against qemu-img convert and qemu-io");
    match tool_bench(&root, &out, args.quick, "compact") {
        Ok((r, d)) => {
            rows.extend(r);
            details.push(d);
        }
        Err(e) => rows.push(Row::failed(
            "compact",
            "compact and trim",
            "qcow-metal",
            "qemu-img, qemu-io",
            &e,
        )),
    }

    step(6, "scrape latency under NBD load");
    let params = scrape::Params {
        scrapers: 4,
        phase: Duration::from_secs(if args.quick { 3 } else { 10 }),
    };
    let scraped = kernel::build_kernel(&root, BuildOutput::Show)
        .map_err(|e| e.to_string())
        .and_then(|k| scrape::run(&k, args.accel, params));
    match scraped {
        Ok(o) => {
            rows.extend(o.rows(params));
            details.push(scrape_details(&o, params));
            accels.push(o.accel.to_string());
        }
        Err(e) => {
            for q in [50, 99] {
                rows.push(Row::failed(
                    "scrape",
                    &format!("GET /metrics p{q}, {} concurrent scrapers", params.scrapers),
                    "with NBD writes",
                    "idle guest",
                    &e,
                ));
            }
        }
    }

    accels.dedup();
    let ctx = Context {
        command: command_of(args),
        machine,
        load_before,
        load_after: load_average(),
        accel: if accels.is_empty() {
            format!("{} (no guest came up)", args.accel.as_str())
        } else {
            accels.join(", ")
        },
        took: started.elapsed(),
        details,
    };
    let md = out.join("report.md");
    let png = out.join("report.png");
    fs::write(&md, markdown(&ctx, &rows)).map_err(|e| format!("write {}: {e}", md.display()))?;
    let title = format!(
        "qcow-metal: our speed / the peer's ({}, {} CPUs, {})",
        ctx.machine.cpu, ctx.machine.cpus, ctx.accel
    );
    chart::write_png(&rows, &title, &png)?;

    println!();
    print!("{}", report::text_table(&rows));
    println!();
    println!(
        "{}; accelerator {}; load average {} before, {} after; took {:.0} s",
        ctx.machine.summary(),
        ctx.accel,
        ctx.load_before,
        ctx.load_after,
        ctx.took.as_secs_f64()
    );
    println!("report: {}", md.display());
    println!("chart:  {}", png.display());
    let failed: Vec<&Row> = rows
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
        .collect();
    for r in &failed {
        if let Outcome::Failed(why) = &r.outcome {
            eprintln!(
                "qcow-metal bench: {} / {} failed: {why}",
                r.area, r.workload
            );
        }
    }
    Ok(failed.is_empty())
}

/// The command line that makes this report (a debug build shows as `cargo run --`).
fn command_of(args: &BenchArgs) -> String {
    let mut s = String::from(if cfg!(debug_assertions) {
        "cargo run -- bench"
    } else {
        "cargo run --release -- bench"
    });
    if args.quick {
        s.push_str(" --quick");
    }
    if args.accel != Accel::Auto {
        let _ = write!(s, " --accel {}", args.accel.as_str());
    }
    if let Some(out) = &args.out {
        let _ = write!(s, " --out {}", out.display());
    }
    s
}

/// Prints a progress line for step `i`.
fn step(i: usize, what: &str) {
    eprintln!("[{i}/{STEPS}] {what} ...");
}

/// Reads a file a sub-benchmark wrote.
fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// Runs `cargo bench -p package --bench bench -- flags` in the workspace with `env` set; its
/// standard output goes to `<out>/<bench>.txt`, its standard error to the terminal.
fn cargo_bench(
    root: &Path,
    package: &str,
    bench: &str,
    flags: &[String],
    env: &[(&str, &str)],
    out: &Path,
) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let log = out.join(format!("{bench}.txt"));
    let file = fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let started = Instant::now();
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["bench", "-p", package, "--bench", bench, "--"])
        .args(flags)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "`cargo bench -p {package} --bench {bench}` exited with {status} (its errors went \
             to the terminal, its standard output to {})",
            log.display()
        ));
    }
    eprintln!(
        "  done in {:.0} s; its table: {}",
        started.elapsed().as_secs_f64(),
        log.display()
    );
    Ok(())
}

/// Runs the runner's benchmark `bench` against QEMU's tools (`--json`, `--quick` when
/// `quick`) and reads its rows back.
fn tool_bench(
    root: &Path,
    out: &Path,
    quick: bool,
    bench: &str,
) -> Result<(Vec<Row>, String), String> {
    let json = out.join(format!("{bench}.json"));
    let _ = fs::remove_file(&json);
    let mut flags = vec!["--json".to_string(), json.display().to_string()];
    if quick {
        flags.push("--quick".into());
    }
    cargo_bench(root, "qcow-metal-runner", bench, &flags, &[], out)
        .and_then(|()| read(&json))
        .and_then(|text| tool_rows(&text, bench))
}

/// The JSON of the benchmarks against QEMU's tools (`runner/benches/compact.rs`,
/// `runner/benches/convert.rs`).
#[derive(Deserialize)]
struct ToolJson {
    quick: bool,
    repeat: u32,
    qemu: String,
    rows: Vec<CompactRow>,
}

#[derive(Deserialize)]
struct CompactRow {
    area: String,
    row: String,
    note: String,
    results: Vec<EngineResult>,
}

/// Rows of a benchmark against QEMU's tools, `bench` (times: ours against the peer), and a
/// line for the report's details.
fn tool_rows(text: &str, bench: &str) -> Result<(Vec<Row>, String), String> {
    let doc: ToolJson =
        serde_json::from_str(text).map_err(|e| format!("{bench} bench JSON: {e}"))?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for r in &doc.rows {
        let [ours, peer] = r.results.as_slice() else {
            return Err(format!("{bench} bench row `{}` has not two results", r.row));
        };
        rows.push(Row::measured(
            &r.area,
            &r.row,
            &ours.contender,
            &peer.contender,
            Value::seconds(ours.seconds),
            Value::seconds(peer.seconds),
        ));
        if !r.note.is_empty() {
            notes.push(format!("{}: {}", r.area, r.note));
        }
    }
    if rows.is_empty() {
        return Err(format!("the {bench} bench reported no rows"));
    }
    let how = if bench == "compact" {
        "compact, trim: `cargo bench -p qcow-metal-runner --bench compact --{}` — each \
         contender on its own synced copy of the image"
    } else {
        "convert: `cargo bench -p qcow-metal-runner --bench convert --{}` — both timed until \
         the output is durable"
    };
    let detail = format!(
        "{}, best of {}; {}; {}",
        how.replace(" --{}", if doc.quick { " -- --quick" } else { "" }),
        doc.repeat,
        notes.join("; "),
        doc.qemu
    );
    Ok((rows, detail))
}

/// The serve benchmark's JSON (`runner/benches/serve.rs`).
#[derive(Deserialize)]
struct ServeJson {
    quick: bool,
    repeat: u32,
    peer: String,
    client: String,
    image_bytes: u64,
    seconds: u64,
    rows: Vec<ServeRow>,
}

#[derive(Deserialize)]
struct ServeRow {
    name: String,
    ours_iops: f64,
    peer_iops: f64,
}

/// Rows of the serve benchmark (fio's IOPS through `qcow-metal serve` against `qemu-nbd`),
/// and a line for the report's details.
fn serve_rows(text: &str) -> Result<(Vec<Row>, String), String> {
    let doc: ServeJson =
        serde_json::from_str(text).map_err(|e| format!("serve bench JSON: {e}"))?;
    let rows: Vec<Row> = doc
        .rows
        .iter()
        .map(|r| {
            Row::measured(
                "serve",
                &r.name,
                "qcow-metal serve",
                "qemu-nbd --cache=writeback",
                Value::iops(r.ours_iops),
                Value::iops(r.peer_iops),
            )
        })
        .collect();
    if rows.is_empty() {
        return Err("the serve bench reported no rows".into());
    }
    let detail = format!(
        "serve: `cargo bench -p qcow-metal-runner --bench serve --{}` — {}, ioengine=nbd, one \
         connection, {} s per run, best of {}, {} MiB images; {}",
        if doc.quick { " --quick" } else { "" },
        doc.client,
        doc.seconds,
        doc.repeat,
        doc.image_bytes >> 20,
        doc.peer
    );
    Ok((rows, detail))
}

/// The engine benchmark's JSON (`runner/benches/engine.rs`).
#[derive(Deserialize)]
struct EngineJson {
    quick: bool,
    repeat: u32,
    virtual_size: u64,
    qemu: String,
    rows: Vec<EngineRow>,
}

#[derive(Deserialize)]
struct EngineRow {
    row: String,
    request: u64,
    requests: u64,
    bytes: u64,
    results: Vec<EngineResult>,
}

#[derive(Deserialize)]
struct EngineResult {
    contender: String,
    seconds: f64,
}

/// The contender the engine benchmark's ratios are about.
const OURS: &str = "qcow-metal";

/// Rows of the engine benchmark (ours against each other contender), and a line for the
/// report's details.
fn engine_rows(text: &str) -> Result<(Vec<Row>, String), String> {
    let doc: EngineJson =
        serde_json::from_str(text).map_err(|e| format!("engine bench JSON: {e}"))?;
    let mut rows = Vec::new();
    for r in &doc.rows {
        // Small requests are counted in IOPS, large ones in MiB/s.
        let value = |seconds: f64| {
            if r.request <= 4096 {
                Value::iops(r.requests as f64 / seconds)
            } else {
                Value::mib_s(r.bytes as f64 / (1u64 << 20) as f64 / seconds)
            }
        };
        let ours = r
            .results
            .iter()
            .find(|c| c.contender == OURS)
            .ok_or_else(|| format!("engine bench row `{}` has no {OURS} result", r.row))?;
        for peer in r.results.iter().filter(|c| c.contender != OURS) {
            rows.push(Row::measured(
                "engine",
                &r.row,
                OURS,
                &peer.contender,
                value(ours.seconds),
                value(peer.seconds),
            ));
        }
    }
    if rows.is_empty() {
        return Err("the engine bench reported no rows".into());
    }
    let detail = format!(
        "engine: `cargo bench -p qcow-metal-runner --bench engine --{}` — {} MiB images, \
         queue depth 1, buffered I/O, best of {}; {}",
        if doc.quick { " --quick" } else { "" },
        doc.virtual_size >> 20,
        doc.repeat,
        doc.qemu
    );
    Ok((rows, detail))
}

/// The NBD benchmark's JSON (`tests/bench_nbd.rs`).
#[derive(Deserialize)]
struct NbdJson {
    accel: String,
    region_mib: u64,
    reps: u64,
    ops: u64,
    depth: u64,
    rows: Vec<NbdRow>,
}

#[derive(Deserialize)]
struct NbdRow {
    row: String,
    unit: String,
    bytes: u64,
    requests: u64,
    seconds: NbdSeconds,
}

#[derive(Deserialize)]
struct NbdSeconds {
    a: f64,
    b: f64,
    c: f64,
}

/// Rows of the NBD benchmark ((a) against (b) and (c)), a line for the details, and the
/// accelerator its guests ran on.
fn nbd_rows(text: &str) -> Result<(Vec<Row>, String, String), String> {
    let doc: NbdJson = serde_json::from_str(text).map_err(|e| format!("NBD bench JSON: {e}"))?;
    let mut rows = Vec::new();
    for r in &doc.rows {
        let value = |seconds: f64| match r.unit.as_str() {
            "MiB/s" => Ok(Value::mib_s(r.bytes as f64 / (1u64 << 20) as f64 / seconds)),
            "IOPS" => Ok(Value::iops(r.requests as f64 / seconds)),
            other => Err(format!("NBD bench row `{}`: unknown unit `{other}`", r.row)),
        };
        let ours = value(r.seconds.a)?;
        for (peer, s) in [
            ("(b) QEMU's qcow2 driver", r.seconds.b),
            ("(c) raw file", r.seconds.c),
        ] {
            rows.push(Row::measured(
                "guest NBD",
                &r.row,
                "(a) qcow-metal",
                peer,
                ours.clone(),
                value(s)?,
            ));
        }
    }
    if rows.is_empty() {
        return Err("the NBD bench reported no rows".into());
    }
    let detail = format!(
        "guest NBD: `cargo bench -p qcow-metal-e2e --bench nbd` — {} guests, {} x {} MiB \
         regions, {} random ops, depth {}, best of {}; (a) our engine in the guest on a qcow2 \
         image, (b) the guest in raw mode over QEMU's qcow2 driver, (c) the guest in raw mode \
         on a raw file",
        doc.accel, doc.reps, doc.region_mib, doc.ops, doc.depth, doc.reps
    );
    Ok((rows, detail, doc.accel))
}

/// The details line of the scrape rows.
fn scrape_details(o: &scrape::Outcome, p: scrape::Params) -> String {
    let mut s = format!(
        "scrape: one {} guest, {} scrapers fetching /metrics back to back (new connection \
         each) for {:.0} s idle, then {:.0} s while an NBD client keeps 8 random 4 KiB writes \
         in flight ({:.0} writes/s meanwhile); {} + {} scrapes",
        o.accel,
        p.scrapers,
        p.phase.as_secs_f64(),
        p.phase.as_secs_f64(),
        o.nbd_iops,
        o.idle.ms.len(),
        o.loaded.ms.len()
    );
    for (name, l) in [("idle", &o.idle), ("loaded", &o.loaded)] {
        let slow = l.ms.iter().filter(|&&ms| ms >= 500.0).count();
        if let Some(max) = l.ms.last() {
            let _ = write!(
                s,
                "; {name}: slowest {max:.0} ms, {slow} of {} took 500 ms or more",
                l.ms.len()
            );
        }
        if l.errors > 0 {
            let _ = write!(
                s,
                "; {} failed scrapes {name} (first: {})",
                l.errors,
                l.first_error.as_deref().unwrap_or("?")
            );
        }
    }
    s
}

/// The machine the numbers come from.
struct Machine {
    host: String,
    cpu: String,
    cpus: usize,
}

impl Machine {
    fn probe() -> Machine {
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown host".into());
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| cpu_model(&c))
            .unwrap_or_else(|| "unknown CPU".into());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Machine { host, cpu, cpus }
    }

    fn summary(&self) -> String {
        format!("{}: {}, {} CPUs", self.host, self.cpu, self.cpus)
    }
}

/// The first `model name` of `/proc/cpuinfo`.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// Output of a small command, trimmed, or `fallback`.
fn command_line(program: &str, args: &[&str], fallback: &str) -> String {
    Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| fallback.into())
}

/// The report: how it was made, the table, the chart, the details.
fn markdown(ctx: &Context, rows: &[Row]) -> String {
    let root = kernel::workspace_root();
    let root = root.display().to_string();
    let date = command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"], "unknown date");
    let commit = command_line(
        "git",
        &["-C", &root, "describe", "--always", "--dirty"],
        "unknown commit",
    );
    let qemu = command_line("qemu-system-x86_64", &["--version"], "QEMU not found");
    let qemu = qemu.lines().next().unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(s, "# qcow-metal benchmark report\n");
    let _ = writeln!(
        s,
        "Made by `{}` on {date} at commit {commit}.\n",
        ctx.command
    );
    let _ = writeln!(s, "- machine: {}", ctx.machine.summary());
    let _ = writeln!(s, "- accelerator of the guests: {}", ctx.accel);
    let _ = writeln!(
        s,
        "- load average (1, 5, 15 min): {} before, {} after",
        ctx.load_before, ctx.load_after
    );
    let _ = writeln!(s, "- {qemu}");
    let _ = writeln!(s, "- took {:.0} s\n", ctx.took.as_secs_f64());
    let _ = writeln!(
        s,
        "Ratio = our speed / the peer's: above 1 ours is faster (for times and latencies, the \
         peer's number over ours). Against a raw file it says how close we get to the floor; \
         for scrapes, how much an NBD load slows `/metrics` down (1: not at all).\n"
    );
    s.push_str(&report::markdown_table(rows));
    let _ = writeln!(s, "\n![ratios](report.png)\n");
    let _ = writeln!(s, "## How each area was measured\n");
    for d in &ctx.details {
        let _ = writeln!(s, "- {d}");
    }
    let _ = writeln!(
        s,
        "- serve, convert: the features are not there yet (issues 16, 14); their rows are \
         placeholders."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGINE: &str = r#"{
      "bench": "engine", "quick": true, "repeat": 3, "virtual_size": 268435456,
      "qemu": "qemu-img version 7.2.22",
      "rows": [
        {"row": "4 KiB random writes, fresh image", "write": true, "request": 4096,
         "requests": 4096, "bytes": 16777216, "pattern": "p",
         "results": [
           {"contender": "qcow-metal", "seconds": 0.05, "note": ""},
           {"contender": "imago", "seconds": 0.1, "note": ""},
           {"contender": "raw-file", "seconds": 0.025, "note": ""}]},
        {"row": "1 MiB sequential reads, full image", "write": false, "request": 1048576,
         "requests": 256, "bytes": 268435456, "pattern": "p",
         "results": [
           {"contender": "qcow-metal", "seconds": 0.5, "note": ""},
           {"contender": "qemu-img bench", "seconds": 0.25, "note": "self-timed"}]}
      ]}"#;

    #[test]
    fn engine_json_becomes_rows_of_ours_against_each_peer() {
        let (rows, detail) = engine_rows(ENGINE).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].peer, "imago");
        assert_eq!(rows[0].ours, "qcow-metal");
        assert_eq!(rows[0].area, "engine");
        let Outcome::Measured { ours, peer } = &rows[0].outcome else {
            panic!("not measured");
        };
        // 4 KiB requests: IOPS.
        assert_eq!((ours.amount, ours.unit), (4096.0 / 0.05, "IOPS"));
        assert_eq!(peer.amount, 4096.0 / 0.1);
        assert_eq!(rows[0].ratio_text(), "2.00");
        assert_eq!(rows[1].peer, "raw-file");
        assert_eq!(rows[1].ratio_text(), "0.50");
        // 1 MiB requests: MiB/s.
        let Outcome::Measured { ours, .. } = &rows[2].outcome else {
            panic!("not measured");
        };
        assert_eq!((ours.amount, ours.unit), (512.0, "MiB/s"));
        assert_eq!(rows[2].ratio_text(), "0.50");
        assert!(detail.contains("256 MiB images"), "{detail}");
        assert!(detail.contains("--quick"), "{detail}");
    }

    #[test]
    fn serve_json_becomes_iops_rows_against_qemu_nbd() {
        let json = r#"{"bench": "serve", "quick": true, "peer": "qemu-nbd 7.2.22",
          "client": "fio-3.33", "image_bytes": 134217728, "seconds": 2, "repeat": 3,
          "rows": [{"name": "4 KiB random read, QD32", "ours_iops": 300.0,
                    "peer_iops": 200.0, "ours_bytes_per_s": 1.0, "peer_bytes_per_s": 1.0,
                    "ratio": 1.5}]}"#;
        let (rows, detail) = serve_rows(json).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].area, "serve");
        assert!((rows[0].ratio().unwrap() - 1.5).abs() < 1e-9);
        assert!(
            detail.contains("--quick") && detail.contains("128 MiB"),
            "{detail}"
        );
        assert!(serve_rows("{}").unwrap_err().contains("serve bench JSON"));
        let none = json.replacen("\"rows\": [", "\"rows\": [], \"x\": [", 1);
        assert!(serve_rows(&none).unwrap_err().contains("no rows"));
    }

    #[test]
    fn compact_json_becomes_time_rows_of_ours_against_the_peer() {
        let json = r#"{"quick": true, "repeat": 2, "qemu": "qemu-img version 7.2.22",
          "rows": [
            {"area": "compact", "row": "compact a 256.0 MiB image with half its clusters free",
             "bytes": 268435456, "note": "ours moved 64.0 MiB",
             "results": [{"contender": "qcow-metal image compact", "seconds": 0.1},
                         {"contender": "qemu-img convert -O qcow2", "seconds": 0.2}]},
            {"area": "trim", "row": "trim a fully written 1 GiB image", "bytes": 1073741824,
             "note": "", "results": [{"contender": "qcow-metal engine discard", "seconds": 0.05},
                                     {"contender": "qemu-io discard", "seconds": 0.4}]}
          ]}"#;
        let (rows, detail) = tool_rows(json, "compact").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].area, "compact");
        assert_eq!(rows[0].peer, "qemu-img convert -O qcow2");
        assert!((rows[0].ratio().unwrap() - 2.0).abs() < 1e-9);
        assert!((rows[1].ratio().unwrap() - 8.0).abs() < 1e-9);
        assert!(
            detail.contains("--quick") && detail.contains("best of 2"),
            "{detail}"
        );
        assert!(detail.contains("ours moved 64.0 MiB"), "{detail}");
        assert!(
            tool_rows("{}", "compact")
                .unwrap_err()
                .contains("compact bench JSON")
        );
        let one = json.replacen(r#"{"contender": "qemu-io discard", "seconds": 0.4}"#, "", 1);
        let one = one.replacen(r#"0.05},"#, "0.05}", 1);
        assert!(
            tool_rows(&one, "compact")
                .unwrap_err()
                .contains("has not two results")
        );
    }

    #[test]
    fn engine_json_errors_are_clear() {
        assert!(
            engine_rows("not json")
                .unwrap_err()
                .contains("engine bench JSON")
        );
        let no_ours = ENGINE.replace("\"qcow-metal\"", "\"other\"");
        assert!(
            engine_rows(&no_ours)
                .unwrap_err()
                .contains("no qcow-metal result")
        );
        let empty = r#"{"quick": false, "repeat": 1, "virtual_size": 1, "qemu": "", "rows": []}"#;
        assert!(engine_rows(empty).unwrap_err().contains("no rows"));
    }

    const NBD: &str = r#"{
      "bench": "nbd", "accel": "tcg", "region_mib": 8, "reps": 2, "ops": 1000, "depth": 8,
      "setups": [],
      "rows": [
        {"row": "1 MiB sequential write", "unit": "MiB/s", "bytes": 8388608, "requests": 8,
         "seconds": {"a": 0.1, "b": 0.2, "c": 0.1}},
        {"row": "4 KiB random read", "unit": "IOPS", "bytes": 4096000, "requests": 1000,
         "seconds": {"a": 1.0, "b": 0.5, "c": 0.8}}
      ]}"#;

    #[test]
    fn nbd_json_becomes_a_against_b_and_c() {
        let (rows, detail, accel) = nbd_rows(NBD).unwrap();
        assert_eq!(accel, "tcg");
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].peer, "(b) QEMU's qcow2 driver");
        assert_eq!(rows[1].peer, "(c) raw file");
        let Outcome::Measured { ours, .. } = &rows[0].outcome else {
            panic!("not measured");
        };
        assert_eq!((ours.amount, ours.unit), (80.0, "MiB/s"));
        assert_eq!(rows[0].ratio_text(), "2.00");
        assert_eq!(rows[1].ratio_text(), "1.00");
        let Outcome::Measured { peer, .. } = &rows[2].outcome else {
            panic!("not measured");
        };
        assert_eq!((peer.amount, peer.unit), (2000.0, "IOPS"));
        assert_eq!(rows[2].ratio_text(), "0.50");
        assert_eq!(rows[3].ratio_text(), "0.80");
        assert!(detail.contains("tcg guests, 2 x 8 MiB"), "{detail}");
        let bad = NBD.replace("\"IOPS\"", "\"furlongs\"");
        assert!(
            nbd_rows(&bad)
                .unwrap_err()
                .contains("unknown unit `furlongs`")
        );
    }

    #[test]
    fn the_subcommand_parses() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from([
            "qcow-metal",
            "bench",
            "--quick",
            "--out",
            "x",
            "--accel",
            "tcg",
        ])
        .unwrap();
        let Some(crate::Command::Bench(a)) = cli.command else {
            panic!("not parsed as bench");
        };
        assert!(a.quick);
        assert_eq!(a.out.as_deref(), Some(Path::new("x")));
        assert_eq!(a.accel, Accel::Tcg);
        let cli = crate::Cli::try_parse_from(["qcow-metal", "bench"]).unwrap();
        let Some(crate::Command::Bench(a)) = cli.command else {
            panic!("not parsed as bench");
        };
        assert!(!a.quick && a.out.is_none() && a.accel == Accel::Auto);
        assert!(crate::Cli::try_parse_from(["qcow-metal", "bench", "--accel", "hvf"]).is_err());
    }

    #[test]
    fn the_report_names_the_command_that_made_it() {
        let args = BenchArgs {
            quick: true,
            out: Some(PathBuf::from("/tmp/x")),
            accel: Accel::Tcg,
        };
        // Tests are debug builds.
        assert_eq!(
            command_of(&args),
            "cargo run -- bench --quick --accel tcg --out /tmp/x"
        );
        let args = BenchArgs {
            quick: false,
            out: None,
            accel: Accel::Auto,
        };
        assert_eq!(command_of(&args), "cargo run -- bench");
    }

    #[test]
    fn scrape_details_name_the_slow_scrapes_and_failures() {
        let o = scrape::Outcome {
            accel: "tcg",
            idle: scrape::Latencies {
                ms: vec![1.0, 2.0],
                ..Default::default()
            },
            loaded: scrape::Latencies {
                ms: vec![3.0, 4.0, 600.0, 1044.4],
                errors: 2,
                first_error: Some("connection reset".into()),
            },
            nbd_iops: 857.0,
        };
        let p = scrape::Params {
            scrapers: 4,
            phase: Duration::from_secs(3),
        };
        let d = scrape_details(&o, p);
        assert!(d.contains("(857 writes/s meanwhile); 2 + 4 scrapes"), "{d}");
        assert!(
            d.contains("idle: slowest 2 ms, 0 of 2 took 500 ms or more"),
            "{d}"
        );
        assert!(
            d.contains("loaded: slowest 1044 ms, 2 of 4 took 500 ms"),
            "{d}"
        );
        assert!(
            d.contains("2 failed scrapes loaded (first: connection reset)"),
            "{d}"
        );
    }

    #[test]
    fn cpu_model_comes_from_cpuinfo() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC  7B13 64-Core Processor\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            cpu_model(info).as_deref(),
            Some("AMD EPYC 7B13 64-Core Processor")
        );
        assert_eq!(cpu_model("processor: 0\n"), None);
    }
}
