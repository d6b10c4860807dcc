//! Shared by the runner's benchmarks: their common options and how they run tools.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The options every runner benchmark takes (after `--`).
pub struct Opts {
    /// Smaller images and shorter runs (`--quick`, or `QCOW_METAL_BENCH_QUICK=1`).
    pub quick: bool,
    /// How many times each contender runs a row (`--repeat N`, default 3).
    pub repeat: usize,
    /// Where to write the results as JSON (`--json FILE`).
    pub json: Option<PathBuf>,
}

/// Parses the benchmark `bench`'s command line.
pub fn parse_args(bench: &str) -> Result<Opts, String> {
    let mut o = Opts {
        quick: std::env::var("QCOW_METAL_BENCH_QUICK").is_ok_and(|v| v == "1"),
        repeat: 3,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--repeat" => {
                let v = args.next().ok_or("--repeat needs a number")?;
                o.repeat = v
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or(format!("--repeat {v}: not a positive number"))?;
            }
            "--json" => o.json = Some(args.next().ok_or("--json needs a file name")?.into()),
            // `cargo bench` passes --bench to every bench target.
            "--bench" => {}
            _ => {
                return Err(format!(
                    "usage: {bench} [--quick] [--repeat N] [--json FILE]"
                ));
            }
        }
    }
    Ok(o)
}

/// Runs a tool and returns its standard output. A missing tool ends the benchmark naming
/// its Debian package; a failure panics with the tool's output (a panic, not an exit, so
/// that the scratch directory is removed on the way out).
pub fn tool(name: &str, args: &[&str]) -> String {
    let o = Command::new(name).args(args).output().unwrap_or_else(|e| {
        let package = match name {
            "fio" => "fio",
            "kill" => "procps",
            _ => "qemu-utils",
        };
        eprintln!("cannot run {name} ({e}): install the Debian package {package}");
        std::process::exit(2)
    });
    assert!(
        o.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A path as the `&str` a tool's argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
