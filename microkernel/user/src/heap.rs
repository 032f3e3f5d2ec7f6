//! A small heap for tasks: a bump allocator over a static arena (freeing is a no-op;
//! tasks are short-lived). Thread-safe by an atomic bump pointer.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

// room for a device task: a virtio-blk model has a 64 KiB bounce buffer
const ARENA: usize = 256 << 10;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA]>);

pub struct Bump {
    arena: Arena,
    next: AtomicUsize,
}

// SAFETY: every block is handed out once (atomic bump pointer), so no two threads get
// overlapping memory.
unsafe impl Sync for Bump {}

#[global_allocator]
static HEAP: Bump = Bump { arena: Arena(UnsafeCell::new([0; ARENA])), next: AtomicUsize::new(0) };

// SAFETY: blocks are disjoint, inside the arena, and aligned as the layout asks.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.arena.0.get() as usize;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base + cur).next_multiple_of(layout.align()) - base;
            let end = start + layout.size();
            if end > ARENA {
                return core::ptr::null_mut();
            }
            match self.next.compare_exchange(cur, end, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => return (base + start) as *mut u8,
                Err(now) => cur = now,
            }
        }
    }

    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}
