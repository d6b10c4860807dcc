//! The NBD export end to end under TCG: real clients (qemu-io, qemu-img, nbdinfo, nbdcopy)
//! against the guest's qcow2 engine; malformed clients get errors while others are served;
//! after a clean shutdown the image checks clean and holds exactly what was written. A write
//! that a damaged L2 entry sends onto metadata is refused (EIO) while the guest keeps serving.

use qcow_metal::nbd::client::{go_option_data, greet, read_option_reply, send_option};
use qcow_metal::nbd::proto::{
    OPT_GO, REP_ACK, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REQUEST_LEN, TFLAG_READ_ONLY,
};
use qcow_metal_e2e::{
    NBD_EXPORT, ScratchDir, TOOL_TIMEOUT, boot, guest, metrics_text, nbd_client,
    qemu_img_convert_to_raw, qemu_io, require_tool, run_tool, sample, shut_down_cleanly,
};
use qcow_metal_runner::disk::GuestFormat;
use std::io::{Read, Write};
use std::net::TcpStream;

const MIB: u64 = 1 << 20;
/// Virtual size of the test disk: small, because TCG is slow.
const SIZE: u64 = 24 * MIB;

/// `len` bytes that differ from sector to sector and from `seed` to `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 512) as u8).wrapping_mul(7) ^ seed ^ (i as u8))
        .collect()
}

/// The rows of `nbdinfo --map`: offset, length, state flags.
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run_tool("nbdinfo", "libnbd-bin", &["--map", uri]);
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 3, "unexpected nbdinfo --map line: {l}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// The state flags `nbdinfo --map` reports for the byte at `offset`.
fn state_at(rows: &[(u64, u64, u32)], offset: u64) -> u32 {
    rows.iter()
        .find(|(o, l, _)| *o <= offset && offset < o + l)
        .map(|r| r.2)
        .unwrap_or_else(|| panic!("offset {offset} not in the map {rows:?}"))
}

