//! What opening, creating, checking and serving a qcow2 image can fail with.

use crate::block::BlockError;
use crate::disk::DiskError;
use core::fmt;

/// An error of the qcow2 engine. Every variant's message says what is wrong and, where the
/// user can do something about it, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Qcow2Error {
    /// The device under the image failed.
    Device(BlockError),
    /// The first bytes are not a qcow2 header.
    NotQcow2,
    /// A qcow2 version this engine does not read (only 2 and 3 exist).
    UnsupportedVersion(u32),
    /// An incompatible feature bit this engine does not implement is set.
    UnknownIncompatibleFeature {
        /// Bit number in `incompatible_features`.
        bit: u32,
        /// The name from the image's feature-name table, if it has one for this bit.
        name: Option<heapless::String<46>>,
    },
    /// A feature the image uses that this engine does not (yet) implement.
    Unsupported(&'static str),
    /// A header field has an impossible value.
    BadHeader(&'static str),
    /// The image's metadata is inconsistent in a way that stops the operation.
    Corrupt(&'static str),
    /// The image is marked corrupt (incompatible bit 1) and was opened for writing.
    MarkedCorrupt,
    /// A write was refused because it would have overwritten metadata (a corrupt L2 entry,
    /// refcount or table pointer sent it there); the image is now marked corrupt.
    Overlap {
        /// Host offset of the metadata the write would have hit.
        offset: u64,
        /// Which metadata structure ("an active L2 table", "a refcount block", ...).
        what: &'static str,
    },
    /// The image has a backing file but was opened without its backing chain.
    BackingRequired,
    /// The request or option is outside what the image or engine allows.
    Invalid(&'static str),
    /// The device under the image is full.
    NoSpace,
    /// The image is open read-only.
    ReadOnly,
    /// A consistency check would need more memory than allowed.
    TooLarge(&'static str),
}

impl fmt::Display for Qcow2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Qcow2Error::Device(e) => write!(f, "device error under the qcow2 image: {e}"),
            Qcow2Error::NotQcow2 => f.write_str(
                "not a qcow2 image (the magic bytes QFI\\xfb are missing); use raw mode or \
                 create the image with `image create`",
            ),
            Qcow2Error::UnsupportedVersion(v) => write!(
                f,
                "qcow2 version {v} is not supported (only 2 and 3); convert the image with \
                 `qemu-img convert -O qcow2`"
            ),
            Qcow2Error::UnknownIncompatibleFeature { bit, name } => {
                write!(f, "the image uses incompatible feature bit {bit}")?;
                if let Some(name) = name {
                    write!(f, " ({name})")?;
                }
                f.write_str(
                    " which this engine does not implement; convert it with \
                     `qemu-img convert -O qcow2` to a plain image",
                )
            }
            Qcow2Error::Unsupported(what) => write!(
                f,
                "the image uses {what}, which this engine does not support yet; convert it \
                 with `qemu-img convert -O qcow2`"
            ),
            Qcow2Error::BadHeader(what) => {
                write!(
                    f,
                    "invalid qcow2 header: {what}; the image is damaged or not qcow2"
                )
            }
            Qcow2Error::Corrupt(what) => write!(
                f,
                "qcow2 image corrupt: {what}; run `image check --repair` (or `qemu-img check -r all`)"
            ),
            Qcow2Error::MarkedCorrupt => f.write_str(
                "the image is marked corrupt (incompatible bit 1) and cannot be opened for \
                 writing; open it read-only or run `image check --repair`",
            ),
            Qcow2Error::Overlap { offset, what } => write!(
                f,
                "qcow2 image corrupt: refused a write that would overwrite {what} at host \
                 offset {offset:#x}; the image is marked corrupt, run `image check --repair` \
                 (or `qemu-img check -r all`)"
            ),
            Qcow2Error::BackingRequired => f.write_str(
                "the image is an overlay on a backing file and was opened without it; open \
                 it with its backing chain (the runner attaches every layer; `image info \
                 --backing-chain` lists them)",
            ),
            Qcow2Error::Invalid(what) => write!(f, "invalid request: {what}"),
            Qcow2Error::NoSpace => f.write_str(
                "no space left on the device under the image; give the disk more room \
                 (see max_image_len) or discard data",
            ),
            Qcow2Error::ReadOnly => f.write_str("the image is open read-only"),
            Qcow2Error::TooLarge(what) => write!(
                f,
                "{what}; raise the memory limit in the open options or check on a bigger host"
            ),
        }
    }
}

impl core::error::Error for Qcow2Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Qcow2Error::Device(e) => Some(e),
            _ => None,
        }
    }
}

impl From<BlockError> for Qcow2Error {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::OutOfRange { .. } => Qcow2Error::NoSpace,
            BlockError::ReadOnly => Qcow2Error::ReadOnly,
            other => Qcow2Error::Device(other),
        }
    }
}

impl From<Qcow2Error> for DiskError {
    fn from(e: Qcow2Error) -> Self {
        match e {
            Qcow2Error::Device(b) => DiskError::Device(b),
            Qcow2Error::NoSpace => DiskError::NoSpace,
            Qcow2Error::ReadOnly => DiskError::ReadOnly,
            Qcow2Error::Invalid(_) => DiskError::Invalid,
            Qcow2Error::Unsupported(_) => DiskError::Unsupported,
            Qcow2Error::Corrupt(what)
            | Qcow2Error::BadHeader(what)
            | Qcow2Error::TooLarge(what) => DiskError::Corrupt(what),
            Qcow2Error::MarkedCorrupt => DiskError::Corrupt("image marked corrupt"),
            Qcow2Error::Overlap { what, .. } => DiskError::Corrupt(what),
            Qcow2Error::NotQcow2 => DiskError::Corrupt("not a qcow2 image"),
            Qcow2Error::UnsupportedVersion(_) | Qcow2Error::BackingRequired => {
                DiskError::Unsupported
            }
            Qcow2Error::UnknownIncompatibleFeature { .. } => DiskError::Unsupported,
        }
    }
}

/// Shorthand for engine results.
pub type Result<T> = core::result::Result<T, Qcow2Error>;
