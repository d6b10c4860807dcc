//! `qcow-metal image convert` and `image resize` as commands, against QEMU's tools: every
//! output passes `qemu-img check` (exit 0) and `qemu-img compare` finds it equal to the
//! source; resize agrees with `qemu-img info`; bad options are errors that name them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{RUNNER, ok, qcow2_overlay, run};

fn ours(args: &[&str]) -> Output {
    Command::new(RUNNER)
        .args(args)
        .output()
        .expect("run qcow-metal")
}

/// Runs qcow-metal and fails unless it succeeds; returns stdout.
fn ours_ok(args: &[&str]) -> String {
    let o = ours(args);
    assert!(
        o.status.success(),
        "qcow-metal {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs qcow-metal, expects it to fail, returns stderr.
fn ours_err(args: &[&str]) -> String {
    let o = ours(args);
    assert!(!o.status.success(), "qcow-metal {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img check` exits 0 (no corruption, no leaks).
fn qemu_check_clean(img: &Path) {
    let o = run("qemu-img", &["check", p(img)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img check {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    ok(
        "qemu-img",
        &["compare", "-f", a_fmt, "-F", b_fmt, p(a), p(b)],
    );
}

/// A 48 MiB qcow2 image from QEMU with data, zeros, a hole, noise (incompressible) and a
/// partly written last cluster.
fn qemu_source(dir: &Path) -> PathBuf {
    let img = dir.join("src.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "48M"]);
    let noise = dir.join("noise");
    let mut bytes = vec![0u8; 2 << 20];
    fastrand::Rng::with_seed(0x1234_5678).fill(&mut bytes);
    std::fs::write(&noise, bytes).unwrap();
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0x12 5000 3000",
            "-c",
            "write -P 0x34 8M 5M",
            "-c",
            "write -z 9M 1M",
            "-c",
            &format!("write -s {} 20M 2M", p(&noise)),
            "-c",
            "write -P 0x56 50331000 648",
            p(&img),
        ],
    );
    img
}

#[test]
fn convert_between_raw_and_qcow2_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_source(dir.path());
    // qcow2 -> raw: sparse, equal.
    let raw = dir.path().join("a.raw");
    ours_ok(&["image", "convert", "-q", "-O", "raw", p(&src), p(&raw)]);
    qemu_compare(&src, "qcow2", &raw, "raw");
    let meta = std::fs::metadata(&raw).unwrap();
    assert_eq!(meta.len(), 48 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "raw output is not sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    // raw -> qcow2 (probed source), small clusters and refcounts.
    let q = dir.path().join("b.qcow2");
    let out = ours_ok(&[
        "image",
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4K,refcount_bits=8",
        p(&raw),
        p(&q),
    ]);
    assert!(out.contains("converted"), "{out}");
    qemu_check_clean(&q);
    qemu_compare(&q, "qcow2", &src, "qcow2");
    let info = ok("qemu-img", &["info", p(&q)]);
    assert!(info.contains("cluster_size: 4096"), "{info}");
    // qcow2 -> qcow2 with -f given.
    let q2 = dir.path().join("c.qcow2");
    ours_ok(&[
        "image",
        "convert",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        p(&q),
        p(&q2),
    ]);
    qemu_check_clean(&q2);
    qemu_compare(&q2, "qcow2", &raw, "raw");
}

fn compressed(kind: &str, cluster: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_source(dir.path());
    let out = dir.path().join("c.qcow2");
    let o = format!("compression_type={kind},cluster_size={cluster}");
    let text = ours_ok(&[
        "image",
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &o,
        p(&src),
        p(&out),
    ]);
    assert!(text.contains(&format!("{kind}-compressed")), "{text}");
    qemu_check_clean(&out);
    qemu_compare(&out, "qcow2", &src, "qcow2");
    let info = ok("qemu-img", &["info", "--output=json", p(&out)]);
    assert!(
        info.contains(&format!("\"compression-type\": \"{kind}\"")),
        "{info}"
    );
    let check = ok("qemu-img", &["check", "--output=json", p(&out)]);
    assert!(
        !check.contains("\"compressed-clusters\": 0,") && check.contains("compressed-clusters"),
        "no compressed clusters: {check}"
    );
    // Smaller than the uncompressed data (about 8 MiB, 2 MiB of it noise).
    let len = std::fs::metadata(&out).unwrap().len();
    assert!(len < 5 << 20, "compressed output is {len} bytes");
    let ours_info = ours_ok(&["image", "info", p(&out)]);
    assert!(
        ours_info.contains(&format!("compression type:       {kind}")),
        "{ours_info}"
    );
    // QEMU's own reading of our clusters agrees with ours.
    let back = dir.path().join("back.raw");
    ours_ok(&["image", "convert", "-q", "-O", "raw", p(&out), p(&back)]);
    qemu_compare(&out, "qcow2", &back, "raw");
}

#[test]
fn convert_compressed_zlib() {
    compressed("zlib", "64K");
}

#[test]
fn convert_compressed_zstd() {
    compressed("zstd", "64K");
}

#[test]
fn convert_compressed_zstd_small_clusters() {
    compressed("zstd", "4K");
}

#[test]
fn convert_reads_qemu_zstd_images() {
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_source(dir.path());
    let z = dir.path().join("z.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            p(&src),
            p(&z),
        ],
    );
    let raw = dir.path().join("z.raw");
    ours_ok(&["image", "convert", "-q", "-O", "raw", p(&z), p(&raw)]);
    qemu_compare(&src, "qcow2", &raw, "raw");
}

#[test]
fn convert_reads_through_a_backing_chain() {
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_source(dir.path());
    // A compressed base, an overlay with writes of its own.
    let base = dir.path().join("base.qcow2");
    ok(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", p(&src), p(&base)],
    );
    let top = dir.path().join("top.qcow2");
    qcow2_overlay(&top, "base.qcow2", "qcow2");
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xee 8M 64K",
            "-c",
            "write -z 0 64K",
            p(&top),
        ],
    );
    let out = dir.path().join("flat.qcow2");
    ours_ok(&["image", "convert", "-q", "-O", "qcow2", p(&top), p(&out)]);
    qemu_check_clean(&out);
    qemu_compare(&out, "qcow2", &top, "qcow2");
    let info = ok("qemu-img", &["info", p(&out)]);
    assert!(!info.contains("backing file"), "{info}");
}

#[test]
fn convert_errors_name_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_source(dir.path());
    let dst = dir.path().join("x.qcow2");
    let cases: [(&[&str], &str); 6] = [
        (&["-O", "qcow2", "-o", "cluster_size=3000"], "cluster_size"),
        (
            &["-O", "qcow2", "-o", "compression_type=lz4"],
            "compression_type",
        ),
        (&["-O", "qcow2", "-o", "bogus=1"], "bogus"),
        (&["-O", "raw", "-o", "cluster_size=64K"], "cluster_size"),
        (&["-c", "-O", "raw"], "-c"),
        (&["-O", "vmdk"], "vmdk"),
    ];
    for (args, name) in cases {
        let mut all = vec!["image", "convert"];
        all.extend_from_slice(args);
        all.push(p(&src));
        all.push(p(&dst));
        let err = ours_err(&all);
        assert!(err.contains(name), "{args:?}: {err}");
    }
    // Converting onto the source is refused, and the source is untouched.
    let err = ours_err(&["image", "convert", "-O", "qcow2", p(&src), p(&src)]);
    assert!(err.contains("source"), "{err}");
    qemu_check_clean(&src);
    // A missing source names the file.
    let missing = dir.path().join("missing.qcow2");
    let err = ours_err(&["image", "convert", p(&missing), p(&dst)]);
    assert!(err.contains("missing.qcow2"), "{err}");
}

/// The virtual size `qemu-img info` reports.
fn qemu_virtual_size(img: &Path) -> u64 {
    let info = ok("qemu-img", &["info", "--output=json", p(img)]);
    let at = info.find("\"virtual-size\":").expect("virtual-size") + 15;
    info[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn resize_grows_and_shrinks_as_qemu_img_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_source(dir.path());
    let model = dir.path().join("model.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&model)]);
    // Grow by a relative size.
    ours_ok(&["image", "resize", p(&img), "+1G"]);
    assert_eq!(qemu_virtual_size(&img), (48 << 20) + (1 << 30));
    qemu_check_clean(&img);
    // Shrinking needs --shrink.
    let err = ours_err(&["image", "resize", p(&img), "10M"]);
    assert!(err.contains("--shrink"), "{err}");
    // Shrink into the middle of a cluster (8 MiB + 5000 bytes, rounded to 512).
    let new = (8 << 20) + 5120;
    ours_ok(&["image", "resize", "--shrink", p(&img), &new.to_string()]);
    assert_eq!(qemu_virtual_size(&img), new);
    qemu_check_clean(&img);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap();
    f.set_len(new).unwrap();
    qemu_compare(&img, "qcow2", &model, "raw");
    // The file was cut to the image's end (the data past 8 MiB is gone).
    let len = std::fs::metadata(&img).unwrap().len();
    assert!(len < 4 << 20, "file still {len} bytes");
    // Growing again shows zeros past the old end, as the model does.
    ours_ok(&["image", "resize", p(&img), "32M"]);
    f.set_len(32 << 20).unwrap();
    qemu_check_clean(&img);
    qemu_compare(&img, "qcow2", &model, "raw");
    // Raw images: plain file length, shrink needs the flag too.
    let err = ours_err(&["image", "resize", "-f", "raw", p(&model), "-1M"]);
    assert!(err.contains("--shrink"), "{err}");
    ours_ok(&["image", "resize", "--shrink", p(&model), "-1M"]);
    assert_eq!(std::fs::metadata(&model).unwrap().len(), 31 << 20);
    // A bad size names itself.
    let err = ours_err(&["image", "resize", p(&img), "+12Q"]);
    assert!(err.contains("12Q"), "{err}");
}
