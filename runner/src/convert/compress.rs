//! The compressed output of `image convert -c`: clusters are compressed on every core (std
//! threads) and handed back to the calling thread, which writes them in order
//! ([`Qcow2::write_compressed`]), packed as QEMU packs them.
//!
//! zlib clusters come from the library's [`ClusterCompressor`] (raw deflate at zlib's
//! default level, as QEMU writes them). zstd clusters come from libzstd (the `zstd` crate)
//! at its default level 3, the level QEMU's `qcow2_zstd_compress` uses: one frame per
//! cluster with the content size in its header, which QEMU's reader and ours (ruzstd) both
//! decode.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, Sender, channel, sync_channel};
use std::sync::{Arc, Mutex};

use qcow_metal::block::FileDisk;
use qcow_metal::qcow2::{ClusterCompressor, CompressionType, Qcow2};

use super::{ConvertOptions, ConvertSummary, CopyError, Source, is_zero};

/// Compresses whole clusters of one compression type; one per thread.
pub enum HostCompressor {
    /// Raw deflate (the library's compressor).
    Zlib(ClusterCompressor),
    /// libzstd at level 3.
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

/// zstd level of compressed clusters: libzstd's default, as QEMU leaves it.
const ZSTD_LEVEL: i32 = zstd::DEFAULT_COMPRESSION_LEVEL;

impl HostCompressor {
    /// A compressor for `kind`.
    pub fn new(kind: CompressionType) -> std::io::Result<Self> {
        Ok(match kind {
            CompressionType::Zlib => HostCompressor::Zlib(ClusterCompressor::new(kind)),
            CompressionType::Zstd => {
                HostCompressor::Zstd(Box::new(zstd::bulk::Compressor::new(ZSTD_LEVEL)?))
            }
        })
    }

    /// Compresses one whole cluster `data` into `out`; `false` when the result would not
    /// be smaller than the cluster (it is then stored uncompressed, as QEMU does; `out` is
    /// unspecified).
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        match self {
            HostCompressor::Zlib(c) => c.compress(data, out),
            HostCompressor::Zstd(c) => {
                // Room for one byte less than the cluster: a frame that needs more fails.
                out.clear();
                out.resize(data.len().saturating_sub(1), 0);
                match c.compress_to_buffer(data, &mut out[..]) {
                    Ok(n) if n > 0 => {
                        out.truncate(n);
                        true
                    }
                    _ => false,
                }
            }
        }
    }
}

/// A chunk of clusters for the compression threads.
struct Job {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
    /// Per cluster, for an overlay output (`-B`): whether the new backing file shows
    /// through there (empty otherwise).
    through: Vec<bool>,
}

/// What one cluster of a [`Job`] became.
enum Packed {
    /// Left to the new backing file (`-B`): nothing to write.
    Through,
    /// All zeros: nothing to write (a zero cluster in an overlay).
    Zero,
    /// Did not shrink: written as it is.
    Plain,
    /// Compressed bytes.
    Compressed(Vec<u8>),
}

/// A compressed [`Job`].
struct Done {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
    clusters: Vec<Packed>,
}

fn worker(
    jobs: &Mutex<Receiver<Job>>,
    done: Sender<Done>,
    mut compressor: HostCompressor,
    cs: usize,
) {
    let mut padded = Vec::new();
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let clusters = job
            .data
            .chunks(cs)
            .enumerate()
            .map(|(i, c)| {
                if job.through.get(i) == Some(&true) {
                    return Packed::Through;
                }
                if is_zero(c) {
                    return Packed::Zero;
                }
                let whole = if c.len() < cs {
                    padded.clear();
                    padded.extend_from_slice(c);
                    padded.resize(cs, 0);
                    &padded[..]
                } else {
                    c
                };
                let mut out = Vec::new();
                if compressor.compress(whole, &mut out) {
                    Packed::Compressed(out)
                } else {
                    Packed::Plain
                }
            })
            .collect();
        let result = Done {
            seq: job.seq,
            offset: job.offset,
            data: job.data,
            clusters,
        };
        if done.send(result).is_err() {
            return;
        }
    }
}

/// Finished jobs, written to the image in the order they were sent.
struct InOrder<'a> {
    image: &'a mut Qcow2<FileDisk>,
    cs: usize,
    /// The output is an overlay (`-B`).
    backed: bool,
    /// Finished jobs not written yet, by sequence number.
    ready: BTreeMap<u64, Done>,
    /// Sequence number of the next job to write.
    next_write: u64,
    /// Buffers of written jobs, for the next reads.
    spare: Vec<Vec<u8>>,
}

impl InOrder<'_> {
    /// Takes finished job `done` and writes every job that is next in order.
    fn take(
        &mut self,
        done: Done,
        summary: &mut ConvertSummary,
    ) -> std::result::Result<(), CopyError> {
        self.ready.insert(done.seq, done);
        self.write_ready(summary)
    }

    /// Writes every finished job that is next in order.
    fn write_ready(&mut self, summary: &mut ConvertSummary) -> std::result::Result<(), CopyError> {
        let (image, cs, backed) = (&mut *self.image, self.cs, self.backed);
        while let Some(done) = self.ready.remove(&self.next_write) {
            for (i, packed) in done.clusters.iter().enumerate() {
                let at = done.offset + (i * cs) as u64;
                let len = cs.min(done.data.len() - i * cs);
                match packed {
                    Packed::Through => continue,
                    // An overlay's zeros hide the backing file: a zero cluster.
                    Packed::Zero if backed => {
                        image
                            .zero_range(at, len as u64, true)
                            .map_err(CopyError::Write)?;
                        continue;
                    }
                    Packed::Zero => continue,
                    Packed::Plain => {
                        image
                            .write_at(at, &done.data[i * cs..i * cs + len])
                            .map_err(CopyError::Write)?;
                        summary.uncompressed_clusters += 1;
                    }
                    Packed::Compressed(bytes) => {
                        image
                            .write_compressed(at, bytes)
                            .map_err(CopyError::Write)?;
                        summary.compressed_clusters += 1;
                    }
                }
                summary.bytes_written += len as u64;
            }
            self.spare.push(done.data);
            self.next_write += 1;
        }
        Ok(())
    }
}

