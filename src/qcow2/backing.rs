//! Backing files: the read-only layers under an overlay.
//!
//! An overlay's unallocated clusters read from the layer below it ([`Backing`]), which is a
//! qcow2 image (opened read-only, with its own backing, to any depth) or a raw device. Past
//! a layer's end its bytes read as zeros (an overlay may be larger than its base). The
//! engine owns the chain: [`Qcow2::open_with_backing`] takes the layer below; reads fall
//! through it, partial writes copy the rest of the cluster up from it, and write-zeroes and
//! discard leave zero clusters (version 3) so that it does not show through.

use super::error::{Qcow2Error, Result};
use super::{ClusterKind, Qcow2};
use crate::block::BlockDevice;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// What a layer of a backing chain is.
pub enum Layer<D: BlockDevice> {
    /// A qcow2 image, opened read-only (it may have its own backing).
    Qcow2(Box<Qcow2<D>>),
    /// A raw device: its bytes are the layer's contents, its capacity the layer's size.
    Raw(D),
}

/// The layer under an overlay, with the count of data bytes it served.
pub struct Backing<D: BlockDevice> {
    layer: Layer<D>,
    /// Bytes a raw layer served (a qcow2 layer counts in its own [`super::Stats`]).
    raw_bytes_read: u64,
}

impl<D: BlockDevice> Backing<D> {
    /// A qcow2 layer. It must have been opened read-only (a layer is never written).
    pub fn qcow2(image: Qcow2<D>) -> Result<Self> {
        if !image.read_only {
            return Err(Qcow2Error::Invalid(
                "a backing layer must be opened read-only",
            ));
        }
        Ok(Backing {
            layer: Layer::Qcow2(Box::new(image)),
            raw_bytes_read: 0,
        })
    }

    /// A raw layer: the device's bytes.
    pub fn raw(dev: D) -> Self {
        Backing {
            layer: Layer::Raw(dev),
            raw_bytes_read: 0,
        }
    }

    /// The layer itself.
    pub fn layer(&self) -> &Layer<D> {
        &self.layer
    }

    /// The layer's size in bytes (its virtual size, or a raw device's capacity).
    pub fn size(&self) -> u64 {
        match &self.layer {
            Layer::Qcow2(q) => q.hdr.size,
            Layer::Raw(d) => d.capacity(),
        }
    }

    /// Data bytes served from this layer's own clusters (or a raw layer's bytes), and below
    /// it those of each deeper layer: element 0 is this layer.
    fn data_bytes_read(&self, out: &mut Vec<u64>) {
        match &self.layer {
            Layer::Qcow2(q) => {
                out.push(q.stats.data_bytes_read);
                if let Some(b) = &q.backing {
                    b.data_bytes_read(out);
                }
            }
            Layer::Raw(_) => out.push(self.raw_bytes_read),
        }
    }

    /// Reads `buf` at `offset` of the layer; bytes past its end read as zeros.
    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inside = self.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        if !head.is_empty() {
            match &mut self.layer {
                Layer::Qcow2(q) => q.read_at(offset, head)?,
                Layer::Raw(d) => {
                    super::read_dev(d, offset, head)?;
                    self.raw_bytes_read += inside as u64;
                }
            }
        }
        tail.fill(0);
        Ok(())
    }

    /// The allocation of the run at `offset` (at most `len` bytes) as this layer reads it:
    /// [`ClusterKind::Data`] where it holds data (its own or from further down),
    /// [`ClusterKind::Unallocated`] past its end.
    pub(crate) fn status(&mut self, offset: u64, len: u64) -> Result<(ClusterKind, u64)> {
        let size = self.size();
        if offset >= size {
            return Ok((ClusterKind::Unallocated, len));
        }
        let len = len.min(size - offset);
        match &mut self.layer {
            Layer::Qcow2(q) => q.status(offset, len),
            Layer::Raw(_) => Ok((ClusterKind::Data, len)),
        }
    }
}

impl<D: BlockDevice> Qcow2<D> {
    /// Opens the overlay on `dev` over the layer `backing` (which it reads where its own
    /// clusters are unallocated). An image with a backing file name must be opened this
    /// way ([`Qcow2::open`] refuses it); `backing` may be `None` for an image without one.
    pub fn open_with_backing(
        dev: D,
        opts: super::OpenOptions,
        backing: Option<Backing<D>>,
    ) -> Result<Self> {
        let mut q = Self::open_unchained(dev, opts)?;
        if q.hdr.backing_file.is_some() && backing.is_none() {
            return Err(Qcow2Error::BackingRequired);
        }
        q.backing = backing.map(Box::new);
        q.stats.chain_layers = q.chain_depth() as u64;
        Ok(q)
    }

    /// The layer under this image, if it has one.
    pub fn backing(&self) -> Option<&Backing<D>> {
        self.backing.as_deref()
    }

    /// Layers in the chain, this image included (1 without a backing file).
    pub fn chain_depth(&self) -> usize {
        let mut out = Vec::new();
        self.layer_data_bytes_into(&mut out);
        out.len()
    }

    /// Data bytes each layer of the chain served from its own clusters since open: element
    /// 0 is this image (its [`super::Stats::data_bytes_read`]), element 1 its backing, and
    /// so on down the chain.
    pub fn layer_data_bytes(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.layer_data_bytes_into(&mut out);
        out
    }

    fn layer_data_bytes_into(&self, out: &mut Vec<u64>) {
        out.push(self.stats.data_bytes_read);
        if let Some(b) = &self.backing {
            b.data_bytes_read(out);
        }
    }

    /// Copies each backing layer's served-bytes count into [`super::Stats`].
    fn note_layer_reads(&mut self) {
        let counts = &mut self.stats.layer_data_bytes_read;
        let mut layer = self.backing.as_deref();
        let mut d = 0;
        while let Some(b) = layer {
            let (served, below) = match &b.layer {
                Layer::Qcow2(q) => (q.stats.data_bytes_read, q.backing.as_deref()),
                Layer::Raw(_) => (b.raw_bytes_read, None),
            };
            if let Some(c) = counts.get_mut(d) {
                *c = served;
            }
            layer = below;
            d += 1;
        }
    }

    /// Whether unallocated clusters read from a backing layer (instead of as zeros).
    pub(crate) fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// Fills `buf` with what unallocated guest bytes at `offset` read as: the backing
    /// layer's bytes, or zeros without one.
    pub(crate) fn read_unallocated(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &mut self.backing {
            Some(b) => {
                let r = b.read(offset, buf);
                self.note_layer_reads();
                r
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The allocation of an unallocated run of this image, as the chain below reads it.
    pub(crate) fn unallocated_status(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<(ClusterKind, u64)> {
        match &mut self.backing {
            Some(b) => {
                let (k, n) = b.status(offset, len)?;
                let k = match k {
                    ClusterKind::Compressed => ClusterKind::Data,
                    k => k,
                };
                Ok((k, n.min(len)))
            }
            None => Ok((ClusterKind::Unallocated, len)),
        }
    }
}
