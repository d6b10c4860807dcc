//! qcow-metal: the logic of a unikernel that owns a qcow2 disk.
//!
//! Everything here is `no_std` + `alloc` and is tested on the host. The bare-metal kernel
//! (`kernel/`) binds it to virtio devices; the runner (`runner/`) uses it on host files.
//!
//! - [`block`]: the byte-addressed [`block::BlockDevice`] the engine sits on.
//! - [`blkqueue`]: block requests on a queue device (virtio-blk planning).
//! - [`disk`]: the [`disk::VirtualDisk`] a client sees (qcow2 or raw) and its errors.
//! - [`qcow2`]: the qcow2 engine.
//! - [`metrics`]: counters, gauges, histograms and the Prometheus/OpenMetrics encoders.
//! - [`http`]: the sans-I/O HTTP/1.1 responder that serves `/metrics`.
//! - [`nbd`]: the sans-I/O NBD server.
//! - [`service`]: the guest's services and main loop (the loop itself with feature `smoltcp`).
//! - [`net`]: the network interface's counters.
//! - [`telemetry`]: the guest's `/metrics` exposition, assembled from every layer's families.
//! - [`config`]: the kernel command line, parsed into a typed configuration.
//! - [`hostfile`]: how the guest asks the runner to grow its disk's host file.
//! - [`compaction`]: when the guest compacts its image online (the policy at work).
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod blkqueue;
pub mod block;
pub mod compaction;
pub mod config;
pub mod disk;
pub mod hostfile;
pub mod http;
pub mod metrics;
pub mod nbd;
pub mod net;
pub mod qcow2;
pub mod service;
pub mod telemetry;
