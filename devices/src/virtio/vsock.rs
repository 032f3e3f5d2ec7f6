//! virtio-vsock (virtio 1.x §5.10): stream sockets between the guest and the host.
//!
//! Three queues: rx (0, device-writable buffers the device fills with packets for the
//! guest), tx (1, packets from the guest) and event (2, never used: we do not migrate,
//! so there is no `TRANSPORT_RESET` to announce; its buffers just stay posted). The
//! configuration space is the guest's CID (le64).
//!
//! Every packet starts with the 44-byte `virtio_vsock_hdr`. This device checks each
//! guest packet before a backend sees it:
//! - a chain too short for a header, or whose `src_cid` is not the guest's own, is
//!   dropped (it cannot be answered truthfully);
//! - a packet of another type than `STREAM`, or to another CID than the host (2), is
//!   answered with `RST`;
//! - a `len` above [`MAX_PAYLOAD`], or larger than the payload the chain carries, or a
//!   payload outside guest RAM, resets the connection: the backend gets an `RST` for it
//!   (so it can close its side) and the guest gets one back.
//!
//! What the backend hands out for the guest is copied into rx chains when the backend
//! says it has something ([`VsockBackend::has_pending`]), on `backend_ready` and after
//! every notification. A chain taken from the ring for which the backend then has
//! nothing is kept for the next packet, not returned empty.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use super::queue::Chain;
use super::{device_type, read_config_bytes, DeviceError, GuestMemory, Queue, VirtioDevice};

/// Bytes of `virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The largest payload accepted from the guest or put into one rx buffer (Linux never
/// sends more than 64 KiB per packet either).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Device-made replies (RSTs to malformed packets) waiting for rx buffers; more are
/// dropped, and the guest's socket times out instead.
const MAX_REPLIES: usize = 256;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;

/// `type` values.
pub const TYPE_STREAM: u16 = 1;

/// `op` values.
pub mod op {
    pub const INVALID: u16 = 0;
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of a `SHUTDOWN` packet.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
}

/// `struct virtio_vsock_hdr`, decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload bytes that follow the header.
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer size (credit).
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, wrapping.
    pub fwd_cnt: u32,
}

