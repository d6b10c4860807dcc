//! Convert benchmark: `qcow-metal image convert` (the library function the command runs)
//! against `qemu-img convert` on the same half-full image, in the same run, with ratios.
//!
//! The source: a 1 GiB disk (256 MiB with `--quick`) whose every other MiB holds data that
//! compresses about elevenfold (64-byte runs of a repeated word and of a repeated 8-byte
//! value), the rest never written; as
//! a raw file (sparse) and as a qcow2 image (64 KiB clusters) made from it by `qemu-img
//! convert` before the clock starts. Rows:
//! 1. qcow2 to raw;
//! 2. raw to qcow2;
//! 3. raw to compressed qcow2, zlib (`-c`);
//! 4. raw to compressed qcow2, zstd (`-c -o compression_type=zstd`).
//!
//! Both contenders are timed until their output is durable: `qemu-img convert` writes with
//! cache=unsafe by default, so an fsync of its output file follows it inside the timing;
//! ours ends with its data synced. Each contender runs `--repeat N` times (default 3),
//! alternately, the source in the page cache for both; the fastest run counts. Every output
//! is checked untimed once (`qemu-img compare` with the source, `qemu-img check` for qcow2).
//! Ratio = qemu-img's time / ours (above 1: ours is faster).
//!
//! Options (after `--`): `--quick`, `--repeat N`, `--json FILE`; `QCOW_METAL_BENCH_QUICK=1`
//! also means quick, `QCOW_METAL_BENCH_DIR` picks the scratch directory. Needs `qemu-img`
//! (Debian package `qemu-utils`).

use qcow_metal::qcow2::CompressionType;
use qcow_metal_runner::convert::{self, ConvertOptions, Format};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{parse_args, s, tool};

/// One MiB that compresses about elevenfold with zlib or zstd: 64-byte runs of a repeated
/// word and of a repeated random 8-byte value.
fn half_compressible(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(1 << 20);
    while out.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(2) {
            out.extend_from_slice(&x.to_le_bytes().repeat(8));
        } else {
            let word = b"qcow-metal convert ";
            for i in 0..64 {
                out.push(word[(i + (x as usize % 7)) % word.len()]);
            }
        }
    }
    out.truncate(1 << 20);
    out
}

/// The sparse raw source: every other MiB written.
fn make_source(raw: &Path, size: u64) {
    let f = std::fs::File::create(raw).unwrap();
    f.set_len(size).unwrap();
    for mib in (0..size >> 20).step_by(2) {
        f.write_all_at(&half_compressible(mib), mib << 20).unwrap();
    }
    f.sync_all().unwrap();
}

fn sync(p: &Path) {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .expect("fsync the output");
}

