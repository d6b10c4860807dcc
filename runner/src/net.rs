//! The guest's network: QEMU's user-mode network (the guest's ports forwarded to 127.0.0.1),
//! or a tap device on which the guest has its own IPv4 address, and the host side of that
//! tap (created, addressed and removed with iproute2's `ip`).
//!
//! On the user-mode network the runner gives the guest [`USER_GUEST_CIDR`] and the gateway
//! [`USER_GATEWAY`] on its command line: the address QEMU's DHCP would hand out, there before
//! the guest's listeners open, so the first connection after boot is answered at once (a SYN
//! that reached a guest still waiting for its lease was dropped, and QEMU resent it only
//! after about 6 s). `--ip dhcp` (or `ip=dhcp`) asks QEMU's DHCP instead (the guest keeps
//! such a SYN until its lease is applied, so there too the first connection is answered at
//! once: `src/service/net.rs`).
//!
//! On a tap, the guest takes a static address from its `ip=`/`gw=` kernel arguments (or DHCP
//! when `ip=dhcp` and the host offers it). Without one, the runner picks
//! [`DEFAULT_GUEST_CIDR`] (host side [`DEFAULT_HOST_ADDR`]) for a tap it creates, and the
//! address after the host's for a ready-made tap that has one.

use std::fmt;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::str::FromStr;

use qcow_metal::config::{Config, IpConfig};

use crate::error::{Error, Result};
use crate::qemu;

/// The tap device `--net tap` uses when `--tap` names none.
pub const DEFAULT_TAP: &str = "qcow-metal0";

/// The guest's address on a tap the runner creates, when none is given: 10.213.0.2/24.
pub const DEFAULT_GUEST_CIDR: Cidr = Cidr {
    addr: Ipv4Addr::new(10, 213, 0, 2),
    prefix_len: 24,
};

/// The host's address on a tap the runner creates with [`DEFAULT_GUEST_CIDR`]: 10.213.0.1.
pub const DEFAULT_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);

/// The guest's address on QEMU's user-mode network, where QEMU forwards the ports to (and
/// what its DHCP hands out): 10.0.2.15/24.
pub const USER_GUEST_CIDR: Cidr = Cidr {
    addr: Ipv4Addr::new(10, 0, 2, 15),
    prefix_len: 24,
};

/// QEMU's user-mode gateway (forwarded connections come from it): 10.0.2.2.
pub const USER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// Kernel arguments the runner adds on the user-mode network, before the user's own:
/// `ip=10.0.2.15/24 gw=10.0.2.2` ([`USER_GUEST_CIDR`], [`USER_GATEWAY`]); `ip=dhcp` when `ip`
/// asks for DHCP, `ip=` of another static address when `ip` names one (QEMU forwards only to
/// 10.0.2.15). A key that `user_args` (the rest of the command line) sets is left to it.
pub fn user_net_args(ip: Option<IpConfig>, user_args: &str) -> Vec<String> {
    let has_key = |key: &str| {
        user_args
            .split_ascii_whitespace()
            .any(|w| w.split_once('=').is_some_and(|(k, _)| k == key))
    };
    let ip = ip.unwrap_or(IpConfig::Static {
        addr: USER_GUEST_CIDR.addr,
        prefix_len: USER_GUEST_CIDR.prefix_len,
    });
    let mut args = Vec::new();
    if has_key("ip") {
        return args;
    }
    args.push(format!("ip={}", ip_arg(ip)));
    if let IpConfig::Static { addr, prefix_len } = ip
        && !has_key("gw")
        && (Cidr { addr, prefix_len }).contains(USER_GATEWAY)
    {
        args.push(format!("gw={USER_GATEWAY}"));
    }
    args
}

/// Linux limits interface names to 15 bytes.
const IFNAME_MAX: usize = 15;

