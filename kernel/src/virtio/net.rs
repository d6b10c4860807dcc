//! virtio-net as a smoltcp [`phy::Device`], on `virtio-drivers`' [`VirtIONetRaw`].
//!
//! `virtio-drivers`' buffered `VirtIONet` waits for every transmitted packet to complete;
//! that costs a round trip to the host per packet, which caps TCP throughput. This device
//! keeps [`QUEUE_SIZE`] receive buffers posted and up to [`QUEUE_SIZE`] packets in flight on
//! the transmit queue, reclaiming finished transmit buffers whenever smoltcp asks for a token.
//! A received frame is handed to smoltcp in place, and smoltcp writes an outgoing frame
//! straight into the buffer the device reads: no copies besides smoltcp's own.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::sync::atomic::Ordering;
use log::warn;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::PciTransport;

use super::KernelHal;

/// Descriptors per queue (receive and transmit).
pub const QUEUE_SIZE: usize = 64;
/// Size of every receive and transmit buffer: the virtio-net header plus a 1514-byte frame.
const BUF_LEN: usize = 2048;
/// Largest Ethernet frame (without FCS) at the standard 1500-byte MTU.
const MAX_FRAME: usize = 1514;

/// Packet and byte counts of the network device (the library's, which also writes their
/// families at scrape time).
pub use qcow_metal::net::NetStats;

struct Inner {
    raw: VirtIONetRaw<KernelHal, PciTransport, QUEUE_SIZE>,
    /// Receive buffers the device holds, by descriptor token.
    rx_posted: Vec<Option<Box<[u8]>>>,
    /// Transmit buffers the device holds (with the length shared), by descriptor token.
    tx_posted: Vec<Option<(Box<[u8]>, usize)>>,
    /// Transmit buffers ready for use.
    tx_free: Vec<Box<[u8]>>,
    /// Length of the virtio-net header in front of every frame.
    header_len: usize,
}

impl Inner {
    /// Gives a receive buffer (back) to the device.
    fn post_rx(&mut self, mut buf: Box<[u8]>) {
        // SAFETY: the buffer is moved into `rx_posted` under its token right away and is not
        // touched until the device hands the token back in `poll_receive`.
        match unsafe { self.raw.receive_begin(&mut buf) } {
            Ok(token) => match self.rx_posted.get_mut(usize::from(token)) {
                Some(slot @ None) => *slot = Some(buf),
                _ => warn!("receive token {token} already in use"),
            },
            Err(e) => warn!("cannot post a receive buffer: {e}"),
        }
    }

    /// Moves every transmit buffer the device has finished with back to the free list.
    fn reclaim_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some((buf, len)) = self
                .tx_posted
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                warn!("the device completed an unknown transmission {token}");
                return;
            };
            // SAFETY: `buf[..len]` is the slice passed to `transmit_begin` for this token.
            if let Err(e) = unsafe { self.raw.transmit_complete(token, &buf[..len]) } {
                warn!("transmit completion failed: {e}");
            }
            self.tx_free.push(buf);
        }
    }
}

/// The virtio-net device, ready for a smoltcp `Interface`.
pub struct VirtioNet {
    inner: RefCell<Inner>,
    mac: [u8; 6],
    stats: alloc::sync::Arc<NetStats>,
}

impl VirtioNet {
    /// Initialises the device behind `transport` and posts every receive buffer.
    pub fn new(
        transport: PciTransport,
        stats: alloc::sync::Arc<NetStats>,
    ) -> Result<Self, virtio_drivers::Error> {
        let mut raw = VirtIONetRaw::<KernelHal, PciTransport, QUEUE_SIZE>::new(transport)?;
        // Polled: the device need not interrupt.
        raw.disable_interrupts();
        let mac = raw.mac_address();
        let mut probe = [0u8; 64];
        let header_len = raw.fill_buffer_header(&mut probe)?;
        let mut inner = Inner {
            raw,
            rx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_free: (0..QUEUE_SIZE)
                .map(|_| vec![0u8; BUF_LEN].into_boxed_slice())
                .collect(),
            header_len,
        };
        for _ in 0..QUEUE_SIZE {
            inner.post_rx(vec![0u8; BUF_LEN].into_boxed_slice());
        }
        Ok(VirtioNet {
            inner: RefCell::new(inner),
            mac,
            stats,
        })
    }

