//! Backing chains: naming the layers, and opening a whole chain from its devices.
//!
//! In the guest every layer is a read-only virtio-blk device whose serial (virtio-blk
//! `GET_ID`) says which layer it is and its format ([`layer_serial`]): the guest never
//! relies on device order. [`open_chain`] takes the devices with their serials and returns
//! the opened overlay, or an error naming the layer. On the host (`std`), [`files`]
//! resolves a chain from an image file as QEMU does and opens it.

use super::backing::Backing;
use super::error::Qcow2Error;
use super::header::{EXT_BACKING_FORMAT, Header};
use super::{OpenOptions, Qcow2};
use crate::block::BlockDevice;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// The format of a backing layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerFormat {
    /// A qcow2 image (which may have its own backing file).
    Qcow2,
    /// Raw bytes (the end of a chain).
    Raw,
}

impl LayerFormat {
    /// The name QEMU uses (`qcow2`, `raw`).
    pub fn name(self) -> &'static str {
        match self {
            LayerFormat::Qcow2 => "qcow2",
            LayerFormat::Raw => "raw",
        }
    }

    /// Parses a QEMU format name; `None` for formats this engine cannot serve as a layer.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "qcow2" => Some(LayerFormat::Qcow2),
            "raw" => Some(LayerFormat::Raw),
            _ => None,
        }
    }
}

impl Header {
    /// The backing file format from the header extension (`qemu-img create -F`), if any.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| {
                let n = e.data.iter().position(|&b| b == 0).unwrap_or(e.data.len());
                String::from_utf8_lossy(&e.data[..n]).into_owned()
            })
    }
}

/// Prefix of every layer serial.
const SERIAL_PREFIX: &str = "qm-layer";

/// The virtio-blk serial of the disk itself (the overlay, or a disk without a chain).
pub const DISK_SERIAL: &str = "qm-disk";

/// Sorts the guest's virtio-blk devices, each with its serial (`None`: none or unreadable),
/// into the disk and the backing layers (with their serials, for [`open_chain`]). The disk
/// is the device with serial [`DISK_SERIAL`]; without one (QEMU started by hand), the one
/// device without a layer serial. `None` for the disk when there is no device.
#[allow(clippy::type_complexity)]
pub fn split_devices<D>(
    devices: Vec<(Option<String>, D)>,
) -> Result<(Option<D>, Vec<(String, D)>), &'static str> {
    let mut disk = None;
    let mut others = Vec::new();
    let mut layers = Vec::new();
    for (serial, dev) in devices {
        match serial {
            Some(s) if s == DISK_SERIAL => {
                if disk.is_some() {
                    return Err("two virtio-blk devices have the disk's serial `qm-disk`");
                }
                disk = Some(dev);
            }
            Some(s) if parse_layer_serial(&s).is_some() => layers.push((s, dev)),
            _ => others.push(dev),
        }
    }
    if disk.is_none() {
        if others.len() > 1 {
            return Err(
                "several virtio-blk devices and none has the serial `qm-disk`: give the disk                  `serial=qm-disk` (the runner does)",
            );
        }
        disk = others.pop();
    }
    Ok((disk, layers))
}

/// The virtio-blk serial of backing layer `depth` (1: the overlay's backing file, 2: its
/// backing, ...) in `format`, e.g. `qm-layer1-qcow2`. At most 20 bytes (virtio-blk's ID
/// length) for any depth below 100000.
pub fn layer_serial(depth: usize, format: LayerFormat) -> String {
    format!("{SERIAL_PREFIX}{depth}-{}", format.name())
}

/// Parses a serial made by [`layer_serial`]; `None` for any other serial (such as the
/// overlay's own disk, or a device that is no layer).
pub fn parse_layer_serial(serial: &str) -> Option<(usize, LayerFormat)> {
    let rest = serial.strip_prefix(SERIAL_PREFIX)?;
    let (depth, format) = rest.split_once('-')?;
    let depth: usize = depth.parse().ok()?;
    (depth >= 1).then_some(())?;
    Some((depth, LayerFormat::from_name(format)?))
}

/// Why a chain could not be opened: which layer (0 is the overlay) and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainError {
    /// The layer: 0 for the overlay, 1 for its backing file, and so on.
    pub depth: usize,
    /// What is wrong with it.
    pub error: ChainFault,
}