/// How the guest is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetMode {
    /// QEMU's user-mode network: the guest's ports are forwarded to 127.0.0.1.
    #[default]
    User,
    /// A tap device: the guest has its own address, reachable from the host.
    Tap,
}

impl FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "user" => Ok(NetMode::User),
            "tap" => Ok(NetMode::Tap),
            other => Err(format!("unknown network `{other}` (user or tap)")),
        }
    }
}

impl NetMode {
    /// The option's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            NetMode::User => "user",
            NetMode::Tap => "tap",
        }
    }
}

/// An IPv4 address with its prefix length (`10.213.0.2/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The network prefix length, 0..=32.
    pub prefix_len: u8,
}

impl Cidr {
    fn mask(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n.min(32))),
        }
    }

    /// Whether `ip` is in this address's network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) ^ u32::from(self.addr)) & self.mask() == 0
    }

    /// The lowest host address of the network that is not `self.addr` (for /31 and /32,
    /// where there is no room, the other address or `None`).
    pub fn other_host(&self) -> Option<Ipv4Addr> {
        let net = u32::from(self.addr) & self.mask();
        let last = net | !self.mask();
        let (first, end) = if self.prefix_len >= 31 {
            (net, last)
        } else {
            (net + 1, last - 1)
        };
        (first..=end).map(Ipv4Addr::from).find(|&a| a != self.addr)
    }

    /// The next host address after `self.addr` in its network, else the one before.
    pub fn neighbour(&self) -> Option<Ipv4Addr> {
        let a = u32::from(self.addr);
        let net = a & self.mask();
        let last = net | !self.mask();
        let (first, end) = if self.prefix_len >= 31 {
            (net, last)
        } else {
            (net + 1, last - 1)
        };
        if a < end {
            Some(Ipv4Addr::from(a + 1))
        } else if a > first {
            Some(Ipv4Addr::from(a - 1))
        } else {
            None
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not an IPv4 address with a prefix length (A.B.C.D/len)");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        if prefix_len > 32 {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Parses the `--ip` option: `dhcp` or `A.B.C.D/len`, as the kernel's `ip=` takes it.
pub fn parse_guest_ip(text: &str) -> Result<IpConfig, String> {
    if text == "dhcp" {
        return Ok(IpConfig::Dhcp);
    }
    let cidr: Cidr = text.parse().map_err(|e| format!("{e}, or dhcp"))?;
    Ok(IpConfig::Static {
        addr: cidr.addr,
        prefix_len: cidr.prefix_len,
    })
}

/// The tap device's name as Linux accepts it.
pub fn check_tap_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > IFNAME_MAX
        || name == "."
        || name == ".."
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "`{name}` is not an interface name (1 to {IFNAME_MAX} letters, digits, `-`, `_`, `.`)"
        ));
    }
    Ok(())
}

/// What the guest's network on a tap comes to: the device, how the host side is set up,
/// and the kernel arguments that give the guest its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapPlan {
    /// The tap device.
    pub name: String,
    /// Whether the runner creates it (and removes it at the end); else it exists already.
    pub create: bool,
    /// The host's address on the tap: set by the runner when it creates the tap, read from
    /// the device when it exists.
    pub host: Option<Cidr>,
    /// The guest's address as the kernel command line will give it.
    pub guest: IpConfig,
    /// Kernel arguments the runner adds (`ip=... gw=...`), before the user's own.
    pub kernel_args: Vec<String>,
    /// Notes for the user: what was picked and why.
    pub notes: Vec<String>,
}

