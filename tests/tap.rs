//! The guest on its own IP address: each test creates a network namespace, runs itself
//! again inside it (`ip netns exec`), and there boots a guest on a tap device with a static
//! address, reaches `/metrics` and the NBD export on that address, summarises the metrics
//! like `qcow-metal scrape`, and has a real Prometheus scrape the guest's address. A guest
//! with `--ip dhcp` takes its address from dnsmasq (Debian's dnsmasq-base) on the tap.
//!
//! Creating a namespace needs root (CI runs as root): without it the tests fail, saying so.
//! The namespace, and every process left in it, is removed when a test ends, failed or not.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

use qcow_metal::config::IpConfig;
use qcow_metal::metrics::Format;
use qcow_metal::metrics::parse::parse;
use qcow_metal_e2e::{
    BOOT_TIMEOUT, Guest, ScratchDir, guest, in_namespace, ip, nbd_client_at, qemu_io, require_tool,
    run_tool_output, shut_down_cleanly, spawn_prometheus,
};
use qcow_metal_runner::net::NetMode;
use qcow_metal_runner::scrape::{self, Health, Url};
use serde_json::Value;

/// The tap the test makes itself, and the addresses on it.
const READY_TAP: &str = "qmtap0";
const HOST: &str = "10.213.0.1/24";
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);

/// GET `url`; status and body.
fn http_get(url: &str) -> (u16, String) {
    let url = Url::parse(url).unwrap();
    scrape::get(&url).unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// A real Prometheus inside the namespace; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: ScratchDir,
}

impl Prometheus {
    /// Scraping `target` every second.
    fn start(target: &str) -> Prometheus {
        Prometheus::with_config(&format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
             scrape_configs:\n  - job_name: qcow-metal\n    static_configs:\n      \
             - targets: [\"{target}\"]\n"
        ))
    }

