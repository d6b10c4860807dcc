//! `qcow-metal --net tap` and `qcow-metal scrape` as a user runs them (the built binary), in
//! a network namespace the test creates: the runner creates its tap, prints the guest's own
//! URLs, `scrape` summarises the guest on its address, Ctrl-C shuts down cleanly and removes
//! the tap; without root, the runner says what to run as root.
//!
//! Creating a namespace needs root (CI runs as root): without it the test fails, saying so.

use std::process::{Command, Output};
use std::time::Duration;

use qcow_metal_runner::kernel;

mod common;
use common::{RUNNER, Runner};

/// Guard against hangs (never a timed assert): a TCG boot takes about a second.
const TIMEOUT: Duration = Duration::from_secs(300);

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip ({e}): install the Debian package iproute2"))
}

/// A network namespace; dropping it kills what is left inside (processes this test
/// started) and deletes it.
struct NetNs(String);

impl NetNs {
    fn create() -> NetNs {
        let name = format!("qm-cli-{}", std::process::id());
        let out = ip(&["netns", "add", &name]);
        assert!(
            out.status.success(),
            "`ip netns add {name}` failed: {}\nthis test needs root to create a network \
             namespace and a tap device in it; CI runs it as root",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let ns = NetNs(name);
        assert!(
            ip(&["-n", &ns.0, "link", "set", "lo", "up"])
                .status
                .success()
        );
        ns
    }

    /// `ip netns exec NS program args...`
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0, program]).args(args);
        cmd
    }

    fn has_link(&self, name: &str) -> bool {
        ip(&["-n", &self.0, "link", "show", "dev", name])
            .status
            .success()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let pids = ip(&["netns", "pids", &self.0]).stdout;
        for pid in String::from_utf8_lossy(&pids).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = ip(&["netns", "del", &self.0]);
    }
}

#[test]
fn the_command_on_a_tap_it_creates() {
    let ns = NetNs::create();
    let kernel = kernel::shared_kernel().unwrap_or_else(|e| panic!("building the kernel: {e}"));
    let kernel = kernel.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (disk, serial, qmp) = (path("d.qcow2"), path("serial.log"), path("qmp.sock"));
    let mut cmd = ns.command(
        RUNNER,
        &[
            "--kernel",
            kernel,
            "--disk",
            &disk,
            "--size",
            "64M",
            "--accel",
            "tcg",
            "--net",
            "tap",
            "--serial-log",
            &serial,
            "--qmp",
            &qmp,
        ],
    );
    cmd.env("TMPDIR", dir.path());
    // `ip netns exec` execs the runner: this pid is the runner's.
    let mut runner = Runner::spawn(cmd);
    runner.wait_for("press Ctrl-C", TIMEOUT);
    let err = runner.stderr();
    for want in [
        "qcow-metal: network: tap qcow-metal0 (created by the runner, removed at exit), host \
         side 10.213.0.1/24; guest ip=10.213.0.2/24 gw=10.213.0.1",
        "the guest takes the default address 10.213.0.2/24",
        "qcow-metal: metrics: http://10.213.0.2:9090/metrics\n",
        "qcow-metal: NBD:     nbd://10.213.0.2:10809/disk\n",
    ] {
        assert!(err.contains(want), "missing `{want}` in\n{err}");
    }
    assert!(ns.has_link("qcow-metal0"));

    let out = ns
        .command(RUNNER, &["scrape", "10.213.0.2", "--interval", "500ms"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scrape failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "qcow-metal 0.1.0 at http://10.213.0.2:9090/metrics, up ",
        "health:  ok\n",
        "disk: up (image open)\n",
        "(guest clock):\n",
        "space of the disk: virtual 64 MiB, ",
        ", host file ",
        "errors since boot: disk 0, device 0, NBD 0",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    // Nothing listens at the forwarded address inside the namespace: a clear error.
    let out = ns.command(RUNNER, &["scrape"]).output().unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("connecting to http://127.0.0.1:9090/metrics"),
        "{msg}"
    );

    // Ctrl-C: a clean shutdown, and the tap goes.
    let status = Command::new("kill")
        .args(["-INT", &runner.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = runner.wait_exit(TIMEOUT);
    assert!(status.success(), "{status}\n{}", runner.stderr());
    assert!(
        runner.stderr().contains("the guest shut down cleanly"),
        "{}",
        runner.stderr()
    );
    assert!(!ns.has_link("qcow-metal0"), "the runner removes its tap");

    // Without root (as nobody): nothing is created, and the error says what to run.
    let mut cmd = ns.command(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            RUNNER,
            "--kernel",
            kernel,
            "--disk",
            &format!("/tmp/qcow-metal-nobody-{}.qcow2", std::process::id()),
            "--tap",
            "qm-user0",
            "--ip",
            "10.50.0.2/24",
        ],
    );
    let out = cmd.env("USER", "alice").output().unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    for want in [
        "cannot create the tap device qm-user0",
        "needs root",
        "sudo ip tuntap add dev qm-user0 mode tap user alice",
        "sudo ip addr add 10.50.0.1/24 dev qm-user0",
        "sudo ip link set qm-user0 up",
        "cargo run -- --tap qm-user0 --ip 10.50.0.2/24",
    ] {
        assert!(msg.contains(want), "missing `{want}` in\n{msg}");
    }
    assert!(!ns.has_link("qm-user0"));
    assert!(
        !std::path::Path::new(&format!(
            "/tmp/qcow-metal-nobody-{}.qcow2",
            std::process::id()
        ))
        .exists(),
        "no disk is created before the tap"
    );
}