    /// The device's MAC address.
    pub fn mac_address(&self) -> [u8; 6] {
        self.mac
    }

    /// Lets the device interrupt (INTx) when it uses a buffer, to wake an idle CPU.
    pub fn enable_interrupts(&mut self) {
        self.inner.get_mut().raw.enable_interrupts();
    }

    /// Acknowledges a pending interrupt (reading the ISR deasserts the INTx line).
    pub fn ack_interrupt(&mut self) {
        let _ = self.inner.get_mut().raw.ack_interrupt();
    }

    /// Whether a received frame is waiting (cheap: one look at the used ring).
    pub fn has_rx(&self) -> bool {
        self.inner.borrow().raw.poll_receive().is_some()
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let inner = self.inner.get_mut();
        inner.reclaim_tx();
        loop {
            let token = inner.raw.poll_receive()?;
            let Some(mut buf) = inner
                .rx_posted
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                warn!("the device returned an unknown receive buffer {token}");
                return None;
            };
            // SAFETY: `buf` is the buffer passed to `receive_begin` for this token.
            match unsafe { inner.raw.receive_complete(token, &mut buf) } {
                Ok((header, len)) if header + len <= buf.len() => {
                    self.stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                    self.stats.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    return Some((
                        RxToken {
                            buf: Some(buf),
                            start: header,
                            len,
                            dev: &self.inner,
                        },
                        TxToken {
                            dev: &self.inner,
                            stats: &self.stats,
                        },
                    ));
                }
                _ => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    inner.post_rx(buf);
                }
            }
        }
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        let inner = self.inner.get_mut();
        inner.reclaim_tx();
        if inner.tx_free.is_empty() {
            return None;
        }
        Some(TxToken {
            dev: &self.inner,
            stats: &self.stats,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(QUEUE_SIZE);
        caps
    }
}

/// A received frame, lent to smoltcp; its buffer goes back to the device afterwards.
pub struct RxToken<'a> {
    buf: Option<Box<[u8]>>,
    start: usize,
    len: usize,
    dev: &'a RefCell<Inner>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(mut self, f: F) -> R {
        let buf = self.buf.take().unwrap_or_default();
        // No borrow of the device is held while smoltcp looks at the frame: it may send a
        // reply through the paired transmit token meanwhile.
        let r = f(buf.get(self.start..self.start + self.len).unwrap_or(&[]));
        if !buf.is_empty() {
            self.dev.borrow_mut().post_rx(buf);
        }
        r
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        // A token smoltcp did not consume still returns its buffer to the device.
        if let Some(buf) = self.buf.take() {
            self.dev.borrow_mut().post_rx(buf);
        }
    }
}

/// Permission to send one frame: smoltcp builds it in a buffer the device then reads.
pub struct TxToken<'a> {
    dev: &'a RefCell<Inner>,
    stats: &'a NetStats,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let (buf, header_len) = {
            let mut inner = self.dev.borrow_mut();
            inner.reclaim_tx();
            let header_len = inner.header_len;
            (inner.tx_free.pop(), header_len)
        };
        let Some(mut buf) = buf.filter(|b| header_len + len <= b.len()) else {
            // No buffer (or a frame larger than the MTU): build it in scratch memory and drop
            // it; TCP retransmits.
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            let mut scratch = vec![0u8; len];
            return f(&mut scratch);
        };
        let r = f(&mut buf[header_len..header_len + len]);
        let mut inner = self.dev.borrow_mut();
        if let Err(e) = inner.raw.fill_buffer_header(&mut buf[..header_len]) {
            warn!("cannot fill the header: {e}");
        }
        let frame_len = header_len + len;
        // SAFETY: the buffer is moved into `tx_posted` (with the frame length) right away and
        // not touched until `reclaim_tx` sees the token completed.
        match unsafe { inner.raw.transmit_begin(&buf[..frame_len]) } {
            Ok(token) => {
                self.stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                self.stats.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                match inner.tx_posted.get_mut(usize::from(token)) {
                    Some(slot @ None) => *slot = Some((buf, frame_len)),
                    _ => warn!("transmit token {token} already in use"),
                }
            }
            Err(e) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                warn!("cannot queue a frame: {e}");
                inner.tx_free.push(buf);
            }
        }
        r
    }
}
