//! PCI configuration space through the legacy port I/O mechanism (0xCF8/0xCFC), which works
//! on both QEMU machine types (`pc` and `q35`), and discovery of the virtio devices.
//!
//! SeaBIOS enumerates the bus and assigns BARs before it jumps to the kernel, so normally the
//! kernel only reads them (the boot-time scan, [`crate::pci::enumerate`], has sized them).
//! A memory BAR the firmware left unassigned gets an address from a small bump allocator
//! placed above every BAR that is already assigned.

use core::arch::asm;
use log::{info, warn};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction, PciRoot};

use super::KernelHal;
use crate::pci::{BarKind, PciDevice, VirtioKind};

/// Start of the IOAPIC's registers: the top of the 32-bit PCI memory window.
const IOAPIC_BASE: u64 = 0xFEC0_0000;

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// Configuration access mechanism #1: an address written to port 0xCF8 selects a dword of a
/// function's configuration space, which is then read or written at port 0xCFC.
#[derive(Debug)]
pub struct PortCam;

fn config_address(df: DeviceFunction, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(df.bus) << 16)
        | (u32::from(df.device) << 11)
        | (u32::from(df.function) << 8)
        | u32::from(offset & 0xFC)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        let value: u32;
        // SAFETY: ports 0xCF8/0xCFC are the PCI configuration mechanism of the PC platform;
        // accessing them has no effect on memory. The guest runs on one CPU without
        // interrupt handlers that touch PCI, so the address/data pair is not interleaved.
        unsafe {
            asm!("out dx, eax", in("dx") CONFIG_ADDRESS, in("eax") config_address(df, offset),
                 options(nomem, nostack, preserves_flags));
            asm!("in eax, dx", in("dx") CONFIG_DATA, out("eax") value,
                 options(nomem, nostack, preserves_flags));
        }
        value
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        // SAFETY: as in `read_word`; writes change the device's configuration only.
        unsafe {
            asm!("out dx, eax", in("dx") CONFIG_ADDRESS, in("eax") config_address(df, offset),
                 options(nomem, nostack, preserves_flags));
            asm!("out dx, eax", in("dx") CONFIG_DATA, in("eax") data,
                 options(nomem, nostack, preserves_flags));
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// The virtio devices found on the PCI bus, with their transports ready for a driver.
#[derive(Default)]
pub struct VirtioDevices {
    /// The first virtio-blk device.
    pub blk: Option<(DeviceFunction, PciTransport)>,
    /// The first virtio-net device.
    pub net: Option<(DeviceFunction, PciTransport)>,
}

/// Hands out addresses for memory BARs the firmware did not assign, from just above the
/// highest BAR that is assigned, below the IOAPIC at 0xFEC0_0000.
struct BarAllocator {
    next: u64,
    limit: u64,
}

impl BarAllocator {
    fn alloc(&mut self, size: u64) -> Option<u64> {
        let size = size.max(0x1000);
        let start = self.next.checked_next_multiple_of(size)?;
        let end = start.checked_add(size)?;
        if end > self.limit {
            return None;
        }
        self.next = end;
        Some(start)
    }
}

/// Brings up the first virtio-blk and virtio-net devices among `devices` (the boot-time
/// PCI scan): BARs assigned, memory decoding and bus mastering on, PCI transport built.
/// Other devices are left alone.
pub fn probe(devices: &[PciDevice]) -> VirtioDevices {
    let mut root = PciRoot::new(PortCam);
    let mut found = VirtioDevices::default();

    // Unassigned BARs go above every assigned 32-bit memory BAR.
    let highest = devices
        .iter()
        .flat_map(|d| d.bars.iter())
        .filter(|b| b.kind != BarKind::Io && b.address != 0)
        .map(|b| b.address.saturating_add(b.size))
        .filter(|&end| end <= IOAPIC_BASE)
        .fold(0xC000_0000u64, u64::max);
    let mut bar_alloc = BarAllocator {
        next: highest,
        limit: IOAPIC_BASE,
    };

    for device in devices {
        let slot = match device.virtio_kind() {
            Some(VirtioKind::Block) if found.blk.is_none() => &mut found.blk,
            Some(VirtioKind::Net) if found.net.is_none() => &mut found.net,
            _ => continue,
        };
        let a = device.address;
        let df = DeviceFunction {
            bus: a.bus,
            device: a.device,
            function: a.function,
        };
        assign_missing_bars(&mut root, df, device, &mut bar_alloc);
        let (_, command) = root.get_status_command(df);
        root.set_command(
            df,
            command | Command::MEMORY_SPACE | Command::IO_SPACE | Command::BUS_MASTER,
        );
        match PciTransport::new::<KernelHal, _>(&mut root, df) {
            Ok(transport) => {
                info!(
                    "{} at {df}",
                    device.virtio_kind().map_or("virtio", VirtioKind::name)
                );
                *slot = Some((df, transport));
            }
            Err(e) => warn!("{df} cannot be used: {e}"),
        }
    }
    found
}

/// Gives every unassigned memory BAR of `df` an address (firmware normally did this).
fn assign_missing_bars(
    root: &mut PciRoot<PortCam>,
    df: DeviceFunction,
    device: &PciDevice,
    alloc: &mut BarAllocator,
) {
    for bar in &device.bars {
        if bar.kind == BarKind::Io || bar.address != 0 || bar.size == 0 {
            continue;
        }
        let Some(address) = alloc.alloc(bar.size) else {
            warn!(
                "{df}: no room to assign BAR{} ({} bytes)",
                bar.index, bar.size
            );
            continue;
        };
        match bar.kind {
            BarKind::Memory64 => root.set_bar_64(df, bar.index, address),
            _ => root.set_bar_32(df, bar.index, address as u32),
        }
        info!(
            "{df}: assigned BAR{} at {address:#x} ({} bytes)",
            bar.index, bar.size
        );
    }
}
