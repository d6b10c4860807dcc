//! Compressed clusters: the two compression types QEMU writes, both ways.
//!
//! - Type 0, zlib (the default): each compressed cluster is a raw deflate stream (no zlib
//!   header or trailer).
//! - Type 1, zstd (header field `compression_type`, incompatible bit 3): each compressed
//!   cluster is one zstd frame.
//!
//! Reading inflates into one whole cluster and stops there (the stored length is rounded
//! up to 512-byte sectors, so bytes after the stream are whatever follows on disk).
//! Writing ([`ClusterCompressor`]) is a pure function of the cluster's bytes, so callers
//! may compress on several threads and hand the results to
//! [`Qcow2::write_compressed`](super::Qcow2::write_compressed) in order.
//!
//! QEMU inflates a zlib cluster in one call with the whole cluster as output, so the
//! deflate window of the writer (32 KiB here, 4 KiB in QEMU's writer) does not matter to
//! it; `qemu-img compare` and `check` run on our output in the tests.

use super::error::{Qcow2Error, Result};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use miniz_oxide::deflate::core::{
    CompressorOxide, TDEFLFlush, TDEFLStatus, create_comp_flags_from_zip_params,
};
use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use ruzstd::encoding::{CompressionLevel, FrameCompressor};

/// The compression type of an image (header byte 104 of a version 3 header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Type 0: raw deflate, the default.
    #[default]
    Zlib,
    /// Type 1: zstd (needs incompatible bit 3).
    Zstd,
}

impl CompressionType {
    /// The type with header value `v`, if the format defines one.
    pub fn from_byte(v: u8) -> Option<Self> {
        match v {
            0 => Some(CompressionType::Zlib),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    /// The header value.
    pub fn to_byte(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// The name QEMU uses (`compression_type=zlib|zstd`).
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    /// The type named `name` (`zlib` or `zstd`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "zlib" => Some(CompressionType::Zlib),
            "zstd" => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// Reusable state for inflating compressed clusters (allocated on the first one).
#[derive(Default)]
pub struct Inflater {
    zlib: Option<Box<DecompressorOxide>>,
    zstd: Option<Box<FrameDecoder>>,
    /// Compressed bytes read from the device.
    pub input: Vec<u8>,
}

/// The error every undecodable compressed cluster gives.
const BAD_CLUSTER: Qcow2Error =
    Qcow2Error::Corrupt("a compressed cluster does not inflate to a whole cluster");

impl Inflater {
    /// A buffer of `len` bytes for the compressed data.
    pub fn input_buf(&mut self, len: usize) -> &mut [u8] {
        if self.input.len() < len {
            self.input = vec![0; len];
        }
        &mut self.input[..len]
    }

    /// Inflates the first `len` bytes of the input buffer into `out` (one whole cluster);
    /// returns how many input bytes the stream used (where it ends, when it ends before
    /// `len`).
    pub fn inflate(&mut self, kind: CompressionType, len: usize, out: &mut [u8]) -> Result<usize> {
        match kind {
            CompressionType::Zlib => self.inflate_zlib(len, out),
            CompressionType::Zstd => self.inflate_zstd(len, out),
        }
    }

    fn inflate_zlib(&mut self, len: usize, out: &mut [u8]) -> Result<usize> {
        let state = self
            .zlib
            .get_or_insert_with(|| Box::new(DecompressorOxide::new()));
        state.init();
        let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        let (status, used, written) = decompress(state, &self.input[..len], out, 0, flags);
        match status {
            TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(used),
            _ => Err(BAD_CLUSTER),
        }
    }

    /// Decodes zstd frames until `out` is full (QEMU's reader goes on into a next frame
    /// too); bytes after that are padding.
    fn inflate_zstd(&mut self, len: usize, out: &mut [u8]) -> Result<usize> {
        let dec = self.zstd.get_or_insert_with(|| {
            let mut d = FrameDecoder::new();
            // A cluster is at most 2 MiB: a frame asking for a bigger window is not ours.
            d.set_max_window_size(8 << 20);
            Box::new(d)
        });
        let mut src: &[u8] = &self.input[..len];
        let mut written = 0;
        while written < out.len() {
            dec.reset(&mut src).map_err(|_| BAD_CLUSTER)?;
            loop {
                let want = out.len() - written;
                dec.decode_blocks(&mut src, BlockDecodingStrategy::UptoBytes(want))
                    .map_err(|_| BAD_CLUSTER)?;
                let n = ruzstd::io::Read::read(&mut **dec, &mut out[written..])
                    .map_err(|_| BAD_CLUSTER)?;
                written += n;
                if written == out.len() {
                    break;
                }
                if dec.is_finished() && dec.can_collect() == 0 {
                    break;
                }
                if n == 0 && src.is_empty() {
                    return Err(BAD_CLUSTER);
                }
            }
            if written < out.len() && src.is_empty() {
                return Err(BAD_CLUSTER);
            }
        }
        Ok(len - src.len())
    }
}

/// Compresses clusters for [`Qcow2::write_compressed`](super::Qcow2::write_compressed);
/// keeps its buffers between clusters. One per thread.
pub struct ClusterCompressor {
    kind: CompressionType,
    zlib: Option<Box<CompressorOxide>>,
}

/// zlib level used for compressed clusters: zlib's default (6), as QEMU uses.
const ZLIB_LEVEL: i32 = 6;

impl ClusterCompressor {
    /// A compressor for compression type `kind`.
    pub fn new(kind: CompressionType) -> Self {
        ClusterCompressor { kind, zlib: None }
    }

    /// Compresses one cluster (`data`, the whole cluster) into `out`. Returns `false`
    /// when the result would not be smaller than the cluster: such a cluster is stored
    /// uncompressed, as QEMU does (`out` is then unspecified).
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        match self.kind {
            CompressionType::Zlib => self.deflate(data, out),
            CompressionType::Zstd => self.zstd(data, out),
        }
    }

    fn deflate(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        let flags = create_comp_flags_from_zip_params(ZLIB_LEVEL, -15, 0);
        let c = self
            .zlib
            .get_or_insert_with(|| Box::new(CompressorOxide::new(flags)));
        c.reset();
        // Anything that does not fit in one byte less than the cluster is useless.
        out.resize(data.len().saturating_sub(1), 0);
        let (status, used, n) =
            miniz_oxide::deflate::core::compress(c, data, out, TDEFLFlush::Finish);
        if status != TDEFLStatus::Done || used != data.len() {
            return false;
        }
        out.truncate(n);
        true
    }

    fn zstd(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        // A fresh frame compressor per cluster: its state is a few tables, small next to
        // the matching work of a cluster.
        let mut c = FrameCompressor::new(CompressionLevel::Fastest);
        c.set_source(data);
        c.set_drain(&mut *out);
        c.compress();
        drop(c);
        out.len() < data.len()
    }
}
