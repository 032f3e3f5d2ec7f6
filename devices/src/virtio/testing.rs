//! The driver's side of a split virtqueue over `VecMemory`, for device tests and
//! property tests: it lays out the rings, posts chains and reads the used ring, and can
//! also corrupt any of it on purpose.
//!
//! Layout from `base`: descriptor table at `base`, available ring at `base + 0x1000`,
//! used ring at `base + 0x2000` (room for 256 entries each).

use alloc::vec::Vec;

use super::mem::GuestMemory;
use super::queue::Queue;

/// `N` device queues of `max` entries each, with driver rings of `size` entries laid
/// out 0x4000 apart from guest address 0, configured as a driver would and validated.
pub fn driver_queues<const N: usize>(
    mem: &dyn GuestMemory,
    size: u16,
    max: u16,
) -> ([DriverQueue; N], [Queue; N]) {
    let drivers: [DriverQueue; N] =
        core::array::from_fn(|i| DriverQueue::new(size, 0x4000 * i as u64));
    let queues = core::array::from_fn(|i| {
        let mut q = Queue::new(max);
        drivers[i].configure(&mut q);
        q.validate(mem).expect("a valid test queue");
        q
    });
    (drivers, queues)
}

pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    pub fn new(size: u16, base: u64) -> Self {
        DriverQueue {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Write this layout into the device's queue registers, as a driver would.
    pub fn configure(&self, q: &mut Queue) {
        q.size = self.size;
        q.desc_table = self.desc;
        q.avail_ring = self.avail;
        q.used_ring = self.used;
        q.ready = true;
    }

    fn write_desc(
        &self,
        mem: &dyn GuestMemory,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write(self.desc + 16 * u64::from(i), &raw).unwrap();
    }

    /// Post a chain of `(addr, len, device_writable)` buffers; returns its head index.
    /// Descriptors are taken round-robin from the table.
    pub fn add(&mut self, mem: &dyn GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = (self.next_desc + k as u16) % self.size;
            let last = k + 1 == bufs.len();
            let flags = if last { 0 } else { 1 } | if writable { 2 } else { 0 };
            self.write_desc(mem, i, addr, len, flags, (i + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        let slot = u64::from(self.avail_idx % self.size);
        mem.store_u16(self.avail + 4 + 2 * slot, head).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store_u16(self.avail + 2, self.avail_idx).unwrap();
        head
    }

    fn desc_field(&self, i: u16, off: u64) -> u64 {
        self.desc + 16 * u64::from(i) + off
    }

    /// Make descriptor `i` continue at `next`.
    pub fn set_next(&self, mem: &dyn GuestMemory, i: u16, next: u16) {
        let flags = mem.load_u16(self.desc_field(i, 12)).unwrap() | 1;
        mem.store_u16(self.desc_field(i, 12), flags).unwrap();
        mem.store_u16(self.desc_field(i, 14), next).unwrap();
    }

    /// Overwrite descriptor `i`'s flags.
    pub fn set_flags(&self, mem: &dyn GuestMemory, i: u16, flags: u16) {
        mem.store_u16(self.desc_field(i, 12), flags).unwrap();
    }

    pub fn set_avail_idx(&self, mem: &dyn GuestMemory, idx: u16) {
        mem.store_u16(self.avail + 2, idx).unwrap();
    }

    pub fn set_avail_flags(&self, mem: &dyn GuestMemory, flags: u16) {
        mem.store_u16(self.avail, flags).unwrap();
    }

    pub fn set_used_event(&self, mem: &dyn GuestMemory, idx: u16) {
        mem.store_u16(self.avail + 4 + 2 * u64::from(self.size), idx)
            .unwrap();
    }

    pub fn avail_event(&self, mem: &dyn GuestMemory) -> u16 {
        mem.load_u16(self.used + 4 + 8 * u64::from(self.size))
            .unwrap()
    }

    /// The used elements `(id, len)` added since the last call.
    pub fn used(&mut self, mem: &dyn GuestMemory) -> Vec<(u32, u32)> {
        let idx = mem.load_u16(self.used + 2).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let id = mem.read_u32(self.used + 4 + 8 * slot).unwrap();
            let len = mem.read_u32(self.used + 8 + 8 * slot).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Forget the used entries (lets long tests recycle descriptors).
    pub fn reclaim(&mut self, mem: &dyn GuestMemory) {
        self.used(mem);
    }
}
