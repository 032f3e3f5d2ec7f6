//! Shared pieces of the fuzz targets: the guest-RAM layout, guest addresses and buffer
//! descriptions decoded from fuzz input, a hostile driver that posts chains and
//! scribbles over the rings, and small fake backends that check the contracts the
//! device models promise their backends.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::virtio::blk::{BackendError, BlockBackend};
use devices::virtio::mem::VecMemory;
use devices::virtio::net::{self, NetBackend, NetError};
use devices::virtio::testing::DriverQueue;
use devices::virtio::vsock::{self, PacketHeader, VsockBackend};
use devices::virtio::{GuestMemory, Interrupt, MemError, Queue};

// ---------------------------------------------------------------------------------------
// Guest RAM layout
// ---------------------------------------------------------------------------------------

/// Guest RAM: `[0, RAM)`. Queue `q`'s rings are at `RING_STRIDE * q` (descriptor table,
/// then available ring at +0x1000, used ring at +0x2000: room for 256 entries each);
/// buffers go in `[DATA, RAM)`.
pub const RAM: u64 = 0x4_0000;
pub const RING_STRIDE: u64 = 0x4000;
pub const MAX_QUEUES: u64 = 3;
pub const DATA: u64 = RING_STRIDE * MAX_QUEUES;

pub fn ring_base(q: usize) -> u64 {
    RING_STRIDE * q as u64
}

/// Guest RAM filled from the fuzz input (the data area), the rings zeroed.
pub fn guest_ram(fill: &[u8]) -> VecMemory {
    let mem = VecMemory::new(0, RAM as usize);
    let n = fill.len().min((RAM - DATA) as usize);
    mem.write(DATA, &fill[..n]).unwrap();
    mem
}

/// A guest physical address as the fuzzer names it: mostly somewhere in the data area,
/// sometimes in the rings, at the end of RAM, or anything at all.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// 16-byte aligned in `[DATA, RAM - 16 KiB)`, so that most lengths fit.
    Data(u16),
    /// Anywhere in RAM.
    Unaligned(u32),
    Ring(u16),
    EndOfRam(u16),
    Raw(u64),
}

impl Addr {
    pub fn get(self) -> u64 {
        match self {
            Addr::Data(o) => DATA + (u64::from(o) % ((RAM - DATA - 0x4000) / 16)) * 16,
            Addr::Unaligned(o) => u64::from(o) % RAM,
            Addr::Ring(o) => u64::from(o) % DATA,
            Addr::EndOfRam(back) => RAM.wrapping_sub(u64::from(back)),
            Addr::Raw(a) => a,
        }
    }
}

/// A buffer length: mostly small (up to 16 KiB), sometimes whole sectors, sometimes
/// anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Tiny(u8),
    Small(u16),
    Sectors(u8),
    /// A multiple of 16 (virtio-blk discard segments).
    Segments(u8),
    Raw(u32),
}

impl Len {
    pub fn get(self) -> u32 {
        match self {
            Len::Tiny(n) => u32::from(n),
            Len::Small(n) => u32::from(n) % 0x4000,
            Len::Sectors(n) => u32::from(n % 32) * 512,
            Len::Segments(n) => u32::from(n % 20) * 16,
            Len::Raw(n) => n,
        }
    }
}

/// One descriptor of a chain the driver posts.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Buf {
    pub addr: Addr,
    pub len: Len,
    pub writable: bool,
}

/// A chain as a driver builds it, or anything.
#[derive(Arbitrary, Debug, Clone)]
pub enum Layout {
    /// A device-readable header of the device's header size, then device-readable
    /// payload buffers.
    Out {
        hdr: Addr,
        payload: Vec<(Addr, Len)>,
    },
    /// Device-writable buffers.
    In(Vec<(Addr, Len)>),
    Raw(Vec<Buf>),
}

impl Layout {
    pub fn bufs(&self, hdr_len: u32) -> Vec<Buf> {
        fn list(v: &[(Addr, Len)], writable: bool) -> impl Iterator<Item = Buf> + '_ {
            v.iter().map(move |&(addr, len)| Buf {
                addr,
                len,
                writable,
            })
        }
        match self {
            Layout::Out { hdr, payload } => {
                let mut b = vec![Buf {
                    addr: *hdr,
                    len: Len::Raw(hdr_len),
                    writable: false,
                }];
                b.extend(list(payload, false).take(MAX_CHAIN - 1));
                b
            }
            Layout::In(v) => list(v, true).collect(),
            Layout::Raw(b) => b.clone(),
        }
    }
}

