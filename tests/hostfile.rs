//! The host file follows the image, end to end.
//!
//! A fresh 1 GiB qcow2 image is booted: its file is not extended before boot (a few hundred
//! KiB, not the 1.3 GB the image could reach). 100 MiB written over NBD make the guest ask
//! the runner for room (`qcow-metal: grow-device` console lines); the runner grows the file
//! with QMP `block_resize` and the guest takes the new capacity from virtio-blk's
//! configuration. Every write succeeds and reads back, the file stays within a growth step
//! of the image's end, and `qcow_metal_blockdev_capacity_bytes` follows it. After a clean
//! shutdown the runner cuts the file to the image's end: `qemu-img check` reports an image
//! end offset equal to the file's length, exits 0, and the image holds every byte written.
//!
//! A file far longer than its image (as older runners left them, extended to the most the
//! image can reach) is cut while the guest runs: the guest asks (`qcow-metal: cut-device`)
//! once it sees more than two growth steps past the image's end, and the runner shrinks the
//! file to the end plus a step; writes go on, and the clean shutdown cuts it to the end.
//! (A filesystem too small for the growth: `tests/device_errors.rs`.)

use qcow_metal::hostfile::growth_step;
use qcow_metal::metrics::Format;
use qcow_metal::metrics::parse::parse;
use qcow_metal::nbd::client::{Client, ClientOptions};
use qcow_metal_e2e::{
    NBD_EXPORT, ScratchDir, boot, guest, qemu_img_check_json, qemu_img_to_raw, require_tool,
    shut_down_cleanly,
};
use qcow_metal_runner::hostfile::Cut;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 1 << 30;
/// MiB written over NBD.
const WRITTEN_MIB: u64 = 100;

/// Block `i`: every 8-byte word is its own offset, mixed.
fn pattern(i: u64) -> Vec<u8> {
    (0..MIB / 8)
        .flat_map(|w| ((i * MIB + w * 8) ^ 0x0f11_0b5e_5eed_0000).to_le_bytes())
        .collect()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("the image file").len()
}

/// `qcow_metal_blockdev_capacity_bytes` as the guest exports it.
fn capacity_metric(port: u16) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("/metrics");
    let (_, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let exp = parse(body, Format::Text).unwrap_or_else(|e| panic!("/metrics: {e}"));
    exp.find("qcow_metal_blockdev_capacity_bytes", &[])
        .map(|s| s.value)
        .next()
        .expect("qcow_metal_blockdev_capacity_bytes is exported")
}

