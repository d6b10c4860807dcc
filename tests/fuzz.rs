//! The cargo-fuzz targets of `fuzz/` run for a bounded time each over their committed corpus;
//! a crash, a hang or too much memory fails the test with libFuzzer's report and the input
//! that did it.
//!
//! Needs the nightly toolchain and cargo-fuzz (`bash .ci/setup` installs both); without them
//! the tests fail saying what to install. The targets are built once, without a sanitizer
//! and with debug assertions (`-s none -a`: the library has no `unsafe`, so overflow checks
//! find more than AddressSanitizer would, and the build is much faster), into `fuzz/target`.
//! New inputs found during the run go to a temporary directory, not into the committed
//! corpus. How to run the targets longer by hand: `fuzz/README.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Seconds each target runs (after going through its corpus).
const SECONDS: u32 = 20;

/// The fuzz crate's directory.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// `cargo +nightly` in `fuzz/`, without the variables the outer `cargo test` set (they
/// name the stable toolchain's tools and the outer build's directories).
fn nightly_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").current_dir(fuzz_dir());
    for var in [
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_MANIFEST_DIR",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command, what: &str) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run cargo for {what} ({e}): install Rust with rustup"))
}

/// Checks for the tools, then builds every target once (the first test to get here does it).
fn build() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let v = run(nightly_cargo().arg("--version"), "the nightly check");
        if !v.status.success() {
            return Err(format!(
                "the nightly toolchain is missing: `rustup toolchain install nightly` \
                 (`bash .ci/setup` does it)\n{}",
                String::from_utf8_lossy(&v.stderr)
            ));
        }
        let f = run(
            nightly_cargo().args(["fuzz", "--version"]),
            "the cargo-fuzz check",
        );
        if !f.status.success() {
            return Err(format!(
                "cargo-fuzz is missing: `cargo install cargo-fuzz --locked` \
                 (`bash .ci/setup` does it)\n{}",
                String::from_utf8_lossy(&f.stderr)
            ));
        }
        let b = run(
            nightly_cargo().args(["fuzz", "build", "--sanitizer", "none", "--debug-assertions"]),
            "the fuzz build",
        );
        if !b.status.success() {
            return Err(format!(
                "`cargo +nightly fuzz build` failed:\n{}",
                String::from_utf8_lossy(&b.stderr)
            ));
        }
        Ok(())
    });
    if let Err(e) = built {
        panic!("{e}");
    }
}

/// Runs `target` for [`SECONDS`] over its corpus with inputs up to `max_len` bytes.
fn fuzz(target: &str, max_len: u32) {
    build();
    // One target at a time: each gets the machine's cores to itself.
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let new_inputs = scratch.path().join("corpus");
    std::fs::create_dir(&new_inputs).expect("a corpus directory");
    let artifacts = format!("{}/", scratch.path().display());
    let corpus = fuzz_dir().join("corpus").join(target);
    assert!(
        corpus.is_dir(),
        "no committed corpus at {}",
        corpus.display()
    );
    let out = run(
        nightly_cargo()
            .args([
                "fuzz",
                "run",
                "--sanitizer",
                "none",
                "--debug-assertions",
                target,
            ])
            .arg(&new_inputs)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={SECONDS}"))
            .arg(format!("-max_len={max_len}"))
            .arg("-rss_limit_mb=2048")
            .arg("-timeout=10")
            .arg(format!("-artifact_prefix={artifacts}"))
            .arg("-print_final_stats=1"),
        target,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let found: Vec<String> = std::fs::read_dir(scratch.path())
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_file())
                    .map(|e| {
                        let bytes = std::fs::read(e.path()).unwrap_or_default();
                        format!("{}: {bytes:?}", e.file_name().to_string_lossy())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "fuzz target `{target}` failed ({}):\n{}\ninputs found:\n{}",
            out.status,
            tail.join("\n"),
            found.join("\n")
        );
    }
    // libFuzzer ran and went through the corpus.
    let runs = stderr
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no final statistics from libFuzzer:\n{stderr}"));
    let seeds = std::fs::read_dir(&corpus).expect("the corpus").count() as u64;
    assert!(
        runs >= seeds,
        "{runs} runs for {seeds} corpus inputs:\n{stderr}"
    );
    eprintln!("fuzz target `{target}`: {runs} runs in {SECONDS} s, clean");
}

#[test]
fn image() {
    fuzz("image", 131072);
}

#[test]
fn ops() {
    fuzz("ops", 512);
}

#[test]
fn nbd() {
    fuzz("nbd", 16384);
}

#[test]
fn http() {
    fuzz("http", 8192);
}

#[test]
fn cmdline() {
    fuzz("cmdline", 1024);
}