/// The buffers of a virtio-blk request.
#[derive(Arbitrary, Debug, Clone)]
pub enum BlkLayout {
    /// What a driver sends: a 16-byte header, data buffers (device-writable or not),
    /// a one-byte status.
    Shaped {
        hdr: Addr,
        data: Vec<(Addr, Len)>,
        writable: bool,
        status: Addr,
    },
    /// Anything.
    Raw(Vec<Buf>),
}

impl BlkLayout {
    pub fn bufs(&self) -> Vec<Buf> {
        match self {
            BlkLayout::Raw(b) => b.clone(),
            BlkLayout::Shaped {
                hdr,
                data,
                writable,
                status,
            } => {
                let mut b = vec![Buf {
                    addr: *hdr,
                    len: Len::Tiny(16),
                    writable: false,
                }];
                b.extend(data.iter().take(8).map(|&(addr, len)| Buf {
                    addr,
                    len,
                    writable: *writable,
                }));
                b.push(Buf {
                    addr: *status,
                    len: Len::Tiny(1),
                    writable: true,
                });
                b
            }
        }
    }
}

/// The most descriptors per posted chain (a longer chain is cut).
pub const MAX_CHAIN: usize = 12;

/// A queue size the driver asks for: usually valid, sometimes not.
pub fn queue_size(sel: u8, max: u16) -> u16 {
    match sel % 8 {
        0 => 1,
        1 => 2,
        2 => 4,
        3 | 4 => 16,
        5 => max,
        6 => 64.min(max),
        _ => 8,
    }
}

// ---------------------------------------------------------------------------------------
// A hostile driver
// ---------------------------------------------------------------------------------------

/// The driver's side of one queue: posts chains through `DriverQueue` and checks the
/// used lengths the device reports against the writable room of each chain, as long as
/// the driver has been well-behaved enough for that to be well defined (`clean`).
pub struct Driver {
    pub dq: DriverQueue,
    queue: usize,
    /// Chains posted and not yet seen in the used ring: (head, descriptors, writable room).
    in_flight: VecDeque<(u16, usize, u64)>,
    /// No scribbles, no overlapping chains, no device-writable buffer over the rings:
    /// what the device reads is what was posted.
    pub clean: bool,
}

impl Driver {
    pub fn new(q: usize, size: u16) -> Self {
        Driver {
            dq: DriverQueue::new(size, ring_base(q)),
            queue: q,
            in_flight: VecDeque::new(),
            clean: true,
        }
    }

    /// Zero this queue's rings and start over (a driver re-initializing after reset).
    pub fn reinit(&mut self, mem: &dyn GuestMemory, size: u16) {
        mem.write(ring_base(self.queue), &[0; RING_STRIDE as usize])
            .unwrap();
        *self = Driver::new(self.queue, size);
    }

    pub fn configure(&self, q: &mut Queue, event_idx: bool) {
        self.dq.configure(q);
        q.set_event_idx(event_idx);
    }

    /// Post `bufs` (cut to `MAX_CHAIN`); returns the head. An empty chain is not posted.
    pub fn post(&mut self, mem: &dyn GuestMemory, bufs: &[Buf]) -> Option<u16> {
        let bufs: Vec<(u64, u32, bool)> = bufs
            .iter()
            .take(MAX_CHAIN)
            .map(|b| (b.addr.get(), b.len.get(), b.writable))
            .collect();
        if bufs.is_empty() {
            return None;
        }
        let busy: usize = self.in_flight.iter().map(|c| c.1).sum();
        let over_rings = bufs.iter().any(|&(a, l, w)| w && l > 0 && a < DATA);
        if busy + bufs.len() > usize::from(self.dq.size) || over_rings {
            self.clean = false;
        }
        let head = self.dq.add(mem, &bufs);
        let room = bufs.iter().filter(|b| b.2).map(|b| u64::from(b.1)).sum();
        self.in_flight.push_back((head, bufs.len(), room));
        Some(head)
    }

