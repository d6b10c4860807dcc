//! Discovery of the virtio devices on the PCI bus, through virtio-drivers' [`PciRoot`] over
//! the kernel's configuration access ([`PortCam`], the legacy ports 0xCF8/0xCFC).
//!
//! SeaBIOS enumerates the bus and assigns BARs before it jumps to the kernel, so normally the
//! kernel only reads them (the boot-time scan, [`crate::pci::enumerate`], has sized them).
//! A memory BAR the firmware left unassigned gets an address from a small bump allocator
//! placed above every BAR that is already assigned.

use log::{info, warn};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{Command, DeviceFunction, PciRoot};

use super::KernelHal;
use crate::pci::{BarKind, PciDevice, PortCam, VirtioKind};

/// Start of the IOAPIC's registers: the top of the 32-bit PCI memory window.
const IOAPIC_BASE: u64 = 0xFEC0_0000;

/// The virtio devices found on the PCI bus, with their transports ready for a driver.
#[derive(Default)]
pub struct VirtioDevices {
    /// The first virtio-blk device.
    pub blk: Option<(DeviceFunction, PciTransport)>,
    /// Further virtio-blk devices (layers of a backing chain; which is which comes from
    /// their serials, not from this order).
    pub more_blk: alloc::vec::Vec<(DeviceFunction, PciTransport)>,
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

/// Brings up the virtio-blk devices and the first virtio-net device among `devices` (the boot-time
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
        // Which slot the device goes to: `None` for a further virtio-blk device.
        let slot = match device.virtio_kind() {
            Some(VirtioKind::Block) if found.blk.is_none() => Some(&mut found.blk),
            Some(VirtioKind::Block) => None,
            Some(VirtioKind::Net) if found.net.is_none() => Some(&mut found.net),
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
                match slot {
                    Some(slot) => *slot = Some((df, transport)),
                    None => found.more_blk.push((df, transport)),
                }
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
