//! Shared by the runner's integration tests: the `qcow-metal` binary started in the
//! background, its stderr collected as it arrives; QEMU's tools run to completion.

// Each test crate includes this module and uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const RUNNER: &str = env!("CARGO_BIN_EXE_qcow-metal");

/// A runner started in the background, its stderr collected as it arrives; dropping it
/// kills it.
pub struct Runner {
    pub child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Runner {
    /// Spawns `cmd` with stdin and stdout null and stderr collected.
    pub fn spawn(mut cmd: Command) -> Runner {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qcow-metal");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Runner { child, stderr }
    }

    /// The stderr collected so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for `text` on the runner's stderr; fails if the runner exits first or
    /// `timeout` (a guard against hangs) passes.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(text) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the runner exited ({status}) before `{text}`:\n{}",
                    self.stderr()
                );
            }
            assert!(Instant::now() < deadline, "no `{text}`:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the runner to exit; fails (killing it) if it has not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "the runner did not exit within {timeout:?}:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a tool, failing with the Debian package that provides it when it is missing.
pub fn run(tool: &str, args: &[&str]) -> Output {
    let package = match tool {
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "promtool" => "prometheus",
        "kill" => "procps",
        _ => "qemu-utils",
    };
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install the Debian package {package}"))
}

/// Runs a tool like [`run`] and fails unless it succeeds; returns its standard output.
pub fn ok(tool: &str, args: &[&str]) -> String {
    let o = run(tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-img convert -f qcow2 -O raw IMAGE RAW`: the virtual disk's bytes in a raw file.
pub fn qcow2_to_raw(image: &std::path::Path, raw: &std::path::Path) {
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

/// `qemu-img create -f qcow2 -b BACKING -F FORMAT TOP`: an overlay at `top` over the file
/// `backing` names (relative to `top`'s directory) of `format` (raw or qcow2).
pub fn qcow2_overlay(top: &std::path::Path, backing: &str, format: &str) {
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            format,
            top.to_str().unwrap(),
        ],
    );
}