    /// Read the used ring; while clean, check that every used element names a chain in
    /// flight and reports no more than its writable room. Returns the used elements.
    pub fn collect_used(&mut self, mem: &dyn GuestMemory) -> Vec<(u32, u32)> {
        let used = self.dq.used(mem);
        for &(id, len) in &used {
            if !self.clean {
                break;
            }
            let pos = self.in_flight.iter().position(|c| u32::from(c.0) == id);
            let Some(pos) = pos else {
                panic!("used id {id} is no chain in flight: {:?}", self.in_flight);
            };
            let (_, _, room) = self.in_flight.remove(pos).unwrap();
            assert!(
                u64::from(len) <= room,
                "used length {len} > writable room {room} of chain {id}"
            );
        }
        if !self.clean {
            self.in_flight.clear();
        }
        used
    }
}

/// The driver writes `bytes` at `addr` (nothing if that is not all RAM); returns
/// whether it wrote over the rings.
pub fn driver_write(mem: &dyn GuestMemory, addr: u64, bytes: &[u8]) -> bool {
    mem.write(addr, bytes).is_ok() && addr < DATA
}

/// Rings of all queues lie side by side: a buffer or scribble over one may hit any, so
/// one unclean driver makes all of them unclean.
pub fn spread_taint(drivers: &mut [Driver]) {
    if drivers.iter().any(|d| !d.clean) {
        drivers.iter_mut().for_each(|d| d.clean = false);
    }
}

/// A driver scribble over the ring area or anywhere in RAM.
#[derive(Arbitrary, Debug, Clone)]
pub enum Scribble {
    /// A 16-bit store into queue `q`'s rings (indices, flags, ring entries, descriptors).
    Ring { q: u8, offset: u16, value: u16 },
    /// Bytes written anywhere.
    Bytes { addr: Addr, bytes: Vec<u8> },
}