/// Compression threads QEMU's qcow2 driver runs at most (`QCOW2_MAX_THREADS`): with fewer
/// cores than that we run as many, so that on a busy machine both tools get the same share
/// of the CPU.
const QEMU_THREADS: usize = 4;

/// Copies `source` into `image` with every nonzero cluster compressed (`chunk_len` bytes
/// per job, a multiple of the cluster size). For an overlay (`-B`), as [`super::to_overlay`]:
/// zeros become zero clusters and what the source's top layer leaves to its backing chain
/// is not written.
pub(super) fn to_compressed(
    source: &mut Source,
    image: &mut Qcow2<FileDisk>,
    opts: &ConvertOptions,
    chunk_len: usize,
    summary: &mut ConvertSummary,
    progress: &mut impl FnMut(u64, u64),
) -> std::result::Result<(), CopyError> {
    let size = source.size();
    let cs = image.cluster_size() as usize;
    let threads = if opts.threads > 0 {
        opts.threads
    } else {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        cores.max(QEMU_THREADS)
    };
    let in_flight_max = threads * 2;
    let backed = opts.backing.is_some();
    let kind = opts.compression_type;
    let compressors = (0..threads)
        .map(|_| HostCompressor::new(kind))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(CopyError::Compress)?;
    let (job_tx, job_rx) = sync_channel::<Job>(in_flight_max);
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = channel::<Done>();
    std::thread::scope(|s| {
        for compressor in compressors {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            s.spawn(move || worker(&rx, tx, compressor, cs));
        }
        drop(done_tx);
        let mut out = InOrder {
            image,
            cs,
            backed,
            ready: BTreeMap::new(),
            next_write: 0,
            spare: Vec::new(),
        };
        let mut sent = 0u64;
        let mut off = 0u64;
        let mut result = Ok(());
        while off < size && result.is_ok() {
            let n = (chunk_len as u64).min(size - off) as usize;
            let mut data = out.spare.pop().unwrap_or_default();
            data.resize(n, 0);
            match source.read_sparse(off, &mut data) {
                Ok((read, any)) => {
                    summary.bytes_read += read;
                    let mut through = Vec::new();
                    if backed {
                        for start in (0..n).step_by(cs) {
                            let len = cs.min(n - start) as u64;
                            match source.reads_from_backing(off + start as u64, len) {
                                Ok(t) => through.push(t),
                                Err(e) => result = Err(CopyError::Read(e)),
                            }
                        }
                    }
                    // An overlay writes zeros too, unless the backing shows through.
                    let wanted = any || (backed && through.iter().any(|&t| !t));
                    if wanted && result.is_ok() {
                        let job = Job {
                            seq: sent,
                            offset: off,
                            data,
                            through,
                        };
                        sent += 1;
                        if job_tx.send(job).is_err() {
                            break;
                        }
                    } else {
                        out.spare.push(data);
                    }
                }
                Err(e) => result = Err(CopyError::Read(e)),
            }
            // Keep the threads busy, write what is ready in order.
            while sent - out.next_write >= in_flight_max as u64 && result.is_ok() {
                let Ok(d) = done_rx.recv() else { break };
                result = out.take(d, summary);
            }
            while let Ok(d) = done_rx.try_recv() {
                out.ready.insert(d.seq, d);
            }
            if result.is_ok() {
                result = out.write_ready(summary);
            }
            off += n as u64;
            progress(off.min(size), size);
        }
        drop(job_tx);
        while result.is_ok() && out.next_write < sent {
            let Ok(d) = done_rx.recv() else { break };
            result = out.take(d, summary);
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow_metal::block::MemDisk;
    use qcow_metal::qcow2::CreateOptions;

    /// Both compressors make clusters the library's reader (the guest's) inflates back.
    #[test]
    fn clusters_round_trip_through_the_engine_reader() {
        let cs = 65536;
        let mut cluster = vec![0u8; cs];
        for (i, b) in cluster.iter_mut().enumerate() {
            *b = (i / 100 % 7) as u8 + b'a';
        }
        let mut noise = vec![0u8; cs];
        fastrand::Rng::with_seed(7).fill(&mut noise);
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = HostCompressor::new(kind).unwrap();
            let mut out = Vec::new();
            assert!(c.compress(&cluster, &mut out), "{kind:?}");
            assert!(out.len() < cs / 10, "{kind:?}: {}", out.len());
            let create = CreateOptions {
                virtual_size: 1 << 20,
                compression_type: kind,
                ..CreateOptions::default()
            };
            let mut image = Qcow2::create(MemDisk::growable(), &create).unwrap();
            image.write_compressed(65536, &out).unwrap();
            let mut back = vec![0u8; cs];
            image.read_at(65536, &mut back).unwrap();
            assert!(back == cluster, "{kind:?}: reads back different bytes");
            // Noise does not shrink: stored as it is.
            assert!(!c.compress(&noise, &mut out), "{kind:?}");
        }
    }
}
