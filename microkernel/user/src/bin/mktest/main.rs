//! The VM0 boot module: the root task (root pager, supervisor and test driver) and the
//! test tasks it starts from its own image.
//!
//! Every test task is a new address space (`task_new`) whose pager is the root's pager
//! thread: it shares the image's text and read-only pages, gets private copies of the
//! data pages, and fresh zero pages anywhere in the lazy region (its stack lives there).
//! A task's first message is its boot message from the root, carrying its arguments;
//! it reports back to the root (the boot message's sender).
//!
//! Modes (from the kernel in `rdx`): boot (say hello), selftest (`tests`), bench
//! (`bench`), bench-exit (`guest`), hosted (`hosted`: the guest server of a Linux
//! guest). The root ends VM0 through the exit port.

#![no_std]
#![no_main]

extern crate alloc;

mod bench;
mod device;
mod guest;
mod hosted;
mod pager;
mod tests;

use mkrt::abi::{exregs, thread_control, Fpage, ThreadId, Timeout, NO_CHANGE};
use mkrt::bootinfo::{layout, mode};
use mkrt::msg::{receive, send, wait, Msg, NO_WINDOW};
use mkrt::pool::Pool;
use mkrt::{port, println, sys};

/// The root task's page pool (shared by its threads).
pub static POOL: Pool = Pool::empty();

/// Top of every test task's stack (in the lazy region: the pager fills it on demand).
pub const CHILD_STACK_TOP: u64 = 0x9000_0000;
/// Label of boot messages and reports.
pub const BOOT: u64 = 0xb007;
pub const REPORT: u64 = 0x4e9;

/// The root's view: its main thread and its pager thread.
#[derive(Clone, Copy)]
pub struct Root {
    pub me: ThreadId,
    pub pager: ThreadId,
}

impl Root {
    /// A new task running `entry` (an `extern "C" fn() -> !`), paged by the root pager,
    /// supervised by the root.
    pub fn spawn(&self, entry: extern "C" fn() -> !, flags: u64) -> Result<ThreadId, u64> {
        sys::task_new(self.pager, entry as *const () as u64, CHILD_STACK_TOP - 8, flags)
    }

    /// Send `t` its boot message (or any command) within 5 s.
    pub fn tell(&self, t: ThreadId, words: &[u64]) -> Result<(), u64> {
        send(t, &mut Msg::new(BOOT, words), Timeout(500))
    }

    /// The next message from `from` within `ticks`.
    pub fn expect(&self, from: ThreadId, ticks: u32) -> Result<Msg, u64> {
        receive(from, Timeout(ticks), NO_WINDOW).map(|(_, m)| m)
    }

    pub fn kill(&self, t: ThreadId) {
        let _ = sys::thread_control(thread_control::DELETE_TASK, t, ThreadId::NIL, ThreadId::NIL);
    }
}

/// A task's start: wait for the boot message; returns the root and the message.
pub fn booted() -> (ThreadId, Msg) {
    wait()
}

/// A task's start when the root maps it memory first: take every message's map items
/// into `window` until the boot message; returns the root and the boot message.
pub fn booted_with(window: Fpage) -> (ThreadId, Msg) {
    loop {
        match receive(ThreadId::ANY, Timeout::NEVER, window) {
            Ok((from, m)) if m.label() == BOOT => return (from, m),
            Ok(_) => {}
            Err(_) => park(),
        }
    }
}

/// Report `words` to the root.
pub fn report(root: ThreadId, words: &[u64]) {
    let _ = send(root, &mut Msg::new(REPORT, words), Timeout::NEVER);
}

/// Wait forever (until the root deletes the task).
pub fn park() -> ! {
    loop {
        let _ = wait();
    }
}

#[no_mangle]
#[link_section = ".text.start"]
extern "C" fn _start(
    pool: u64,
    pool_size: u64,
    run_mode: u64,
    me: u64,
    flags: u64,
    pool_phys: u64,
) -> ! {
    sys::use_int_syscall(flags & mkrt::bootinfo::flags::INT_SYSCALL != 0);
    POOL.init(pool, pool_size);
    let (run_mode, argument) = mode::split(run_mode);
    // hosted: the guest's RAM comes first, aligned at the pool's base
    let (ram_mib, devices) = mode::hosted_split(argument);
    let guest_ram = (run_mode == mode::HOSTED).then(|| hosted::reserve(ram_mib)).flatten();
    let me = ThreadId(me as u32);
    let pager = match start_pager(me) {
        Ok(p) => p,
        Err(e) => {
            println!("root: cannot start the pager thread: error {e}");
            port::exit(2)
        }
    };
    let root = Root { me, pager };
    let status = match run_mode {
        mode::SELFTEST => tests::run_all(&root),
        mode::BENCH => bench::run(&root),
        mode::BENCH_EXIT => guest::bench(&root),
        mode::HOSTED => {
            use mkrt::bootinfo::flags::{DEVICE_FAULTS, EVENTFD_PAIRING};
            let boot = (if flags & DEVICE_FAULTS != 0 { device::boot::FAULTS } else { 0 })
                | (if flags & EVENTFD_PAIRING != 0 { device::boot::PAIRED } else { 0 });
            let (how, status) = hosted::run(&root, guest_ram, devices, pool_phys, boot);
            port::end(how, status)
        }
        _ => {
            println!("root: up (pool {} KiB at {pool:#x}); tests and bench: vmm --microkernel --selftest | --bench-ipc", pool_size >> 10);
            0
        }
    };
    port::exit(status)
}

/// A second thread in the root task that serves every test task's page faults.
fn start_pager(me: ThreadId) -> Result<ThreadId, u64> {
    const STACK_PAGES: u64 = 4;
    let base = POOL.page().ok_or(0u64)?;
    for _ in 1..STACK_PAGES {
        POOL.page().ok_or(0u64)?;
    }
    let top = base + STACK_PAGES * 4096;
    let (t, _) = sys::thread_control(thread_control::CREATE, me, ThreadId::NIL, me)?;
    sys::schedule(t, 200, NO_CHANGE)?;
    let flags = exregs::SET_IP | exregs::SET_SP | exregs::RESUME;
    sys::exchange_registers(t, flags, pager::main as *const () as u64, top - 8)?;
    let _ = layout::LAZY_START;
    Ok(t)
}