/// What is wrong with a layer of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainFault {
    /// The layer's device is not attached (the chain has a gap).
    Missing,
    /// Two devices claim the same layer.
    Duplicate,
    /// The layer has no backing file, yet deeper layers are attached.
    Unexpected,
    /// The engine refused the layer.
    Open(Qcow2Error),
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.depth;
        let which = if d == 0 {
            String::from("the overlay")
        } else {
            format!("backing layer {d} (virtio-blk serial `{SERIAL_PREFIX}{d}-...`)")
        };
        match &self.error {
            ChainFault::Missing => write!(
                f,
                "{which} is not attached: give the guest every layer of the chain (the runner \
                 does; `image info --backing-chain` lists them)"
            ),
            ChainFault::Duplicate => write!(f, "{which} is attached twice"),
            ChainFault::Unexpected => write!(
                f,
                "{which} is attached but the layer above it has no backing file"
            ),
            ChainFault::Open(e) => write!(f, "{which} cannot be opened: {e}"),
        }
    }
}

/// Opens the qcow2 overlay on `top` over the backing layers in `layers` (each with its
/// serial; any order; devices without a layer serial are ignored). Layers are opened
/// read-only with `opts`' cache budgets, from the deepest up; the overlay with `opts`.
pub fn open_chain<D: BlockDevice>(
    top: D,
    opts: OpenOptions,
    layers: Vec<(String, D)>,
) -> Result<Qcow2<D>, ChainError> {
    let mut slots: Vec<Option<(LayerFormat, D)>> = Vec::new();
    for (serial, dev) in layers {
        let Some((depth, format)) = parse_layer_serial(&serial) else {
            continue;
        };
        if slots.len() < depth {
            slots.resize_with(depth, || None);
        }
        if slots[depth - 1].is_some() {
            return Err(ChainError {
                depth,
                error: ChainFault::Duplicate,
            });
        }
        slots[depth - 1] = Some((format, dev));
    }
    let layer_opts = OpenOptions {
        read_only: true,
        zero_tail: false,
        repair: false,
        ..opts.clone()
    };
    // From the deepest layer up: each opens over the one below it.
    let mut below: Option<Backing<D>> = None;
    for depth in (1..=slots.len()).rev() {
        let Some((format, dev)) = slots[depth - 1].take() else {
            return Err(ChainError {
                depth,
                error: ChainFault::Missing,
            });
        };
        below = Some(open_layer(depth, format, dev, &layer_opts, below)?);
    }
    open_over(0, top, opts, below)
}

/// Opens layer `depth` of `format` over `below`.
pub fn open_layer<D: BlockDevice>(
    depth: usize,
    format: LayerFormat,
    dev: D,
    opts: &OpenOptions,
    below: Option<Backing<D>>,
) -> Result<Backing<D>, ChainError> {
    match format {
        LayerFormat::Raw if below.is_some() => Err(ChainError {
            depth: depth + 1,
            error: ChainFault::Unexpected,
        }),
        LayerFormat::Raw => Ok(Backing::raw(dev)),
        LayerFormat::Qcow2 => {
            let q = open_over(depth, dev, opts.clone(), below)?;
            Backing::qcow2(q).map_err(|e| ChainError {
                depth,
                error: ChainFault::Open(e),
            })
        }
    }
}

/// Opens the qcow2 image of layer `depth` over `below`, checking that they belong together.
fn open_over<D: BlockDevice>(
    depth: usize,
    dev: D,
    opts: OpenOptions,
    below: Option<Backing<D>>,
) -> Result<Qcow2<D>, ChainError> {
    let has_below = below.is_some();
    let q = Qcow2::open_with_backing(dev, opts, below).map_err(|e| ChainError {
        depth: if e == Qcow2Error::BackingRequired {
            depth + 1
        } else {
            depth
        },
        error: if e == Qcow2Error::BackingRequired {
            ChainFault::Missing
        } else {
            ChainFault::Open(e)
        },
    })?;
    if has_below && q.header().backing_file.is_none() {
        return Err(ChainError {
            depth: depth + 1,
            error: ChainFault::Unexpected,
        });
    }
    Ok(q)
}

#[cfg(any(test, feature = "std"))]
pub mod files;
