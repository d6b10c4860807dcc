//! Tests of the qcow2 engine: unit behaviour, model-based random tests, interoperability
//! with QEMU's tools, and hostile images.

mod backing;
mod basic;
mod bitmap;
mod check_vs_qemu;
mod compact;
mod compression;
mod device_full;
mod fuzz_found;
mod hostile;
mod interop;
mod model;
mod overlap;
mod partial_writeback;
mod short_device;
mod snapshot;
mod subclusters;
mod truncated;
pub(crate) mod util;
mod zero_tail;