impl Scribble {
    pub fn apply(&self, mem: &dyn GuestMemory) {
        match self {
            Scribble::Ring { q, offset, value } => {
                let q = u64::from(*q) % MAX_QUEUES;
                let at = RING_STRIDE * q + ((u64::from(*offset) % 0x3000) & !1);
                let _ = mem.store_u16(at, *value);
            }
            Scribble::Bytes { addr, bytes } => {
                let n = bytes.len().min(256);
                let _ = mem.write(addr.get(), &bytes[..n]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Interrupts and shared memory
// ---------------------------------------------------------------------------------------

/// Counts interrupts.
pub struct CountIrq(pub Arc<AtomicUsize>);

impl Interrupt for CountIrq {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A handle on guest RAM that the transport owns while the fuzz driver keeps another.
#[derive(Clone)]
pub struct Shared(pub Rc<VecMemory>);

impl GuestMemory for Shared {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.0.write(addr, buf)
    }
    fn check_range(&self, addr: u64, len: u64) -> bool {
        self.0.check_range(addr, len)
    }
}

// ---------------------------------------------------------------------------------------
// Fake backends
// ---------------------------------------------------------------------------------------

/// Which backend calls fail.
#[derive(Arbitrary, Debug, Clone, Copy, Default)]
pub struct DiskFaults {
    pub read: bool,
    pub write: bool,
    pub flush: bool,
    pub discard: bool,
}

/// A disk in a vector. Panics if the device asks for bytes outside the disk: the device
/// promises to check every range first.
pub struct FakeDisk {
    pub data: Vec<u8>,
    pub faults: DiskFaults,
    pub discard: bool,
    /// The disk is read-only: any write or discard reaching it is a device bug.
    pub read_only: bool,
}

impl FakeDisk {
    fn check(&self, what: &str, offset: u64, len: u64) {
        let end = offset.checked_add(len).expect("backend range overflows");
        assert!(
            end <= self.data.len() as u64,
            "{what} {offset:#x}+{len:#x} beyond the {:#x}-byte disk",
            self.data.len()
        );
        assert!(
            offset.is_multiple_of(512),
            "{what} at {offset:#x}: not a sector boundary"
        );
    }
}

impl BlockBackend for FakeDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.check("read", offset, buf.len() as u64);
        if self.faults.read {
            return Err(BackendError::Io);
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        assert!(!self.read_only, "write to a read-only disk");
        self.check("write", offset, buf.len() as u64);
        if self.faults.write {
            return Err(BackendError::Io);
        }
        let o = offset as usize;
        self.data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BackendError> {
        if self.faults.flush {
            return Err(BackendError::Io);
        }
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        assert!(!self.read_only, "discard on a read-only disk");
        assert!(self.discard, "discard on a disk that cannot");
        self.check("discard", offset, len);
        if self.faults.discard {
            return Err(BackendError::Unsupported);
        }
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn can_discard(&self) -> bool {
        self.discard
    }
}

/// A frame the fake tap delivers.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Frame {
    pub len: FrameLen,
    pub flags: u8,
    pub gso: u8,
    pub fill: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FrameLen {
    Small(u16),
    Max,
    TooBig,
    Raw(u32),
}

impl FrameLen {
    pub fn get(self) -> usize {
        match self {
            FrameLen::Small(n) => usize::from(n) % 2048,
            FrameLen::Max => net::MAX_FRAME,
            FrameLen::TooBig => net::MAX_FRAME + 1,
            FrameLen::Raw(n) => n as usize % (4 * net::MAX_FRAME),
        }
    }
}

/// The part of the fake tap the fuzz driver changes while the device owns the backend.
#[derive(Default)]
pub struct Wire {
    pub inbox: VecDeque<Frame>,
    pub recv_error: Option<NetError>,
}

/// A tap in memory. Checks what the device sends.
#[derive(Default)]
pub struct FakeNet {
    pub wire: Arc<Mutex<Wire>>,
    pub fail_send: bool,
    pub fail_offloads: bool,
    pub sent: usize,
    /// The guest features the device last configured.
    pub offloads: Option<u64>,
}

impl NetBackend for FakeNet {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        assert!(
            (net::HDR_LEN..=net::MAX_FRAME).contains(&frame.len()),
            "sent a {}-byte frame",
            frame.len()
        );
        self.sent += 1;
        if self.fail_send {
            return Err(NetError::Io(5));
        }
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        assert_eq!(buf.len(), net::MAX_FRAME, "receive buffer size");
        let mut wire = self.wire.lock().unwrap();
        if let Some(e) = wire.recv_error {
            return Err(e);
        }
        let Some(f) = wire.inbox.pop_front() else {
            return Ok(None);
        };
        let len = f.len.get();
        let n = len.min(buf.len());
        buf[..n].fill(f.fill);
        if n >= 2 {
            buf[0] = f.flags;
            buf[1] = f.gso;
        }
        Ok(Some(len))
    }
    fn set_offloads(&mut self, guest_features: u64) -> Result<(), NetError> {
        self.offloads = Some(guest_features);
        if self.fail_offloads {
            return Err(NetError::Io(22));
        }
        Ok(())
    }
}

/// A packet the fake vsock muxer has for the guest.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct VsockPacket {
    pub op: u16,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub fill: u8,
    /// Claim the whole length even if the buffer was smaller (a backend bug the device
    /// must survive).
    pub overclaim: bool,
}

/// The guest CID of the fuzzed vsock device.
pub const GUEST_CID: u64 = 3;

/// A vsock muxer in memory. Checks the documented contract of what reaches it.
#[derive(Default)]
pub struct FakeVsock {
    pub outbox: VecDeque<VsockPacket>,
    /// Claims to have packets it never produces.
    pub liar: bool,
    pub sent: usize,
    pub resets: usize,
}

impl VsockBackend for FakeVsock {
    fn send_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        assert_eq!(hdr.src_cid, GUEST_CID, "src_cid");
        assert_eq!(hdr.dst_cid, vsock::HOST_CID, "dst_cid");
        assert_eq!(hdr.type_, vsock::TYPE_STREAM, "type");
        assert_eq!(hdr.len as usize, payload.len(), "len");
        assert!(payload.len() <= vsock::MAX_PAYLOAD, "payload too long");
        self.sent += 1;
    }
    fn recv_pkt(&mut self, hdr: &mut PacketHeader, payload: &mut [u8]) -> Option<usize> {
        let p = self.outbox.pop_front()?;
        *hdr = PacketHeader {
            src_cid: vsock::HOST_CID,
            dst_cid: GUEST_CID,
            src_port: p.src_port,
            dst_port: p.dst_port,
            len: 0,
            type_: vsock::TYPE_STREAM,
            op: p.op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        };
        let len = p.len as usize % (vsock::MAX_PAYLOAD + 4096);
        let n = len.min(payload.len());
        payload[..n].fill(p.fill);
        Some(if p.overclaim { len } else { n })
    }
    fn has_pending(&self) -> bool {
        self.liar || !self.outbox.is_empty()
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.outbox.clear();
    }
}
