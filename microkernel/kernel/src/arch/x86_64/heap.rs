//! The kernel heap: power-of-two size classes over a static arena, each class with a
//! free list. The core allocates its tables at boot and mapping-database nodes and
//! tree nodes as it runs; freed blocks are reused by the same class, so the heap never
//! fragments beyond a factor of two.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

/// Sized for the mapping database at its limit (`Config::mappings`, 2^18 nodes of 96
/// bytes in a vector reserved at boot: 24 MiB) and its trees (about 13 MiB).
const ARENA: usize = 56 << 20;
const CLASSES: usize = 32;

#[repr(C, align(4096))]
struct Arena([u8; ARENA]);

struct State {
    next: usize,
    free: [*mut u8; CLASSES],
}

pub struct Heap {
    arena: UnsafeCell<Arena>,
    state: UnsafeCell<State>,
}

// SAFETY: one CPU and the kernel runs with interrupts off: the heap is never entered
// twice at the same time.
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap {
    arena: UnsafeCell::new(Arena([0; ARENA])),
    state: UnsafeCell::new(State { next: 0, free: [ptr::null_mut(); CLASSES] }),
};

fn class(layout: Layout) -> usize {
    let size = layout.size().max(layout.align()).max(16);
    size.next_power_of_two().trailing_zeros() as usize
}

// SAFETY: blocks are disjoint parts of the arena, aligned to min(class size, 4096)
// which is at least the layout's alignment (the class covers the alignment).
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let c = class(layout);
        // SAFETY: no other reference to the state exists (see `Sync`).
        let s = unsafe { &mut *self.state.get() };
        if c >= CLASSES {
            return ptr::null_mut();
        }
        let head = s.free[c];
        if !head.is_null() {
            // SAFETY: a free block stores the next free block in its first word.
            s.free[c] = unsafe { ptr::read(head as *mut *mut u8) };
            return head;
        }
        let size = 1usize << c;
        let align = size.min(4096);
        let start = s.next.next_multiple_of(align);
        if start + size > ARENA {
            return ptr::null_mut();
        }
        s.next = start + size;
        // SAFETY: `start + size <= ARENA`, inside the arena.
        unsafe { (self.arena.get() as *mut u8).add(start) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let c = class(layout);
        // SAFETY: as in `alloc`; `p` is a block of class `c` that is now unused.
        unsafe {
            let s = &mut *self.state.get();
            ptr::write(p as *mut *mut u8, s.free[c]);
            s.free[c] = p;
        }
    }
}