impl PacketHeader {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        PacketHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The `RST` that answers `self` (addresses and ports swapped, no credit).
    pub fn reset_reply(&self) -> PacketHeader {
        PacketHeader {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: self.type_,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

/// The other end of the guest's connections (the Unix-socket muxer on the host).
///
/// Packets given to `send_pkt` are checked: `src_cid` is the guest's, `dst_cid` is
/// [`HOST_CID`], `type_` is `STREAM`, and `payload.len() == hdr.len <= MAX_PAYLOAD`.
/// Everything else in them (ports, ops, flags, credit) is still the guest's word.
pub trait VsockBackend: Send {
    /// A packet from the guest.
    fn send_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]);
    /// Produce the next packet for the guest: fill `hdr` (its `len` is set by the
    /// device) and at most `payload.len()` bytes of payload; return the payload length,
    /// or `None` if there is nothing to send after all.
    fn recv_pkt(&mut self, hdr: &mut PacketHeader, payload: &mut [u8]) -> Option<usize>;
    /// Whether `recv_pkt` would (probably) produce a packet.
    fn has_pending(&self) -> bool;
    /// The driver reset the device: forget every connection.
    fn reset(&mut self) {}
}

pub struct Vsock<B> {
    guest_cid: u64,
    backend: B,
    /// An rx chain popped for a packet that did not come.
    held_rx: Option<Chain>,
    /// RSTs the device itself owes the guest.
    replies: VecDeque<PacketHeader>,
    /// Bounce buffer for one payload.
    buf: Vec<u8>,
}

impl<B: VsockBackend> Vsock<B> {
    /// `guest_cid` must be a valid guest CID (3 to `u32::MAX - 1`); the caller checks.
    pub fn new(guest_cid: u64, backend: B) -> Self {
        Vsock {
            guest_cid,
            backend,
            held_rx: None,
            replies: VecDeque::new(),
            buf: vec![0; MAX_PAYLOAD],
        }
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    fn reply(&mut self, hdr: PacketHeader) {
        if self.replies.len() < MAX_REPLIES {
            self.replies.push_back(hdr);
        }
    }

    /// Check one guest packet and pass it on (or answer it).
    fn handle_tx(&mut self, mem: &dyn GuestMemory, chain: &Chain) {
        let mut r = chain.reader();
        let mut raw = [0u8; HDR_LEN];
        if r.read_exact(mem, &mut raw).is_err() {
            return;
        }
        let hdr = PacketHeader::from_bytes(&raw);
        if hdr.src_cid != self.guest_cid {
            return;
        }
        if hdr.type_ != TYPE_STREAM || hdr.dst_cid != HOST_CID {
            if hdr.op != op::RST {
                self.reply(hdr.reset_reply());
            }
            return;
        }
        let len = hdr.len as usize;
        let payload_ok = len <= MAX_PAYLOAD
            && r.remaining() >= u64::from(hdr.len)
            && r.read_exact(mem, &mut self.buf[..len]).is_ok();
        if !payload_ok {
            // The stream has lost bytes: reset it on both sides.
            let rst = PacketHeader {
                op: op::RST,
                len: 0,
                flags: 0,
                ..hdr
            };
            self.backend.send_pkt(&rst, &[]);
            if hdr.op != op::RST {
                self.reply(hdr.reset_reply());
            }
            return;
        }
        self.backend.send_pkt(&hdr, &self.buf[..len]);
    }

    fn process_tx(&mut self, tx: &mut Queue, mem: &dyn GuestMemory) -> Result<(), DeviceError> {
        loop {
            while let Some(chain) = tx.pop(mem)? {
                self.handle_tx(mem, &chain);
                tx.add_used(mem, chain.head, 0)?;
            }
            if !tx.enable_notification(mem)? {
                return Ok(());
            }
        }
    }

    fn has_output(&self) -> bool {
        !self.replies.is_empty() || self.backend.has_pending()
    }

    /// Fill rx chains while there are packets for the guest and buffers for them.
    fn fill_rx(&mut self, rx: &mut Queue, mem: &dyn GuestMemory) -> Result<(), DeviceError> {
        if !rx.ready {
            return Ok(());
        }
        while self.has_output() {
            let chain = match self.held_rx.take() {
                Some(c) => c,
                None => match rx.pop(mem)? {
                    Some(c) => c,
                    None => {
                        // Out of buffers: ask for a kick when the driver adds some.
                        if rx.enable_notification(mem)? {
                            continue;
                        }
                        return Ok(());
                    }
                },
            };
            let room = chain.writer().remaining();
            if room < HDR_LEN as u64 {
                rx.add_used(mem, chain.head, 0)?;
                continue;
            }
            let cap = ((room - HDR_LEN as u64).min(MAX_PAYLOAD as u64)) as usize;
            if !writable_in_ram(mem, &chain, HDR_LEN as u64 + cap as u64) {
                // A buffer outside RAM: give it back empty rather than lose a packet in it.
                rx.add_used(mem, chain.head, 0)?;
                continue;
            }
            let mut hdr;
            let n = if let Some(reply) = self.replies.pop_front() {
                hdr = reply;
                0
            } else {
                hdr = PacketHeader::default();
                match self.backend.recv_pkt(&mut hdr, &mut self.buf[..cap]) {
                    Some(n) => n.min(cap),
                    None => {
                        self.held_rx = Some(chain);
                        return Ok(());
                    }
                }
            };
            hdr.len = n as u32;
            let mut w = chain.writer();
            // Checked above, so these cannot fail short; if they do, the used length says so.
            let _ = w
                .write_all(mem, &hdr.to_bytes())
                .and_then(|()| w.write_all(mem, &self.buf[..n]));
            rx.add_used(mem, chain.head, w.written())?;
        }
        Ok(())
    }
}

/// Whether the first `need` bytes of the chain's writable buffers lie in guest RAM.
fn writable_in_ram(mem: &dyn GuestMemory, chain: &Chain, mut need: u64) -> bool {
    for d in chain.descs.iter().filter(|d| d.writable) {
        if need == 0 {
            break;
        }
        let take = u64::from(d.len).min(need);
        if take > 0 && !mem.check_range(d.addr, take) {
            return false;
        }
        need -= take;
    }
    true
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        // VIRTIO_VSOCK_F_STREAM is implied when no type feature is offered.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn reset(&mut self) {
        self.backend.reset();
        self.held_rx = None;
        self.replies.clear();
    }

