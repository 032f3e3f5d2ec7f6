//! The root pager thread: resolves the page faults of every test task.
//!
//! Text and read-only pages of the image are mapped from the root's own (shared, a
//! child mapping of the root's); data pages get a private copy; any page in the lazy
//! region a fresh zero page from the pool. Other faults get no reply: the task stays
//! blocked, and the test that caused it times out — or, for a device task of a hosted
//! guest, its supervisor (the root) restarts it (`hosted::faulted`).

use core::sync::atomic::{AtomicU64, Ordering};

use mkrt::abi::{label, Fpage, Rights, ThreadId};
use mkrt::bootinfo::layout;
use mkrt::msg::{reply_wait, wait, Msg};
use mkrt::println;

use crate::POOL;

/// Page faults served so far.
pub static FAULTS: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static __image_start: u8;
    static __rodata_end: u8;
    static __text_end: u8;
    static __image_end: u8;
}

fn addr(s: *const u8) -> u64 {
    s as u64
}

/// The reply that resolves a fault at `fault` (None: unresolvable).
fn resolve(fault: u64) -> Option<Msg> {
    let page = fault & !0xfff;
    let (start, text_end) = (addr(&raw const __image_start), addr(&raw const __text_end));
    let (ro_end, end) = (addr(&raw const __rodata_end), addr(&raw const __image_end));
    let (frame, rights) = if (start..text_end).contains(&page) {
        (page, Rights::RX)
    } else if (text_end..ro_end).contains(&page) {
        (page, Rights::R)
    } else if (ro_end..end).contains(&page) {
        let copy = POOL.page()?;
        copy_page(page, copy);
        (copy, Rights::RW)
    } else if (layout::LAZY_START..layout::LAZY_END).contains(&page) {
        (POOL.page()?, Rights::RW)
    } else {
        return None;
    };
    let fpage = Fpage::new(frame, 12, rights)?;
    Some(Msg::map(0, fpage, page, false))
}

fn copy_page(from: u64, to: u64) {
    for i in (0..4096).step_by(8) {
        // SAFETY: both are whole pages mapped in the root task (image data, pool page).
        unsafe {
            core::ptr::write_volatile(
                (to + i) as *mut u64,
                core::ptr::read_volatile((from + i) as *const u64),
            )
        };
    }
}

pub extern "C" fn main() -> ! {
    let (mut from, mut m) = wait();
    loop {
        let reply = if m.label() == label::PAGE_FAULT {
            FAULTS.fetch_add(1, Ordering::Relaxed);
            let r = resolve(m.word(0));
            if r.is_none() {
                println!(
                    "pager: no page for {:#x} (ip {:#x}) of thread {:#x}{}",
                    m.word(0),
                    m.word(1),
                    from.0,
                    // a device task's supervisor restarts it
                    if crate::hosted::faulted(from) { ": reported to its supervisor" } else { "" }
                );
            }
            r
        } else {
            None
        };
        let next = match reply {
            Some(mut r) => reply_wait(from, &mut r).map(|f| (f, r)),
            None => Err(0),
        };
        (from, m) = next.unwrap_or_else(|_| wait());
        let _ = ThreadId::NIL;
    }
}
