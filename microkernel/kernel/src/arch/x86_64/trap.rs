//! From an entry to the portable core and back: the one `Kernel` value, the dispatch
//! of syscalls, faults, exceptions and interrupts, and acting on the core's `Next`.
//!
//! Vectors: 0..32 CPU exceptions (14 = page fault), 32 the LAPIC timer (the core's
//! tick), 33..55 IOAPIC lines 0..22 (interrupts as IPC), 55 line 22: the vmm asks for
//! a dump of the threads, 56 line 23: a guest exit (`bootinfo::hyper`). Anything else
//! is ignored.
//! On kvm-pvm (boot flag `INT_SYSCALL`) the breakpoint trap `int3` is the system call:
//! that host neither enters ring 0 on SYSCALL nor delivers `int n` from user mode for a
//! guest that is not PVM-aware, but it does deliver #BP.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use microkernel::abi::{Rights, ThreadId};
use microkernel::bootinfo::{hyper, SYSCALL_VECTOR};
use microkernel::{GuestExit, Kernel, Next};

use super::entry::{exit_to_user, idle, Ctx, Shared};
use super::{apic, console, cpu, paging::X86};

pub const TIMER_VECTOR: u64 = 32;
pub const IRQ_VECTOR_BASE: u64 = 33;
pub const IRQ_LINES: u16 = 24;

static KERNEL: Shared<Option<Kernel<X86>>> = Shared(UnsafeCell::new(None));

/// `seq` of the last guest exit taken (`hyper::ExitRecord`).
static LAST_EXIT: AtomicU64 = AtomicU64::new(0);

/// The kernel state. Only the entry paths call this, once per entry, with interrupts off.
pub fn kernel() -> &'static mut Kernel<X86> {
    // SAFETY: one CPU with interrupts off in the kernel, and every entry takes this
    // reference exactly once and drops it before leaving (the exit paths never return).
    unsafe { (*KERNEL.0.get()).as_mut().expect("kernel not booted") }
}

pub fn install(k: Kernel<X86>) {
    // SAFETY: boot, before the first entry; nothing else holds a reference.
    unsafe { *KERNEL.0.get() = Some(k) };
}

#[no_mangle]
extern "C" fn mk_syscall() -> ! {
    let k = kernel();
    let next = syscall(k);
    run(k, next)
}

/// A system call: the core's fast path if it applies, else the full path.
fn syscall(k: &mut Kernel<X86>) -> Next {
    match k.fastpath() {
        Some(next) => next,
        None => k.syscall(),
    }
}

#[no_mangle]
extern "C" fn mk_trap(vector: u64, error: u64) -> ! {
    let k = kernel();
    let next = match vector {
        14 => {
            let mut access = Rights::R;
            if error & 2 != 0 {
                access = Rights::W;
            }
            if error & 16 != 0 {
                access = Rights::X;
            }
            k.page_fault(cpu::cr2(), access)
        }
        v if v == SYSCALL_VECTOR as u64 && k.machine.int_syscall => syscall(k),
        1 => {
            // A single-step trap left over from an outside debugger (see `entry`).
            match k.current().and_then(|t| k.context_mut(t)) {
                Some(ctx) => {
                    ctx.rflags &= !0x100;
                    Next::Resume
                }
                None => Next::Idle,
            }
        }
        0..32 => k.exception(vector, error),
        _ => interrupt(k, vector),
    };
    run(k, next)
}

/// A vector taken in kernel mode: an interrupt in the idle loop, or a kernel bug.
#[no_mangle]
extern "C" fn mk_kernel_trap(vector: u64, error: u64, ip: u64) -> ! {
    if vector < 32 {
        use super::console::{fatal, Piece::*};
        fatal(&[
            S("exception "),
            D(vector),
            S(" (error "),
            X(error),
            S(") at "),
            X(ip),
            S(" in kernel mode, cr2 "),
            X(cpu::cr2()),
        ]);
    }
    let k = kernel();
    let next = interrupt(k, vector);
    run(k, next)
}

fn interrupt(k: &mut Kernel<X86>, vector: u64) -> Next {
    apic::eoi();
    match vector {
        TIMER_VECTOR => k.tick(),
        v if v == IRQ_VECTOR_BASE + hyper::EXIT_LINE as u64 => {
            // an exit announced again (`hyper::REANNOUNCE_MS`) is taken once; a record
            // read while the vmm rewrote it is left for the announcement that follows
            let Some(r) = cpu::exit_record().filter(|r| LAST_EXIT.load(Ordering::Relaxed) != r.seq)
            else {
                return carry_on(k);
            };
            LAST_EXIT.store(r.seq, Ordering::Relaxed);
            let exit = GuestExit {
                kind: r.kind as u8,
                size: r.size as u8,
                addr: r.addr,
                data: r.data,
                pulse: 0,
            };
            k.guest_exit(ThreadId(r.vcpu as u32), exit)
        }
        v if v == IRQ_VECTOR_BASE + hyper::DUMP_LINE as u64 => {
            console::dump(k);
            carry_on(k)
        }
        v if (IRQ_VECTOR_BASE..IRQ_VECTOR_BASE + IRQ_LINES as u64).contains(&v) => {
            k.interrupt((v - IRQ_VECTOR_BASE) as u16)
        }
        _ => carry_on(k),
    }
}

/// An interrupt that changed no thread: back to the running one, or to idle.
fn carry_on(k: &Kernel<X86>) -> Next {
    match k.current() {
        Some(_) => Next::Resume,
        None => Next::Idle,
    }
}

/// Carry out the core's decision.
pub fn run(k: &'static mut Kernel<X86>, next: Next) -> ! {
    let thread = match next {
        Next::Idle => idle(),
        Next::Resume => k.current(),
        Next::Switch { thread, task } => {
            k.machine.activate(task);
            Some(thread)
        }
    };
    let Some(thread) = thread else { idle() };
    let ctx: &mut Ctx = k.context_mut(thread).expect("running thread has a context");
    exit_to_user(ctx)
}
