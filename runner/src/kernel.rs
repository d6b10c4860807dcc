//! Building the guest kernel (`kernel/`, release profile) with cargo.
//!
//! The kernel is built into its own target directory, `<workspace>/target/kernel`: during
//! `cargo test` the outer cargo holds the lock on the workspace's target directory, and a
//! nested build there would wait for it forever.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The kernel's cargo package.
pub const KERNEL_PACKAGE: &str = "qcow-metal-kernel";

/// Environment variable naming a prebuilt kernel ELF to boot instead of building one.
pub const KERNEL_ENV: &str = "QCOW_METAL_KERNEL";

/// The workspace root this runner was built from.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Where the kernel build's artifacts go: `<workspace>/target/kernel`.
pub fn kernel_target_dir(root: &Path) -> PathBuf {
    root.join("target").join("kernel")
}

/// How much of cargo's output to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildOutput {
    /// Pass cargo's progress through to the terminal (the `qcow-metal` command).
    Show,
    /// Capture it and include it in the error if the build fails (tests).
    Capture,
}

/// Builds the kernel in release mode and returns the path of its ELF.
///
/// When [`KERNEL_ENV`] is set, that file is returned instead (after checking it exists).
pub fn build_kernel(root: &Path, output: BuildOutput) -> Result<PathBuf> {
    if let Some(path) = env::var_os(KERNEL_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(Error::KernelBuild(format!(
                "{KERNEL_ENV}={} is not a file",
                path.display()
            )));
        }
        return Ok(path);
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = kernel_target_dir(root);
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--manifest-path"])
        .arg(root.join("kernel").join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .stdin(Stdio::null());
    // The kernel is built for the host target with its own link arguments; flags meant for
    // the outer build (e.g. coverage instrumentation) must not leak into it.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(var);
    }
    match output {
        BuildOutput::Show => {
            eprintln!(
                "qcow-metal: building the kernel (cargo build --release --manifest-path kernel/Cargo.toml)"
            );
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
            let status = cmd
                .status()
                .map_err(|e| Error::KernelBuild(format!("cannot run cargo: {e}")))?;
            if !status.success() {
                return Err(Error::KernelBuild(format!(
                    "cargo exited with {status}; its errors are above"
                )));
            }
        }
        BuildOutput::Capture => {
            let out = cmd
                .output()
                .map_err(|e| Error::KernelBuild(format!("cannot run cargo: {e}")))?;
            if !out.status.success() {
                return Err(Error::KernelBuild(format!(
                    "cargo exited with {}:\n{}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
    }
    let elf = target_dir.join("release").join(KERNEL_PACKAGE);
    if !elf.is_file() {
        return Err(Error::KernelBuild(format!(
            "cargo succeeded but {} is missing",
            elf.display()
        )));
    }
    Ok(elf)
}

/// The kernel, built once per process and shared (tests boot many guests).
pub fn shared_kernel() -> Result<PathBuf> {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            build_kernel(&workspace_root(), BuildOutput::Capture).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(Error::KernelBuild)
}
