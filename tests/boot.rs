//! Boot end to end under TCG: the guest reaches its main loop and names its devices, QMP
//! answers, bad kernel arguments and CPU faults are reported with their exit statuses, and
//! a QMP power-down shuts the guest down cleanly. On the user-mode network the guest has
//! its address from the command line (DHCP when asked), and a connection made right after
//! the banner is answered either way.

use std::time::Instant;

use qcow_metal::config::IpConfig;
use qcow_metal_e2e::{
    Banner, Guest, GuestOutcome, boot, guest, nbd_client, require_tool, run_to_exit,
    shut_down_cleanly,
};

#[test]
fn guest_boots_to_its_main_loop_and_names_its_devices() {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let (guest, banner) = boot(guest());
    eprintln!(
        "banner: {} (guest {} ms, wall {:?})",
        banner.line, banner.guest_ms, banner.wall
    );
    assert_eq!(banner.version, env!("CARGO_PKG_VERSION"), "{}", banner.line);
    assert!(banner.devices.contains("virtio-blk"), "{}", banner.line);
    assert!(banner.devices.contains("virtio-net"), "{}", banner.line);
    // PCI enumeration logs every device before the banner.
    let log = guest.serial_log();
    assert!(
        log.contains("pci "),
        "no PCI enumeration on the console:\n{log}"
    );
}

#[test]
fn the_user_mode_network_address_is_static_unless_dhcp_is_asked_for() {
    // The runner gives the guest QEMU's address on the command line, and the guest announces
    // it (gratuitous ARP) as its network comes up: a connection made right after the banner
    // is answered at once. (Before, the guest took a DHCP lease after its banner, and QEMU's
    // ARP request for it, then its SYN, were lost: QEMU resent the SYN after about 6 s.)
    // Printed, not asserted: the handshake takes tens of milliseconds instead of 6 s.
    let (mut g, banner) = boot(guest());
    assert!(
        g.kernel_cmdline().contains("ip=10.0.2.15/24 gw=10.0.2.2"),
        "{}",
        g.kernel_cmdline()
    );
    first_handshake(&g, &banner, "static");
    let log = g.serial_log();
    assert!(
        log.contains("static address 10.0.2.15/24, gateway 10.0.2.2"),
        "{log}"
    );
    assert!(!log.contains("DHCP"), "{log}");
    shut_down_cleanly(&mut g);

    // `--ip dhcp` on the user-mode network: QEMU's DHCP hands out the same address. QEMU
    // sends the first connection's SYN as soon as the guest's DHCP DISCOVER told it the
    // guest's MAC address, before the guest has its lease: the guest keeps that SYN and takes
    // it in once the lease is applied (src/service/net.rs, `Tap`), so this connection too is
    // answered at once (it took about 6 s, QEMU's resent SYN, when the guest dropped it).
    let (mut g, banner) = boot(guest().guest_ip(IpConfig::Dhcp));
    assert!(
        g.kernel_cmdline().contains("ip=dhcp") && !g.kernel_cmdline().contains("gw="),
        "{}",
        g.kernel_cmdline()
    );
    first_handshake(&g, &banner, "dhcp");
    let log = g.serial_log();
    assert!(
        log.contains("DHCP lease 10.0.2.15/24, gateway 10.0.2.2"),
        "{log}"
    );
    shut_down_cleanly(&mut g);
}

/// One NBD connection to the guest, made at once (no retries, no wait for `/metrics`): its
/// handshake must succeed; how long it took is printed.
fn first_handshake(g: &Guest, banner: &Banner, what: &str) {
    let asked = Instant::now();
    let client = nbd_client(g.nbd_port());
    eprintln!(
        "{what}: the first NBD handshake took {:?} (banner at {:?} wall)",
        asked.elapsed(),
        banner.wall
    );
    assert_eq!(client.size(), 64 << 20);
}

#[test]
fn qmp_answers_status_and_blockstats() {
    let (mut guest, _) = boot(guest());
    let qmp = guest.qmp().expect("QMP session");
    let status = qmp.query_status().expect("query-status");
    assert!(status.running, "{status:?}");
    assert_eq!(status.status, "running");
    let stats = qmp.query_blockstats().expect("query-blockstats");
    assert!(
        stats
            .iter()
            .any(|s| s.qdev.as_deref().is_some_and(|q| q.contains("vblk0"))
                || s.device.as_deref() == Some("disk0")),
        "the virtio-blk disk is not in query-blockstats: {stats:?}"
    );
    // The untyped interface answers too.
    let version = qmp
        .execute("query-version", serde_json::Value::Null)
        .expect("query-version");
    assert!(version["qemu"]["major"].as_u64().is_some(), "{version}");
}

#[test]
fn bad_kernel_argument_is_reported_and_exits_35() {
    let (guest, outcome) = run_to_exit(guest().append("metrics_port=abc"));
    let log = guest.serial_log();
    assert_eq!(outcome, GuestOutcome::BadConfig, "{outcome}\n{log}");
    assert_eq!(outcome.qemu_code(), Some(35));
    assert!(
        log.contains("metrics_port") && log.contains("abc"),
        "the console does not name the bad argument:\n{log}"
    );
    assert!(
        !log.contains("ready in"),
        "the guest must not reach its main loop:\n{log}"
    );
}

