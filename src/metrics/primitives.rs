//! The metric primitives: [`Counter`], [`Gauge`], [`FloatGauge`] and [`Histogram`].
//!
//! Every update is one or two relaxed atomic operations on 64-bit words (x86-64 has them
//! natively), so hot paths never take a lock and never allocate. Encoding reads the words
//! while updates go on; a scrape is a snapshot of each value, not of the whole set.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count (requests, bytes).
#[derive(Debug, Default)]
pub struct Counter {
    value: AtomicU64,
}

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Self {
        Counter {
            value: AtomicU64::new(0),
        }
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n` (wrapping at 2^64, which a byte counter reaches after 16 EiB).
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    /// Sets the value from a count kept elsewhere (the engine's own statistics, copied at
    /// scrape time). The source must itself only grow, or the series will look reset.
    pub fn mirror(&self, value: u64) {
        self.value.store(value, Ordering::Relaxed);
    }
}

/// A value that goes up and down (bytes in use, connections open), as a signed integer.
#[derive(Debug, Default)]
pub struct Gauge {
    value: AtomicI64,
}

impl Gauge {
    /// A gauge at zero.
    pub const fn new() -> Self {
        Gauge {
            value: AtomicI64::new(0),
        }
    }

    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.value.store(v, Ordering::Relaxed);
    }

    /// Sets the value from an unsigned quantity, saturating at `i64::MAX`.
    pub fn set_u64(&self, v: u64) {
        self.set(i64::try_from(v).unwrap_or(i64::MAX));
    }

    /// Adds `n` (which may be negative).
    pub fn add(&self, n: i64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.add(-1);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// A gauge holding a float (seconds of uptime), stored as its IEEE-754 bits.
#[derive(Debug, Default)]
pub struct FloatGauge {
    bits: AtomicU64,
}

impl FloatGauge {
    /// A gauge at 0.0.
    pub const fn new() -> Self {
        FloatGauge {
            bits: AtomicU64::new(0),
        }
    }

    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.bits.store(v.to_bits(), Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

/// Bucket upper bounds for request latencies, in seconds: 10 µs to 10 s.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A distribution of observations in fixed buckets, with their count and sum.
///
/// Observations are integers in a unit chosen at construction (nanoseconds for latencies,
/// bytes for sizes); `scale` turns that unit into the base unit the exposition uses
/// (`1e-9` for seconds from nanoseconds). Bucket bounds are given in the base unit. Keeping
/// the sum as an integer makes it exact and lets every observation be two atomic adds.
/// The count is the sum of the bucket counts, so the `+Inf` bucket always equals `_count`.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in the base unit, strictly increasing and finite.
    bounds: Box<[f64]>,
    /// The same bounds in observation units: an observation `v` falls in the first bucket
    /// whose threshold is `>= v`.
    thresholds: Box<[u64]>,
    /// Per-bucket (non-cumulative) counts; the last one is the overflow (`+Inf`) bucket.
    counts: Box<[AtomicU64]>,
    /// Sum of observations, in observation units.
    sum: AtomicU64,
    /// Base units per observation unit.
    scale: f64,
}

impl Histogram {
    /// A histogram with upper `bounds` in the base unit and observations in units of `scale`
    /// base units. Bounds that are not finite, not positive-or-zero or not increasing are
    /// dropped (the `+Inf` bucket is always there).
    pub fn new(bounds: &[f64], scale: f64) -> Self {
        let scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        let mut kept: Vec<f64> = Vec::with_capacity(bounds.len());
        for &b in bounds {
            if b.is_finite() && b >= 0.0 && kept.last().is_none_or(|&last| b > last) {
                kept.push(b);
            }
        }
        let thresholds: Vec<u64> = kept.iter().map(|&b| to_units(b, scale)).collect();
        let counts: Vec<AtomicU64> = (0..=kept.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram {
            bounds: kept.into_boxed_slice(),
            thresholds: thresholds.into_boxed_slice(),
            counts: counts.into_boxed_slice(),
            sum: AtomicU64::new(0),
            scale,
        }
    }

    /// A latency histogram: observations in nanoseconds, exposed in seconds, with
    /// [`LATENCY_BUCKETS_SECONDS`].
    pub fn latency() -> Self {
        Histogram::new(LATENCY_BUCKETS_SECONDS, 1e-9)
    }

    /// Records one observation of `v` units (nanoseconds for a latency histogram).
    pub fn observe(&self, v: u64) {
        let i = self.thresholds.partition_point(|&t| t < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Records one observation given in the base unit (seconds); negative and NaN values
    /// count as zero.
    pub fn observe_base(&self, v: f64) {
        let units = v / self.scale;
        let units = if units.is_nan() || units <= 0.0 {
            0
        } else if units >= u64::MAX as f64 {
            u64::MAX
        } else {
            units as u64
        };
        self.observe(units);
    }

    /// The bucket upper bounds in the base unit (without `+Inf`).
    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    /// The number of observations in bucket `i` alone (not cumulative); `i == bounds().len()`
    /// is the overflow bucket. Out of range gives 0.
    pub fn bucket_count(&self, i: usize) -> u64 {
        self.counts.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The number of observations.
    pub fn count(&self) -> u64 {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }

    /// The sum of observations in observation units.
    pub fn sum_units(&self) -> u64 {
        self.sum.load(Ordering::Relaxed)
    }

    /// The sum of observations in the base unit.
    pub fn sum(&self) -> f64 {
        self.sum_units() as f64 * self.scale
    }

    /// Whether the sum is a whole number of base units (then it is written as an integer).
    pub(crate) fn is_integral(&self) -> bool {
        self.scale == 1.0
    }
}

/// A bound in the base unit, as a threshold in observation units: the largest integer
/// observation that is `<=` the bound, tolerating the rounding of decimal bounds.
fn to_units(bound: f64, scale: f64) -> u64 {
    let t = bound / scale;
    if t.is_nan() || t <= 0.0 {
        return 0;
    }
    if t >= u64::MAX as f64 {
        return u64::MAX;
    }
    // `as` truncates toward zero, which is floor for positive values (no_std has no `floor`).
    let nearest = (t + 0.5) as u64;
    if (t - nearest as f64).abs() <= 1e-9 * t.max(1.0) {
        nearest
    } else {
        t as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_and_gauges() {
        let c = Counter::new();
        c.inc();
        c.add(41);
        assert_eq!(c.get(), 42);
        c.mirror(7);
        assert_eq!(c.get(), 7);
        let g = Gauge::new();
        g.inc();
        g.inc();
        g.dec();
        g.add(-5);
        assert_eq!(g.get(), -4);
        g.set_u64(u64::MAX);
        assert_eq!(g.get(), i64::MAX);
        let f = FloatGauge::new();
        f.set(1.5);
        assert_eq!(f.get(), 1.5);
    }

    #[test]
    fn histogram_buckets_are_inclusive_upper_bounds() {
        let h = Histogram::new(&[0.001, 0.01, 0.1], 1e-9);
        h.observe(1_000_000); // exactly 1 ms: in the 0.001 bucket
        h.observe(1_000_001); // just over: in 0.01
        h.observe(0);
        h.observe(200_000_000); // 0.2 s: overflow
        assert_eq!(h.bucket_count(0), 2);
        assert_eq!(h.bucket_count(1), 1);
        assert_eq!(h.bucket_count(2), 0);
        assert_eq!(h.bucket_count(3), 1);
        assert_eq!(h.bucket_count(99), 0);
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum_units(), 202_000_001);
        assert!((h.sum() - 0.202000001).abs() < 1e-12);
        h.observe_base(0.05);
        assert_eq!(h.bucket_count(2), 1);
        h.observe_base(f64::NAN);
        h.observe_base(-1.0);
        assert_eq!(h.bucket_count(0), 4);
    }

    #[test]
    fn histogram_drops_bad_bounds() {
        let h = Histogram::new(
            &[1.0, f64::NAN, 0.5, 2.0, 2.0, f64::INFINITY, -1.0, 4.0],
            1.0,
        );
        assert_eq!(h.bounds(), &[1.0, 2.0, 4.0]);
        h.observe(3);
        assert_eq!(h.bucket_count(2), 1);
        let h = Histogram::new(&[], 0.0);
        h.observe(5);
        assert_eq!(h.count(), 1);
        assert_eq!(h.bucket_count(0), 1);
    }
}