    /// With this configuration.
    fn with_config(text: &str) -> Prometheus {
        let dir = ScratchDir::new("tap-prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, text).unwrap();
        let port = qcow_metal_runner::ports::pick_free().unwrap();
        let child = spawn_prometheus(&config, dir.path(), port);
        Prometheus { child, port, dir }
    }

    fn api(&self, path: &str) -> Option<Value> {
        let url = Url::parse(&format!("http://127.0.0.1:{}{path}", self.port)).ok()?;
        let (code, body) = scrape::get(&url).ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// Polls `path` until `done` accepts the answer.
    fn wait_for(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < BOOT_TIMEOUT {
            last = self.api(path);
            if let Some(v) = &last
                && done(v)
            {
                return v.clone();
            }
            thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "Prometheus never showed {what} ({path}); last answer: {last:?}\nlog:\n{}",
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the guest's banner, then for `/metrics` to answer on the guest's address.
fn wait_until_serving(guest: &mut Guest) {
    guest
        .wait_for_banner(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("boot: {e}"));
    guest
        .wait_for_metrics(BOOT_TIMEOUT, || false)
        .unwrap_or_else(|e| panic!("/metrics on the guest's address: {e}"));
}

#[test]
fn prometheus_scrapes_the_guest_on_its_own_ip() {
    in_namespace("prometheus_scrapes_the_guest_on_its_own_ip", || {
        // A ready-made tap with the host's address: the runner only attaches to it.
        ip(&["tuntap", "add", "dev", READY_TAP, "mode", "tap"]);
        ip(&["addr", "add", HOST, "dev", READY_TAP]);
        ip(&["link", "set", READY_TAP, "up"]);
        let mut guest = guest()
            .tap(READY_TAP)
            .guest_ip(IpConfig::Static {
                addr: GUEST,
                prefix_len: 24,
            })
            .start()
            .unwrap_or_else(|e| panic!("starting the guest on {READY_TAP}: {e}"));
        let tap = guest.tap().expect("the guest is on a tap");
        assert!(!tap.created(), "a ready-made tap is attached, not created");
        assert!(
            guest
                .kernel_cmdline()
                .contains("ip=10.213.0.2/24 gw=10.213.0.1"),
            "{}",
            guest.kernel_cmdline()
        );
        wait_until_serving(&mut guest);
        let metrics_url = guest.metrics_url();
        assert_eq!(metrics_url, "http://10.213.0.2:9090/metrics");
        assert_eq!(guest.nbd_url(), "nbd://10.213.0.2:10809/disk");
        assert!(
            guest.serial_log().contains("static address 10.213.0.2/24"),
            "{}",
            guest.tail()
        );

        // curl, as a user would, on the guest's own address.
        let curl = run_tool_output("curl", "curl", &["-sfS", "--max-time", "30", &metrics_url]);
        assert!(curl.success, "curl {metrics_url}: {}", curl.stderr);
        let exp = parse(&curl.stdout, Format::Text).expect("the guest's exposition parses");
        assert_eq!(
            exp.value("qcow_metal_disk_up", &[("disk", "disk")]),
            Some(1.0)
        );

        // An NBD write on the guest's address, seen between two scrapes.
        let url = Url::parse(&metrics_url).unwrap();
        let before = scrape::scrape(&url).unwrap();
        qemu_io(
            &guest.nbd_url(),
            &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M", "flush"],
        );
        let after = scrape::scrape(&url).unwrap();
        let s = scrape::summarize(&before, &after, 1.0);
        assert!(s.guest_clock, "the guest's clock times the interval");
        let disk = &s.disks[0];
        assert_eq!(disk.up, Some(true));
        let rate = |op: &str| disk.rates.iter().find(|r| r.op == op).unwrap().clone();
        let written = rate("write").bytes.unwrap() * s.interval;
        assert!(
            (written - 1048576.0).abs() < 1.0,
            "{written} bytes written\n{s}"
        );
        let read = rate("read").bytes.unwrap() * s.interval;
        assert!((read - 1048576.0).abs() < 1.0, "{read} bytes read\n{s}");
        assert!(
            disk.space.iter().any(|&(n, v)| n == "data" && v >= 1 << 20),
            "{s}"
        );
        assert!(s.errors.iter().all(|&(_, total, _)| total == 0), "{s}");

        // The scrape command's own path: two scrapes and /healthz.
        let s = scrape::run(&url, Duration::from_millis(500)).unwrap();
        assert_eq!(s.health, Health::Ok("ok".into()), "{s}");
        let text = s.to_string();
        for want in [
            "qcow-metal 0.1.0 at http://10.213.0.2:9090/metrics",
            "health:  ok",
            "disk: up (image open)",
            "(guest clock)",
            "space of the disk: virtual 64 MiB, data 1 MiB",
            ", host file ",
            "errors since boot: disk 0, device 0, NBD 0",
        ] {
            assert!(text.contains(want), "missing `{want}` in\n{text}");
        }

        // A real Prometheus, in the same namespace, scraping the guest's address.
        let prom = Prometheus::start("10.213.0.2:9090");
        prom.wait_for("/api/v1/targets", "the guest's target up", |v| {
            v["data"]["activeTargets"].as_array().is_some_and(|t| {
                t.len() == 1
                    && t[0]["health"] == "up"
                    && t[0]["scrapeUrl"] == "http://10.213.0.2:9090/metrics"
            })
        });
        let up = prom.wait_for(
            "/api/v1/query?query=up%7Binstance%3D%2210.213.0.2%3A9090%22%7D",
            "up = 1",
            |v| v["data"]["result"][0]["value"][1] == "1",
        );
        assert_eq!(up["data"]["result"].as_array().map(Vec::len), Some(1));
        prom.wait_for(
            "/api/v1/query?query=qcow_metal_disk_data_bytes",
            "the guest's data bytes",
            |v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .is_some_and(|b| b >= 1048576.0)
            },
        );
        drop(prom);

        shut_down_cleanly(&mut guest);
        drop(guest);
        assert!(
            Path::new("/sys/class/net").join(READY_TAP).exists(),
            "a ready-made tap stays after the guest"
        );
    });
}

#[test]
fn the_runner_creates_its_tap_and_removes_it() {
    in_namespace("the_runner_creates_its_tap_and_removes_it", || {
        let default_tap = qcow_metal_runner::net::DEFAULT_TAP;
        assert!(!Path::new("/sys/class/net").join(default_tap).exists());
        // No name, no address: the defaults.
        let mut guest = guest()
            .net(NetMode::Tap)
            .start()
            .unwrap_or_else(|e| panic!("starting the guest on a new tap: {e}"));
        let tap = guest.tap().expect("the guest is on a tap");
        assert!(tap.created() && tap.name() == default_tap);
        let addrs = ip(&["-4", "-o", "addr", "show", "dev", default_tap]);
        assert!(addrs.contains("inet 10.213.0.1/24"), "{addrs}");
        assert!(ip(&["link", "show", default_tap]).contains("UP"));
        wait_until_serving(&mut guest);
        assert_eq!(guest.metrics_url(), "http://10.213.0.2:9090/metrics");
        let (code, body) = http_get("http://10.213.0.2:9090/healthz");
        assert_eq!((code, body.trim()), (200, "ok"));
        let (code, body) = http_get(&guest.metrics_url());
        assert_eq!(code, 200);
        assert!(body.contains("qcow_metal_net_packets_total"), "{body}");

        // doc/prometheus.yml as it is: its tap target is this guest (the defaults).
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../doc/prometheus.yml"
        ))
        .expect("doc/prometheus.yml");
        let prom = Prometheus::with_config(&doc);
        prom.wait_for(
            "/api/v1/targets",
            "doc/prometheus.yml's tap target up",
            |v| {
                v["data"]["activeTargets"].as_array().is_some_and(|t| {
                    t.iter().any(|t| {
                        t["labels"]["network"] == "tap"
                            && t["health"] == "up"
                            && t["scrapeUrl"] == "http://10.213.0.2:9090/metrics"
                    })
                })
            },
        );
        drop(prom);
        shut_down_cleanly(&mut guest);
        drop(guest);
        assert!(
            !Path::new("/sys/class/net").join(default_tap).exists(),
            "the runner removes the tap it created"
        );
    });
}

/// dnsmasq serving DHCP only (no DNS) on `tap`, in the foreground; killed on drop.
struct Dnsmasq {
    child: Child,
    leases: std::path::PathBuf,
    _dir: ScratchDir,
}

impl Dnsmasq {
    /// Hands out 10.213.0.50-60/24 with 10.213.0.1 as the gateway.
    fn start(tap: &str) -> Dnsmasq {
        let program = require_tool("dnsmasq", "dnsmasq-base");
        let dir = ScratchDir::new("dnsmasq");
        let leases = dir.path().join("leases");
        let child = std::process::Command::new(program)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--bind-interfaces",
                // No ping of an address before it is offered (3 s of waiting otherwise).
                "--no-ping",
                "--log-facility=-",
                "--dhcp-range=10.213.0.50,10.213.0.60,255.255.255.0,1h",
                "--dhcp-option=option:router,10.213.0.1",
                &format!("--interface={tap}"),
                &format!("--dhcp-leasefile={}", leases.display()),
                &format!("--pid-file={}", dir.path().join("pid").display()),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting dnsmasq: {e}"));
        Dnsmasq {
            child,
            leases,
            _dir: dir,
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_dhcp_guest_on_a_tap_takes_its_address_from_dnsmasq() {
    in_namespace(
        "a_dhcp_guest_on_a_tap_takes_its_address_from_dnsmasq",
        || {
            ip(&["tuntap", "add", "dev", READY_TAP, "mode", "tap"]);
            ip(&["addr", "add", HOST, "dev", READY_TAP]);
            ip(&["link", "set", READY_TAP, "up"]);
            let dnsmasq = Dnsmasq::start(READY_TAP);
            let mut guest = guest()
                .tap(READY_TAP)
                .guest_ip(IpConfig::Dhcp)
                .start()
                .unwrap_or_else(|e| panic!("starting the guest on {READY_TAP}: {e}"));
            assert!(
                guest.kernel_cmdline().contains("ip=dhcp"),
                "{}",
                guest.kernel_cmdline()
            );
            let banner = guest
                .wait_for_banner(BOOT_TIMEOUT)
                .unwrap_or_else(|e| panic!("boot: {e}"));
            // The runner learns the address from the console's `DHCP lease` line.
            let asked = Instant::now();
            guest
                .wait_for_metrics(BOOT_TIMEOUT, || false)
                .unwrap_or_else(|e| panic!("/metrics on the guest's leased address: {e}"));
            eprintln!(
                "dhcp on a tap: /metrics answered {:?} after the banner (banner at {:?} wall)",
                asked.elapsed(),
                banner.wall
            );
            let addr = guest
                .guest_ip()
                .expect("the runner knows the leased address");
            assert!(
                (50..=60).contains(&addr.octets()[3]) && addr.octets()[..3] == [10, 213, 0],
                "{addr} is not from dnsmasq's range"
            );
            let log = guest.serial_log();
            assert!(
                log.contains(&format!("DHCP lease {addr}/24, gateway 10.213.0.1")),
                "{log}"
            );
            assert_eq!(guest.metrics_url(), format!("http://{addr}:9090/metrics"));
            // dnsmasq's own record of the lease: the guest's MAC address and that address.
            let leases = std::fs::read_to_string(&dnsmasq.leases).unwrap_or_default();
            assert!(
                leases
                    .lines()
                    .any(|l| l.contains(&addr.to_string()) && l.contains("52:54:00:12:34:56")),
                "dnsmasq's leases: {leases}"
            );
            // The NBD export on the leased address.
            let client = nbd_client_at(std::net::SocketAddrV4::new(addr, guest.nbd_port()));
            assert_eq!(client.size(), 64 << 20);
            drop(client);
            shut_down_cleanly(&mut guest);
            drop(dnsmasq);
        },
    );
}
