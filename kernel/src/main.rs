//! The qcow-metal guest: a bare-metal x86-64 kernel booted by QEMU through PVH.
//!
//! This crate is glue: boot, CPU tables, memory, clock, console, PCI, power and the virtio
//! drivers here, the platform the services run on in `app`; all the logic (the main loop,
//! network, NBD, metrics) in the `qcow-metal` library (`qcow_metal::service`). See `doc/kernel.md` for the boot path, the memory layout,
//! the exit statuses and how to debug.
//!
//! Boot order in [`kernel_main`]: GDT/TSS and IDT (so faults are reported from here on), serial
//! console, TSC calibration, logger, start info (command line and memory map), heap (RAM past
//! the boot map gets mapped), stack guard page, command line, PCI enumeration (BARs past the
//! boot map get mapped), ACPI power button, local APIC timer and SCI wake-up, banner, the
//! `debug_fault=` hook, then [`app::run`].
#![no_std]
#![no_main]

extern crate alloc;

pub mod apic;
pub mod app;
pub mod boot;
pub mod cpu;
pub mod gdt;
pub mod heap;
pub mod hostfile;
pub mod interrupts;
pub mod logger;
pub mod mem_builtins;
pub mod paging;
pub mod panic;
pub mod pci;
pub mod power;
pub mod serial;
pub mod time;
pub mod virtio;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use qcow_metal::config::{Config, GuestExit};

use crate::boot::{BootInfo, MemmapEntry};
use crate::pci::PciDevice;

/// The kernel's version (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the boot code hands to the main loop.
#[derive(Debug)]
pub struct Platform {
    /// The parsed kernel command line.
    pub config: Config,
    /// The raw kernel command line.
    pub cmdline: String,
    /// Every PCI function found, in bus order.
    pub pci_devices: Vec<PciDevice>,
    /// Milliseconds from power-on (TSC 0) to the banner. The clock is [`time::now_ns`] /
    /// [`time::now_ms`], on the same scale.
    pub boot_ms: u64,
    /// Bytes of RAM given to the heap.
    pub heap_bytes: u64,
    /// The south bridge with the ACPI power button, and its PM I/O base.
    pub acpi: Option<(power::Chipset, u16)>,
}

/// The Rust entry point, called by the boot code in long mode on the boot stack with the
/// physical address of the PVH start info.
#[unsafe(no_mangle)]
extern "C" fn kernel_main(start_info: u64) -> ! {
    gdt::init();
    interrupts::init();
    serial::init();
    let tsc_hz = time::init();
    logger::init();

    let mut info = BootInfo {
        cmdline: [0; boot::MAX_CMDLINE],
        cmdline_len: 0,
        cmdline_truncated: false,
        memmap: [MemmapEntry {
            addr: 0,
            size: 0,
            kind: 0,
            reserved: 0,
        }; boot::MAX_MEMMAP],
        memmap_len: 0,
        rsdp: 0,
    };
    // SAFETY: `start_info` is what the PVH loader passed in ebx; low memory is untouched so far.
    if let Err(e) = unsafe { boot::read_start_info(start_info, &mut info) } {
        panic!("unusable PVH start info at {start_info:#x}: {e:?}");
    }
    let heap_bytes = heap::init(&info);
    let guard = paging::unmap_page(boot::stack_guard());

    let Some(cmdline) = info.cmdline() else {
        println!("qcow-metal: the kernel command line is not UTF-8");
        power::shutdown(GuestExit::BadConfig);
    };
    let config = match Config::parse(cmdline) {
        Ok((config, warnings)) => {
            logger::set_level(config.log);
            for warning in warnings {
                log::warn!("{warning}");
            }
            config
        }
        Err(e) => {
            println!("qcow-metal: {e}");
            power::shutdown(GuestExit::BadConfig);
        }
    };
    if info.cmdline_truncated {
        log::warn!("kernel command line cut at {} bytes", boot::MAX_CMDLINE);
    }

    let mut brand = [0; 48];
    log::info!(
        "qcow-metal {VERSION}: {} at {}.{:03} MHz (TSC), command line {:?}",
        cpu::brand(&mut brand),
        tsc_hz / 1_000_000,
        tsc_hz / 1_000 % 1_000,
        cmdline
    );
    for entry in info.memmap() {
        log::debug!(
            "memory {:#012x}..{:#012x} {}",
            entry.addr,
            entry.addr.saturating_add(entry.size),
            boot::memmap_kind_name(entry.kind)
        );
    }
    let (image_start, image_end) = boot::kernel_image();
    log::info!(
        "memory: {} MiB RAM, heap {} MiB, image {:#x}..{:#x}, {} GiB identity-mapped ({} pages)",
        heap::ram_bytes() >> 20,
        heap_bytes >> 20,
        image_start,
        image_end,
        boot::IDENTITY_MAP_LIMIT >> 30,
        if cpu::has_1g_pages() {
            "1 GiB"
        } else {
            "2 MiB"
        }
    );

    if let Err(e) = guard {
        log::warn!("no guard page below the boot stack: {e:?}");
    }

    let pci_devices = pci::enumerate();
    for device in &pci_devices {
        log::info!("pci {device}");
        map_bars(device);
    }
    let acpi = power::init(&pci_devices);
    match apic::init() {
        Some(per_ms) => log::debug!("local APIC timer: {per_ms} ticks/ms"),
        None => log::warn!("no local APIC: idling busy-waits"),
    }
    if let Some(irq) = power::sci_irq().and_then(apic::enable_wake_line) {
        log::debug!("the power button (SCI, IRQ {irq}) wakes the idle loop");
    }
    match acpi {
        Some((chipset, base)) => {
            log::debug!("ACPI power button armed ({chipset:?}, PM base {base:#x})")
        }
        None => log::warn!("no ACPI PM device: the power button will not work"),
    }

    let boot_ms = time::now_ms();
    println!("{}", banner(boot_ms, &pci_devices));
    interrupts::raise(config.debug_fault);

    app::run(Platform {
        config,
        cmdline: String::from(cmdline),
        pci_devices,
        boot_ms,
        heap_bytes,
        acpi,
    })
}

/// Makes sure the device's memory BARs are mapped (the boot map covers 64 GiB; SeaBIOS puts
/// 64-bit BARs above the RAM, which can be higher on big guests).
fn map_bars(device: &PciDevice) {
    for bar in &device.bars {
        let end = bar.address.saturating_add(bar.size);
        if bar.kind == pci::BarKind::Io || bar.address == 0 || end <= boot::IDENTITY_MAP_LIMIT {
            continue;
        }
        match paging::map_identity(bar.address, end) {
            Ok(()) => log::debug!("pci {}: mapped {bar}", device.address),
            Err(e) => log::warn!("pci {}: cannot map {bar}: {e:?}", device.address),
        }
    }
}

/// `qcow-metal <version> ready in <N> ms: <virtio devices> (<n> PCI functions)`: the line the
/// runner and the tests wait for.
fn banner(boot_ms: u64, devices: &[PciDevice]) -> String {
    let mut line = String::new();
    let _ = write!(line, "qcow-metal {VERSION} ready in {boot_ms} ms:");
    let mut virtio = 0;
    for device in devices {
        if let Some(kind) = device.virtio_kind() {
            let _ = write!(line, " {}@{}", kind.name(), device.address);
            virtio += 1;
        }
    }
    if virtio == 0 {
        line.push_str(" no virtio devices");
    }
    let _ = write!(line, " ({} PCI functions)", devices.len());
    line
}
