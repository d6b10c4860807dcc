//! `qcow-metal serve` against real peers: qemu-io, qemu-img convert/compare over `nbd://`,
//! nbdinfo --list/--map, nbdcopy, several clients at once, promtool on `/metrics`; SIGINT
//! and SIGTERM leave `qemu-img check` clean, the dirty bit cleared and every write there.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use qcow_metal::nbd::client::Client;
use qcow_metal::nbd::proto::{CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};

mod common;
use common::{RUNNER, Runner, ok, qcow2_overlay, qcow2_to_raw, run};

/// How long the server may take to come up or to stop (guards against hangs only).
const WAIT: Duration = Duration::from_secs(60);

/// A `qemu-img create`d qcow2 image of `size`.
fn qcow2(dir: &Path, name: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), size],
    );
    p
}

/// `qcow-metal serve IMAGE` on free ports; returns it with its NBD URI and metrics URL.
fn serve(image: &Path, extra: &[&str]) -> (Runner, String, String) {
    let mut cmd = Command::new(RUNNER);
    cmd.args(["serve", image.to_str().unwrap()])
        .args(["--nbd-port", "0", "--metrics-port", "0"])
        .args(extra);
    let mut r = Runner::spawn(cmd);
    r.wait_for("press Ctrl-C", WAIT);
    let err = r.stderr();
    let field = |prefix: &str| {
        err.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line:\n{err}"))
            .trim()
            .to_string()
    };
    let nbd = field("qcow-metal: NBD:");
    let metrics = field("qcow-metal: metrics:");
    (r, nbd, metrics)
}

/// Sends `signal` (INT or TERM) to the server, waits for it, and checks it exited 0 having
/// closed the image clean.
fn stop(mut r: Runner, signal: &str) -> String {
    let pid = r.child.id().to_string();
    ok("kill", &[&format!("-{signal}"), &pid]);
    let status = r.wait_exit(WAIT);
    let err = r.stderr();
    assert!(
        status.success(),
        "serve exited {status} on SIG{signal}:\n{err}"
    );
    assert!(err.contains("closed clean"), "{err}");
    err
}

