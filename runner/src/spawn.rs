//! Starting QEMU so that it dies with the runner, even a SIGKILLed one.
//!
//! QEMU is started through `setpriv --pdeathsig KILL` (util-linux), which asks the kernel to
//! SIGKILL it when its parent goes away, then executes QEMU in the same process (QEMU's pid
//! is the child's). The kernel sends that signal when the *thread* that forked the child
//! exits, not only the process, so every QEMU is forked by one thread that lives as long as
//! the process. (A runner killed in the microseconds between the fork and setpriv's `prctl`
//! would still leave QEMU running; QEMU >= 9's `-run-with exit-with-parent=on` has the same
//! window.)

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Sender};

use crate::error::{Error, Result};
use crate::qemu;

/// The util-linux program that sets the parent-death signal.
pub const SETPRIV: &str = "setpriv";

/// `setpriv` on `PATH`, or an error naming its Debian package.
pub fn find_setpriv() -> Result<PathBuf> {
    qemu::find_program(SETPRIV).ok_or_else(|| {
        Error::Qemu(format!(
            "`{SETPRIV}` was not found on PATH; it makes QEMU die with the runner: install the \
             Debian package util-linux (sudo apt-get install -y util-linux)"
        ))
    })
}

/// A command running `program` under `setpriv --pdeathsig KILL`.
pub fn dies_with_parent(setpriv: &Path, program: &Path) -> Command {
    let mut cmd = Command::new(setpriv);
    cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
    cmd
}

type Request = (Command, Sender<io::Result<Child>>);

/// Spawns `cmd` from the process-long spawner thread (see the module doc), so that a
/// parent-death signal set in the child fires only when the whole runner is gone.
pub fn spawn(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<io::Result<Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("qemu-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| tx)
    });
    let spawner = spawner
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), format!("starting the spawner thread: {e}")))?;
    let (reply, answer) = mpsc::channel();
    spawner
        .send((cmd, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether `pid` has exited (gone, or a zombie nobody has reaped yet).
    fn dead(pid: u32) -> bool {
        !crate::rundir::alive(pid)
    }

    #[test]
    fn children_outlive_the_calling_thread_and_die_with_their_parent() {
        let setpriv = find_setpriv().unwrap();
        // Spawned from a short-lived thread: the child must survive that thread's exit.
        let sp = setpriv.clone();
        let mut child = std::thread::spawn(move || {
            let mut cmd = dies_with_parent(&sp, Path::new("/bin/sleep"));
            cmd.arg("60");
            spawn(cmd).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child died with its thread"
        );
        child.kill().unwrap();
        child.wait().unwrap();

        // A parent (a shell) SIGKILLed: its setpriv'd child follows.
        let script = format!(
            "{} --pdeathsig KILL -- sleep 60 & echo $!; wait",
            setpriv.display()
        );
        let mut shell = Command::new("sh")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        io::BufRead::read_line(
            &mut io::BufReader::new(shell.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: u32 = line.trim().parse().unwrap();
        // Once it runs sleep, setpriv has set the signal.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{grandchild}/comm"))
            .is_ok_and(|c| c.trim() != "sleep")
        {
            assert!(Instant::now() < deadline, "setpriv did not run sleep");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!dead(grandchild));
        shell.kill().unwrap();
        shell.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dead(grandchild) {
            assert!(
                Instant::now() < deadline,
                "pid {grandchild} outlived its parent: {:?}",
                std::fs::read_to_string(format!("/proc/{grandchild}/status"))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
