//! vsock-peer: the host end of a guest vsock connection, through the vmm's vsock muxer.
//!
//! ```text
//! vsock-peer connect UDS_PATH PORT [WAIT_SECS]
//! vsock-peer listen UDS_PATH_PORT
//! ```
//!
//! `connect` reaches the guest's vsock port PORT: it connects to the muxer's Unix socket
//! UDS_PATH (the vmm's `--vsock socket=`), sends `CONNECT PORT\n` and expects
//! `OK <local port>\n`. If the guest refuses (nothing listens on PORT yet: the muxer
//! closes the stream without `OK`), it retries every 100 ms for up to WAIT_SECS
//! (default 0, no retry). `listen` waits for the guest to connect to host port P: it
//! listens on the Unix socket `UDS_PATH_P` (which must not exist; it is removed at
//! exit) and accepts one connection.
//!
//! Either way it then copies stdin to the connection and the connection to stdout
//! until both reach EOF; stdin's EOF becomes `shutdown(SHUT_WR)`, so the guest sees
//! the end of the data and can still answer. Exit status: 0 on success, 1 on I/O
//! errors, 2 on usage errors, 3 if the guest refused the connection.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: vsock-peer connect UDS_PATH PORT [WAIT_SECS]\n       vsock-peer listen UDS_PATH_PORT";

enum Failure {
    Usage(String),
    Io(String, io::Error),
    Refused(String),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("vsock-peer: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Io(what, e)) => {
            eprintln!("vsock-peer: {what}: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Refused(msg)) => {
            eprintln!("vsock-peer: {msg}");
            ExitCode::from(3)
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Failure {
    let what = what.into();
    move |e| Failure::Io(what, e)
}

fn run(args: &[String]) -> Result<(), Failure> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["connect", path, port, rest @ ..] if rest.len() <= 1 => {
            let port: u32 = port
                .parse()
                .map_err(|_| Failure::Usage(format!("bad port '{port}'")))?;
            let wait = match rest.first() {
                Some(s) => s
                    .parse::<f64>()
                    .ok()
                    .filter(|w| w.is_finite() && *w >= 0.0)
                    .ok_or_else(|| Failure::Usage(format!("bad WAIT_SECS '{s}'")))?,
                None => 0.0,
            };
            let stream = connect(Path::new(path), port, Duration::from_secs_f64(wait))?;
            bridge(stream)
        }
        ["listen", path] => {
            let path = PathBuf::from(path);
            let listener = UnixListener::bind(&path)
                .map_err(io_err(format!("listen on {}", path.display())))?;
            let _cleanup = RemoveOnDrop(path.clone());
            let (stream, _) = listener
                .accept()
                .map_err(io_err(format!("accept on {}", path.display())))?;
            drop(listener);
            bridge(stream)
        }
        _ => Err(Failure::Usage("bad arguments".into())),
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Connect through the muxer; retry refusals until `wait` has passed.
fn connect(path: &Path, port: u32, wait: Duration) -> Result<UnixStream, Failure> {
    let deadline = Instant::now() + wait;
    loop {
        let mut s =
            UnixStream::connect(path).map_err(io_err(format!("connect to {}", path.display())))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .map_err(io_err("send CONNECT"))?;
        // Byte by byte: whatever follows the line is the guest's data.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        let complete = loop {
            match s.read(&mut b) {
                Ok(0) => break false,
                Ok(_) if b[0] == b'\n' => break true,
                Ok(_) if line.len() >= 64 => break false,
                Ok(_) => line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A reset is a refusal too.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break false,
                Err(e) => return Err(Failure::Io("read the muxer's answer".into(), e)),
            }
        };
        if complete {
            let text = String::from_utf8_lossy(&line);
            let ok = text
                .strip_prefix("OK ")
                .is_some_and(|p| p.trim_end_matches('\r').parse::<u32>().is_ok());
            if !ok {
                return Err(Failure::Refused(format!(
                    "unexpected answer from the muxer: {text:?}"
                )));
            }
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(Failure::Refused(format!(
                "guest port {port} refused the connection"
            )));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Copy stdin → stream (then half-close) and stream → stdout, until both end.
fn bridge(stream: UnixStream) -> Result<(), Failure> {
    let mut to_peer = stream.try_clone().map_err(io_err("clone the socket"))?;
    let sender = thread::spawn(move || -> Result<(), Failure> {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Io("read stdin".into(), e)),
            };
            to_peer
                .write_all(&buf[..n])
                .map_err(io_err("write to the socket"))?;
        }
        // The peer may be gone already; that shows on the other direction.
        let _ = to_peer.shutdown(Shutdown::Write);
        Ok(())
    });
    let mut from_peer = stream;
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let received = loop {
        let n = match from_peer.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(Failure::Io("read from the socket".into(), e)),
        };
        if let Err(e) = stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()) {
            break Err(Failure::Io("write stdout".into(), e));
        }
    };
    // A broken connection ends the program at once, without waiting for stdin.
    received?;
    sender
        .join()
        .unwrap_or_else(|_| Err(Failure::Usage("stdin thread panicked".into())))
}