/// `qemu-img check` finds nothing, and the header's dirty bit is clear.
fn assert_clean(image: &Path) {
    let o = run(
        "qemu-img",
        &["check", "-f", "qcow2", image.to_str().unwrap()],
    );
    assert!(
        o.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let header = std::fs::read(image).unwrap();
    let incompatible = u64::from_be_bytes(header[72..80].try_into().unwrap());
    assert_eq!(incompatible & 1, 0, "the dirty bit is still set");
}

/// GET `path` on the metrics server; returns the body.
fn http_get(url: &str, path: &str) -> String {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut s = TcpStream::connect(&host).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

fn promtool_check(body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install the Debian package prometheus")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The value of the one series of `name` in a text exposition.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0; len];
    fastrand::Rng::with_seed(seed).fill(&mut data);
    data
}

#[test]
fn qemus_tools_and_nbd_tools_work_against_serve() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "64M");
    let (r, uri, metrics) = serve(&image, &[]);

    // Listing: the export, its size, base:allocation.
    let list = ok("nbdinfo", &["--list", &uri]);
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("export-size: 67108864"), "{list}");
    assert!(list.contains("base:allocation"), "{list}");

    // qemu-io writes and reads back a pattern.
    let io = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 2M",
            "-c",
            "read -P 0x5a 1M 2M",
            "-c",
            "flush",
            &uri,
        ],
    );
    assert!(io.contains("read 2097152/2097152"), "{io}");

    // qemu-img convert a raw file into the export and compare.
    let raw = dir.path().join("data.raw");
    let mut data = pseudo_random(8 << 20, 7);
    data[..64 << 10].fill(0); // a zero run at the start
    std::fs::write(&raw, &data).unwrap();
    let raw_s = raw.to_str().unwrap();
    ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", raw_s, &uri],
    );
    let cmp = ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", raw_s, &uri],
    );
    assert!(cmp.contains("identical"), "{cmp}");

    // nbdinfo --map: data at the start, a hole past the written 8 MiB.
    let map = ok("nbdinfo", &["--map", &uri]);
    assert!(
        map.lines().any(|l| l.contains("data")),
        "no data extent:\n{map}"
    );
    let last = map.lines().last().unwrap();
    assert!(last.contains("hole"), "the tail is not a hole:\n{map}");

    // nbdcopy the whole export out; it holds what was converted in.
    let copy = dir.path().join("copy.raw");
    ok("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    let copied = std::fs::read(&copy).unwrap();
    assert_eq!(copied.len(), 64 << 20);
    assert!(copied[..data.len()] == data[..], "nbdcopy read other data");

    // Four qemu-io clients at once, each writing and verifying its own 4 MiB.
    let clients: Vec<_> = (0..4u32)
        .map(|i| {
            let uri = uri.clone();
            thread::spawn(move || {
                let off = format!("{}M", 16 + 4 * i);
                let pattern = format!("0x{:x}", 0x10 + i);
                ok(
                    "qemu-io",
                    &[
                        "-f",
                        "raw",
                        "-c",
                        &format!("write -P {pattern} {off} 4M"),
                        "-c",
                        &format!("read -P {pattern} {off} 4M"),
                        &uri,
                    ],
                )
            })
        })
        .collect();
    for c in clients {
        let out = c.join().unwrap();
        assert!(out.contains("read 4194304/4194304"), "{out}");
    }

    // /metrics: valid for promtool, and it counted the clients.
    let body = http_get(&metrics, "/metrics");
    promtool_check(&body);
    assert!(
        metric(&body, "qcow_metal_nbd_sessions_total") >= 8.0,
        "{body}"
    );
    assert_eq!(metric(&body, "qcow_metal_disk_up"), 1.0);
    assert!(http_get(&metrics, "/healthz").starts_with("ok"));

    stop(r, "INT");
    assert_clean(&image);
    // Durable: what the clients wrote is in the image file after the server is gone.
    let after = dir.path().join("after.raw");
    qcow2_to_raw(&image, &after);
    let after = std::fs::read(&after).unwrap();
    assert!(after[..data.len()] == data[..], "converted data lost");
    for i in 0..4u8 {
        let at = (16 + 4 * i as usize) << 20;
        assert!(
            after[at..at + (4 << 20)].iter().all(|&b| b == 0x10 + i),
            "client {i}'s data lost"
        );
    }
}

