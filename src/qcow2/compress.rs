//! Compressed clusters (reading): QEMU's default compression type 0 stores each compressed
//! cluster as a raw deflate stream (no zlib header). The stream is inflated into one
//! cluster; decompression stops when the cluster is full.

use super::error::{Qcow2Error, Result};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};

/// Reusable state for inflating compressed clusters (allocated on the first one).
#[derive(Default)]
pub struct Inflater {
    state: Option<Box<DecompressorOxide>>,
    /// Compressed bytes read from the device.
    pub input: Vec<u8>,
}

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
    pub fn inflate(&mut self, len: usize, out: &mut [u8]) -> Result<usize> {
        let state = self
            .state
            .get_or_insert_with(|| Box::new(DecompressorOxide::new()));
        state.init();
        let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
        let (status, used, written) = decompress(state, &self.input[..len], out, 0, flags);
        match status {
            TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(used),
            _ => Err(Qcow2Error::Corrupt(
                "a compressed cluster does not inflate to a whole cluster",
            )),
        }
    }
}
