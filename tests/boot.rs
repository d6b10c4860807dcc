//! Boot end to end under TCG: the guest reaches its main loop and names its devices, QMP
//! answers, bad kernel arguments and CPU faults are reported with their exit statuses, and
//! a QMP power-down shuts the guest down cleanly.

use qcow_metal_e2e::{GuestOutcome, boot, guest, require_tool, run_to_exit};

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