    fn queue_notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &dyn GuestMemory,
    ) -> Result<(), DeviceError> {
        let [rx, tx, _event] = queues else {
            return Ok(());
        };
        if index == TX_QUEUE && tx.ready {
            self.process_tx(tx, mem)?;
        }
        // New rx buffers, or replies to what was just sent.
        self.fill_rx(rx, mem)
    }

    fn backend_ready(
        &mut self,
        queues: &mut [Queue],
        mem: &dyn GuestMemory,
    ) -> Result<(), DeviceError> {
        let [rx, _tx, _event] = queues else {
            return Ok(());
        };
        self.fill_rx(rx, mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mem::VecMemory;
    use crate::virtio::testing::{driver_queues, DriverQueue};

    const CID: u64 = 3;

    #[derive(Default)]
    struct Fake {
        sent: Vec<(PacketHeader, Vec<u8>)>,
        outbox: VecDeque<(PacketHeader, Vec<u8>)>,
        /// Claims to have something but produces nothing.
        liar: bool,
        resets: usize,
    }

    impl VsockBackend for Fake {
        fn send_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]) {
            assert_eq!(hdr.len as usize, payload.len());
            self.sent.push((*hdr, payload.to_vec()));
        }
        fn recv_pkt(&mut self, hdr: &mut PacketHeader, payload: &mut [u8]) -> Option<usize> {
            let (h, mut p) = self.outbox.pop_front()?;
            *hdr = h;
            if p.len() > payload.len() {
                let rest = p.split_off(payload.len());
                self.outbox.push_front((h, rest));
            }
            payload[..p.len()].copy_from_slice(&p);
            Some(p.len())
        }
        fn has_pending(&self) -> bool {
            self.liar || !self.outbox.is_empty()
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.outbox.clear();
        }
    }

    struct Rig {
        mem: VecMemory,
        rxq: DriverQueue,
        txq: DriverQueue,
        queues: [Queue; 3],
        dev: Vsock<Fake>,
    }

    fn rig() -> Rig {
        let mem = VecMemory::new(0, 1 << 21);
        let ([rxq, txq, _evq], queues) = driver_queues(&mem, 16, QUEUE_SIZE);
        Rig {
            mem,
            rxq,
            txq,
            queues,
            dev: Vsock::new(CID, Fake::default()),
        }
    }

    fn stream(op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    impl Rig {
        /// Post `bufs` on the tx queue and kick it.
        fn tx(&mut self, bufs: &[(u64, u32, bool)]) {
            self.txq.add(&self.mem, bufs);
            self.dev
                .queue_notify(TX_QUEUE, &mut self.queues, &self.mem)
                .unwrap();
            assert_eq!(self.txq.used(&self.mem).len(), 1);
        }

        fn tx_packet(&mut self, hdr: &PacketHeader, payload: &[u8]) {
            self.mem.write(0x10000, &hdr.to_bytes()).unwrap();
            self.mem.write(0x20000, payload).unwrap();
            self.tx(&[
                (0x10000, HDR_LEN as u32, false),
                (0x20000, payload.len() as u32, false),
            ]);
        }

        /// Post one rx buffer of `len` bytes at `addr` and kick the rx queue.
        fn rx_buffer(&mut self, addr: u64, len: u32) {
            self.rxq.add(&self.mem, &[(addr, len, true)]);
            self.dev
                .queue_notify(RX_QUEUE, &mut self.queues, &self.mem)
                .unwrap();
        }

        fn read_packet(&self, addr: u64) -> (PacketHeader, Vec<u8>) {
            let mut raw = [0; HDR_LEN];
            self.mem.read(addr, &mut raw).unwrap();
            let h = PacketHeader::from_bytes(&raw);
            let mut p = vec![0; h.len as usize];
            self.mem.read(addr + HDR_LEN as u64, &mut p).unwrap();
            (h, p)
        }
    }

    #[test]
    fn header_round_trips() {
        let h = PacketHeader {
            src_cid: 0x0102030405060708,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 0xdeadbeef,
            len: 77,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 99,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &0x0102030405060708u64.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(PacketHeader::from_bytes(&b), h);
    }

    #[test]
    fn config_is_the_guest_cid() {
        let r = rig();
        let mut b = [0xff; 12];
        r.dev.read_config(0, &mut b);
        assert_eq!(b, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.dev.device_type(), 19);
        assert_eq!(r.dev.queue_max_sizes(), &[256, 256, 256]);
    }

    #[test]
    fn tx_packets_reach_the_backend() {
        let mut r = rig();
        r.tx_packet(&stream(op::RW, 1000, 52, 5), b"hello");
        // Header and payload in one descriptor, with trailing slack.
        let h = stream(op::REQUEST, 1001, 52, 0);
        r.mem.write(0x30000, &h.to_bytes()).unwrap();
        r.tx(&[(0x30000, 100, false)]);
        let sent = &r.dev.backend().sent;
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].0, stream(op::RW, 1000, 52, 5));
        assert_eq!(sent[0].1, b"hello");
        assert_eq!(sent[1].0.op, op::REQUEST);
        assert!(sent[1].1.is_empty());
    }