/// The host address of an `nbd://` URI.
fn nbd_addr(uri: &str) -> String {
    uri.trim_start_matches("nbd://")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// Clients that share the image's 4 KiB slots round-robin (so they share every cluster).
const SHARERS: u64 = 6;
/// The shared area: the first 8 MiB.
const SHARED_AREA: u64 = 8 << 20;

/// Client `me` of [`SHARERS`]: `rounds` bursts of 32 pipelined requests on distinct slots of
/// its own (writes, reads checked against its model, write-zeroes), then a flush. Returns
/// its model: the byte each of its slots holds (0: zeros).
fn sharer(addr: &str, me: u64, rounds: usize) -> Vec<(u64, u8)> {
    const SLOT: u64 = 4096;
    let slots: Vec<u64> = (0..SHARED_AREA / SLOT)
        .filter(|s| s % SHARERS == me)
        .collect();
    let mut model = vec![0u8; slots.len()];
    let mut rng = fastrand::Rng::with_seed(me);
    let mut c = Client::connect(addr, "disk").unwrap();
    let mut buf = Vec::new();
    for round in 0..rounds {
        let mut picked: Vec<usize> = (0..slots.len()).collect();
        rng.shuffle(&mut picked);
        picked.truncate(32);
        // handle -> (slot index, what a read must see; None for writes and zeroes)
        let mut expect = std::collections::HashMap::new();
        let mut after = Vec::new();
        for &i in &picked {
            let off = slots[i] * SLOT;
            let h = match rng.u8(..20) {
                0..=12 => {
                    let v = (round as u8).wrapping_mul(31) ^ (i as u8) | 1;
                    after.push((i, v));
                    c.send(CMD_WRITE, 0, off, SLOT as u32, &vec![v; SLOT as usize])
                }
                13..=18 => {
                    let h = c.send(CMD_READ, 0, off, SLOT as u32, &[]);
                    expect.insert(*h.as_ref().unwrap(), model[i]);
                    h
                }
                _ => {
                    after.push((i, 0));
                    c.send(CMD_WRITE_ZEROES, 0, off, SLOT as u32, &[])
                }
            }
            .unwrap();
            let _ = h;
        }
        for _ in 0..picked.len() {
            let r = c.recv(&mut buf).unwrap();
            assert_eq!(r.error, 0, "client {me}: request {} failed", r.handle);
            if let Some(&want) = expect.get(&r.handle) {
                assert!(
                    buf.iter().all(|&b| b == want),
                    "client {me} round {round}: read {:x?}.. where it wrote {want:#x}",
                    &buf[..8]
                );
            }
        }
        for (i, v) in after {
            model[i] = v;
        }
    }
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect().unwrap();
    slots
        .iter()
        .zip(model)
        .map(|(&s, v)| (s * SLOT, v))
        .collect()
}

/// A client that races others on the same clusters of `[at, at + len)`: pipelined 4 KiB
/// overwrites from one, whole-cluster trims, write-zeroes and writes from the other (`me`
/// 0 or 1). Nothing about the data is checked (the clients race); the image must stay
/// consistent.
fn racer(addr: &str, me: u64, at: u64, len: u64, rounds: usize) {
    const CLUSTER: u64 = 64 << 10;
    let mut rng = fastrand::Rng::with_seed(100 + me);
    let mut c = Client::connect(addr, "disk").unwrap();
    let mut buf = Vec::new();
    for _ in 0..rounds {
        for _ in 0..32 {
            let cluster = at + rng.u64(..len / CLUSTER) * CLUSTER;
            if me == 0 {
                let off = cluster + rng.u64(..16) * 4096;
                c.send(CMD_WRITE, 0, off, 4096, &[0xa5; 4096]).unwrap();
            } else {
                match rng.u8(..4) {
                    0 => c.send(CMD_TRIM, 0, cluster, CLUSTER as u32, &[]),
                    1 => c.send(CMD_WRITE_ZEROES, 0, cluster, CLUSTER as u32, &[]),
                    2 => c.send(CMD_FLUSH, 0, 0, 0, &[]),
                    _ => c.send(
                        CMD_WRITE,
                        0,
                        cluster,
                        CLUSTER as u32,
                        &[0x5a; CLUSTER as usize],
                    ),
                }
                .unwrap();
            }
        }
        for _ in 0..32 {
            assert_eq!(c.recv(&mut buf).unwrap().error, 0, "racer {me}");
        }
    }
    c.disconnect().unwrap();
}

#[test]
fn concurrent_pipelined_clients_keep_their_data_and_the_image_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "16M");
    let (r, uri, metrics) = serve(&image, &[]);
    let addr = nbd_addr(&uri);
    let sharers: Vec<_> = (0..SHARERS)
        .map(|me| {
            let addr = addr.clone();
            thread::spawn(move || sharer(&addr, me, 40))
        })
        .collect();
    // Two racers on the other half: trims and zeroes free clusters while 4 KiB overwrites
    // of the same clusters are in flight.
    let racers: Vec<_> = (0..2)
        .map(|me| {
            let addr = addr.clone();
            thread::spawn(move || racer(&addr, me, SHARED_AREA, 8 << 20, 40))
        })
        .collect();
    let models: Vec<_> = sharers.into_iter().map(|t| t.join().unwrap()).collect();
    for t in racers {
        t.join().unwrap();
    }
    // Batches did go through the pool (the device counted the pieces).
    let body = http_get(&metrics, "/metrics");
    assert!(
        metric(&body, "qcow_metal_nbd_sessions_total") >= 8.0,
        "{body}"
    );
    stop(r, "INT");
    assert_clean(&image);
    let raw = dir.path().join("after.raw");
    qcow2_to_raw(&image, &raw);
    let after = std::fs::read(&raw).unwrap();
    for (me, model) in models.iter().enumerate() {
        for &(off, v) in model {
            let got = &after[off as usize..off as usize + 4096];
            assert!(
                got.iter().all(|&b| b == v),
                "client {me}'s slot at {off:#x}: {:x?}.. instead of {v:#x}",
                &got[..8]
            );
        }
    }
}

