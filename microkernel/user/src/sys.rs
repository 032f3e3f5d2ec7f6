//! System-call stubs: the register convention of `microkernel/SYSCALLS.md`.
//!
//! `rax` call number / status, `rdi rsi rdx r10` arguments, `rdi rsi` results, message
//! registers MR0..MR7 in `r8 r9 r12 r13 r14 r15 rbx rbp`. `rbx` and `rbp` cannot be
//! named as asm operands, so the stub loads and stores them through the MR array.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

use microkernel::abi::{Fpage, Sysno, ThreadId, MR_COUNT};

pub type Mrs = [u64; MR_COUNT];

/// Enter the kernel with `int3` instead of `syscall` (on kvm-pvm; see
/// `bootinfo::flags::INT_SYSCALL`). Set by the root task at start; tasks it starts
/// inherit it with their copy of the data pages.
static INT_SYSCALL: AtomicBool = AtomicBool::new(false);

pub fn use_int_syscall(on: bool) {
    INT_SYSCALL.store(on, Ordering::Relaxed);
}

macro_rules! enter {
    ($insn:literal, $nr:expr, $a:expr, $m:ident, $p:ident, $r0:ident, $r1:ident, $r2:ident) => {
        // SAFETY: the kernel preserves every register except rax, rdi, rsi (results),
        // rcx and r11 (SYSCALL) and the message registers; rbx, rbp and the MR pointer
        // are saved on the stack around it, and the asm only touches `m` through `p`.
        unsafe {
            asm!(
                "push rbx",
                "push rbp",
                "push rcx",
                "mov rbx, [rcx + 48]",
                "mov rbp, [rcx + 56]",
                $insn,
                "pop rcx",
                "mov [rcx + 48], rbx",
                "mov [rcx + 56], rbp",
                "pop rbp",
                "pop rbx",
                in("rcx") $p,
                inlateout("rax") $nr as u64 => $r0,
                inlateout("rdi") $a[0] => $r1,
                inlateout("rsi") $a[1] => $r2,
                inlateout("rdx") $a[2] => _,
                inlateout("r10") $a[3] => _,
                inlateout("r8") $m[0] => $m[0],
                inlateout("r9") $m[1] => $m[1],
                inlateout("r12") $m[2] => $m[2],
                inlateout("r13") $m[3] => $m[3],
                inlateout("r14") $m[4] => $m[4],
                inlateout("r15") $m[5] => $m[5],
                out("r11") _,
            );
        }
    };
}

/// One system call. Returns `[status, r1, r2]`; `mrs` are sent and replaced by the
/// registers after the call.
#[inline(always)]
pub fn syscall(nr: Sysno, a: [u64; 4], mrs: &mut Mrs) -> [u64; 3] {
    let (r0, r1, r2);
    let mut m = *mrs;
    let p = m.as_mut_ptr();
    if INT_SYSCALL.load(Ordering::Relaxed) {
        enter!("int3", nr, a, m, p, r0, r1, r2);
    } else {
        enter!("syscall", nr, a, m, p, r0, r1, r2);
    }
    *mrs = m;
    [r0, r1, r2]
}

fn simple(nr: Sysno, a: [u64; 4]) -> Result<(u64, u64), u64> {
    let mut m = [0; MR_COUNT];
    match syscall(nr, a, &mut m) {
        [0, r1, r2] => Ok((r1, r2)),
        [e, ..] => Err(e),
    }
}

/// The `ipc` call: `Ok(from)` of the received message (NIL without receive phase).
pub fn ipc(
    to: ThreadId,
    from: ThreadId,
    timeouts: u64,
    window: Fpage,
    mrs: &mut Mrs,
) -> Result<ThreadId, u64> {
    match syscall(Sysno::Ipc, [to.raw(), from.raw(), timeouts, window.raw()], mrs) {
        [0, r1, _] => Ok(ThreadId(r1 as u32)),
        [e, ..] => Err(e),
    }
}

pub fn unmap(fpage: Fpage, flags: u64) -> Result<(), u64> {
    simple(Sysno::Unmap, [fpage.raw(), flags, 0, 0]).map(|_| ())
}

pub fn thread_switch(to: ThreadId) -> Result<(), u64> {
    simple(Sysno::ThreadSwitch, [to.raw(), 0, 0, 0]).map(|_| ())
}

pub fn schedule(t: ThreadId, prio: u64, timeslice: u64) -> Result<(u64, u64), u64> {
    simple(Sysno::Schedule, [t.raw(), prio, timeslice, 0])
}

pub fn exchange_registers(t: ThreadId, flags: u64, ip: u64, sp: u64) -> Result<(u64, u64), u64> {
    simple(Sysno::ExchangeRegisters, [t.raw(), flags, ip, sp])
}

pub fn thread_control(
    op: u64,
    target: ThreadId,
    pager: ThreadId,
    supervisor: ThreadId,
) -> Result<(ThreadId, u64), u64> {
    simple(Sysno::ThreadControl, [op, target.raw(), pager.raw(), supervisor.raw()])
        .map(|(t, task)| (ThreadId(t as u32), task))
}

pub fn task_new(pager: ThreadId, ip: u64, sp: u64, flags: u64) -> Result<ThreadId, u64> {
    simple(Sysno::TaskNew, [pager.raw(), ip, sp, flags]).map(|(t, _)| ThreadId(t as u32))
}

pub fn irq_control(op: u64, irq: u64, thread: ThreadId) -> Result<(), u64> {
    simple(Sysno::IrqControl, [op, irq, thread.raw(), 0]).map(|_| ())
}

/// Route guest `vcpu`'s exits in `len` ports or bytes from `base` (`space`:
/// `abi::guest_route::PORT` or `MMIO`) to `handler` (NIL: remove the route at `base`).
pub fn guest_route(
    vcpu: ThreadId,
    space: u64,
    base: u64,
    len: u64,
    handler: ThreadId,
) -> Result<(), u64> {
    simple(Sysno::GuestRoute, [vcpu.raw(), base, space << 32 | len, handler.raw()]).map(|_| ())
}

/// Pulse guest `vcpu`'s IOAPIC pins in `pins` now (the caller is its pager or one of
/// its routes' handlers).
pub fn guest_interrupt(vcpu: ThreadId, pins: u32) -> Result<(), u64> {
    simple(Sysno::GuestInterrupt, [vcpu.raw(), u64::from(pins), 0, 0]).map(|_| ())
}

pub fn debug_write(bytes: &[u8]) -> Result<u64, u64> {
    simple(Sysno::DebugWrite, [bytes.as_ptr() as u64, bytes.len() as u64, 0, 0]).map(|(n, _)| n)
}