    #[test]
    fn rx_fill_splits_and_waits_for_buffers() {
        let mut r = rig();
        let mut h = stream(op::RW, 52, 1000, 0);
        core::mem::swap(&mut h.src_cid, &mut h.dst_cid);
        let data: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
        r.dev.backend_mut().outbox.push_back((h, data.clone()));
        // No buffers yet: nothing happens.
        r.dev.backend_ready(&mut r.queues, &r.mem).unwrap();
        assert!(r.rxq.used(&r.mem).is_empty());
        r.rx_buffer(0x40000, (HDR_LEN + 4096) as u32);
        r.rx_buffer(0x50000, (HDR_LEN + 4096) as u32);
        let used = r.rxq.used(&r.mem);
        assert_eq!(
            used,
            [
                (0, (HDR_LEN + 4096) as u32),
                (1, (HDR_LEN + 6000 - 4096) as u32)
            ]
        );
        let (h1, p1) = r.read_packet(0x40000);
        let (h2, p2) = r.read_packet(0x50000);
        assert_eq!((h1.op, h1.len, h1.dst_port), (op::RW, 4096, 1000));
        assert_eq!(h2.len, 6000 - 4096);
        assert_eq!([p1, p2].concat(), data);
    }

    #[test]
    fn a_chain_the_backend_cannot_fill_is_kept() {
        let mut r = rig();
        r.dev.backend_mut().liar = true;
        r.rx_buffer(0x40000, 4096);
        assert!(r.rxq.used(&r.mem).is_empty());
        assert!(r.dev.held_rx.is_some());
        r.dev.backend_mut().liar = false;
        r.dev
            .backend_mut()
            .outbox
            .push_back((stream(op::RESPONSE, 1, 2, 0), vec![]));
        r.dev.backend_ready(&mut r.queues, &r.mem).unwrap();
        assert_eq!(r.rxq.used(&r.mem), [(0, HDR_LEN as u32)]);
        assert_eq!(r.read_packet(0x40000).0.op, op::RESPONSE);
        // Reset drops the held chain and tells the backend.
        r.dev.backend_mut().liar = true;
        r.rx_buffer(0x40000, 4096);
        r.dev.reset();
        assert!(r.dev.held_rx.is_none());
        assert_eq!(r.dev.backend().resets, 1);
    }

