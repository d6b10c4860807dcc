//! The guest's services: the metrics (HTTP) and NBD ports served from one polled loop.
//!
//! - [`socket`]: the [`socket::Socket`] trait, all a session needs of a TCP connection.
//! - [`http`], [`nbd`], [`session`]: one accepted connection of each port, driving the
//!   sans-I/O protocol state machines ([`crate::http`], [`crate::nbd`]) over a socket.
//! - [`disk`]: the disk the guest serves ([`disk::Disk`]: qcow2, raw, or none and why) and
//!   how it is opened on the block device ([`disk::open_disk`]).
//! - [`telemetry`]: what the listener pools report (connections refused, evicted, timed
//!   out, per port; socket buffer memory).
//! - [`net`] (feature `smoltcp`): the smoltcp interface, its address, the listener pools.
//! - [`guest`] (feature `smoltcp`): the main loop ([`guest::Guest`]), generic over the
//!   network device, the block device and the [`guest::Platform`] (clock, halting, power
//!   button). The kernel supplies the one real platform; host tests supply their own.

pub mod disk;
#[cfg(feature = "smoltcp")]
pub mod guest;
pub mod http;
pub mod nbd;
#[cfg(feature = "smoltcp")]
pub mod net;
pub mod session;
pub mod socket;
pub mod telemetry;

#[cfg(all(test, feature = "smoltcp"))]
mod tests;