#[test]
fn guest_fault_is_reported_with_its_vector_and_exits_37() {
    let (guest, outcome) = run_to_exit(guest().append("debug_fault=ud"));
    let log = guest.serial_log();
    assert_eq!(outcome, GuestOutcome::Fault, "{outcome}\n{log}");
    assert_eq!(outcome.qemu_code(), Some(37));
    let report = log
        .lines()
        .find(|l| l.contains("CPU exception"))
        .unwrap_or_else(|| panic!("no exception report on the console:\n{log}"));
    assert!(
        report.contains("exception 6 "),
        "vector 6 (#UD) not named: {report}"
    );
    assert!(report.contains("RIP"), "{report}");
}

#[test]
fn qmp_powerdown_shuts_the_guest_down_cleanly() {
    let (mut guest, _) = boot(guest());
    let outcome = guest.shutdown().expect("shutdown");
    assert_eq!(
        outcome,
        GuestOutcome::Clean,
        "{outcome}\n{}",
        guest.serial_log()
    );
    assert_eq!(outcome.qemu_code(), Some(33));
}

#[test]
fn auto_accel_comes_up_on_this_host_falling_back_to_tcg_when_kvm_cannot_run_it() {
    use qcow_metal_e2e::Accel;
    use qcow_metal_runner::qemu::{AccelKind, kvm_device_opens, kvm_unusable_reason};
    // Try KVM even where it is known not to work, so the fallback itself is exercised.
    let (guest, banner) = boot(guest().accel(Accel::Auto).force_kvm_trial(true));
    assert!(banner.devices.contains("virtio-blk"), "{}", banner.line);
    if !kvm_device_opens() || kvm_unusable_reason().is_some() {
        assert_eq!(
            guest.accel(),
            AccelKind::Tcg,
            "KVM cannot run the guest here"
        );
    }
}

#[test]
fn a_busy_port_and_an_unopenable_disk_say_what_to_do() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let err = guest()
        .metrics_port(port)
        .start()
        .err()
        .expect("a busy metrics port must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains(&port.to_string()) && msg.contains("--metrics-port"),
        "{msg}"
    );
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let err = guest()
        .disk(not_a_dir.join("disk.qcow2"))
        .start()
        .err()
        .expect("a disk under a regular file cannot be created");
    let msg = err.to_string();
    assert!(
        msg.contains("disk.qcow2") && msg.contains("--disk"),
        "{msg}"
    );
}

#[test]
fn a_damaged_qcow2_magic_is_never_exported_raw_unless_asked_and_empty_disks_are_refused() {
    use qcow_metal::nbd::client::{Client, ClientOptions};
    use qcow_metal_e2e::{NBD_EXPORT, ScratchDir, nbd_client, shut_down_cleanly};
    use qcow_metal_runner::disk::{GuestFormat, create_qcow2};
    let dir = ScratchDir::new("damaged-magic");
    let image = dir.path().join("damaged.qcow2");
    create_qcow2(&image, 8 << 20, 65536, 16).expect("creating the image");
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[3] ^= 0x04; // QFI\xfb -> QFI\xff
    std::fs::write(&image, &bytes).unwrap();

    // The runner's --format auto refuses it before boot.
    let err = guest()
        .disk(&image)
        .start()
        .err()
        .expect("a damaged qcow2 image must not boot under --format auto")
        .to_string();
    assert!(
        err.contains("damaged magic") && err.contains("--format raw"),
        "{err}"
    );

    // The guest's own format=auto (the last format= on its command line wins) does not
    // export it either: NBD clients are turned away, the reason is on the console.
    let (mut g, _) = boot(
        guest()
            .disk(&image)
            .format(GuestFormat::Raw)
            .append("format=auto"),
    );
    let line = g
        .wait_for_line("disk:", qcow_metal_e2e::BOOT_TIMEOUT)
        .expect("the guest's disk line");
    assert!(
        line.contains("unavailable") && line.contains("damaged magic"),
        "{line}"
    );
    let opts = ClientOptions {
        timeout: Some(std::time::Duration::from_secs(60)),
        ..ClientOptions::new(NBD_EXPORT)
    };
    assert!(
        Client::connect_with(("127.0.0.1", g.nbd_port()), &opts).is_err(),
        "the damaged image was exported"
    );
    shut_down_cleanly(&mut g);
    drop(g);
    assert!(std::fs::read(&image).unwrap() == bytes, "the image changed");

    // --format raw exports its bytes as they are.
    let (mut g, _) = boot(guest().disk(&image).format(GuestFormat::Raw));
    let mut c = nbd_client(g.nbd_port());
    assert_eq!(c.size(), bytes.len() as u64);
    let mut first = vec![0u8; 4096];
    assert_eq!(c.read(0, &mut first).unwrap(), 0);
    assert!(
        first == bytes[..4096],
        "the raw export is not the file's bytes"
    );
    c.disconnect().unwrap();
    shut_down_cleanly(&mut g);

    // A 0-byte disk (say, left by an old failed create) is refused in every format.
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    for format in [GuestFormat::Auto, GuestFormat::Raw] {
        let err = guest()
            .disk(&empty)
            .format(format)
            .start()
            .err()
            .expect("a 0-byte disk must be refused")
            .to_string();
        assert!(err.contains("empty (0 bytes)"), "{err}");
    }
}
