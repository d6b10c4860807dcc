//! The guest's devices and the one real [`service::guest::Platform`]: the library's main
//! loop ([`qcow_metal::service::guest::Guest`]) runs on them.
//!
//! [`run`] brings up, in order: the metrics registry; the virtio devices found on the PCI
//! bus ([`crate::virtio::pci::probe`]); the disk on virtio-blk
//! ([`qcow_metal::service::disk::open_disk`]: qcow2 when the device starts with the qcow2
//! magic or the command line says so, raw otherwise); virtio-net and its wake-up interrupt.
//! Then it hands everything to the library's loop, which returns once the power button was
//! pressed and the disk closed, and powers off with the status it gives.
//!
//! [`KernelPlatform`] is what the loop needs of the machine: the TSC clock, halting the CPU
//! until a deadline or virtio-net's interrupt ([`apic::idle_until`]), the ACPI power button,
//! and the heap and network device figures for the metrics.

use alloc::sync::Arc;
use alloc::vec::Vec;
use log::{error, info, warn};
use qcow_metal::block::Sectored;
use qcow_metal::block::telemetry::BlockDeviceMetrics;
use qcow_metal::net::NetStats;
use qcow_metal::qcow2::chain;
use qcow_metal::service;
use qcow_metal::service::disk::{Disk, open_disk};
use qcow_metal::service::guest::{Guest, GuestSetup, shut_down};
use qcow_metal::telemetry::{GuestConfig, GuestMetrics, SystemFigures};

use crate::virtio::blk::VirtioBlk;
use crate::virtio::net::VirtioNet;
use crate::{Platform, VERSION, apic, power, time};

/// The block device the disk sits on: virtio-blk, byte-addressed.
pub type Device = Sectored<VirtioBlk>;

/// Longest halt of an idle guest (the power button is polled in between).
const MAX_IDLE_MS: u64 = 100;

/// The machine as the service loop sees it.
pub struct KernelPlatform {
    /// virtio-net's interrupt wakes the CPU from [`apic::idle_until`].
    net_wakes: bool,
    /// virtio-net's packet and byte counts.
    net_stats: Arc<NetStats>,
}

impl service::guest::Platform for KernelPlatform {
    type Net = VirtioNet;

    fn now_ns(&self) -> u64 {
        time::now_ns()
    }

    /// Waits until `deadline_ms` or until a frame arrives, whichever comes first, with the
    /// CPU halted ([`apic::idle_until`]): virtio-net's interrupt ends the wait early when it
    /// is wired ([`apic::enable_wake`]); otherwise the wait is cut into short slices that
    /// look at the receive ring. The power button is polled, so a wait is never longer than
    /// [`MAX_IDLE_MS`].
    fn idle_until(&mut self, net: &mut VirtioNet, deadline_ms: u64) {
        if net.has_rx() {
            return;
        }
        let slice_ms = if self.net_wakes { MAX_IDLE_MS } else { 1 };
        let until_ms = deadline_ms.min(time::now_ms() + slice_ms);
        apic::idle_until(until_ms.saturating_mul(1_000_000));
        if apic::take_device_wake() {
            net.ack_interrupt();
        }
    }

    fn power_button_pressed(&mut self) -> bool {
        power::power_button_pressed()
    }

    fn system(&self) -> SystemFigures {
        let heap = crate::heap::stats();
        SystemFigures {
            uptime_seconds: time::now_ns() as f64 / 1e9,
            heap_size: heap.claimed_bytes,
            heap_used: heap.allocated_bytes,
        }
    }

    fn net_stats(&self) -> &NetStats {
        &self.net_stats
    }
}