impl TapPlan {
    /// Decides the address plan for tap `name`. `existing` is the tap's host address when the
    /// device exists (`Some(None)`: it exists without an IPv4 address; `None`: it does not
    /// exist). `ip` is `--ip`; `user_args` is the rest of the kernel command line, whose
    /// `ip=`/`gw=` win over everything (the last word of a key wins in the guest).
    pub fn new(
        name: &str,
        existing: Option<Option<Cidr>>,
        ip: Option<IpConfig>,
        user_args: &str,
    ) -> Result<TapPlan> {
        check_tap_name(name).map_err(Error::Usage)?;
        let has_key = |key: &str| {
            user_args
                .split_ascii_whitespace()
                .any(|w| w.split_once('=').is_some_and(|(k, _)| k == key))
        };
        let (user_ip, user_gw) = (has_key("ip"), has_key("gw"));
        let parsed = Config::parse(user_args)
            .map_err(|e| Error::Usage(e.to_string()))?
            .0;
        let mut notes = Vec::new();
        let mut kernel_args = Vec::new();
        let create = existing.is_none();
        let existing_host = existing.flatten();

        let guest = match (user_ip, ip) {
            (true, _) => parsed.ip,
            (false, Some(ip)) => ip,
            (false, None) => match existing_host.and_then(|h| h.neighbour().map(|n| (h, n))) {
                Some((host, addr)) => {
                    notes.push(format!(
                        "the guest takes {addr}/{} next to the host's {host} on {name} \
                         (--ip picks another)",
                        host.prefix_len
                    ));
                    IpConfig::Static {
                        addr,
                        prefix_len: host.prefix_len,
                    }
                }
                None => {
                    notes.push(format!(
                        "the guest takes the default address {DEFAULT_GUEST_CIDR} on {name} \
                         (--ip picks another)"
                    ));
                    IpConfig::Static {
                        addr: DEFAULT_GUEST_CIDR.addr,
                        prefix_len: DEFAULT_GUEST_CIDR.prefix_len,
                    }
                }
            },
        };
        if !user_ip {
            kernel_args.push(format!("ip={}", ip_arg(guest)));
        }
        let user_gateway = parsed.gw.filter(|_| user_gw);

        let host = match (existing, guest) {
            (Some(h), _) => h,
            (None, IpConfig::Dhcp) => {
                return Err(Error::Usage(format!(
                    "the guest asks for DHCP (ip=dhcp), but the tap {name} does not exist and \
                     one created by the runner has no DHCP server: give the guest an address \
                     with --ip A.B.C.D/len, or attach it to a tap (or bridge) that has a DHCP \
                     server with --tap NAME"
                )));
            }
            (None, IpConfig::Static { addr, prefix_len }) => {
                let guest_cidr = Cidr { addr, prefix_len };
                let host_addr = match user_gateway {
                    Some(gw) if guest_cidr.contains(gw) && gw != addr => gw,
                    _ => guest_cidr.other_host().ok_or_else(|| {
                        Error::Usage(format!(
                            "the guest's address {guest_cidr} leaves no room for the host's \
                             address on the tap: use a shorter prefix (e.g. /24)"
                        ))
                    })?,
                };
                Some(Cidr {
                    addr: host_addr,
                    prefix_len,
                })
            }
        };
        // The host is the guest's gateway, unless the user named one.
        if !user_gw
            && let (Some(h), IpConfig::Static { addr, prefix_len }) = (host, guest)
            && (Cidr { addr, prefix_len }).contains(h.addr)
            && h.addr != addr
        {
            kernel_args.push(format!("gw={}", h.addr));
        }
        if let (Some(None), IpConfig::Static { addr, prefix_len }) = (existing, guest) {
            let suggestion = Cidr { addr, prefix_len }
                .other_host()
                .map(|h| format!("{h}/{prefix_len}"))
                .unwrap_or_else(|| "HOST/LEN".into());
            notes.push(format!(
                "warning: the tap {name} has no IPv4 address on the host, so the host cannot \
                 reach the guest; as root: ip addr add {suggestion} dev {name}"
            ));
        }
        if let (Some(h), IpConfig::Static { addr, prefix_len }) = (host, guest)
            && !(Cidr { addr, prefix_len }).contains(h.addr)
        {
            notes.push(format!(
                "warning: the guest's {addr}/{prefix_len} is not in the network of the host's \
                 {h} on {name}: the host may not reach it"
            ));
        }
        Ok(TapPlan {
            name: name.to_string(),
            create,
            host,
            guest,
            kernel_args,
            notes,
        })
    }