    #[test]
    fn malformed_packets_are_dropped_or_reset() {
        let mut r = rig();
        // Short header: dropped, nothing sent anywhere.
        r.mem
            .write(0x10000, &stream(op::RW, 1, 2, 0).to_bytes())
            .unwrap();
        r.tx(&[(0x10000, 20, false)]);
        // No readable part at all.
        r.tx(&[(0x10000, 64, true)]);
        // Wrong source CID: dropped without a reply.
        let mut spoof = stream(op::REQUEST, 1, 2, 0);
        spoof.src_cid = 7;
        r.tx_packet(&spoof, &[]);
        assert!(r.dev.backend().sent.is_empty());
        assert!(r.dev.replies.is_empty());

        // len larger than the payload: RST to the backend and to the guest.
        r.mem
            .write(0x10000, &stream(op::RW, 10, 52, 100).to_bytes())
            .unwrap();
        r.tx(&[(0x10000, HDR_LEN as u32 + 10, false)]);
        // Huge len.
        r.mem
            .write(0x10000, &stream(op::RW, 11, 52, u32::MAX).to_bytes())
            .unwrap();
        r.tx(&[(0x10000, HDR_LEN as u32, false), (0x20000, u32::MAX, false)]);
        // Payload outside guest RAM.
        r.mem
            .write(0x10000, &stream(op::RW, 12, 52, 16).to_bytes())
            .unwrap();
        r.tx(&[(0x10000, HDR_LEN as u32, false), (1 << 40, 16, false)]);
        let sent = &r.dev.backend().sent;
        assert_eq!(sent.len(), 3);
        for (i, (h, p)) in sent.iter().enumerate() {
            assert_eq!((h.op, h.len, h.src_port), (op::RST, 0, 10 + i as u32));
            assert!(p.is_empty());
        }
        // Wrong type and wrong destination: RST from the device alone.
        let mut dgram = stream(op::REQUEST, 20, 52, 0);
        dgram.type_ = 2;
        r.tx_packet(&dgram, &[]);
        let mut other = stream(op::REQUEST, 21, 52, 0);
        other.dst_cid = 9;
        r.tx_packet(&other, &[]);
        // An RST is never answered with one.
        let mut rst = stream(op::RST, 22, 52, 0);
        rst.dst_cid = 9;
        r.tx_packet(&rst, &[]);
        assert_eq!(r.dev.backend().sent.len(), 3);

        // The replies come out when the guest posts buffers.
        for i in 0..5 {
            r.rx_buffer(0x40000 + i * 0x1000, 4096);
        }
        let used = r.rxq.used(&r.mem);
        assert_eq!(used.len(), 5);
        let replies: Vec<PacketHeader> = (0..5)
            .map(|i| r.read_packet(0x40000 + i * 0x1000).0)
            .collect();
        assert!(replies
            .iter()
            .all(|h| h.op == op::RST && h.dst_cid == CID && h.len == 0));
        assert_eq!(
            replies.iter().map(|h| h.dst_port).collect::<Vec<_>>(),
            [10, 11, 12, 20, 21]
        );
        assert_eq!(replies[4].src_cid, 9);
        assert_eq!(replies[3].type_, 2);
    }

    #[test]
    fn hostile_rx_buffers_do_not_eat_packets() {
        let mut r = rig();
        r.dev
            .backend_mut()
            .outbox
            .push_back((stream(op::RESPONSE, 1, 2, 0), vec![]));
        // Too small for a header, then outside RAM: both come back empty.
        r.rx_buffer(0x40000, 10);
        r.rx_buffer(1 << 40, 4096);
        assert_eq!(r.rxq.used(&r.mem), [(0, 0), (1, 0)]);
        assert_eq!(r.dev.backend().outbox.len(), 1);
        // A readable-only chain has no room either.
        r.rxq.add(&r.mem, &[(0x40000, 4096, false)]);
        r.rx_buffer(0x50000, 4096);
        let used = r.rxq.used(&r.mem);
        assert_eq!(used, [(2, 0), (3, HDR_LEN as u32)]);
    }

    #[test]
    fn garbage_never_panics() {
        let mut r = rig();
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let mut raw = [0u8; HDR_LEN];
            for b in raw.iter_mut() {
                *b = next() as u8;
            }
            let mut h = PacketHeader::from_bytes(&raw);
            if next() % 2 == 0 {
                h.src_cid = CID;
                h.dst_cid = HOST_CID;
                h.type_ = TYPE_STREAM;
                h.len %= 200;
            }
            r.mem.write(0x10000, &h.to_bytes()).unwrap();
            let plen = (next() % 300) as u32;
            r.tx(&[(0x10000, HDR_LEN as u32, false), (0x20000, plen, false)]);
        }
        for (h, p) in &r.dev.backend().sent {
            assert_eq!(h.len as usize, p.len());
            assert_eq!(h.src_cid, CID);
        }
    }
}