#[test]
fn sigterm_with_a_client_connected_drains_and_closes_clean() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "32M");
    let (r, uri, _) = serve(&image, &[]);
    let addr = nbd_addr(&uri);
    // A client writes without flushing and stays connected, silent.
    let mut client = Client::connect(&addr, "disk").unwrap();
    let data = pseudo_random(1 << 20, 3);
    assert_eq!(client.write(5 << 20, &data, false).unwrap(), 0);
    // A second server on the same image is refused by the disk lock.
    let o = Command::new(RUNNER)
        .args(["serve", image.to_str().unwrap()])
        .args(["--nbd-port", "0", "--metrics-port", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("lock"), "{err}");

    let err = stop(r, "TERM");
    assert!(err.contains("closed 1 NBD connection"), "{err}");
    drop(client);
    assert_clean(&image);
    let after = dir.path().join("after.raw");
    qcow2_to_raw(&image, &after);
    let after = std::fs::read(&after).unwrap();
    assert!(
        after[5 << 20..6 << 20] == data[..],
        "an unflushed write was lost at close"
    );
}

#[test]
fn read_only_and_bad_images_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "16M");
    let (r, uri, _) = serve(&image, &["--read-only", "--export", "ro"]);
    assert!(uri.ends_with("/ro"), "{uri}");
    let info = ok("nbdinfo", &[&uri]);
    assert!(info.contains("is_read_only: true"), "{info}");
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 64k", &uri]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !out.contains("wrote 65536"),
        "a read-only export took a write: {out}"
    );
    stop(r, "INT");
    assert_clean(&image);

    // `--format qcow2` on a file without the magic, and a qcow2 image whose magic is
    // damaged under `--format auto`, are refused with what to do instead.
    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, vec![1u8; 1 << 20]).unwrap();
    let refused = |path: &Path, extra: &[&str]| {
        let o = Command::new(RUNNER)
            .args(["serve", path.to_str().unwrap()])
            .args(["--nbd-port", "0", "--metrics-port", "0"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = refused(&raw, &["--format", "qcow2"]);
    assert!(err.contains("qcow2 magic"), "{err}");
    let mut damaged = std::fs::read(&image).unwrap();
    damaged[0] = b'X';
    let damaged_path = dir.path().join("damaged.qcow2");
    std::fs::write(&damaged_path, damaged).unwrap();
    let err = refused(&damaged_path, &[]);
    assert!(err.contains("damaged magic"), "{err}");
}

#[test]
fn a_raw_file_is_served_at_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    let data = pseudo_random(3 << 20, 11);
    std::fs::write(&raw, &data).unwrap();
    let (r, uri, _) = serve(&raw, &[]);
    let info = ok("nbdinfo", &[&uri]);
    assert!(info.contains("export-size: 3145728"), "{info}");
    let cmp = ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            raw.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    let io = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 1M 68k",
            "-c",
            "flush",
            &uri,
        ],
    );
    assert!(io.contains("wrote 69632/69632"), "{io}");
    // Past the end: refused, and the file does not grow.
    let o = run("qemu-io", &["-f", "raw", "-c", "write 3M 4k", &uri]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(!out.contains("wrote 4096"), "a write past the end: {out}");
    let mut r = r;
    let pid = r.child.id().to_string();
    ok("kill", &["-INT", &pid]);
    assert!(r.wait_exit(WAIT).success(), "{}", r.stderr());
    let after = std::fs::read(&raw).unwrap();
    assert_eq!(after.len(), data.len());
    let mut want = data;
    want[1 << 20..(1 << 20) + (68 << 10)].fill(0x77);
    assert!(after == want, "the raw file does not hold what was written");
}