    /// The guest's address, when it is static.
    pub fn guest_addr(&self) -> Option<Ipv4Addr> {
        match self.guest {
            IpConfig::Static { addr, .. } => Some(addr),
            IpConfig::Dhcp => None,
        }
    }

    /// What to run as root to create this tap by hand, for a user called `user`.
    pub fn root_commands(&self, user: &str) -> String {
        let host = self
            .host
            .map(|h| h.to_string())
            .unwrap_or_else(|| format!("{DEFAULT_HOST_ADDR}/24"));
        format!(
            "sudo ip tuntap add dev {n} mode tap user {user}\n    \
             sudo ip addr add {host} dev {n}\n    \
             sudo ip link set {n} up",
            n = self.name
        )
    }
}

/// `dhcp` or `A.B.C.D/len`, as `ip=` takes it.
pub fn ip_arg(ip: IpConfig) -> String {
    match ip {
        IpConfig::Dhcp => "dhcp".into(),
        IpConfig::Static { addr, prefix_len } => format!("{addr}/{prefix_len}"),
    }
}

/// The `ip` program of iproute2.
fn ip_program() -> Result<std::path::PathBuf> {
    qemu::find_program("ip").ok_or_else(|| {
        Error::Network(
            "`ip` was not found on PATH: install the Debian package iproute2 \
             (tap networking sets up the host side with it)"
                .into(),
        )
    })
}