#[test]
fn real_clients_use_the_guest_export_and_the_image_stays_clean() {
    for (p, pkg) in [
        ("qemu-io", "qemu-utils"),
        ("qemu-img", "qemu-utils"),
        ("nbdinfo", "libnbd-bin"),
        ("nbdcopy", "libnbd-bin"),
    ] {
        require_tool(p, pkg);
    }
    let (mut g, _) = boot(guest().size(SIZE));
    let uri = g.nbd_url();
    let dir = ScratchDir::new("nbd-e2e");
    // What the virtual disk must hold, kept in step with every write below.
    let mut expected = vec![0u8; SIZE as usize];

    // nbdcopy in: 6 MiB of data at the start of a sparse source, zeros after it.
    let src = dir.path().join("in.raw");
    let data = pattern(6 * MIB as usize, 0x3c);
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(SIZE).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&data, 0).unwrap();
    }
    expected[..data.len()].copy_from_slice(&data);
    // The fresh disk reads as zeros: nbdcopy need not write the source's zeros.
    run_tool(
        "nbdcopy",
        "libnbd-bin",
        &["--destination-is-zero", src.to_str().unwrap(), &uri],
    );

    // qemu-io writes patterns (aligned, unaligned, zeroes, asynchronous) and reads them back.
    let writes = [
        ("write -P 0xab 8M 1M", 8 * MIB, MIB, 0xab),
        ("write -P 0x11 12345 4567", 12345, 4567, 0x11),
        ("write -P 0xcd 9437184 65536", 9 * MIB, 65536, 0xcd),
        ("aio_write -P 0x22 10M 256k", 10 * MIB, 256 << 10, 0x22),
        ("aio_write -P 0x23 11M 64k", 11 * MIB, 64 << 10, 0x23),
        ("write -z 5M 512k", 5 * MIB, 512 << 10, 0),
    ];
    let mut cmds: Vec<String> = writes.iter().map(|w| w.0.to_string()).collect();
    cmds.push("aio_flush".into());
    cmds.push("flush".into());
    qemu_io(&uri, &cmds);
    for (_, off, len, byte) in writes {
        expected[off as usize..(off + len) as usize].fill(byte);
    }
    let reads: Vec<String> = writes
        .iter()
        .map(|(_, off, len, byte)| format!("read -P {byte:#x} {off} {len}"))
        .chain([format!("read -P 0 {} {}", 16 * MIB, 8 * MIB)])
        .collect();
    let out = qemu_io(&uri, &reads);
    assert_eq!(out.matches("read ").count(), reads.len(), "{out}");

    // qemu-img convert from the export gives the expected bytes.
    let converted = dir.path().join("convert.raw");
    qemu_img_convert_to_raw("raw", &uri, &converted);
    assert!(
        std::fs::read(&converted).unwrap() == expected,
        "qemu-img convert"
    );

    // nbdcopy out gives them too.
    let copied = dir.path().join("out.raw");
    run_tool("nbdcopy", "libnbd-bin", &[&uri, copied.to_str().unwrap()]);
    assert!(std::fs::read(&copied).unwrap() == expected, "nbdcopy out");

    // nbdinfo --map: written data is allocated data, the untouched tail reads as zeros and
    // is a hole; no extent claims zeros where there is data.
    let rows = map(&uri);
    assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), SIZE, "{rows:?}");
    for off in [0, 3 * MIB, 8 * MIB, 9 * MIB, 10 * MIB, 11 * MIB] {
        assert_eq!(state_at(&rows, off), 0, "data at {off}: {rows:?}");
    }
    assert_eq!(
        state_at(&rows, 20 * MIB) & 2,
        2,
        "zeros at 20 MiB: {rows:?}"
    );
    assert_eq!(state_at(&rows, SIZE - 1), 3, "hole at the end: {rows:?}");
    for (off, len, state) in &rows {
        if state & 2 != 0 {
            let r = *off as usize..(off + len) as usize;
            assert!(
                expected[r].iter().all(|b| *b == 0),
                "zero extent {off}+{len} has data"
            );
        }
    }

    // Malformed clients get errors or are closed, and a good client keeps being served.
    let mut good = nbd_client(g.nbd_port());
    let _idle = malformed_clients(g.nbd_port());
    let mut buf = vec![0u8; 4567];
    assert_eq!(good.read(12345, &mut buf).unwrap(), 0);
    assert!(buf.iter().all(|b| *b == 0x11));
    let mut big = [0u8; 16];
    assert_eq!(
        good.read(SIZE - 8, &mut big).unwrap(),
        22,
        "EINVAL past the end"
    );
    assert_eq!(
        good.write(SIZE - 8, &big, false).unwrap(),
        28,
        "ENOSPC past the end"
    );
    assert_eq!(good.write(13 * MIB, b"after errors", true).unwrap(), 0);
    expected[13 * MIB as usize..][..12].copy_from_slice(b"after errors");
    good.disconnect().unwrap();

    // A clean shutdown; then the image checks clean and equals what was written.
    shut_down_cleanly(&mut g);
    let image = g.disk_path().to_str().unwrap().to_string();
    let check = run_tool("qemu-img", "qemu-utils", &["check", "-f", "qcow2", &image]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(!check.contains("leaked"), "{check}");
    let want = dir.path().join("expected.raw");
    std::fs::write(&want, &expected).unwrap();
    let cmp = run_tool(
        "qemu-img",
        "qemu-utils",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &image,
            want.to_str().unwrap(),
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

/// Garbage handshakes and requests: each gets an error or a closed connection. Returns a
/// client that connected and said nothing, to keep open while others are served.
fn malformed_clients(port: u16) -> TcpStream {
    let addr = ("127.0.0.1", port);
    // HTTP instead of NBD: the server closes after the bad client flags.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TOOL_TIMEOUT)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_closed(&mut s);

    // Unknown options and exports are refused and the handshake goes on; a request with a
    // bad magic then closes the connection.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TOOL_TIMEOUT)).unwrap();
    greet(&mut s).unwrap();
    send_option(&mut s, 0x7777, b"junk").unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().1, REP_ERR_UNSUP);
    send_option(&mut s, OPT_GO, &go_option_data("nope", &[])).unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().1, REP_ERR_UNKNOWN);
    send_option(&mut s, OPT_GO, &go_option_data(NBD_EXPORT, &[])).unwrap();
    while read_option_reply(&mut s).unwrap().1 != REP_ACK {}
    s.write_all(&[0x42; REQUEST_LEN]).unwrap();
    assert_closed(&mut s);

    // A client that connects and says nothing stays open and harms nobody.
    TcpStream::connect(addr).unwrap()
}