#[test]
fn an_overlay_is_served_over_its_backing_chain() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    // raw base <- qcow2 middle (4 MiB of its own) <- qcow2 top (1 MiB of its own).
    let base = p("base.raw");
    std::fs::write(&base, pseudo_random(16 << 20, 21)).unwrap();
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    qcow2_overlay(&p("mid.qcow2"), "base.raw", "raw");
    ok(
        "qemu-io",
        &["-c", "write -P 0x22 4M 4M", &s(&p("mid.qcow2"))],
    );
    qcow2_overlay(&p("top.qcow2"), "mid.qcow2", "qcow2");
    ok(
        "qemu-io",
        &["-c", "write -P 0x33 6M 1M", &s(&p("top.qcow2"))],
    );
    let expected = p("expected.raw");
    qcow2_to_raw(&p("top.qcow2"), &expected);
    let base_before = std::fs::read(&base).unwrap();
    let mid_before = std::fs::read(p("mid.qcow2")).unwrap();

    let (r, uri, metrics) = serve(&p("top.qcow2"), &[]);
    let cmp = ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &s(&expected), &uri],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    let body = http_get(&metrics, "/metrics");
    // The base (depth 2) was read through the chain.
    let base_read: f64 = body
        .lines()
        .find(|l| l.starts_with("qcow_metal_disk_layer_read_bytes") && l.contains("depth=\"2\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no depth 2 in:\n{body}"));
    assert!(base_read > 0.0, "{body}");
    // Writes: a partial cluster over the base (copied up), over the middle, and over the
    // top's own data.
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x44 100k 8k",
            "-c",
            "write -P 0x55 5M 4k",
            "-c",
            "write -P 0x66 7M 64k",
            "-c",
            "flush",
            &uri,
        ],
    );
    stop(r, "INT");
    assert_clean(&p("top.qcow2"));
    let mut want = std::fs::read(&expected).unwrap();
    want[100 << 10..108 << 10].fill(0x44);
    want[5 << 20..(5 << 20) + 4096].fill(0x55);
    want[7 << 20..(7 << 20) + (64 << 10)].fill(0x66);
    let after = p("after.raw");
    qcow2_to_raw(&p("top.qcow2"), &after);
    assert!(
        std::fs::read(&after).unwrap() == want,
        "the overlay reads other data"
    );
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base changed"
    );
    assert!(
        std::fs::read(p("mid.qcow2")).unwrap() == mid_before,
        "the middle layer changed"
    );
}

#[test]
fn nbd_clients_silent_for_nbd_idle_are_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let image = qcow2(dir.path(), "disk.qcow2", "16M");
    let (r, uri, metrics) = serve(&image, &["--nbd-idle", "3"]);
    let addr = nbd_addr(&uri);
    let data = pseudo_random(64 << 10, 9);
    let mut silent = Client::connect(&addr, "disk").unwrap();
    assert_eq!(silent.write(0, &data, false).unwrap(), 0);
    // A client with a request every 250 ms is served all along; the other one, silent for
    // twice the idle time, is disconnected.
    let mut busy = Client::connect(&addr, "disk").unwrap();
    for i in 0..24u64 {
        let mut back = vec![0; 4096];
        assert_eq!(
            busy.read((i % 16) * 4096, &mut back).unwrap(),
            0,
            "read {i}"
        );
        assert!(back[..] == data[(i % 16) as usize * 4096..][..4096]);
        thread::sleep(Duration::from_millis(250));
    }
    assert!(
        silent.flush().is_err(),
        "the silent client is still served after 6 s with --nbd-idle 3"
    );
    let body = http_get(&metrics, "/metrics");
    assert_eq!(metric(&body, "qcow_metal_nbd_connections_active"), 1.0);
    assert_eq!(busy.flush().unwrap(), 0);
    busy.disconnect().unwrap();
    stop(r, "INT");
    assert_clean(&image);
}
