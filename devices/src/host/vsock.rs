//! The vsock muxer: the guest's vsock stream connections bridged to host Unix sockets,
//! the way Firecracker does it (its `docs/vsock.md`).
//!
//! - Host-initiated: a host program connects to the muxer's socket `PATH` and writes
//!   `CONNECT <port>\n`. The muxer picks a local (host) port and sends the guest a
//!   `REQUEST` from `(2, local port)` to `(guest cid, port)`. When the guest answers
//!   `RESPONSE`, the muxer writes `OK <local port>\n` to the host stream, and from then on
//!   the stream carries the connection's bytes both ways. If the guest answers `RST`
//!   (nothing listens on that port), the host stream is closed.
//! - Guest-initiated: a guest connection to CID 2 port `P` becomes a connection to the
//!   Unix socket `PATH_P` (non-blocking; refused, missing or busy means `RST`).
//!
//! Streams: data from the guest is buffered per connection up to [`BUF_ALLOC`], the
//! credit the muxer advertises; a guest that sends past its credit is reset. The
//! muxer's `fwd_cnt` counts the bytes written to the host socket, and a `CREDIT_UPDATE`
//! goes out whenever a quarter of the buffer has drained unannounced or the guest asks.
//! Data to the guest is read from the host socket straight into the rx buffer, never
//! more than the guest's advertised credit, so there is no buffer in that direction.
//! A host EOF becomes `SHUTDOWN(SEND)`; a guest `SHUTDOWN(SEND)` becomes
//! `shutdown(SHUT_WR)` on the host stream once buffered data is written; a guest
//! `SHUTDOWN` of both directions, an `RST` or any socket error closes the host stream,
//! and the muxer answers the guest with `RST`.
//!
//! At most [`MAX_CONNECTIONS`] connections (including host connections that have not
//! sent their `CONNECT` line yet) exist at once; more are refused (closed, or `RST`).
//! The event loop must re-read [`HostFds::fds`] after every `fd_ready`, `queue_notify`
//! and `backend_ready`: sockets come and go, and interest in them changes with credit.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::HostFds;
use crate::virtio::vsock::{
    op, shutdown, PacketHeader, Vsock, VsockBackend, HOST_CID, TYPE_STREAM,
};

/// The receive buffer each connection advertises to the guest (`buf_alloc`), which is
/// also the most guest data it holds for a slow host reader.
pub const BUF_ALLOC: u32 = 64 * 1024;
/// Connections (established, in setup, or waiting for their `CONNECT` line).
pub const MAX_CONNECTIONS: usize = 1024;
/// Send a `CREDIT_UPDATE` once this many drained bytes have not been announced.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// RSTs for connections already gone, waiting for rx buffers (more are dropped).
const MAX_PENDING_RSTS: usize = 2 * MAX_CONNECTIONS;
/// First local port handed out for host-initiated connections (as in Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `sun_path` (without its NUL).
const MAX_SUN_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is invalid (3 to 4294967294)")]
    InvalidCid(u64),
    #[error("{0} already exists (a socket left from an earlier run? remove it)")]
    PathInUse(PathBuf),
    #[error("directory {0} does not exist")]
    NoDirectory(PathBuf),
    #[error("{0} is too long for a Unix socket path with a _PORT suffix (at most 96 bytes)")]
    PathTooLong(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

/// `(local port, peer port)`: the host side's port and the guest's.
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: `REQUEST` sent (or about to be), waiting for the guest's `RESPONSE`.
    AwaitingResponse,
    Established,
    /// The guest shut down both directions: write what is buffered, then close and `RST`.
    Closing,
}

