//! A backing chain served by the guest, end to end.
//!
//! An overlay on a chain whose base is compressed (`qemu-img convert -c`), depth 3, the
//! overlay larger than its base: the runner resolves the chain, attaches every layer
//! read-only as a virtio-blk device with its serial, and the guest opens the chain. The NBD
//! export reads equal to `qemu-img convert -O raw` of the overlay; it takes writes (partial
//! clusters copied up from the base) and write-zeroes (the base must not show through);
//! `/metrics` counts the data each layer served; after a clean shutdown `qemu-img check`
//! exits 0, `qemu-img compare` (which follows the chain) equals the expected content, and
//! the layers below are untouched. A missing layer, a `json:` backing name, a vmdk layer and
//! an encrypted layer are refused before boot, naming the file.

use qcow_metal_e2e::{
    ScratchDir, boot_serving, guest, metrics_text, qemu_img_to_raw, qemu_io, run_tool,
    run_tool_output, sample, shut_down_cleanly,
};
use std::path::Path;
use std::time::Duration;

const KIB: usize = 1024;
const MIB: usize = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_img(args: &[&str]) -> String {
    run_tool("qemu-img", "qemu-utils", args)
}

#[test]
fn guest_serves_an_overlay_on_a_compressed_base() {
    let dir = ScratchDir::new("backing");
    let d = dir.path();
    // The base: 4 MiB of compressible, position-dependent data, compressed.
    let src = d.join("src.raw");
    let data: Vec<u8> = (0..4 * MIB)
        .map(|i| ((i / 512) as u8).wrapping_mul(7) ^ (i % 5) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let base = d.join("base.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&base),
    ]);
    // A middle layer (6 MiB, 4 KiB clusters) with some data and a zeroed range of its own.
    let mid = d.join("mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&mid),
        "6M",
    ]);
    run_tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 512k 100k",
            "-c",
            "write -z 1536k 64k",
            "-c",
            "write -P 0x12 4100k 200k",
            s(&mid),
        ],
    );
    // The overlay: 8 MiB, larger than every layer.
    let top = d.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "8M",
    ]);
    let base_before = std::fs::read(&base).unwrap();
    let mid_before = std::fs::read(&mid).unwrap();
    let expected_path = d.join("expected.raw");
    qemu_img_to_raw(&top, &expected_path);
    let mut expected = std::fs::read(&expected_path).unwrap();

    let (mut g, _) = boot_serving(guest().disk(&top));
    // Both layers attached and opened (the guest found them by their serials).
    g.wait_for_line(
        "disk: a backing chain of 2 layers",
        Duration::from_secs(300),
    )
    .unwrap_or_else(|e| panic!("the guest did not open the chain: {e}\n{}", g.tail()));
    let uri = g.nbd_url();
    // Reads: the whole export equals qemu-img's view of the chain.
    qemu_img(&["compare", "-f", "raw", "-F", "raw", &uri, s(&expected_path)]);
    // Writes: partial clusters over the compressed base and the middle layer, a zeroed
    // range over both, a write past the base's end.
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 70000 5000",
            "write -P 0x5b 530k 3k",
            "write -z 1m 768k",
            "write -z 3000k 5k",
            "write -P 0x77 7m 64k",
        ],
    );
    expected[70000..75000].fill(0x5a);
    expected[530 * KIB..533 * KIB].fill(0x5b);
    expected[MIB..MIB + 768 * KIB].fill(0);
    expected[3000 * KIB..3005 * KIB].fill(0);
    expected[7 * MIB..7 * MIB + 64 * KIB].fill(0x77);
    std::fs::write(&expected_path, &expected).unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "raw", &uri, s(&expected_path)]);
    // Every layer served data, counted per depth.
    let metrics = metrics_text(g.metrics_port());
    for depth in 0..3 {
        let v = sample(
            &metrics,
            &format!("qcow_metal_disk_layer_read_bytes_total{{disk=\"disk\",depth=\"{depth}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(v > 0.0, "depth {depth} served nothing:\n{metrics}");
    }
    shut_down_cleanly(&mut g);

    let check = run_tool_output("qemu-img", "qemu-utils", &["check", "-f", "qcow2", s(&top)]);
    assert!(
        check.success,
        "qemu-img check: {}{}",
        check.stdout, check.stderr
    );
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&top),
        s(&expected_path),
    ]);
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base changed"
    );
    assert!(
        std::fs::read(&mid).unwrap() == mid_before,
        "the middle layer changed"
    );
}

#[test]
fn a_missing_layer_is_refused_naming_the_file() {
    let dir = ScratchDir::new("backing-missing");
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "1M",
    ]);
    let Err(e) = guest().disk(&top).start() else {
        panic!("a guest started on an overlay whose backing file is missing");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("gone.qcow2") && msg.contains("missing"),
        "{msg}"
    );
}

/// Layers the guest cannot serve stop the runner before boot, naming the file and why: a
/// `json:` backing name, a backing format other than qcow2 and raw (vmdk), and a qcow2
/// layer the engine refuses (encrypted, LUKS by its header).
#[test]
fn layers_the_guest_cannot_serve_are_refused_naming_the_file() {
    let dir = ScratchDir::new("backing-refused");
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "vmdk", s(&d.join("base.vmdk")), "1M"]);
    // An encrypted layer: a qcow2 header whose encryption method says LUKS. (Not made with
    // `qemu-img create -o encrypt.format=luks`: QEMU 7.2 times PBKDF2 on the thread's CPU
    // clock first and fails with "Unable to get accurate CPU usage" on a loaded machine.)
    let locked = d.join("locked.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&locked), "1M"]);
    let mut header = std::fs::read(&locked).unwrap();
    header[32..36].copy_from_slice(&2u32.to_be_bytes());
    std::fs::write(&locked, header).unwrap();
    let cases = [
        (
            "json:{\"file\":{\"driver\":\"file\",\"filename\":\"x.raw\"}}",
            "raw",
            "json:",
        ),
        ("base.vmdk", "vmdk", "format `vmdk`"),
        ("locked.qcow2", "qcow2", "encryption"),
    ];
    for (n, (backing, format, why)) in cases.into_iter().enumerate() {
        let top = d.join(format!("top{n}.qcow2"));
        let args = [
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", format,
        ];
        qemu_img(&[&args[..], &[s(&top), "1M"]].concat());
        let Err(e) = guest().disk(&top).start() else {
            panic!("a guest started over the backing file {backing}");
        };
        let msg = e.to_string();
        let file = if n == 0 { "top0.qcow2" } else { backing };
        assert!(msg.contains(why) && msg.contains(file), "{backing}: {msg}");
    }
}
