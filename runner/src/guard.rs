//! Guards on the host files a guest uses, checked before anything is touched: the disk must
//! be a regular file, non-empty, not a damaged qcow2 image taken for raw, and locked for the
//! guest's life; new files appear whole or not at all.

use std::fs::{File, TryLockError};
use std::io::{self, Read};
use std::path::Path;

use qcow_metal::qcow2::probe::{self, Probe};

use crate::error::{Error, Result};

/// Refuses a `--disk` that is not a regular file (a FIFO, a device, a directory, a
/// socket): opening a FIFO blocks until a writer comes, and QEMU cannot size the others.
/// A missing file passes (it is created).
pub fn ensure_regular(path: &Path) -> Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::disk(path, "open", e)),
    };
    let ty = meta.file_type();
    if ty.is_file() {
        return Ok(());
    }
    use std::os::unix::fs::FileTypeExt;
    let what = if ty.is_dir() {
        "a directory"
    } else if ty.is_fifo() {
        "a FIFO (named pipe)"
    } else if ty.is_char_device() {
        "a character device"
    } else if ty.is_block_device() {
        "a block device"
    } else if ty.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(Error::disk(
        path,
        "use",
        format!("it is {what}; the disk must be a regular file (qcow2, or raw with --format raw)"),
    ))
}

/// Locks the disk file for this guest (`flock`: exclusive when writable, shared when
/// read-only, like QEMU's own image locks), without waiting. A second runner on the same
/// image is refused here, before it touches the first one's QMP socket or serial log.
/// The lock lasts as long as the returned file is open; QEMU does not inherit it.
pub fn lock_disk(path: &Path, read_only: bool) -> Result<File> {
    // Read access is enough for either lock; no FIFO to block on.
    ensure_regular(path)?;
    let file = File::open(path).map_err(|e| Error::disk(path, "open", e))?;
    if !file
        .metadata()
        .map_err(|e| Error::disk(path, "open", e))?
        .is_file()
    {
        return Err(Error::disk(path, "use", "it is not a regular file"));
    }
    let locked = if read_only {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match locked {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::disk(
            path,
            "lock",
            if read_only {
                "another qcow-metal guest has it open writable (a read-only guest shares it \
                 only with other read-only ones)"
            } else {
                "another qcow-metal guest has it open (stop that one first; its QMP socket and \
                 serial log were left alone)"
            },
        )),
        Err(TryLockError::Error(e)) => Err(Error::disk(path, "lock", e)),
    }
}

/// With `--format auto`: refuses an empty disk (nothing to export) and a qcow2 image whose
/// magic is damaged (exporting it raw would let a client overwrite its metadata).
pub fn check_auto_format(path: &Path) -> Result<()> {
    let mut file = File::open(path).map_err(|e| Error::disk(path, "open", e))?;
    let mut first = Vec::with_capacity(probe::PROBE_LEN);
    file.by_ref()
        .take(probe::PROBE_LEN as u64)
        .read_to_end(&mut first)
        .map_err(|e| Error::disk(path, "read", e))?;
    if first.is_empty() {
        return Err(empty(path));
    }
    if probe::probe(&first) == Probe::DamagedQcow2 {
        return Err(Error::disk(
            path,
            "use",
            "it looks like a qcow2 image with a damaged magic (the rest of the qcow2 header \
             is intact), so it is not exported as a raw disk; `qcow-metal image check` and \
             `qemu-img check` tell more, and `--format raw` exports its bytes as they are",
        ));
    }
    Ok(())
}

/// The error for a 0-byte disk.
pub fn empty(path: &Path) -> Error {
    Error::disk(
        path,
        "use",
        "it is empty (0 bytes), perhaps left by a failed create; remove it (the runner then \
         creates a qcow2 image of --size) or give it a length",
    )
}

/// Creates `path` whole or not at all: `fill` writes the content into a temporary file in
/// the same directory, which then takes the name only if nothing has it yet. On any error
/// the temporary file is removed; an existing file at `path` is never touched.
pub fn create_new(path: &Path, fill: impl FnOnce(&File) -> io::Result<()>) -> io::Result<()> {
    let dir = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => p,
        None => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".creating-");
    let tmp = tempfile::Builder::new().prefix(&prefix).tempfile_in(dir)?;
    fill(tmp.as_file())?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn fifos_directories_and_devices_are_refused_before_anything_opens_them() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo is missing: install the Debian package coreutils");
        assert!(status.success());
        let started = Instant::now();
        let err = ensure_regular(&fifo).unwrap_err().to_string();
        assert!(
            err.contains("FIFO") && err.contains("regular file"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = ensure_regular(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a directory"), "{err}");
        let err = ensure_regular(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("character device"), "{err}");
        ensure_regular(&dir.path().join("missing")).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        ensure_regular(&file).unwrap();
    }

    #[test]
    fn a_locked_disk_is_refused_and_released_with_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        std::fs::write(&disk, [0u8; 4096]).unwrap();
        let first = lock_disk(&disk, false).unwrap();
        let err = lock_disk(&disk, false).unwrap_err().to_string();
        assert!(
            err.contains("lock") && err.contains("another qcow-metal"),
            "{err}"
        );
        assert!(lock_disk(&disk, true).is_err());
        drop(first);
        let a = lock_disk(&disk, true).unwrap();
        let b = lock_disk(&disk, true).unwrap();
        assert!(lock_disk(&disk, false).is_err());
        drop((a, b));
        lock_disk(&disk, false).unwrap();
    }

    #[test]
    fn empty_and_damaged_qcow2_disks_are_refused_under_auto() {
        let dir = tempfile::tempdir().unwrap();
        let empty_disk = dir.path().join("empty");
        std::fs::write(&empty_disk, b"").unwrap();
        let err = check_auto_format(&empty_disk).unwrap_err().to_string();
        assert!(err.contains("empty (0 bytes)"), "{err}");
        let image = dir.path().join("d.qcow2");
        crate::disk::create_qcow2(&image, 8 << 20, 65536, 16).unwrap();
        check_auto_format(&image).unwrap();
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[3] ^= 0x04;
        std::fs::write(&image, &bytes).unwrap();
        let err = check_auto_format(&image).unwrap_err().to_string();
        assert!(
            err.contains("damaged magic") && err.contains("--format raw"),
            "{err}"
        );
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [0u8; 4096]).unwrap();
        check_auto_format(&raw).unwrap();
    }

    #[test]
    fn created_files_appear_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new");
        let err = create_new(&path, |f| {
            use std::io::Write;
            (&*f).write_all(b"half")?;
            Err(io::Error::other("fill failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "fill failed");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        create_new(&path, |f| f.set_len(4096)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        // An existing file is neither replaced nor removed.
        let err = create_new(&path, |f| f.set_len(1)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