struct Row {
    name: &'static str,
    ours: Duration,
    qemu: Duration,
    ours_len: u64,
    qemu_len: u64,
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn row(
    name: &'static str,
    dir: &Path,
    src: &Path,
    src_fmt: &str,
    out_fmt: Format,
    compress: Option<CompressionType>,
    repeat: usize,
) -> Row {
    let ours_out = dir.join("ours.out");
    let qemu_out = dir.join("qemu.out");
    let opts = ConvertOptions {
        src_format: Some(Format::parse(src_fmt).unwrap()),
        out_format: out_fmt,
        compress: compress.is_some(),
        compression_type: compress.unwrap_or_default(),
        ..ConvertOptions::default()
    };
    let out_name = match out_fmt {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    };
    let mut qargs: Vec<String> = vec!["convert".into(), "-f".into(), src_fmt.into()];
    qargs.extend(["-O".into(), out_name.into()]);
    if let Some(kind) = compress {
        qargs.push("-c".into());
        qargs.extend(["-o".into(), format!("compression_type={}", kind.name())]);
    }
    qargs.push(s(src).into());
    qargs.push(s(&qemu_out).into());
    let qrefs: Vec<&str> = qargs.iter().map(|a| a.as_str()).collect();
    let mut best_ours = Duration::MAX;
    let mut best_qemu = Duration::MAX;
    for _ in 0..repeat {
        let _ = std::fs::remove_file(&ours_out);
        let t = Instant::now();
        convert::convert(src, &ours_out, &opts, |_, _| {}).expect("our convert");
        best_ours = best_ours.min(t.elapsed());

        let _ = std::fs::remove_file(&qemu_out);
        let t = Instant::now();
        tool("qemu-img", &qrefs);
        sync(&qemu_out);
        best_qemu = best_qemu.min(t.elapsed());
    }
    // Untimed: both outputs hold the source's disk; qcow2 outputs check clean.
    for out in [&ours_out, &qemu_out] {
        tool(
            "qemu-img",
            &["compare", "-f", src_fmt, "-F", out_name, s(src), s(out)],
        );
        if out_fmt == Format::Qcow2 {
            tool("qemu-img", &["check", s(out)]);
        }
    }
    let r = Row {
        name,
        ours: best_ours,
        qemu: best_qemu,
        ours_len: allocated(&ours_out),
        qemu_len: allocated(&qemu_out),
    };
    let _ = std::fs::remove_file(&ours_out);
    let _ = std::fs::remove_file(&qemu_out);
    r
}

fn main() {
    let opts = match parse_args("convert") {
        Ok(o) => o,
        Err(e) => {
            eprintln!("convert bench: {e}");
            std::process::exit(2);
        }
    };
    let size: u64 = if opts.quick { 256 << 20 } else { 1 << 30 };
    let base = std::env::var_os("QCOW_METAL_BENCH_DIR").map(PathBuf::from);
    let dir = match &base {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir(),
    }
    .expect("scratch directory");
    let raw = dir.path().join("src.raw");
    let qcow = dir.path().join("src.qcow2");
    make_source(&raw, size);
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow)],
    );
    sync(&qcow);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "convert bench: {} MiB disk, half written (every other MiB, data compressing about \
         elevenfold), best of {}; load average at start: {}",
        size >> 20,
        opts.repeat,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let d = dir.path();
    let rows = [
        row(
            "qcow2 to raw",
            d,
            &qcow,
            "qcow2",
            Format::Raw,
            None,
            opts.repeat,
        ),
        row(
            "raw to qcow2",
            d,
            &raw,
            "raw",
            Format::Qcow2,
            None,
            opts.repeat,
        ),
        row(
            "raw to qcow2 -c zlib",
            d,
            &raw,
            "raw",
            Format::Qcow2,
            Some(CompressionType::Zlib),
            opts.repeat,
        ),
        row(
            "raw to qcow2 -c zstd",
            d,
            &raw,
            "raw",
            Format::Qcow2,
            Some(CompressionType::Zstd),
            opts.repeat,
        ),
    ];
    println!(
        "{:<24}{:>12}{:>12}{:>8}{:>14}{:>14}",
        "row", "ours", "qemu-img", "ratio", "ours out", "qemu-img out"
    );
    let mut rows_json = Vec::new();
    for r in &rows {
        let ratio = r.qemu.as_secs_f64() / r.ours.as_secs_f64();
        println!(
            "{:<24}{:>10.3} s{:>10.3} s{:>7.2}x{:>10} MiB{:>10} MiB",
            r.name,
            r.ours.as_secs_f64(),
            r.qemu.as_secs_f64(),
            ratio,
            r.ours_len >> 20,
            r.qemu_len >> 20
        );
        rows_json.push(format!(
            "{{\"area\":\"convert\",\"row\":\"{} ({} MiB disk, half full)\",\"note\":\"\",\
             \"results\":[{{\"contender\":\"qcow-metal image convert\",\"seconds\":{:.4}}},\
             {{\"contender\":\"qemu-img convert + fsync\",\"seconds\":{:.4}}}]}}",
            r.name,
            size >> 20,
            r.ours.as_secs_f64(),
            r.qemu.as_secs_f64(),
        ));
    }
    let version = tool("qemu-img", &["--version"]);
    let json = format!(
        "{{\"quick\":{},\"repeat\":{},\"qemu\":\"{}\",\"rows\":[{}]}}",
        opts.quick,
        opts.repeat,
        version.lines().next().unwrap_or("").replace('"', "'"),
        rows_json.join(",")
    );
    if let Some(path) = &opts.json {
        let mut f = std::fs::File::create(path).expect("json file");
        writeln!(f, "{json}").expect("write json");
    }
}