/// Fails unless the server closes `s` (end of stream or reset) without sending more.
fn assert_closed(s: &mut TcpStream) {
    s.set_read_timeout(Some(TOOL_TIMEOUT)).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "data after a protocol error: {rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

#[test]
fn read_only_guest_serves_what_an_earlier_boot_wrote() {
    let dir = ScratchDir::new("nbd-ro");
    let disk = dir.path().join("disk.qcow2");
    // First boot, read-write: write and shut down cleanly.
    {
        let (mut g, _) = boot(guest().size(8 * MIB).disk(&disk));
        let mut c = nbd_client(g.nbd_port());
        assert_eq!(c.flags() & TFLAG_READ_ONLY, 0);
        assert_eq!(c.write(MIB, &pattern(65536, 9), false).unwrap(), 0);
        assert_eq!(c.flush().unwrap(), 0);
        c.disconnect().unwrap();
        shut_down_cleanly(&mut g);
    }
    // Second boot, read-only: the data is there, writes get EPERM.
    let (mut g, _) = boot(guest().disk(&disk).read_only(true));
    let mut c = nbd_client(g.nbd_port());
    assert_ne!(c.flags() & TFLAG_READ_ONLY, 0);
    let mut buf = vec![0u8; 65536];
    assert_eq!(c.read(MIB, &mut buf).unwrap(), 0);
    assert!(buf == pattern(65536, 9), "data of the first boot");
    assert_eq!(c.write(0, b"nope", false).unwrap(), 1, "EPERM");
    assert_eq!(c.trim(0, 4096).unwrap(), 1, "EPERM");
    assert_eq!(c.write_zeroes(0, 4096, 0).unwrap(), 1, "EPERM");
    assert_eq!(c.read(0, &mut buf[..4096]).unwrap(), 0);
    assert!(buf[..4096].iter().all(|b| *b == 0));
    c.disconnect().unwrap();
    shut_down_cleanly(&mut g);
    let image = disk.to_str().unwrap();
    let check = run_tool("qemu-img", "qemu-utils", &["check", "-f", "qcow2", image]);
    assert!(check.contains("No errors were found"), "{check}");
}

#[test]
fn read_only_guest_serves_a_fresh_qemu_img_image() {
    let dir = ScratchDir::new("nbd-ro-fresh");
    let disk = dir.path().join("fresh.qcow2");
    let image = disk.to_str().unwrap();
    run_tool(
        "qemu-img",
        "qemu-utils",
        &["create", "-q", "-f", "qcow2", image, "8M"],
    );
    // The file ends part-way through the L1 table's cluster; read-only, nothing extends it.
    let before = std::fs::read(&disk).unwrap();
    assert_ne!(
        before.len() as u64 % 65536,
        0,
        "qemu-img made whole clusters"
    );
    let (mut g, _) = boot(guest().disk(&disk).read_only(true));
    let mut c = nbd_client(g.nbd_port());
    assert_ne!(c.flags() & TFLAG_READ_ONLY, 0);
    assert_eq!(c.size(), 8 * MIB);
    let mut buf = vec![0xffu8; 8 * MIB as usize];
    assert_eq!(c.read(0, &mut buf).unwrap(), 0);
    assert!(buf.iter().all(|b| *b == 0), "a fresh image reads as zeros");
    assert_eq!(c.write(0, b"nope", false).unwrap(), 1, "EPERM");
    c.disconnect().unwrap();
    shut_down_cleanly(&mut g);
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the read-only image is unchanged"
    );
}