/// Runs `ip ARGS`; its stdout, or its stderr as the error.
fn run_ip(args: &[&str]) -> Result<std::result::Result<String, String>> {
    let out = Command::new(ip_program()?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("running `ip`", e))?;
    if out.status.success() {
        Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// Whether the network interface `name` exists, and its first IPv4 address on the host.
/// An interface that exists and is not a tap (an Ethernet card, a bridge, a tun) is an error.
pub fn probe_tap(name: &str) -> Result<Option<Option<Cidr>>> {
    let dir = std::path::Path::new("/sys/class/net").join(name);
    if !dir.exists() {
        return Ok(None);
    }
    let flags = std::fs::read_to_string(dir.join("tun_flags")).ok();
    if !flags.as_deref().is_some_and(is_tap_flags) {
        return Err(Error::Network(format!(
            "the network interface {name} exists and is not a tap device: pick another name \
             with --tap NAME (the runner creates it), or attach a tap to a bridge yourself"
        )));
    }
    let out = run_ip(&["-4", "-o", "addr", "show", "dev", name])?
        .map_err(|e| Error::Network(format!("reading the addresses of {name}: {e}")))?;
    Ok(Some(first_inet(&out)))
}

/// Whether a `tun_flags` sysfs value (`0x1002`) has IFF_TAP (a tun has IFF_TUN instead).
pub fn is_tap_flags(text: &str) -> bool {
    const IFF_TAP: u32 = 0x0002;
    let t = text.trim();
    u32::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).is_ok_and(|f| f & IFF_TAP != 0)
}

/// The first `inet A.B.C.D/len` of `ip -4 -o addr show` output.
pub fn first_inet(ip_output: &str) -> Option<Cidr> {
    let mut words = ip_output.split_ascii_whitespace();
    while let Some(w) = words.next() {
        if w == "inet" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// A tap device the guest is attached to. One the runner created is removed on drop.
#[derive(Debug)]
pub struct Tap {
    plan: TapPlan,
    created: bool,
}

impl Tap {
    /// Sets up the host side of `plan`: nothing when the tap exists; otherwise
    /// `ip tuntap add`, `ip addr add` and `ip link set up`, undone on failure and on drop.
    /// Without the rights (not root, no CAP_NET_ADMIN), the error says what to run as root.
    pub fn setup(plan: TapPlan) -> Result<Tap> {
        if !plan.create {
            return Ok(Tap {
                plan,
                created: false,
            });
        }
        let name = plan.name.clone();
        if let Err(e) = run_ip(&["tuntap", "add", "dev", &name, "mode", "tap"])? {
            return Err(if is_permission_error(&e) {
                Error::Network(no_rights_message(&plan, &e))
            } else {
                Error::Network(format!("cannot create the tap device {name}: ip: {e}"))
            });
        }
        let tap = Tap {
            plan,
            created: true,
        };
        if let Some(host) = tap.plan.host {
            run_ip(&["addr", "add", &host.to_string(), "dev", &name])?.map_err(|e| {
                Error::Network(format!(
                    "cannot give the tap {name} the address {host}: ip: {e}"
                ))
            })?;
        }
        run_ip(&["link", "set", &name, "up"])?
            .map_err(|e| Error::Network(format!("cannot bring the tap {name} up: ip: {e}")))?;
        Ok(tap)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.plan.name
    }

    /// Whether the runner created the device (and removes it on drop).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The address plan.
    pub fn plan(&self) -> &TapPlan {
        &self.plan
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if self.created {
            let _ = run_ip(&["link", "del", "dev", &self.plan.name]);
        }
    }
}

/// Whether `ip`'s complaint means missing rights.
fn is_permission_error(stderr: &str) -> bool {
    stderr.contains("Operation not permitted") || stderr.contains("Permission denied")
}

/// The user's name, for the commands to run as root.
fn user_name() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "$USER".into())
}

/// What to say when the runner may not create the tap.
pub fn no_rights_message(plan: &TapPlan, why: &str) -> String {
    let ip = match plan.guest {
        IpConfig::Static { addr, prefix_len } => format!(" --ip {addr}/{prefix_len}"),
        IpConfig::Dhcp => String::new(),
    };
    format!(
        "cannot create the tap device {name} ({why}): creating one needs root (CAP_NET_ADMIN). \
         Run the runner as root, or create the tap once as root for your user:\n    {cmds}\n\
         and then run: cargo run -- --tap {name}{ip}",
        name = plan.name,
        cmds = plan.root_commands(&user_name()),
    )
}

/// What to say when QEMU could not open the tap (its stderr is `stderr`), if that is it.
pub fn qemu_tap_error(plan: &TapPlan, stderr: &str) -> Option<String> {
    if !stderr.contains("/dev/net/tun") && !stderr.contains("tap") {
        return None;
    }
    let first = stderr
        .lines()
        .find(|l| l.contains("tun") || l.contains("tap"))?;
    let name = &plan.name;
    if first.contains("could not open /dev/net/tun") && is_permission_error(first) {
        Some(format!(
            "QEMU may not open /dev/net/tun ({}): on this host only root may use tap devices; \
             run as root, or let users have them (Debian's default) as root:\n    \
             sudo chmod 0666 /dev/net/tun\nand have a tap of your own:\n    {}",
            first.trim(),
            plan.root_commands(&user_name())
        ))
    } else if is_permission_error(first) {
        Some(format!(
            "QEMU may not open the tap {name} ({}): the tap must belong to your user, or run \
             as root; as root:\n    sudo ip tuntap del dev {name} mode tap\n    {}",
            first.trim(),
            plan.root_commands(&user_name())
        ))
    } else if first.contains("busy") {
        Some(format!(
            "the tap {name} is in use by another QEMU ({}): give this guest another one \
             with --tap NAME (and --ip in another network)",
            first.trim()
        ))
    } else {
        Some(format!("QEMU cannot open the tap {name}: {}", first.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_arithmetic() {
        let c = cidr("10.213.0.2/24");
        assert!(c.contains(Ipv4Addr::new(10, 213, 0, 254)));
        assert!(!c.contains(Ipv4Addr::new(10, 213, 1, 1)));
        assert_eq!(c.other_host(), Some(Ipv4Addr::new(10, 213, 0, 1)));
        assert_eq!(
            cidr("10.0.0.1/24").other_host(),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
        assert_eq!(
            cidr("10.0.0.1/24").neighbour(),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
        assert_eq!(
            cidr("10.0.0.254/24").neighbour(),
            Some(Ipv4Addr::new(10, 0, 0, 253))
        );
        assert_eq!(
            cidr("10.0.0.4/31").other_host(),
            Some(Ipv4Addr::new(10, 0, 0, 5))
        );
        assert_eq!(cidr("10.0.0.4/32").other_host(), None);
        assert!(cidr("0.0.0.0/0").contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(c.to_string(), "10.213.0.2/24");
        for bad in ["10.0.0.1", "10.0.0.1/33", "10.0.0/24", "x/1", "10.0.0.1/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(parse_guest_ip("dhcp"), Ok(IpConfig::Dhcp));
        assert!(parse_guest_ip("10.0.0.1").unwrap_err().contains("dhcp"));
    }

    #[test]
    fn the_user_mode_network_gets_qemus_address_statically() {
        assert_eq!(user_net_args(None, ""), ["ip=10.0.2.15/24", "gw=10.0.2.2"]);
        assert_eq!(
            user_net_args(Some(IpConfig::Dhcp), "log=debug"),
            ["ip=dhcp"]
        );
        // The user's own ip= (any value) wins: nothing is added, not even the gateway.
        assert!(user_net_args(None, "ip=dhcp").is_empty());
        assert!(user_net_args(Some(IpConfig::Dhcp), "log=info ip=10.0.2.15/24").is_empty());
        assert_eq!(user_net_args(None, "gw=10.0.2.3"), ["ip=10.0.2.15/24"]);
    }

    #[test]
    fn a_tap_the_runner_creates_gets_the_default_plan() {
        let p = TapPlan::new("qcow-metal0", None, None, "log=info").unwrap();
        assert!(p.create);
        assert_eq!(p.host, Some(cidr("10.213.0.1/24")));
        assert_eq!(p.guest_addr(), Some(Ipv4Addr::new(10, 213, 0, 2)));
        assert_eq!(p.kernel_args, ["ip=10.213.0.2/24", "gw=10.213.0.1"]);
        assert!(
            p.notes.iter().any(|n| n.contains("default address")),
            "{p:?}"
        );
    }

    #[test]
    fn explicit_addresses_are_kept() {
        let ip = parse_guest_ip("192.168.50.7/24").unwrap();
        let p = TapPlan::new("t0", None, Some(ip), "").unwrap();
        assert_eq!(p.host, Some(cidr("192.168.50.1/24")));
        assert_eq!(p.kernel_args, ["ip=192.168.50.7/24", "gw=192.168.50.1"]);
        // ip= and gw= of the kernel arguments win over --ip and the derived gateway.
        let p = TapPlan::new(
            "t0",
            None,
            Some(ip),
            "ip=172.20.0.9/16 gw=172.20.0.100 log=debug",
        )
        .unwrap();
        assert_eq!(p.guest_addr(), Some(Ipv4Addr::new(172, 20, 0, 9)));
        assert_eq!(p.host, Some(cidr("172.20.0.100/16")));
        assert!(p.kernel_args.is_empty(), "{p:?}");
    }

    #[test]
    fn a_ready_made_tap_is_only_attached() {
        let p = TapPlan::new("br-tap", Some(Some(cidr("10.9.0.1/24"))), None, "").unwrap();
        assert!(!p.create);
        assert_eq!(p.guest_addr(), Some(Ipv4Addr::new(10, 9, 0, 2)));
        assert_eq!(p.kernel_args, ["ip=10.9.0.2/24", "gw=10.9.0.1"]);
        // Without a host address: the default, and a warning saying what to run.
        let p = TapPlan::new("bare", Some(None), None, "").unwrap();
        assert_eq!(p.guest_addr(), Some(DEFAULT_GUEST_CIDR.addr));
        assert_eq!(p.kernel_args, ["ip=10.213.0.2/24"]);
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains("ip addr add 10.213.0.1/24 dev bare")),
            "{p:?}"
        );
        // DHCP on a ready-made tap is the user's business.
        let p = TapPlan::new("br", Some(None), Some(IpConfig::Dhcp), "").unwrap();
        assert_eq!(p.kernel_args, ["ip=dhcp"]);
        assert_eq!(p.guest_addr(), None);
    }

    #[test]
    fn impossible_plans_are_refused() {
        let e = TapPlan::new("t0", None, Some(IpConfig::Dhcp), "").unwrap_err();
        assert!(e.to_string().contains("DHCP"), "{e}");
        let e = TapPlan::new("t0", None, None, "ip=dhcp").unwrap_err();
        assert!(e.to_string().contains("--ip"), "{e}");
        let e = TapPlan::new("this-name-is-too-long", None, None, "").unwrap_err();
        assert!(e.to_string().contains("interface name"), "{e}");
        let ip = parse_guest_ip("10.0.0.1/32").unwrap();
        assert!(TapPlan::new("t0", None, Some(ip), "").is_err());
    }

    #[test]
    fn the_no_rights_message_says_what_to_run_as_root() {
        let p = TapPlan::new("qcow-metal0", None, None, "").unwrap();
        let m = no_rights_message(&p, "ioctl(TUNSETIFF): Operation not permitted");
        for want in [
            "Operation not permitted",
            "root",
            "sudo ip tuntap add dev qcow-metal0 mode tap user ",
            "sudo ip addr add 10.213.0.1/24 dev qcow-metal0",
            "sudo ip link set qcow-metal0 up",
            "cargo run -- --tap qcow-metal0 --ip 10.213.0.2/24",
        ] {
            assert!(m.contains(want), "missing `{want}` in {m}");
        }
        let q = qemu_tap_error(
            &p,
            "qemu-system-x86_64: -netdev tap,id=net0,ifname=qcow-metal0: could not configure \
             /dev/net/tun (qcow-metal0): Operation not permitted",
        )
        .unwrap();
        assert!(q.contains("sudo ip tuntap add"), "{q}");
        let q = qemu_tap_error(
            &p,
            "qemu-system-x86_64: -netdev tap,id=net0,ifname=qcow-metal0,script=no,downscript=no: \
             could not open /dev/net/tun: Permission denied",
        )
        .unwrap();
        assert!(q.contains("sudo chmod 0666 /dev/net/tun"), "{q}");
        let q = qemu_tap_error(
            &p,
            "qemu-system-x86_64: could not configure /dev/net/tun (qcow-metal0): Device or \
             resource busy",
        )
        .unwrap();
        assert!(q.contains("--tap NAME"), "{q}");
        assert_eq!(qemu_tap_error(&p, "Failed to get write lock"), None);
    }

    #[test]
    fn ip_output_is_read() {
        let out = "5: qm0    inet 10.213.0.1/24 scope global qm0\\       valid_lft forever \
                   preferred_lft forever\n";
        assert_eq!(first_inet(out), Some(cidr("10.213.0.1/24")));
        assert_eq!(first_inet(""), None);
        assert!(is_tap_flags("0x1802\n"));
        assert!(is_tap_flags("0x1002"));
        assert!(!is_tap_flags("0x1001"), "a tun");
        assert!(!is_tap_flags("garbage"));
        // Loopback exists and is no tap.
        let e = probe_tap("lo").unwrap_err();
        assert!(e.to_string().contains("not a tap device"), "{e}");
        assert_eq!(probe_tap("qm-no-such-if").unwrap(), None);
    }
}
