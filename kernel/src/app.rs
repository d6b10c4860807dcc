//! The guest's main loop. Placeholder until the network and disk services land: it waits for
//! the ACPI power button and powers off cleanly.

use qcow_metal::config::GuestExit;

use crate::Platform;

/// Runs the guest's services forever (or until power-off).
pub fn run(platform: Platform) -> ! {
    log::debug!("main loop: {} PCI functions", platform.pci_devices.len());
    loop {
        if crate::power::power_button_pressed() {
            log::info!("power button pressed: shutting down");
            crate::power::shutdown(GuestExit::Clean);
        }
        crate::time::delay_us(1000);
    }
}
