//! The host side of the serial console: the terminal and the stdin reader.
//!
//! Guest output goes straight to stdout from the UART model. Host input is read by one
//! thread and queued in the UART model, which hands it to the guest only as fast as the
//! guest takes it (see `devices::serial`). When stdin is a terminal it is switched to
//! raw mode, so keys such as Ctrl-C reach the guest, and `Ctrl-a x` quits the vmm
//! (`Ctrl-a Ctrl-a` sends a literal Ctrl-a), as with QEMU.

use std::fs::File;
use std::io::{self, IsTerminal, Read, Stdout, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use devices::serial::SerialConsole;
use vmm_sys_util::terminal::Terminal;

use crate::irq::IrqTrigger;
use crate::seccomp::{Sandbox, ThreadKind};
use crate::vm::{Outcome, VmState};

/// The console UART as the vCPU threads and the stdin reader share it.
pub type Console = Arc<Mutex<SerialConsole<IrqTrigger, PanicWatch<Stdout>>>>;

/// Host input queued beyond this waits in the pipe: the reader pauses.
const MAX_PENDING_INPUT: usize = 1 << 20;
const ESCAPE: u8 = 0x01; // Ctrl-a

/// Passes guest output through while watching for Linux's panic banner, so a panic
/// followed by a reboot (`panic=-1`) is reported as a panic even when the guest has no
/// pvpanic driver loaded yet.
pub struct PanicWatch<W> {
    out: W,
    state: Arc<VmState>,
    matched: usize,
}

const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";

impl<W: Write> PanicWatch<W> {
    pub fn new(out: W, state: Arc<VmState>) -> Self {
        PanicWatch {
            out,
            state,
            matched: 0,
        }
    }
}

impl<W: Write> Write for PanicWatch<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            // The banner has no proper prefix that is also a suffix, so on a mismatch
            // matching restarts at 0 (or 1 if this byte starts the banner).
            self.matched = if b == PANIC_BANNER[self.matched] {
                self.matched + 1
            } else {
                usize::from(b == PANIC_BANNER[0])
            };
            if self.matched == PANIC_BANNER.len() {
                self.state.saw_panic_banner();
                self.matched = 0;
            }
        }
        self.out.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Restores the terminal's canonical mode when dropped.
///
/// It works on its own duplicate of fd 0, never through `io::stdin().lock()`: the stdin
/// reader thread holds that lock while it blocks in `read`, so locking it here would
/// deadlock the vmm's exit.
pub struct TerminalGuard(Option<Tty>);

/// A terminal file descriptor of our own.
struct Tty(File);

// SAFETY: `tty_fd` returns the descriptor owned by the `File` inside, which stays open
// for as long as the `Tty` (and so any use of the returned fd through the trait) lives.
unsafe impl Terminal for Tty {
    fn tty_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl TerminalGuard {
    /// Put stdin in raw mode if it is a terminal.
    pub fn raw_if_terminal() -> Self {
        let stdin = io::stdin();
        let tty = stdin
            .is_terminal()
            .then(|| {
                stdin
                    .as_fd()
                    .try_clone_to_owned()
                    .ok()
                    .map(|fd| Tty(File::from(fd)))
            })
            .flatten()
            .filter(|tty| tty.set_raw_mode().is_ok());
        TerminalGuard(tty)
    }

    /// Whether stdin is an interactive terminal in raw mode.
    pub fn interactive(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(tty) = &self.0 {
            let _ = tty.set_canon_mode();
        }
    }
}

/// Start the thread that moves stdin into the console. It enters `sandbox` (its
/// seccomp filter) before it reads anything.
pub fn spawn_stdin_reader(
    console: Console,
    state: Arc<VmState>,
    interactive: bool,
    sandbox: Arc<Sandbox>,
) -> io::Result<()> {
    thread::Builder::new().name("stdin".into()).spawn(move || {
        if !sandbox.enter(ThreadKind::Stdin) {
            return;
        }
        let mut stdin = io::stdin().lock();
        let mut buf = [0u8; 4096];
        let mut escape = EscapeParser::default();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let input = if interactive {
                match escape.feed(&buf[..n]) {
                    Some(bytes) => bytes,
                    None => {
                        state.finish(Outcome::UserQuit);
                        return;
                    }
                }
            } else {
                buf[..n].to_vec()
            };
            console.lock().unwrap().queue_input(&input);
            while console.lock().unwrap().pending_len() > MAX_PENDING_INPUT {
                thread::sleep(Duration::from_millis(5));
            }
        }
        console.lock().unwrap().close_input();
    })?;
    Ok(())
}

/// Recognises `Ctrl-a x` (quit) and `Ctrl-a Ctrl-a` (a literal Ctrl-a) in typed input.
#[derive(Default)]
struct EscapeParser {
    after_escape: bool,
}

impl EscapeParser {
    /// The bytes to send to the guest, or `None` when the user asked to quit.
    fn feed(&mut self, input: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    b'x' | b'X' => return None,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend([ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                out.push(b);
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_banner_is_noticed_across_writes() {
        let state = Arc::new(VmState::default());
        let mut w = PanicWatch::new(Vec::new(), state.clone());
        w.write_all(b"[ 1.0] KKernel pan").unwrap();
        assert!(!state.panic_seen());
        w.write_all(b"ic - not syncing: VFS").unwrap();
        assert!(state.panic_seen());
        assert_eq!(w.out, b"[ 1.0] KKernel panic - not syncing: VFS");
    }

    #[test]
    fn escape_sequences() {
        let mut p = EscapeParser::default();
        assert_eq!(p.feed(b"ls\r"), Some(b"ls\r".to_vec()));
        assert_eq!(p.feed(&[ESCAPE, ESCAPE, b'a']), Some(vec![ESCAPE, b'a']));
        assert_eq!(p.feed(&[ESCAPE, b'c']), Some(vec![ESCAPE, b'c']));
        // Split across reads.
        assert_eq!(p.feed(&[b'y', ESCAPE]), Some(vec![b'y']));
        assert_eq!(p.feed(b"x"), None);
    }
}