struct Conn {
    stream: UnixStream,
    state: State,
    // Packets owed to the guest.
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    send_shutdown: bool,
    credit_request_sent: bool,
    /// In `Muxer::ready`.
    queued: bool,
    // Host → guest.
    /// epoll said readable and we have not seen `EAGAIN` since.
    host_readable: bool,
    host_eof: bool,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    guest_shut_rcv: bool,
    // Guest → host.
    /// `OK <port>\n`, written before any data.
    ok_line: Vec<u8>,
    to_host: VecDeque<u8>,
    /// Bytes written to the host socket.
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_told: u32,
    guest_shut_send: bool,
    host_wr_shut: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Conn {
        Conn {
            stream,
            state,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            send_shutdown: false,
            credit_request_sent: false,
            queued: false,
            host_readable: false,
            host_eof: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            guest_shut_rcv: false,
            ok_line: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            guest_shut_send: false,
            host_wr_shut: false,
        }
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether data should flow from the host socket to the guest.
    fn reading(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_shut_rcv
    }

    fn wants_epollin(&self) -> bool {
        self.reading() && !self.host_readable && self.peer_credit() > 0
    }

    fn has_output(&self) -> bool {
        self.send_request
            || self.send_response
            || self.send_credit_update
            || self.send_shutdown
            || (self.reading()
                && self.host_readable
                && (self.peer_credit() > 0 || !self.credit_request_sent))
    }

    fn buffered_for_host(&self) -> bool {
        !self.ok_line.is_empty() || !self.to_host.is_empty()
    }
}

/// A host stream that has not sent its `CONNECT <port>\n` yet.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What a connection produced for the guest.
enum Produced {
    Packet(usize),
    Nothing,
    /// The connection failed: remove it and reset the guest's end.
    Reset,
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    pending: HashMap<RawFd, Pending>,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    /// Connections with packets for the guest, in turn.
    ready: VecDeque<Key>,
    /// RSTs (and other one-off packets) for the guest about connections already gone.
    rsts: VecDeque<PacketHeader>,
    next_local_port: u32,
    max_conns: usize,
}

impl Muxer {
    /// Listen on `uds_path` for host-initiated connections. The path must not exist
    /// yet; the muxer removes it again when dropped.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        if uds_path.as_os_str().len() + 11 > MAX_SUN_PATH {
            return Err(VsockError::PathTooLong(uds_path.to_path_buf()));
        }
        if std::fs::symlink_metadata(uds_path).is_ok() {
            return Err(VsockError::PathInUse(uds_path.to_path_buf()));
        }
        let dir = match uds_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(VsockError::NoDirectory(dir.to_path_buf()));
        }
        let bind_err = |source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        if let Err(e) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(uds_path);
            return Err(bind_err(e));
        }
        Ok(Muxer {
            guest_cid,
            path: uds_path.to_path_buf(),
            listener,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            ready: VecDeque::new(),
            rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            max_conns: MAX_CONNECTIONS,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connections open now (established or being set up), for tests and diagnostics.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.pending.len() >= self.max_conns
    }

    fn header(&self, key: Key, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn push_rst(&mut self, key: Key) {
        if self.rsts.len() < MAX_PENDING_RSTS {
            let h = self.header(key, op::RST);
            self.rsts.push_back(h);
        }
    }

    fn enqueue(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_output() {
                c.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Forget a connection (closing its host stream).
    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_fd.remove(&c.stream.as_raw_fd());
        }
    }

    /// Close a connection and tell the guest.
    fn kill(&mut self, key: Key) {
        self.remove(key);
        self.push_rst(key);
    }

    fn insert(&mut self, key: Key, conn: Conn) {
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.enqueue(key);
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = match p.checked_add(1) {
                Some(n) if n != u32::MAX => n,
                _ => FIRST_LOCAL_PORT,
            };
            // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
            if !self.conns.keys().any(|k| k.0 == p) {
                return p;
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.at_capacity() || stream.set_nonblocking(true).is_err() {
                        continue; // dropped: refused
                    }
                    let fd = stream.as_raw_fd();
                    self.pending.insert(
                        fd,
                        Pending {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock, or a failure (EMFILE...) that the next readiness retries.
                Err(_) => return,
            }
        }
    }

    /// Read a pending stream's `CONNECT` line, a byte at a time so that nothing after
    /// the newline is taken from the stream.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => break None,
                Ok(_) if b[0] == b'\n' => break parse_connect(&p.line),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break None,
                Ok(_) => p.line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        // A bad line closes the stream.
        let Some(peer_port) = port else {
            return;
        };
        let key = (self.alloc_local_port(), peer_port);
        let mut conn = Conn::new(p.stream, State::AwaitingResponse);
        conn.send_request = true;
        self.insert(key, conn);
    }

    /// A guest `REQUEST` for a connection we do not have: connect to `PATH_<port>`.
    fn guest_connect(&mut self, key: Key, hdr: &PacketHeader) {
        if self.at_capacity() {
            self.push_rst(key);
            return;
        }
        let mut path = OsString::from(self.path.as_os_str());
        path.push(format!("_{}", key.0));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let mut conn = Conn::new(stream, State::Established);
                conn.peer_buf_alloc = hdr.buf_alloc;
                conn.peer_fwd_cnt = hdr.fwd_cnt;
                conn.send_response = true;
                self.insert(key, conn);
            }
            Err(_) => self.push_rst(key),
        }
    }

    /// Write what is buffered for the host stream; a failed stream is closed and reset,
    /// a drained closing one closed.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let ok = flush_conn(c);
        if !ok {
            self.kill(key);
            return;
        }
        if !c.buffered_for_host() && c.state == State::Closing {
            self.kill(key);
            return;
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= CREDIT_UPDATE_THRESHOLD {
            c.send_credit_update = true;
        }
        self.enqueue(key);
    }

    fn conn_packet(&mut self, key: Key, hdr: &mut PacketHeader, payload: &mut [u8]) -> Produced {
        let base = self.header(key, op::INVALID);
        let Some(c) = self.conns.get_mut(&key) else {
            return Produced::Nothing;
        };
        *hdr = base;
        let mut n = 0;
        if c.send_request {
            c.send_request = false;
            hdr.op = op::REQUEST;
        } else if c.send_response {
            c.send_response = false;
            hdr.op = op::RESPONSE;
        } else {
            if c.reading() && c.host_readable && c.peer_credit() > 0 {
                let want = payload.len().min(c.peer_credit() as usize);
                match c.stream.read(&mut payload[..want]) {
                    Ok(0) => {
                        c.host_eof = true;
                        c.host_readable = false;
                        c.send_shutdown = true;
                    }
                    Ok(k) => {
                        c.rx_cnt = c.rx_cnt.wrapping_add(k as u32);
                        hdr.op = op::RW;
                        n = k;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.host_readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Produced::Reset,
                }
            }
            if hdr.op != op::INVALID {
                // RW, set above.
            } else if c.send_credit_update {
                hdr.op = op::CREDIT_UPDATE;
            } else if c.send_shutdown {
                c.send_shutdown = false;
                hdr.op = op::SHUTDOWN;
                hdr.flags = shutdown::SEND;
            } else if c.reading()
                && c.host_readable
                && c.peer_credit() == 0
                && !c.credit_request_sent
            {
                c.credit_request_sent = true;
                hdr.op = op::CREDIT_REQUEST;
            } else {
                return Produced::Nothing;
            }
        }
        // Every packet carries our credit, so it answers any pending update.
        hdr.buf_alloc = BUF_ALLOC;
        hdr.fwd_cnt = c.fwd_cnt;
        c.fwd_cnt_told = c.fwd_cnt;
        c.send_credit_update = false;
        Produced::Packet(n)
    }

    /// A guest packet for an existing connection.
    fn conn_packet_from_guest(&mut self, key: Key, hdr: &PacketHeader, payload: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        c.credit_request_sent = false;
        match (hdr.op, c.state) {
            (op::RST, _) => {
                self.remove(key);
                return;
            }
            (op::RESPONSE, State::AwaitingResponse) => {
                c.state = State::Established;
                c.ok_line = format!("OK {}\n", key.0).into_bytes();
                self.flush(key);
                return;
            }
            (op::RW, State::Established) if !c.guest_shut_send => {
                if c.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    // Past the credit we gave.
                    self.kill(key);
                    return;
                }
                c.to_host.extend(payload);
                self.flush(key);
                return;
            }
            (op::SHUTDOWN, State::Established) => {
                c.guest_shut_rcv |= hdr.flags & shutdown::RCV != 0;
                c.guest_shut_send |= hdr.flags & shutdown::SEND != 0;
                if c.guest_shut_rcv && c.guest_shut_send {
                    c.state = State::Closing;
                }
                self.flush(key);
                return;
            }
            (op::CREDIT_UPDATE, State::Established | State::Closing) => {}
            (op::CREDIT_REQUEST, State::Established | State::Closing) => {
                c.send_credit_update = true
            }
            (op::SHUTDOWN, State::Closing) => {}
            // Anything else is a protocol violation (a second REQUEST, data before the
            // RESPONSE or after SHUTDOWN(SEND), an unknown op...).
            _ => {
                self.kill(key);
                return;
            }
        }
        self.enqueue(key);
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `CONNECT <port>` (without the newline).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `send(2)` without `SIGPIPE`.
fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes and the fd is owned by `stream`.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Write a connection's buffered bytes; false if the host stream failed.
fn flush_conn(c: &mut Conn) -> bool {
    while !c.ok_line.is_empty() {
        match send(&c.stream, &c.ok_line) {
            Ok(n) => {
                c.ok_line.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    while !c.to_host.is_empty() {
        let (a, _) = c.to_host.as_slices();
        match send(&c.stream, a) {
            Ok(n) => {
                c.to_host.drain(..n);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    if c.guest_shut_send && !c.host_wr_shut && c.state == State::Established {
        c.host_wr_shut = true;
        // A peer that is already gone shows up at the next read.
        let _ = c.stream.shutdown(Shutdown::Write);
    }
    true
}

/// Connect a non-blocking Unix stream socket; a listener whose backlog is full counts
/// as refusing (the event loop must not block on it).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is an initialized sockaddr_un and `len` does not exceed its size.
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

impl VsockBackend for Muxer {
    fn send_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            self.conn_packet_from_guest(key, hdr, payload);
            return;
        }
        match hdr.op {
            op::REQUEST => self.guest_connect(key, hdr),
            op::RST => {}
            _ => self.push_rst(key),
        }
    }

    fn recv_pkt(&mut self, hdr: &mut PacketHeader, payload: &mut [u8]) -> Option<usize> {
        if let Some(r) = self.rsts.pop_front() {
            *hdr = r;
            return Some(0);
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            match self.conn_packet(key, hdr, payload) {
                Produced::Packet(n) => {
                    self.enqueue(key);
                    return Some(n);
                }
                Produced::Nothing => {}
                Produced::Reset => {
                    self.remove(key);
                    *hdr = self.header(key, op::RST);
                    return Some(0);
                }
            }
        }
        None
    }

    fn has_pending(&self) -> bool {
        !self.rsts.is_empty() || !self.ready.is_empty()
    }

    fn reset(&mut self) {
        self.conns.clear();
        self.by_fd.clear();
        self.ready.clear();
        self.rsts.clear();
    }
}

impl HostFds for Muxer {
    fn fds(&self) -> Vec<(RawFd, u32)> {
        let mut v = Vec::with_capacity(1 + self.pending.len() + self.conns.len());
        v.push((self.listener.as_raw_fd(), libc::EPOLLIN as u32));
        v.extend(self.pending.keys().map(|&fd| (fd, libc::EPOLLIN as u32)));
        for c in self.conns.values() {
            let mut ev = 0;
            if c.wants_epollin() {
                ev |= libc::EPOLLIN as u32;
            }
            if c.buffered_for_host() {
                ev |= libc::EPOLLOUT as u32;
            }
            if ev != 0 {
                v.push((c.stream.as_raw_fd(), ev));
            }
        }
        v
    }

    fn fd_ready(&mut self, fd: RawFd, events: u32) {
        if fd == self.listener.as_raw_fd() {
            self.accept_all();
            return;
        }
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let failed = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        if events & (libc::EPOLLOUT as u32 | failed) != 0 {
            self.flush(key);
        }
        if events & (libc::EPOLLIN as u32 | failed) != 0 {
            if let Some(c) = self.conns.get_mut(&key) {
                if c.reading() {
                    c.host_readable = true;
                }
            }
            self.enqueue(key);
        }
    }
}

impl<B: VsockBackend + HostFds> HostFds for Vsock<B> {
    fn fds(&self) -> Vec<(RawFd, u32)> {
        self.backend().fds()
    }

    fn fd_ready(&mut self, fd: RawFd, events: u32) {
        self.backend_mut().fd_ready(fd, events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mem::{GuestMemory, VecMemory};
    use crate::virtio::testing::{driver_queues, DriverQueue};
    use crate::virtio::vsock::{HDR_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
    use crate::virtio::{Queue, VirtioDevice};
    use std::io::Write;
    use std::time::{Duration, Instant};

    const CID: u64 = 3;
    const RX_BUFS: u16 = 8;
    const RX_BASE: u64 = 0x10000;
    const RX_BUF_LEN: u32 = (HDR_LEN + 4096) as u32;
    const TX_BUF: u64 = 0x40000;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The guest: a driver over `VecMemory`, and an event loop over the muxer's fds.
    struct Guest {
        mem: VecMemory,
        rxq: DriverQueue,
        txq: DriverQueue,
        queues: [Queue; 3],
        dev: Vsock<Muxer>,
        got: VecDeque<(PacketHeader, Vec<u8>)>,
        fwd_cnt: u32,
    }

    impl Guest {
        fn new(path: &Path) -> Guest {
            let mem = VecMemory::new(0, 1 << 21);
            let ([rxq, txq, _evq], queues) = driver_queues(&mem, 16, QUEUE_SIZE);
            let mut g = Guest {
                mem,
                rxq,
                txq,
                queues,
                dev: Vsock::new(CID, Muxer::new(CID, path).unwrap()),
                got: VecDeque::new(),
                fwd_cnt: 0,
            };
            for _ in 0..RX_BUFS {
                g.post_rx();
            }
            g
        }

        fn post_rx(&mut self) {
            // Single-descriptor chains take descriptors in turn, so the head names the buffer.
            let head = self.rxq.add(&self.mem, &[(0, 0, true)]);
            let addr = RX_BASE + u64::from(head) * 0x2000;
            self.mem
                .write(self.rxq.desc + 16 * u64::from(head), &addr.to_le_bytes())
                .unwrap();
            self.mem
                .write(
                    self.rxq.desc + 16 * u64::from(head) + 8,
                    &RX_BUF_LEN.to_le_bytes(),
                )
                .unwrap();
        }

        fn collect(&mut self) {
            for (id, len) in self.rxq.used(&self.mem) {
                let addr = RX_BASE + u64::from(id) * 0x2000;
                let mut raw = [0; HDR_LEN];
                self.mem.read(addr, &mut raw).unwrap();
                let h = PacketHeader::from_bytes(&raw);
                assert_eq!(len, HDR_LEN as u32 + h.len);
                let mut p = vec![0; h.len as usize];
                self.mem.read(addr + HDR_LEN as u64, &mut p).unwrap();
                self.got.push_back((h, p));
                self.post_rx();
            }
            self.dev
                .queue_notify(RX_QUEUE, &mut self.queues, &self.mem)
                .unwrap();
        }

        fn send(&mut self, op: u16, local: u32, peer: u32, flags: u32, payload: &[u8]) {
            let h = PacketHeader {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port: local,
                dst_port: peer,
                len: payload.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags,
                buf_alloc: 16 * 1024,
                fwd_cnt: self.fwd_cnt,
            };
            self.mem.write(TX_BUF, &h.to_bytes()).unwrap();
            self.mem.write(TX_BUF + HDR_LEN as u64, payload).unwrap();
            self.txq.add(
                &self.mem,
                &[(TX_BUF, (HDR_LEN + payload.len()) as u32, false)],
            );
            self.dev
                .queue_notify(TX_QUEUE, &mut self.queues, &self.mem)
                .unwrap();
            self.txq.reclaim(&self.mem);
            self.collect();
        }

        /// One event-loop round: poll the muxer's fds briefly, deliver events.
        fn pump(&mut self) {
            let want = self.dev.fds();
            let mut pfds: Vec<libc::pollfd> = want
                .iter()
                .map(|&(fd, ev)| libc::pollfd {
                    fd,
                    events: (if ev & libc::EPOLLIN as u32 != 0 {
                        libc::POLLIN
                    } else {
                        0
                    }) | (if ev & libc::EPOLLOUT as u32 != 0 {
                        libc::POLLOUT
                    } else {
                        0
                    }),
                    revents: 0,
                })
                .collect();
            // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 10) };
            assert!(n >= 0);
            for p in pfds.iter().filter(|p| p.revents != 0) {
                let mut ev = 0u32;
                if p.revents & libc::POLLIN != 0 {
                    ev |= libc::EPOLLIN as u32;
                }
                if p.revents & libc::POLLOUT != 0 {
                    ev |= libc::EPOLLOUT as u32;
                }
                if p.revents & libc::POLLHUP != 0 {
                    ev |= libc::EPOLLHUP as u32;
                }
                if p.revents & libc::POLLERR != 0 {
                    ev |= libc::EPOLLERR as u32;
                }
                self.dev.fd_ready(p.fd, ev);
                self.dev.backend_ready(&mut self.queues, &self.mem).unwrap();
            }
            self.collect();
        }

        /// Pump until a packet arrives; consumes it (and acknowledges RW payload).
        fn expect_packet(&mut self) -> (PacketHeader, Vec<u8>) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.got.is_empty() {
                assert!(Instant::now() < deadline, "no packet for the guest");
                self.pump();
            }
            let (h, p) = self.got.pop_front().unwrap();
            assert_eq!(
                (h.src_cid, h.dst_cid, h.type_),
                (HOST_CID, CID, TYPE_STREAM)
            );
            self.fwd_cnt = self.fwd_cnt.wrapping_add(p.len() as u32);
            (h, p)
        }

        /// Pump until `n` bytes of RW payload have arrived.
        fn expect_data(&mut self, n: usize) -> Vec<u8> {
            let mut out = Vec::new();
            while out.len() < n {
                let (h, p) = self.expect_packet();
                if h.op == op::RW {
                    out.extend(p);
                } else {
                    assert_eq!(h.op, op::CREDIT_UPDATE, "{h:?}");
                }
            }
            out
        }
    }

    fn read_line(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    #[test]
    fn host_initiated_round_trip() {
        let dir = temp_dir("host");
        let path = dir.join("v.sock");
        let mut g = Guest::new(&path);
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let (req, _) = g.expect_packet();
        assert_eq!(
            (req.op, req.dst_port, req.buf_alloc),
            (op::REQUEST, 52, BUF_ALLOC)
        );
        let local = req.src_port;
        assert!(local >= FIRST_LOCAL_PORT);
        g.send(op::RESPONSE, 52, local, 0, &[]);
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Drive the loop from another thread while the host reads.
        let reader = std::thread::spawn(move || {
            assert_eq!(read_line(&mut host), format!("OK {local}"));
            host
        });
        while !reader.is_finished() {
            g.pump();
        }
        let mut host = reader.join().unwrap();

        // Host → guest: more than one rx buffer's worth, and past the guest's 16 KiB credit.
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
        let writer = {
            let mut host = host.try_clone().unwrap();
            let data = data.clone();
            std::thread::spawn(move || host.write_all(&data).unwrap())
        };
        let mut got: Vec<u8> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < data.len() {
            assert!(Instant::now() < deadline);
            g.pump();
            while let Some((h, p)) = g.got.pop_front() {
                match h.op {
                    op::RW => {
                        assert_eq!((h.src_port, h.dst_port), (local, 52));
                        got.extend(&p);
                        g.fwd_cnt = g.fwd_cnt.wrapping_add(p.len() as u32);
                    }
                    op::CREDIT_REQUEST => {}
                    other => panic!("unexpected op {other}"),
                }
            }
            // The guest consumes and says so.
            g.send(op::CREDIT_UPDATE, 52, local, 0, &[]);
        }
        writer.join().unwrap();
        assert_eq!(got, data);

        // Guest → host, with a CREDIT_UPDATE once a quarter of the buffer drained.
        let chunk = vec![0x5a; 8192];
        for _ in 0..3 {
            g.send(op::RW, 52, local, 0, &chunk);
        }
        let mut buf = vec![0; 3 * 8192];
        host.read_exact(&mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
        let (cu, _) = g.expect_packet();
        assert_eq!(cu.op, op::CREDIT_UPDATE);
        assert!(cu.fwd_cnt >= CREDIT_UPDATE_THRESHOLD);
        // Asked for credit, the muxer answers.
        g.send(op::CREDIT_REQUEST, 52, local, 0, &[]);
        let (cu, _) = g.expect_packet();
        assert_eq!(
            (cu.op, cu.fwd_cnt, cu.buf_alloc),
            (op::CREDIT_UPDATE, 3 * 8192, BUF_ALLOC)
        );

        // Host half-closes: the guest hears SHUTDOWN(SEND) and can still send.
        host.shutdown(Shutdown::Write).unwrap();
        let (sd, _) = g.expect_packet();
        assert_eq!((sd.op, sd.flags), (op::SHUTDOWN, shutdown::SEND));
        g.send(op::RW, 52, local, 0, b"bye");
        let mut b = [0; 3];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"bye");
        // The guest closes: RST back, host sees EOF, state gone.
        g.send(op::SHUTDOWN, 52, local, shutdown::RCV | shutdown::SEND, &[]);
        let (rst, _) = g.expect_packet();
        assert_eq!(rst.op, op::RST);
        assert_eq!(host.read(&mut b).unwrap(), 0);
        assert_eq!(g.dev.backend().connections(), 0);
        drop(g);
        assert!(!path.exists(), "the muxer removes its socket");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_rst_closes_the_host_stream() {
        let dir = temp_dir("rst");
        let path = dir.join("v.sock");
        let mut g = Guest::new(&path);
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 1234\n").unwrap();
        let (req, _) = g.expect_packet();
        // Nothing listens on the guest's port 1234.
        g.send(op::RST, 1234, req.src_port, 0, &[]);
        let mut b = [0; 8];
        assert_eq!(host.read(&mut b).unwrap(), 0);
        assert_eq!(g.dev.backend().connections(), 0);

        // A bad CONNECT line just closes the stream.
        let mut bad = UnixStream::connect(&path).unwrap();
        bad.write_all(b"HELLO\n").unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = std::thread::spawn(move || bad.read(&mut [0; 8]).unwrap());
        while !t.is_finished() {
            g.pump();
        }
        assert_eq!(t.join().unwrap(), 0);
        assert!(g.got.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn guest_initiated_connect_and_refusal() {
        let dir = temp_dir("guest");
        let path = dir.join("v.sock");
        let mut g = Guest::new(&path);
        let listener = UnixListener::bind(dir.join("v.sock_5000")).unwrap();

        g.send(op::REQUEST, 40000, 5000, 0, &[]);
        let (resp, _) = g.expect_packet();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (op::RESPONSE, 5000, 40000)
        );
        let (mut host, _) = listener.accept().unwrap();
        g.send(op::RW, 40000, 5000, 0, b"ping");
        let mut b = [0; 4];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        host.write_all(b"pong").unwrap();
        assert_eq!(g.expect_data(4), b"pong");
        // The host closes entirely: SHUTDOWN, then the guest's close gets RST.
        drop(host);
        let (sd, _) = g.expect_packet();
        assert_eq!(sd.op, op::SHUTDOWN);
        g.send(
            op::SHUTDOWN,
            40000,
            5000,
            shutdown::RCV | shutdown::SEND,
            &[],
        );
        assert_eq!(g.expect_packet().0.op, op::RST);
        assert_eq!(g.dev.backend().connections(), 0);

        // Nobody listens on port 6000: RST.
        g.send(op::REQUEST, 40001, 6000, 0, &[]);
        let (rst, _) = g.expect_packet();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 6000, 40001));
        // Data for a connection that does not exist: RST; an RST for one: nothing.
        g.send(op::RW, 40002, 5000, 0, b"x");
        assert_eq!(g.expect_packet().0.op, op::RST);
        g.send(op::RST, 40003, 5000, 0, &[]);
        for _ in 0..5 {
            g.pump();
        }
        assert!(g.got.is_empty());
        assert_eq!(g.dev.backend().connections(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credit_violations_reset_the_connection() {
        let dir = temp_dir("credit");
        let path = dir.join("v.sock");
        let mut g = Guest::new(&path);
        let listener = UnixListener::bind(dir.join("v.sock_7")).unwrap();
        g.send(op::REQUEST, 1, 7, 0, &[]);
        assert_eq!(g.expect_packet().0.op, op::RESPONSE);
        let (_host, _) = listener.accept().unwrap();
        // The host never reads: the socket buffer fills, then our 64 KiB, then RST.
        let chunk = vec![1u8; 60_000];
        let mut reset = false;
        for _ in 0..100 {
            g.send(op::RW, 1, 7, 0, &chunk);
            if g.got.iter().any(|(h, _)| h.op == op::RST) {
                reset = true;
                break;
            }
        }
        assert!(reset, "a guest ignoring credit is reset");
        assert_eq!(g.dev.backend().connections(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn connection_cap_refuses_requests() {
        let dir = temp_dir("cap");
        let path = dir.join("v.sock");
        let mut m = Muxer::new(CID, &path).unwrap();
        m.max_conns = 8;
        let listener = UnixListener::bind(dir.join("v.sock_9")).unwrap();
        let mut accepted: Vec<(UnixStream, _)> = Vec::new();
        let req = |port| PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: port,
            dst_port: 9,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            ..Default::default()
        };
        for port in 0..8 {
            m.send_pkt(&req(port), &[]);
            accepted.push(listener.accept().unwrap());
        }
        assert_eq!(m.connections(), 8);
        m.send_pkt(&req(99_999), &[]);
        assert_eq!(m.connections(), 8);
        // Host connections beyond the cap are accepted and closed at once.
        let mut extra = UnixStream::connect(&path).unwrap();
        m.fd_ready(m.listener.as_raw_fd(), libc::EPOLLIN as u32);
        assert_eq!(extra.read(&mut [0; 4]).unwrap(), 0);
        // The guest gets RESPONSEs first, in turn, then the refusal.
        let mut h = PacketHeader::default();
        let mut buf = [0; 16];
        let mut ops = Vec::new();
        while m.has_pending() {
            if let Some(0) = m.recv_pkt(&mut h, &mut buf) {
                ops.push((h.op, h.dst_port));
            }
        }
        assert_eq!(ops[0], (op::RST, 99_999));
        assert_eq!(ops.len(), 9);
        assert!(ops[1..].iter().all(|&(o, _)| o == op::RESPONSE));
        // Reset forgets them all.
        m.reset();
        assert_eq!(m.connections(), 0);
        drop(m);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn path_errors_are_clear() {
        let dir = temp_dir("paths");
        let path = dir.join("v.sock");
        let m = Muxer::new(CID, &path).unwrap();
        let e = Muxer::new(CID, &path).err().unwrap();
        assert!(matches!(e, VsockError::PathInUse(_)), "{e}");
        assert!(e.to_string().contains("already exists"));
        drop(m);
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            Muxer::new(CID, &path),
            Err(VsockError::PathInUse(_))
        ));
        let e = Muxer::new(CID, &dir.join("missing/v.sock")).err().unwrap();
        assert!(matches!(e, VsockError::NoDirectory(_)), "{e}");
        assert!(matches!(
            Muxer::new(2, &dir.join("x")),
            Err(VsockError::InvalidCid(2))
        ));
        assert!(matches!(
            Muxer::new(u64::from(u32::MAX), &dir.join("x")),
            Err(VsockError::InvalidCid(_))
        ));
        let long = dir.join("x".repeat(100));
        assert!(matches!(
            Muxer::new(CID, &long),
            Err(VsockError::PathTooLong(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"connect 5",
            b"CONNECT 5 6",
        ] {
            assert_eq!(parse_connect(bad), None);
        }
    }
}
