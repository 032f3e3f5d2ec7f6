//! A small heap for tasks: power-of-two size classes over a static arena. A block of
//! class `c` is `2^c` bytes, aligned to its size; freed blocks go on their class's free
//! list and are reused, so a long-lived task (a device task allocating per request)
//! runs in bounded memory. Memory never moves between classes. A spin lock guards the
//! lists: a task's threads rarely allocate at the same time.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

// room for a device task: a virtio-blk model has a 64 KiB bounce buffer, a virtio-net
// model two frame buffers of 64 KiB + 26 bytes (a 128 KiB block each). Pages of the
// arena a task never touches cost nothing: its pager maps them on first use.
const ARENA: usize = 1 << 20;
/// Smallest block: 16 bytes (room for the free-list link).
const MIN_CLASS: usize = 4;
const CLASSES: usize = 20;

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA]>);

struct State {
    /// Bytes of the arena handed out so far.
    next: usize,
    /// Free blocks per class: the address of the first (0: none); each holds the next.
    free: [usize; CLASSES],
}

pub struct Heap {
    arena: Arena,
    lock: AtomicBool,
    state: UnsafeCell<State>,
}

// SAFETY: `state` is only touched with `lock` held, and every block belongs to one
// owner at a time (handed out once until it is freed).
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap {
    arena: Arena(UnsafeCell::new([0; ARENA])),
    lock: AtomicBool::new(false),
    state: UnsafeCell::new(State { next: 0, free: [0; CLASSES] }),
};

fn class(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS).checked_next_power_of_two()?;
    let c = size.trailing_zeros() as usize;
    (c < CLASSES).then_some(c)
}

impl Heap {
    fn with<R>(&self, f: impl FnOnce(&mut State, usize) -> R) -> R {
        while self.lock.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held: no one else has the state.
        let r = f(unsafe { &mut *self.state.get() }, self.arena.0.get() as usize);
        self.lock.store(false, Ordering::Release);
        r
    }
}

// SAFETY: blocks are disjoint, inside the arena, and aligned to their power-of-two
// size, which is at least the layout's size and alignment.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class(layout) else {
            return ptr::null_mut();
        };
        self.with(|s, base| {
            let head = s.free[c];
            if head != 0 {
                // SAFETY: a free block of this class: its first word is the next link.
                s.free[c] = unsafe { ptr::read(head as *const usize) };
                return head as *mut u8;
            }
            let start = (base + s.next).next_multiple_of(1 << c) - base;
            let end = start + (1 << c);
            if end > ARENA {
                return ptr::null_mut();
            }
            s.next = end;
            (base + start) as *mut u8
        })
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let Some(c) = class(layout) else {
            return;
        };
        self.with(|s, _| {
            // SAFETY: the caller gives back a block of this class it owned; it is at
            // least 16 bytes and aligned, so the link fits.
            unsafe { ptr::write(p as *mut usize, s.free[c]) };
            s.free[c] = p as usize;
        })
    }
}
