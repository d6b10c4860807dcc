//! The monotonic clock: the TSC, calibrated once at boot against the PIT.
//!
//! Calibration: PIT channel 2 (gate through port `0x61`, no speaker) is programmed in mode 0
//! with a count of [`CALIBRATION_MS`] ms at 1.193182 MHz; the TSC is read when the count starts
//! and when OUT2 (port `0x61` bit 5) rises. Windows are repeated until two agree (see
//! [`CALIBRATION_TOLERANCE_PPM`]): usually two windows, 10 ms. Under TCG both the PIT and
//! QEMU's TSC follow the host's real time, so this also holds there.
//!
//! The clock's zero is TSC 0, which QEMU sets when the virtual CPU starts: [`now_ms`] at the
//! banner is the time from power-on (firmware included) to the main loop.
//!
//! Resolution: one TSC tick (sub-nanosecond); [`now_ns`] is exact to the nanosecond up to
//! the calibration error (agreeing windows differ by tens of ppm).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu::{self, inb, outb};

/// Length of one calibration window.
pub const CALIBRATION_MS: u64 = 5;
/// How close (in millionths) two windows must be to be trusted. Undisturbed windows agree to
/// about 10 ppm; a window during which the host deschedules the virtual CPU ends late and
/// reads high (seen often under TCG on a loaded 2-core host), by a random amount.
pub const CALIBRATION_TOLERANCE_PPM: u64 = 200;
/// Most windows tried (100 ms); then the lowest is used (errors only ever inflate).
pub const CALIBRATION_MAX_WINDOWS: usize = 20;
/// PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// `ns = (ticks * NS_PER_TICK_FP) >> 32`.
static NS_PER_TICK_FP: AtomicU64 = AtomicU64::new(0);

/// Measures the TSC frequency; call once, early (before any timestamp is wanted).
pub fn init() -> u64 {
    let hz = calibrate_pit();
    TSC_HZ.store(hz, Ordering::Relaxed);
    NS_PER_TICK_FP.store(
        ((1_000_000_000u128 << 32) / u128::from(hz)) as u64,
        Ordering::Relaxed,
    );
    hz
}

/// Measures windows until two agree and returns the lower of the two.
fn calibrate_pit() -> u64 {
    let mut seen = [0u64; CALIBRATION_MAX_WINDOWS];
    for i in 0..CALIBRATION_MAX_WINDOWS {
        let hz = pit_window();
        for &other in &seen[..i] {
            let (low, high) = (hz.min(other), hz.max(other));
            if (high - low).saturating_mul(1_000_000)
                <= low.saturating_mul(CALIBRATION_TOLERANCE_PPM)
            {
                return low;
            }
        }
        seen[i] = hz;
    }
    seen.iter().copied().min().unwrap_or(1_000_000)
}

/// One window: TSC ticks while PIT channel 2 counts down [`CALIBRATION_MS`], as Hz.
fn pit_window() -> u64 {
    let count = (PIT_HZ * CALIBRATION_MS / 1000) as u16;
    // Gate channel 2 on, speaker off.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    // Channel 2, lobyte/hibyte, mode 0 (OUT2 rises at terminal count), binary.
    outb(0x43, 0xB0);
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let start = cpu::rdtsc();
    let mut end = start;
    // Bounded in case there is no PIT (about 1 s at 100 M iterations/s).
    for _ in 0..100_000_000u64 {
        if inb(0x61) & 0x20 != 0 {
            end = cpu::rdtsc();
            break;
        }
    }
    let ticks = end.wrapping_sub(start).max(1);
    // A PIT-less machine gives nonsense: floor at 1 MHz.
    (ticks * 1000 / CALIBRATION_MS).max(1_000_000)
}

/// The calibrated TSC frequency in Hz (0 before [`init`]).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Converts TSC ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    ((u128::from(ticks) * u128::from(NS_PER_TICK_FP.load(Ordering::Relaxed))) >> 32) as u64
}

/// Nanoseconds since the CPU started (0 before [`init`]).
pub fn now_ns() -> u64 {
    ticks_to_ns(cpu::rdtsc())
}

/// Microseconds since the CPU started.
pub fn now_us() -> u64 {
    now_ns() / 1_000
}

/// Milliseconds since the CPU started.
pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// Busy-waits for `us` microseconds.
pub fn delay_us(us: u64) {
    let end = now_ns().saturating_add(us.saturating_mul(1_000));
    while now_ns() < end {
        cpu::spin_hint();
    }
}