#[test]
fn the_host_file_grows_with_the_image_and_is_cut_to_its_end_at_shutdown() {
    require_tool("qemu-img", "qemu-utils");
    let scratch = ScratchDir::new("hostfile");
    let image = scratch.path().join("disk.qcow2");
    let (mut guest, _) = boot(guest().disk(&image).size(IMAGE_SIZE));

    // Not pre-extended: the file is the fresh image (header, tables), well under a MiB.
    let start = file_len(&image);
    assert!(
        start < MIB,
        "a fresh 1 GiB image's file is {start} bytes at boot (pre-extended?)"
    );

    let opts = ClientOptions {
        timeout: Some(Duration::from_secs(60)),
        ..ClientOptions::new(NBD_EXPORT)
    };
    let mut client = Client::connect_with(("127.0.0.1", guest.nbd_port()), &opts)
        .unwrap_or_else(|e| panic!("NBD handshake: {e}"));
    let step = growth_step(IMAGE_SIZE, 65536);
    let mut largest = 0;
    for i in 0..WRITTEN_MIB {
        let err = client
            .write(i * MIB, &pattern(i), false)
            .unwrap_or_else(|e| panic!("NBD write of block {i}: {e}"));
        assert_eq!(
            err,
            0,
            "NBD write of block {i}: error {err}\n{}",
            guest.tail()
        );
        largest = largest.max(file_len(&image));
    }
    assert_eq!(client.flush().expect("NBD flush"), 0, "NBD flush");
    let grown = file_len(&image);
    eprintln!(
        "hostfile: file {start} bytes at boot, {grown} after {WRITTEN_MIB} MiB written \
         (largest seen {largest}, step {step})"
    );
    assert!(
        grown >= WRITTEN_MIB * MIB,
        "the file ({grown} bytes) cannot hold {WRITTEN_MIB} MiB of data"
    );
    assert!(
        largest <= WRITTEN_MIB * MIB + 2 * step,
        "the file grew to {largest} bytes for {WRITTEN_MIB} MiB of data (more than two \
         growth steps of {step} ahead)"
    );
    let console = guest.serial_log();
    let requests = console
        .lines()
        .filter(|l| l.starts_with("qcow-metal: grow-device "))
        .count();
    assert!(
        (1..=20).contains(&requests),
        "{requests} grow requests on the console for {WRITTEN_MIB} MiB"
    );
    // The guest sees the grown device (the metric may lag a growth ahead of need).
    let metric = capacity_metric(guest.metrics_port()) as u64;
    assert!(
        metric >= WRITTEN_MIB * MIB && metric <= file_len(&image),
        "qcow_metal_blockdev_capacity_bytes {metric}, file {} bytes",
        file_len(&image)
    );

    let mut buf = vec![0u8; MIB as usize];
    for i in 0..WRITTEN_MIB {
        assert_eq!(client.read(i * MIB, &mut buf).expect("NBD read"), 0);
        assert!(buf == pattern(i), "block {i} reads back wrong");
    }
    client.disconnect().expect("NBD disconnect");

    shut_down_cleanly(&mut guest);
    let cut = guest.host_file_cut().cloned();
    drop(guest);
    let end = file_len(&image);
    match cut {
        Some(Ok(Cut::Cut { from, to })) => {
            assert_eq!(to, end);
            assert!(from > to, "{from} -> {to}");
        }
        other => panic!("the file was not cut at shutdown: {other:?}"),
    }

    let out = qemu_img_check_json(&image);
    assert!(out.success, "qemu-img check: {}{}", out.stdout, out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("qemu-img check JSON");
    assert_eq!(
        v["image-end-offset"].as_u64(),
        Some(end),
        "the file is {end} bytes: {}",
        out.stdout
    );
    assert!(
        (WRITTEN_MIB * MIB..WRITTEN_MIB * MIB + 4 * MIB).contains(&end),
        "{end} bytes for {WRITTEN_MIB} MiB of data"
    );

    // The image, as QEMU reads it, holds every block.
    let raw = scratch.path().join("disk.raw");
    qemu_img_to_raw(&image, &raw);
    let mut f = std::fs::File::open(&raw).unwrap();
    for i in 0..WRITTEN_MIB {
        f.read_exact(&mut buf).unwrap();
        assert!(buf == pattern(i), "block {i} of the converted image");
    }
}

#[test]
fn a_file_far_longer_than_its_image_is_cut_while_the_guest_runs() {
    require_tool("qemu-img", "qemu-utils");
    let scratch = ScratchDir::new("hostfile-cut");
    let image = scratch.path().join("disk.qcow2");
    qcow_metal_runner::disk::create_qcow2(&image, IMAGE_SIZE, 65536, 16).expect("creating");
    let long = qcow_metal::qcow2::max_image_len(IMAGE_SIZE, 65536, 16);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(long))
        .expect("extending the file as older runners did");
    let (mut guest, _) = boot(guest().disk(&image).size(IMAGE_SIZE));

    let step = growth_step(IMAGE_SIZE, 65536);
    let deadline = Instant::now() + Duration::from_secs(60);
    while file_len(&image) > 2 * step {
        assert!(
            Instant::now() < deadline,
            "the {long}-byte file was not cut within 60 s ({} bytes)\n{}",
            file_len(&image),
            guest.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let cut = file_len(&image);
    assert!(
        cut >= step,
        "cut to {cut} bytes, less than a step past the image"
    );
    assert!(
        guest.serial_log().contains("qcow-metal: cut-device "),
        "no cut request on the console"
    );

    // The guest goes on: writes, reads, and its capacity is the file's.
    let mut client = Client::connect_with(("127.0.0.1", guest.nbd_port()), &{
        ClientOptions {
            timeout: Some(Duration::from_secs(60)),
            ..ClientOptions::new(NBD_EXPORT)
        }
    })
    .unwrap_or_else(|e| panic!("NBD handshake: {e}"));
    for i in 0..8 {
        assert_eq!(client.write(i * MIB, &pattern(i), false).unwrap(), 0);
    }
    assert_eq!(client.flush().unwrap(), 0);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..8 {
        assert_eq!(client.read(i * MIB, &mut buf).unwrap(), 0);
        assert!(buf == pattern(i), "block {i} after the cut");
    }
    client.disconnect().expect("NBD disconnect");
    assert_eq!(
        capacity_metric(guest.metrics_port()) as u64,
        file_len(&image)
    );

    shut_down_cleanly(&mut guest);
    drop(guest);
    let end = file_len(&image);
    assert!(end < 16 * MIB, "{end} bytes after a clean shutdown");
    let out = qemu_img_check_json(&image);
    assert!(out.success, "qemu-img check: {}{}", out.stdout, out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("qemu-img check JSON");
    assert_eq!(v["image-end-offset"].as_u64(), Some(end), "{}", out.stdout);
}
