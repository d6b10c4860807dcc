//! Link arguments for the bare-metal kernel binary.
//!
//! The kernel is built for the host target (`x86_64-unknown-linux-gnu`, the only one installed)
//! as a `no_std`/`no_main` static executable placed by `linker.ld` at 1 MiB. The arguments are
//! given to the binary only (`rustc-link-arg-bins`): putting them in `RUSTFLAGS` would also
//! reach build scripts and proc-macros, which must link as normal host programs.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let script = dir.join("linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,--gc-sections",
        "-Wl,-z,max-page-size=4096",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