#[test]
fn raw_mode_serves_the_device_bytes() {
    let dir = ScratchDir::new("nbd-raw");
    let disk = dir.path().join("disk.raw");
    let mut bytes = pattern(4 * MIB as usize, 0x5e);
    std::fs::write(&disk, &bytes).unwrap();
    // A file without the qcow2 magic is served raw (format=auto).
    {
        let (mut g, _) = boot(guest().disk(&disk));
        let mut c = nbd_client(g.nbd_port());
        assert_eq!(c.size(), 4 * MIB);
        let mut buf = vec![0u8; 4 * MIB as usize];
        assert_eq!(c.read(0, &mut buf).unwrap(), 0);
        assert!(buf == bytes, "the export is the file's bytes");
        let r = c.block_status(0, 4 * MIB as u32, false).unwrap();
        assert_eq!(r.extents, vec![(4 * MIB as u32, 0)], "raw: all data");
        assert_eq!(c.write(12345, b"raw write", true).unwrap(), 0);
        c.disconnect().unwrap();
        shut_down_cleanly(&mut g);
    }
    bytes[12345..12345 + 9].copy_from_slice(b"raw write");
    assert!(
        std::fs::read(&disk).unwrap() == bytes,
        "the write reached the file"
    );

    // A qcow2 image with format=raw on the command line: the export is the image file.
    let image = dir.path().join("image.qcow2");
    run_tool(
        "qemu-img",
        "qemu-utils",
        &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "8M"],
    );
    let (mut g, _) = boot(guest().disk(&image).format(GuestFormat::Raw));
    let mut c = nbd_client(g.nbd_port());
    let mut magic = [0u8; 4];
    assert_eq!(c.read(0, &mut magic).unwrap(), 0);
    assert_eq!(&magic, b"QFI\xfb");
    c.disconnect().unwrap();
    shut_down_cleanly(&mut g);
}

#[test]
fn a_write_into_metadata_is_refused_and_the_guest_keeps_serving() {
    // A qemu-img image (QEMU 7.2 layout: L1 table at 0x30000, first L2 table at 0x40000)
    // whose L2 entry 0 points at its own L2 table: qemu-io's write through the guest fails
    // (EIO), the L2 table keeps its bytes, the image is marked corrupt, reads go on and
    // /metrics counts the refusal. QEMU refuses the same write.
    const L2: u64 = 0x40000;
    let dir = ScratchDir::new("nbd-overlap");
    let disk = dir.path().join("overlap.qcow2");
    let image = disk.to_str().unwrap();
    run_tool(
        "qemu-img",
        "qemu-utils",
        &["create", "-q", "-f", "qcow2", image, "64M"],
    );
    run_tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 64k 64k",
            image,
        ],
    );
    let mut bytes = std::fs::read(&disk).unwrap();
    assert_eq!(
        u64::from_be_bytes(bytes[0x30000..0x30008].try_into().unwrap()) & !(1 << 63),
        L2,
        "QEMU 7.2 layout"
    );
    bytes[L2 as usize..L2 as usize + 8].copy_from_slice(&((1u64 << 63) | L2).to_be_bytes());
    std::fs::write(&disk, &bytes).unwrap();
    let l2_before = bytes[L2 as usize..L2 as usize + 65536].to_vec();

    let (mut g, _) = boot(guest().disk(&disk));
    let uri = format!("nbd://127.0.0.1:{}/{NBD_EXPORT}", g.nbd_port());
    let out = qemu_io_output(&uri, "write -P 0x77 0 4k");
    assert!(
        !out.success || out.stdout.contains("failed") || out.stderr.contains("failed"),
        "the write into the L2 table must fail: {out:?}"
    );
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("Input/output error"),
        "EIO: {out:?}"
    );
    // The guest keeps serving: reads over a new connection, and /metrics.
    qemu_io(&uri, &["read -P 0x22 64k 64k"]);
    let text = metrics_text(g.metrics_port());
    assert_eq!(
        sample(&text, "qcow_metal_disk_metadata_overlaps_total"),
        Some(1.0),
        "{text}"
    );
    assert!(
        g.tail().contains("preventing a write"),
        "the refusal is logged: {}",
        g.tail()
    );
    shut_down_cleanly(&mut g);
    let after = std::fs::read(&disk).unwrap();
    assert!(
        after[L2 as usize..L2 as usize + 65536] == l2_before[..],
        "the L2 table is unchanged"
    );
    let incompatible = u64::from_be_bytes(after[72..80].try_into().unwrap());
    assert_ne!(incompatible & 2, 0, "the image is marked corrupt");
    let info = run_tool("qemu-img", "qemu-utils", &["info", image]);
    assert!(info.contains("corrupt: true"), "{info}");
}

/// qemu-io on the raw export at `uri` with one command, whatever its outcome.
fn qemu_io_output(uri: &str, cmd: &str) -> qcow_metal_e2e::ToolOutput {
    qcow_metal_e2e::run_tool_output("qemu-io", "qemu-utils", &["-f", "raw", "-c", cmd, uri])
}
