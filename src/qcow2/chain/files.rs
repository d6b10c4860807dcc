//! Backing chains of image files on the host, resolved as QEMU resolves them: a relative
//! backing file name is relative to the directory of the image that names it; the format
//! comes from the backing-format header extension, else from probing the file; qcow2 and
//! raw layers, any depth. Errors name the file and say what to do.

use super::{LayerFormat, open_layer};
use crate::block::{BlockDevice, FileDisk};
use crate::qcow2::backing::Backing;
use crate::qcow2::header::{Header, V2_HEADER_LEN};
use crate::qcow2::layout::MAX_CLUSTER_BITS;
use crate::qcow2::probe::{PROBE_LEN, Probe, probe};
use crate::qcow2::{OpenOptions, Qcow2};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

/// Most layers a chain may have (a guard against absurd chains, far above real use).
pub const MAX_DEPTH: usize = 256;

/// One backing layer of an image file's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFile {
    /// The layer's file, as resolved (the name in the image above, joined to its directory).
    pub path: PathBuf,
    /// The name as the image above stores it.
    pub name: String,
    /// The layer's format.
    pub format: LayerFormat,
    /// The layer's virtual size (a raw file's length).
    pub virtual_size: u64,
}

/// The header of the qcow2 image in `file` (read as far as its first cluster).
fn read_header(path: &Path) -> Result<Header, String> {
    let mut f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut head = vec![0u8; 1 << MAX_CLUSTER_BITS];
    let mut got = 0;
    loop {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        if got == head.len() {
            break;
        }
    }
    head.truncate(got);
    if got < V2_HEADER_LEN {
        return Err(format!(
            "{} is too short to be a qcow2 image",
            path.display()
        ));
    }
    Header::parse(&head).map_err(|e| format!("{}: {e}", path.display()))
}

/// Probes the format of a file (no backing-format extension named it).
fn probe_file(path: &Path) -> Result<LayerFormat, String> {
    let mut f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut first = [0u8; PROBE_LEN];
    let mut got = 0;
    while got < first.len() {
        match f.read(&mut first[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
    match probe(&first[..got]) {
        Probe::Qcow2 => Ok(LayerFormat::Qcow2),
        Probe::Raw => Ok(LayerFormat::Raw),
        Probe::DamagedQcow2 => Err(format!(
            "{} looks like a qcow2 image with a damaged magic; repair it or name its format \
             with `qemu-img rebase -u -F`",
            path.display()
        )),
    }
}

/// The backing layers of the qcow2 image at `path`, top (its backing file) first; empty
/// when it has none. Refuses a missing or unreadable layer, a loop, a protocol or `json:`
/// name, and formats other than qcow2 and raw, naming the file.
pub fn resolve(path: &Path) -> Result<Vec<ChainFile>, String> {
    let mut chain: Vec<ChainFile> = Vec::new();
    let mut seen = vec![
        std::fs::canonicalize(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?,
    ];
    let mut above = path.to_path_buf();
    let mut hdr = read_header(path)?;
    while let Some(name) = hdr.backing_file.clone() {
        if chain.len() >= MAX_DEPTH {
            return Err(format!(
                "the backing chain of {} is deeper than {MAX_DEPTH} layers",
                path.display()
            ));
        }
        if name.starts_with("json:") || name.contains("://") {
            return Err(format!(
                "{} names its backing file `{name}`, a protocol or json: name; only plain \
                 file names are supported (rebase it with `qemu-img rebase -u -b FILE`)",
                above.display()
            ));
        }
        let dir = above.parent().unwrap_or(Path::new(""));
        let layer = if Path::new(&name).is_absolute() {
            PathBuf::from(&name)
        } else {
            dir.join(&name)
        };
        let canon = std::fs::canonicalize(&layer).map_err(|e| {
            format!(
                "backing file {} of {} is missing or unreadable ({e}); restore it or rebase \
                 the image with `qemu-img rebase`",
                layer.display(),
                above.display()
            )
        })?;
        if seen.contains(&canon) {
            return Err(format!(
                "the backing chain of {} loops: {} names {} which is already in the chain",
                path.display(),
                above.display(),
                layer.display()
            ));
        }
        seen.push(canon);
        let format = match hdr.backing_format() {
            Some(f) => LayerFormat::from_name(&f).ok_or_else(|| {
                format!(
                    "backing file {} of {} has format `{f}`; only qcow2 and raw layers are \
                     supported (convert it with `qemu-img convert -O qcow2`)",
                    layer.display(),
                    above.display()
                )
            })?,
            None => probe_file(&layer)?,
        };
        let (virtual_size, next) = match format {
            LayerFormat::Raw => {
                let len = std::fs::metadata(&layer)
                    .map_err(|e| format!("cannot read {}: {e}", layer.display()))?
                    .len();
                (len, None)
            }
            LayerFormat::Qcow2 => {
                let h = read_header(&layer)?;
                (h.size, Some(h))
            }
        };
        chain.push(ChainFile {
            path: layer.clone(),
            name,
            format,
            virtual_size,
        });
        match next {
            Some(h) => hdr = h,
            None => break,
        }
        above = layer;
    }
    Ok(chain)
}

/// [`resolve`] for a file that may not be a (readable) qcow2 image: such a file has no
/// chain here (the engine's open then says what is wrong with it).
pub fn resolve_if_qcow2(path: &Path) -> Result<Vec<ChainFile>, String> {
    match read_header(path) {
        Ok(h) if h.backing_file.is_some() => resolve(path),
        _ => Ok(Vec::new()),
    }
}

/// Opens the backing layers `chain` (as [`resolve`] returns them) read-only, deepest first;
/// returns the layer under the top image.
pub fn open_layers(
    chain: &[ChainFile],
    opts: &OpenOptions,
) -> Result<Option<Backing<FileDisk>>, String> {
    open_layers_with(chain, opts, |file| file)
}

/// [`open_layers`] with each layer's file wrapped by `device` (for a top image whose device
/// type is a wrapper of [`FileDisk`], such as a counting one).
pub fn open_layers_with<D: BlockDevice>(
    chain: &[ChainFile],
    opts: &OpenOptions,
    device: impl Fn(FileDisk) -> D,
) -> Result<Option<Backing<D>>, String> {
    let layer_opts = OpenOptions {
        read_only: true,
        zero_tail: false,
        repair: false,
        ..opts.clone()
    };
    let mut below = None;
    for (i, layer) in chain.iter().enumerate().rev() {
        let dev = FileDisk::open(&layer.path, true)
            .map_err(|e| format!("cannot open {}: {e}", layer.path.display()))?;
        below = Some(
            open_layer(i + 1, layer.format, device(dev), &layer_opts, below)
                .map_err(|e| format!("{}: {}", layer.path.display(), e.error_text()))?,
        );
    }
    Ok(below)
}

/// Opens the qcow2 image at `path` with its whole backing chain (the image itself
/// read-only with `opts.read_only`).
pub fn open(path: &Path, opts: OpenOptions) -> Result<Qcow2<FileDisk>, String> {
    let chain = resolve(path)?;
    let below = open_layers(&chain, &opts)?;
    let dev = FileDisk::open(path, opts.read_only)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Qcow2::open_with_backing(dev, opts, below).map_err(|e| format!("{}: {e}", path.display()))
}

impl super::ChainError {
    /// What went wrong, without the layer's name (for callers that name the file).
    pub fn error_text(&self) -> String {
        match &self.error {
            super::ChainFault::Open(e) => e.to_string(),
            _ => self.to_string(),
        }
    }
}
