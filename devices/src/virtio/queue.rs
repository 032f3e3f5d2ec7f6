//! The split virtqueue (virtio 1.x §2.7), device side, with `VIRTIO_F_EVENT_IDX`.
//!
//! The three rings live in guest memory and the driver writes them concurrently, so
//! every value read from them is re-validated here: ring addresses must lie in RAM and
//! be aligned, the size must be a power of two no larger than the device's maximum,
//! the available index may run at most `size` entries ahead, descriptor indices must
//! be below `size`, a chain may not hold more than `size` descriptors (which also stops
//! loops), indirect descriptors are refused (the feature is never offered), and a
//! device-readable descriptor may not follow a device-writable one. Any of these
//! makes `pop` return a `QueueError`; the transport then marks the device
//! `DEVICE_NEEDS_RESET` and touches the queue no more.
//!
//! Buffer addresses inside a well-formed chain are checked when they are used
//! (`Reader`/`Writer`), so a device can still report a per-request error status.

use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use super::mem::{GuestMemory, MemError};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The ring is not something a device can work with; the device needs a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue size {0} is zero, not a power of two, or above the maximum")]
    BadSize(u16),
    #[error("ring at {0:#x} is misaligned or not in guest RAM")]
    BadRing(u64),
    #[error("available index {avail} is more than the queue size ahead of {next}")]
    AvailTooFar { avail: u16, next: u16 },
    #[error("descriptor index {0} is out of range")]
    BadIndex(u16),
    #[error("descriptor chain is longer than the queue (a loop?)")]
    ChainTooLong,
    #[error("indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not offered")]
    Indirect,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("ring memory: {0}")]
    Mem(#[from] MemError),
}

/// One descriptor of a chain, as the driver described it (address not yet checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A descriptor chain taken from the available ring: device-readable descriptors
/// first, then device-writable ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The head index, to be handed back with `Queue::add_used`.
    pub head: u16,
    pub descs: Vec<Descriptor>,
}

impl Chain {
    fn readable_count(&self) -> usize {
        self.descs.iter().take_while(|d| !d.writable).count()
    }

    /// The device-readable part.
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            cur: Cursor::new(&self.descs[..self.readable_count()]),
        }
    }

    /// The device-writable part.
    pub fn writer(&self) -> Writer<'_> {
        Writer {
            cur: Cursor::new(&self.descs[self.readable_count()..]),
            written: 0,
        }
    }
}

/// A copy ran past the end of the chain's buffers, or into memory the guest does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the request is shorter than its header/payload")]
    Short,
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// A position in a run of descriptors, handing out guest address spans in order.
#[derive(Debug, Clone)]
struct Cursor<'a> {
    descs: &'a [Descriptor],
    pos: usize,
    off: u32,
}

impl<'a> Cursor<'a> {
    fn new(descs: &'a [Descriptor]) -> Self {
        Cursor {
            descs,
            pos: 0,
            off: 0,
        }
    }

    fn remaining(&self) -> u64 {
        let rest = self.descs.get(self.pos..).unwrap_or(&[]);
        rest.iter().map(|d| u64::from(d.len)).sum::<u64>() - u64::from(self.off)
    }

    /// Consume the next piece of at most `max` bytes: its descriptor, its offset in
    /// the descriptor and its length; `None` at the end. Zero-length descriptors are
    /// skipped. No address is computed, so consuming never fails.
    fn advance(&mut self, max: usize) -> Option<(&'a Descriptor, u32, usize)> {
        loop {
            let d = self.descs.get(self.pos)?;
            let n = ((d.len - self.off) as usize).min(max);
            let start = self.off;
            self.off += n as u32;
            if self.off == d.len {
                self.pos += 1;
                self.off = 0;
            }
            if n == 0 && max > 0 {
                continue;
            }
            return Some((d, start, n));
        }
    }

    /// The next span of at most `max` bytes `(guest address, length)`, consumed; `None`
    /// at the end; an error if the span's address does not fit in 64 bits.
    fn next_span(&mut self, max: usize) -> Option<Result<(u64, usize), MemError>> {
        let (d, start, n) = self.advance(max)?;
        let span = d.addr.checked_add(u64::from(start)).map(|a| (a, n));
        Some(span.ok_or(MemError {
            addr: d.addr,
            len: u64::from(d.len),
        }))
    }
}

