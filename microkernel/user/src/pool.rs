//! The root task's page pool: the memory the kernel gave it at `POOL_BASE`, handed out
//! a page at a time (never freed: test runs are short). Safe to share between the
//! root's threads.

use core::sync::atomic::{AtomicU64, Ordering};

pub struct Pool {
    next: AtomicU64,
    end: AtomicU64,
}

impl Pool {
    pub const fn empty() -> Self {
        Self { next: AtomicU64::new(0), end: AtomicU64::new(0) }
    }

    pub fn init(&self, base: u64, size: u64) {
        self.next.store(base, Ordering::SeqCst);
        self.end.store(base + size, Ordering::SeqCst);
    }

    /// The address of a fresh page (zero: the kernel hands over cleared memory).
    pub fn page(&self) -> Option<u64> {
        let p = self.next.fetch_add(4096, Ordering::SeqCst);
        (p + 4096 <= self.end.load(Ordering::SeqCst)).then_some(p)
    }

    /// The address of `2^log2` fresh bytes aligned to their size (the pages skipped for
    /// the alignment are lost).
    pub fn run(&self, log2: u32) -> Option<u64> {
        self.take(1 << log2, 1 << log2)
    }

    /// The address of `size` fresh bytes aligned to `align` (a power of two, at least a
    /// page; the pages skipped for the alignment are lost).
    pub fn take(&self, size: u64, align: u64) -> Option<u64> {
        let mut next = self.next.load(Ordering::SeqCst);
        loop {
            let base = next.checked_add(align - 1)? & !(align - 1);
            let end = base.checked_add(size)?;
            if end > self.end.load(Ordering::SeqCst) {
                return None;
            }
            match self.next.compare_exchange(next, end, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Some(base),
                Err(now) => next = now,
            }
        }
    }

    pub fn used(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }
}