/// Runs the guest's services forever (or until the power button powers it off).
pub fn run(platform: Platform) -> ! {
    let config = platform.config.clone();
    let metrics = GuestMetrics::new(&GuestConfig {
        disk: &config.export,
        device: "vda",
        interface: "eth0",
        version: VERSION,
        mirage: config.mirage_metrics,
        clock: time::now_ns,
    });

    let found = crate::virtio::pci::probe(&platform.pci_devices);
    // Every virtio-blk device, named by its serial: the disk, and the layers of its backing
    // chain (read-only). Which is which never depends on PCI order.
    let mut devices = Vec::new();
    for (df, transport) in found.blk.into_iter().chain(found.more_blk) {
        let stats = Arc::new(BlockDeviceMetrics::new("layer"));
        match VirtioBlk::new(transport, stats, time::now_ns) {
            Ok(mut blk) => devices.push((blk.serial(), (df, blk))),
            Err(e) => error!("virtio-blk at {df}: {e:?}"),
        }
    }
    let (disk_dev, layers) = chain::split_devices(devices).unwrap_or_else(|e| {
        error!("virtio-blk: {e}");
        (None, Vec::new())
    });
    let layers = layers
        .into_iter()
        .map(|(serial, (df, blk))| {
            info!("virtio-blk at {df}: backing layer {serial}");
            (serial, Sectored::new(blk))
        })
        .collect();
    let blk = disk_dev.map(|(df, mut blk)| {
        blk.set_stats(metrics.blockdev.clone());
        let pci = platform.pci_devices.iter().find(|d| {
            let a = d.address;
            (a.bus, a.device, a.function) == (df.bus, df.device, df.function)
        });
        if pci.and_then(apic::enable_wake).is_some() {
            // Long waits for the device halt the CPU instead of spinning.
            blk.set_waiter(apic::idle_until);
        }
        if config.grow && !config.read_only {
            // The host file grows on demand: ask the runner (`crate::hostfile`).
            blk.enable_growth();
        }
        Sectored::new(blk)
    });
    let disk = open_disk(blk, layers, &config, &metrics, time::now_ns);
    if let Disk::Qcow2(d) = &disk
        && d.inner().chain_depth() > 1
    {
        info!(
            "disk: a backing chain of {} layers",
            d.inner().chain_depth() - 1
        );
    }
    match &disk {
        Disk::Unavailable(why) => {
            error!("disk: unavailable: {why}; serving metrics only");
            metrics.disk.set_up(false);
        }
        d => {
            info!("disk: {} export {:?}", d.format_name(), config.export);
            metrics.disk.set_up(true);
        }
    }

    let net_stats = Arc::new(NetStats::default());
    let Some((df, transport)) = found.net else {
        error!("no virtio-net device: nothing to serve");
        park(disk);
    };
    let mut dev = match VirtioNet::new(transport, net_stats.clone()) {
        Ok(dev) => dev,
        Err(e) => {
            error!("virtio-net at {df}: {e}");
            park(disk);
        }
    };
    let net_device = platform
        .pci_devices
        .iter()
        .find(|d| d.virtio_kind() == Some(crate::pci::VirtioKind::Net));
    let net_wakes = match net_device.and_then(apic::enable_wake) {
        Some(pin) => {
            dev.enable_interrupts();
            info!("virtio-net wakes the idle CPU (I/O APIC pin {pin})");
            true
        }
        None => {
            warn!("virtio-net cannot wake the CPU: idling polls every millisecond");
            false
        }
    };
    let mac = dev.mac_address();
    let platform_heap_bytes = platform.heap_bytes;
    let platform = KernelPlatform {
        net_wakes,
        net_stats,
    };
    let setup = GuestSetup {
        config,
        version: VERSION,
        mac,
        seed: crate::cpu::rdtsc(),
        heap_bytes: platform_heap_bytes,
    };
    let exit = Guest::new(platform, dev, disk, metrics, setup).run();
    power::shutdown(exit)
}

/// Without a network there is nothing to serve: wait for the power button, then close the
/// disk and power off.
fn park(disk: Disk<Device>) -> ! {
    loop {
        if power::power_button_pressed() {
            info!("power button pressed");
            power::shutdown(shut_down(disk));
        }
        apic::idle_until(time::now_ns() + 100_000_000);
    }
}