/// Sequential reads over the device-readable buffers of a chain.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    cur: Cursor<'a>,
}

impl Reader<'_> {
    /// Bytes left to read.
    pub fn remaining(&self) -> u64 {
        self.cur.remaining()
    }

    /// Read up to `buf.len()` bytes; returns how many (0 at the end).
    pub fn read(&mut self, mem: &dyn GuestMemory, buf: &mut [u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        while done < buf.len() {
            let Some(span) = self.cur.next_span(buf.len() - done) else {
                break;
            };
            let (addr, n) = span?;
            mem.read(addr, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(done)
    }

    /// Read exactly `buf.len()` bytes.
    pub fn read_exact(&mut self, mem: &dyn GuestMemory, buf: &mut [u8]) -> Result<(), ChainError> {
        if self.read(mem, buf)? < buf.len() {
            return Err(ChainError::Short);
        }
        Ok(())
    }
}

/// Sequential writes over the device-writable buffers of a chain.
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    cur: Cursor<'a>,
    written: u32,
}

impl Writer<'_> {
    /// Room left.
    pub fn remaining(&self) -> u64 {
        self.cur.remaining()
    }

    /// Bytes written so far (the `len` to put in the used ring).
    pub fn written(&self) -> u32 {
        self.written
    }

    /// Write up to `buf.len()` bytes; returns how many.
    pub fn write(&mut self, mem: &dyn GuestMemory, buf: &[u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        while done < buf.len() {
            let Some(span) = self.cur.next_span(buf.len() - done) else {
                break;
            };
            let (addr, n) = span?;
            mem.write(addr, &buf[done..done + n])?;
            done += n;
            self.written = self.written.saturating_add(n as u32);
        }
        Ok(done)
    }

    /// Write all of `buf`.
    pub fn write_all(&mut self, mem: &dyn GuestMemory, buf: &[u8]) -> Result<(), ChainError> {
        if self.write(mem, buf)? < buf.len() {
            return Err(ChainError::Short);
        }
        Ok(())
    }

    /// Skip `n` bytes (they count as written: the device leaves them as they are).
    pub fn skip(&mut self, mut n: u64) {
        while n > 0 {
            let max = usize::try_from(n).unwrap_or(usize::MAX);
            // skipped bytes are not touched, so their addresses do not matter
            let Some((_, _, step)) = self.cur.advance(max) else {
                return;
            };
            n -= step as u64;
            self.written = self.written.saturating_add(step as u32);
        }
    }
}

/// A split virtqueue, device side. The transport writes the configuration fields
/// (`size`, `ready`, ring addresses) on the driver's behalf; `validate` checks them
/// before the device uses the queue.
#[derive(Debug, Clone)]
pub struct Queue {
    max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    event_idx: bool,
    next_avail: u16,
    next_used: u16,
    /// `next_used` at the last interrupt decision, once there has been one.
    signalled_used: Option<u16>,
}

impl Queue {
    pub fn new(max_size: u16) -> Self {
        debug_assert!(max_size.is_power_of_two());
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            event_idx: false,
            next_avail: 0,
            next_used: 0,
            signalled_used: None,
        }
    }

    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// Back to the state after device reset.
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// Carry on with a queue another instance of the device ran (a restarted device
    /// task): the used ring's index, which only the device writes, says how many chains
    /// it gave back, and a device that gives back every chain it takes, in order, before
    /// it returns (blk, net, rng; not vsock, which holds receive buffers) has taken
    /// exactly those. A chain it took and died on is taken again. A used index the
    /// driver scribbled over surfaces as an error at the next `pop`.
    pub fn resume(&mut self, mem: &dyn GuestMemory) -> Result<(), QueueError> {
        let used = mem.load_u16(self.used_ring + 2)?;
        self.next_avail = used;
        self.next_used = used;
        self.signalled_used = None;
        Ok(())
    }

    /// Whether `VIRTIO_F_EVENT_IDX` was negotiated.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Check the configuration the driver wrote against the spec and guest RAM.
    pub fn validate(&self, mem: &dyn GuestMemory) -> Result<(), QueueError> {
        let size = self.size;
        if size == 0 || !size.is_power_of_two() || size > self.max_size {
            return Err(QueueError::BadSize(size));
        }
        let n = u64::from(size);
        for (addr, align, len) in [
            (self.desc_table, 16, 16 * n),
            (self.avail_ring, 2, 6 + 2 * n),
            (self.used_ring, 4, 6 + 8 * n),
        ] {
            if addr % align != 0 || !mem.check_range(addr, len) {
                return Err(QueueError::BadRing(addr));
            }
        }
        Ok(())
    }

    fn avail_idx(&self, mem: &dyn GuestMemory) -> Result<u16, QueueError> {
        let idx = mem.load_u16(self.avail_ring + 2)?;
        // The ring entries and descriptors below were written before the index.
        fence(Ordering::Acquire);
        Ok(idx)
    }

    /// Take the next available chain, if any.
    pub fn pop(&mut self, mem: &dyn GuestMemory) -> Result<Option<Chain>, QueueError> {
        let avail = self.avail_idx(mem)?;
        let pending = avail.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailTooFar {
                avail,
                next: self.next_avail,
            });
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = mem.load_u16(self.avail_ring + 4 + 2 * slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.read_chain(mem, head).map(Some)
    }

    fn read_chain(&self, mem: &dyn GuestMemory, head: u16) -> Result<Chain, QueueError> {
        let mut descs = Vec::new();
        let mut index = head;
        let mut writable_seen = false;
        loop {
            if index >= self.size {
                return Err(QueueError::BadIndex(index));
            }
            if descs.len() == usize::from(self.size) {
                return Err(QueueError::ChainTooLong);
            }
            let mut raw = [0u8; 16];
            mem.read(self.desc_table + 16 * u64::from(index), &mut raw)?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
            let next = u16::from_le_bytes(raw[14..16].try_into().unwrap());
            if flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect);
            }
            let writable = flags & DESC_F_WRITE != 0;
            if writable_seen && !writable {
                return Err(QueueError::ReadableAfterWritable);
            }
            writable_seen |= writable;
            descs.push(Descriptor {
                addr,
                len,
                writable,
            });
            if flags & DESC_F_NEXT == 0 {
                return Ok(Chain { head, descs });
            }
            index = next;
        }
    }

    /// Give a chain back to the driver, `len` bytes written into it.
    pub fn add_used(
        &mut self,
        mem: &dyn GuestMemory,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(self.used_ring + 4 + 8 * slot, &elem)?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        mem.store_u16(self.used_ring + 2, self.next_used)?;
        Ok(())
    }

    /// Hand every available chain to `handle` and return it with the length `handle`
    /// reports written; then re-arm notifications, and go on while the driver added more.
    pub fn process_all(
        &mut self,
        mem: &dyn GuestMemory,
        mut handle: impl FnMut(&Chain) -> u32,
    ) -> Result<(), QueueError> {
        loop {
            while let Some(chain) = self.pop(mem)? {
                let len = handle(&chain);
                self.add_used(mem, chain.head, len)?;
            }
            if !self.enable_notification(mem)? {
                return Ok(());
            }
        }
    }

    /// Ask the driver to notify when it adds buffers (publishes `avail_event`), and
    /// return whether some arrived meanwhile: callers loop `pop` until this is false.
    pub fn enable_notification(&mut self, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        if self.event_idx {
            let avail_event = self.used_ring + 4 + 8 * u64::from(self.size);
            mem.store_u16(avail_event, self.next_avail)?;
        }
        // Order the store above before re-reading the driver's index.
        fence(Ordering::SeqCst);
        Ok(self.avail_idx(mem)? != self.next_avail)
    }

    /// Whether the driver wants an interrupt for the buffers used since the last time
    /// this returned true.
    pub fn needs_notification(&mut self, mem: &dyn GuestMemory) -> Result<bool, QueueError> {
        let new = self.next_used;
        let old = self.signalled_used;
        if old == Some(new) {
            return Ok(false);
        }
        // Our used index store must be visible before we read the driver's threshold.
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            let used_event = mem.load_u16(self.avail_ring + 4 + 2 * u64::from(self.size))?;
            match old {
                // vring_need_event(): did `new` step past `used_event` since `old`?
                Some(old) => new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old),
                None => true,
            }
        } else {
            mem.load_u16(self.avail_ring)? & AVAIL_F_NO_INTERRUPT == 0
        };
        self.signalled_used = Some(new);
        Ok(notify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mem::VecMemory;
    use crate::virtio::testing::DriverQueue;

    /// Found by `hostile_guest::split_virtqueue`: a writable buffer whose end wraps past
    /// 2^64. Skipped bytes are never touched, so skipping all of it counts all of it;
    /// writing into the part beyond 2^64 is an error.
    #[test]
    fn skip_over_a_buffer_that_wraps_counts_every_byte() {
        let d = Descriptor {
            addr: 0xFFFF_FFFF_FFFF_FFC4,
            len: 61,
            writable: true,
        };
        let chain = Chain {
            head: 0,
            descs: alloc::vec![d],
        };
        let mut w = chain.writer();
        w.skip(60);
        w.skip(1);
        assert_eq!((w.written(), w.remaining()), (61, 0));
        let mem = VecMemory::new(0, 4096);
        let mut w = chain.writer();
        w.skip(60);
        assert!(matches!(w.write(&mem, &[0]), Err(ChainError::Mem(_))));
    }

    fn setup(size: u16) -> (VecMemory, DriverQueue, Queue) {
        let mem = VecMemory::new(0, 1 << 20);
        let dq = DriverQueue::new(size, 0x1000);
        let mut q = Queue::new(256);
        dq.configure(&mut q);
        (mem, dq, q)
    }

    #[test]
    fn chains_round_trip_with_data() {
        let (mem, mut dq, mut q) = setup(8);
        q.validate(&mem).unwrap();
        mem.write(0x8000, b"hello").unwrap();
        let head = dq.add(&mem, &[(0x8000, 5, false), (0x9000, 16, true)]);
        let chain = q.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.head, head);
        let mut r = chain.reader();
        let mut buf = [0; 5];
        r.read_exact(&mem, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(r.remaining(), 0);
        let mut w = chain.writer();
        w.write_all(&mem, b"world").unwrap();
        assert_eq!(w.remaining(), 11);
        q.add_used(&mem, chain.head, w.written()).unwrap();
        assert_eq!(dq.used(&mem), vec![(u32::from(head), 5)]);
        let mut out = [0; 5];
        mem.read(0x9000, &mut out).unwrap();
        assert_eq!(&out, b"world");
        assert!(q.pop(&mem).unwrap().is_none());
    }

    #[test]
    fn a_descriptor_loop_is_refused() {
        let (mem, mut dq, mut q) = setup(4);
        let head = dq.add(&mem, &[(0x8000, 1, false), (0x8001, 1, false)]);
        // Point the second descriptor back at the first.
        dq.set_next(&mem, head + 1, head);
        assert_eq!(q.pop(&mem), Err(QueueError::ChainTooLong));
    }

    #[test]
    fn hostile_rings_are_refused_not_followed() {
        let (mem, mut dq, mut q) = setup(4);
        dq.add(&mem, &[(0x8000, 1, false)]);
        dq.set_next(&mem, 0, 7); // index 7 >= size 4
        assert_eq!(q.pop(&mem), Err(QueueError::BadIndex(7)));

        let (mem, mut dq, mut q) = setup(4);
        dq.add(&mem, &[(0x8000, 1, true), (0x8001, 1, false)]);
        assert_eq!(q.pop(&mem), Err(QueueError::ReadableAfterWritable));

        let (mem, dq, mut q) = setup(4);
        dq.set_avail_idx(&mem, 9);
        assert!(matches!(q.pop(&mem), Err(QueueError::AvailTooFar { .. })));

        let (mem, mut dq, mut q) = setup(4);
        dq.add(&mem, &[(0x8000, 1, false)]);
        dq.set_flags(&mem, 0, DESC_F_INDIRECT);
        assert_eq!(q.pop(&mem), Err(QueueError::Indirect));
    }

    #[test]
    fn bad_sizes_and_ring_addresses_fail_validation() {
        let mem = VecMemory::new(0, 1 << 16);
        let mut q = Queue::new(256);
        for size in [0, 3, 100, 512] {
            q.size = size;
            assert_eq!(q.validate(&mem), Err(QueueError::BadSize(size)));
        }
        q.size = 16;
        q.avail_ring = 0x2000;
        q.used_ring = 0x3000;
        q.desc_table = 0x1008; // misaligned
        assert_eq!(q.validate(&mem), Err(QueueError::BadRing(0x1008)));
        q.desc_table = 0xff80; // runs past the end of RAM
        assert_eq!(q.validate(&mem), Err(QueueError::BadRing(0xff80)));
        q.desc_table = 0x1000;
        q.used_ring = u64::MAX - 7;
        assert!(q.validate(&mem).is_err());
    }

    #[test]
    fn buffers_outside_ram_fail_the_copy_only() {
        let (mem, mut dq, mut q) = setup(4);
        dq.add(
            &mem,
            &[(u64::MAX - 2, 16, false), (1 << 30, u32::MAX, true)],
        );
        let chain = q.pop(&mem).unwrap().unwrap();
        let mut buf = [0; 4];
        assert!(matches!(
            chain.reader().read_exact(&mem, &mut buf),
            Err(ChainError::Mem(_))
        ));
        assert!(matches!(
            chain.writer().write_all(&mem, &buf),
            Err(ChainError::Mem(_))
        ));
        // The ring itself is fine: the chain can be returned.
        q.add_used(&mem, chain.head, 0).unwrap();
    }

    #[test]
    fn zero_length_descriptors_are_empty_buffers() {
        let (mem, mut dq, mut q) = setup(4);
        dq.add(
            &mem,
            &[(0x8000, 0, false), (0x8000, 2, false), (0x9000, 0, true)],
        );
        mem.write(0x8000, b"ok").unwrap();
        let chain = q.pop(&mem).unwrap().unwrap();
        let mut buf = [0; 2];
        chain.reader().read_exact(&mem, &mut buf).unwrap();
        assert_eq!(&buf, b"ok");
        assert_eq!(chain.writer().write(&mem, b"x").unwrap(), 0);
    }

    #[test]
    fn event_idx_suppresses_and_requests_interrupts() {
        let (mem, mut dq, mut q) = setup(8);
        q.set_event_idx(true);
        for _ in 0..3 {
            dq.add(&mem, &[(0x9000, 4, true)]);
        }
        // The driver wants an interrupt only once used index passes 2.
        dq.set_used_event(&mem, 2);
        let mut notes = vec![];
        for _ in 0..3 {
            let c = q.pop(&mem).unwrap().unwrap();
            q.add_used(&mem, c.head, 0).unwrap();
            notes.push(q.needs_notification(&mem).unwrap());
        }
        // First decision always notifies; then used 2 does not pass event 2; used 3 does.
        assert_eq!(notes, [true, false, true]);
        assert!(
            !q.needs_notification(&mem).unwrap(),
            "nothing new, no interrupt"
        );
        // avail_event tells the driver where we are.
        assert!(!q.enable_notification(&mem).unwrap());
        assert_eq!(dq.avail_event(&mem), 3);
    }

    #[test]
    fn no_interrupt_flag_without_event_idx() {
        let (mem, mut dq, mut q) = setup(8);
        dq.add(&mem, &[(0x9000, 4, true)]);
        dq.set_avail_flags(&mem, AVAIL_F_NO_INTERRUPT);
        let c = q.pop(&mem).unwrap().unwrap();
        q.add_used(&mem, c.head, 0).unwrap();
        assert!(!q.needs_notification(&mem).unwrap());
        dq.set_avail_flags(&mem, 0);
        dq.add(&mem, &[(0x9000, 4, true)]);
        let c = q.pop(&mem).unwrap().unwrap();
        q.add_used(&mem, c.head, 0).unwrap();
        assert!(q.needs_notification(&mem).unwrap());
    }

    #[test]
    fn indices_wrap_around_u16() {
        let (mem, mut dq, mut q) = setup(4);
        for i in 0..70_000u32 {
            dq.add(&mem, &[(0x8000, 4, false)]);
            let c = q.pop(&mem).unwrap().expect("one chain");
            q.add_used(&mem, c.head, i).unwrap();
            dq.reclaim(&mem);
        }
        assert!(q.pop(&mem).unwrap().is_none());
    }
}
