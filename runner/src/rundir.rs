//! Each guest's private directory (the runner's QMP socket, a temporary disk), and the
//! clean-up of those a killed runner left behind.
//!
//! A runner removes its directory when the guest is dropped, but not when it is SIGKILLed.
//! So the directories live under one parent per user, `$TMPDIR/qcow-metal-<uid>/`, each named
//! after its runner's pid (`<pid>-<random>`), and every new one first removes those whose
//! runner is gone.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::error::{Error, Result};

/// The parent of the per-guest directories: `$TMPDIR/qcow-metal-<uid>` (created, mode 0700).
pub fn parent() -> Result<PathBuf> {
    let uid = std::fs::metadata("/proc/self")
        .map_err(|e| Error::io("reading /proc/self (is /proc mounted?)", e))?
        .uid();
    let dir = std::env::temp_dir().join(format!("qcow-metal-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
    }
    let meta = std::fs::symlink_metadata(&dir)
        .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    if !meta.is_dir() || meta.uid() != uid {
        return Err(Error::Usage(format!(
            "{} is not a directory of this user; remove it, or point TMPDIR elsewhere",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Creates this guest's private directory (removed when the returned value drops), after
/// removing the directories of runners that are no longer alive.
pub fn create() -> Result<TempDir> {
    let parent = parent()?;
    remove_stale(&parent);
    tempfile::Builder::new()
        .prefix(&format!("{}-", std::process::id()))
        .tempdir_in(&parent)
        .map_err(|e| Error::io(format!("creating a directory in {}", parent.display()), e))
}

/// The pid a directory name `<pid>-<random>` belongs to.
fn owner(name: &str) -> Option<u32> {
    name.split_once('-')?.0.parse().ok()
}

/// Removes the entries of `parent` whose owning process is gone (see [`alive`]; nothing is
/// removed when `/proc` is not there to tell).
pub fn remove_stale(parent: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner) else {
            continue;
        };
        if !alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether process `pid` runs: it has a `/proc` entry and is not a zombie (a SIGKILLed
/// runner stays one until reaped, and in a container nobody may reap it).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        // `pid (comm) S ...`: the state follows the last parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_directories_of_dead_runners_go_and_live_ones_stay() {
        let parent = tempfile::tempdir().unwrap();
        // A process that has exited: its pid is free (until reused, which only delays).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = parent.path().join(format!("{dead}-abc"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("qmp-tcg.sock"), b"").unwrap();
        let live = parent.path().join(format!("{}-def", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        let other = parent.path().join("not-a-runner");
        std::fs::create_dir(&other).unwrap();
        remove_stale(parent.path());
        assert!(!stale.exists(), "the dead runner's directory stayed");
        assert!(live.exists() && other.exists());
        assert!(alive(std::process::id()));
        assert!(!alive(dead));
    }

    #[test]
    fn private_directories_are_named_after_the_runner() {
        let dir = create().unwrap();
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(owner(&name), Some(std::process::id()), "{name}");
        assert_eq!(dir.path().parent().unwrap(), parent().unwrap());
    }
}
