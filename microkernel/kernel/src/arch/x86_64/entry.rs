//! Entering and leaving the kernel: the saved user state (`Ctx`) and the assembly paths.
//!
//! Entry (`syscall`, or any IDT vector from user mode through IST1): save every GPR,
//! ip, flags and sp into `*CURRENT` (the running thread's `Ctx`), FXSAVE the FPU/SSE
//! state, reset the stack to the top of the kernel stack and call `trap::syscall` or
//! `trap::trap(vector, error)`. Those never return: they end in `exit_to_user`, which
//! restores a `Ctx` and leaves by SYSRETQ (if the thread entered by SYSCALL, so rcx and
//! r11 are free) or IRETQ. A vector taken in kernel mode can only come from the idle
//! loop (interrupts are off elsewhere), be a single-step #DB (TF kept across SYSCALL),
//! or a kernel bug: `trap::kernel_trap`.

use core::arch::global_asm;
use core::cell::UnsafeCell;

use microkernel::abi::{ARG_COUNT, MR_COUNT, RET_COUNT};
use microkernel::Context;

pub const KSTACK_SIZE: usize = 64 << 10;

/// GPR slots in `Ctx::gpr`.
pub const RAX: usize = 0;
pub const RBX: usize = 1;
pub const RCX: usize = 2;
pub const RDX: usize = 3;
pub const RSI: usize = 4;
pub const RDI: usize = 5;
pub const RBP: usize = 6;
pub const RSP: usize = 7;
pub const R8: usize = 8;
pub const R9: usize = 9;
pub const R10: usize = 10;
pub const R12: usize = 12;
pub const R13: usize = 13;
pub const R14: usize = 14;
pub const R15: usize = 15;

/// User flags a thread may hold: the arithmetic flags, DF and TF; IF is always set.
///
/// TF belongs to a debugger outside the VM (the vmm's instruction counter): stepping
/// follows system calls into the kernel and back. SYSCALL keeps TF (FMASK leaves it),
/// the saved flags keep it, and a stepped kernel hands it to the thread it resumes.
/// Interrupt and exception entries clear TF as the CPU does: they are not stepped.
/// A #DB the guest itself receives (TF left over once the debugger is gone) only
/// clears TF: in kernel mode on its own IST stack, in user mode in `trap`.
const USER_FLAGS: u64 = 0xdd5;
const FLAGS_IF: u64 = 0x202;
const TF: u64 = 0x100;

/// Whether the kernel itself runs with TF (single-stepped from outside the VM).
fn stepped() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS through the stack; no other effect.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) flags) };
    flags & TF != 0
}

/// A thread's user state. The layout is the assembly's: gpr at 0 (rax, rbx, rcx, rdx,
/// rsi, rdi, rbp, rsp, r8..r15), rip 128, rflags 136, how it entered 144, FXSAVE 160.
#[repr(C, align(16))]
pub struct Ctx {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// 0: entered by SYSCALL (leave by SYSRETQ), 1: by an interrupt (IRETQ).
    pub iret: u64,
    _pad: u64,
    pub fx: [u8; 512],
}

impl Default for Ctx {
    fn default() -> Self {
        let mut fx = [0; 512];
        fx[0..2].copy_from_slice(&0x37fu16.to_le_bytes()); // FCW
        fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        Self { gpr: [0; 16], rip: 0, rflags: FLAGS_IF, iret: 1, _pad: 0, fx }
    }
}

impl Ctx {
    /// Make the state safe to load: canonical user ip/sp, no privileged flags.
    pub fn sanitize(&mut self) {
        let user = |a: u64| a < 0x8000_0000_0000;
        if !user(self.rip) {
            self.rip = 0;
        }
        if !user(self.gpr[RSP]) {
            self.gpr[RSP] = 0;
        }
        self.rflags = (self.rflags & USER_FLAGS) | FLAGS_IF;
    }
}

const MRS: [usize; MR_COUNT] = [R8, R9, R12, R13, R14, R15, RBX, RBP];

impl Context for Ctx {
    fn ip(&self) -> u64 {
        self.rip
    }
    fn set_ip(&mut self, ip: u64) {
        self.rip = ip;
    }
    fn sp(&self) -> u64 {
        self.gpr[RSP]
    }
    fn set_sp(&mut self, sp: u64) {
        self.gpr[RSP] = sp;
    }
    fn syscall(&self) -> (u64, [u64; ARG_COUNT]) {
        let g = &self.gpr;
        (g[RAX], [g[RDI], g[RSI], g[RDX], g[R10]])
    }
    fn mrs(&self) -> [u64; MR_COUNT] {
        MRS.map(|r| self.gpr[r])
    }
    fn set_mrs(&mut self, mrs: &[u64; MR_COUNT]) {
        for (r, v) in MRS.iter().zip(mrs) {
            self.gpr[*r] = *v;
        }
    }
    fn set_ret(&mut self, ret: [u64; RET_COUNT]) {
        [self.gpr[RAX], self.gpr[RDI], self.gpr[RSI]] = ret;
    }
}

/// The entry path's globals: the running thread's `Ctx` and a scratch word.
#[repr(C)]
pub struct EntryState {
    pub current: *mut Ctx,
    scratch: u64,
}

pub struct Shared<T>(pub UnsafeCell<T>);
// SAFETY: one CPU, and the kernel runs with interrupts off: no concurrent access.
unsafe impl<T> Sync for Shared<T> {}

#[no_mangle]
pub static MK_ENTRY: Shared<EntryState> =
    Shared(UnsafeCell::new(EntryState { current: core::ptr::null_mut(), scratch: 0 }));

#[repr(C, align(16))]
pub struct Stack<const N: usize>(pub [u8; N]);
#[no_mangle]
pub static MK_KSTACK: Shared<Stack<KSTACK_SIZE>> = Shared(UnsafeCell::new(Stack([0; KSTACK_SIZE])));
/// The stack of #DB (IST2): a single-step trap may hit anywhere in the kernel.
static DEBUG_STACK: Shared<Stack<1024>> = Shared(UnsafeCell::new(Stack([0; 1024])));

pub fn stack_top() -> u64 {
    MK_KSTACK.0.get() as u64 + KSTACK_SIZE as u64
}

pub fn debug_stack_top() -> u64 {
    DEBUG_STACK.0.get() as u64 + 1024
}

/// Make `ctx` the one the next entry saves into.
pub fn set_current(ctx: *mut Ctx) {
    // SAFETY: interrupts are off in the kernel; the entry code reads this only on entry.
    unsafe { (*MK_ENTRY.0.get()).current = ctx };
}

extern "C" {
    fn mk_exit_to_user(ctx: *const Ctx) -> !;
    static mk_vectors: [u64; 64];
    fn mk_spurious();
    fn mk_syscall_entry();
}

pub fn vectors() -> &'static [u64; 64] {
    // SAFETY: a read-only table of stub addresses defined in the assembly below.
    unsafe { &mk_vectors }
}

pub fn spurious_entry() -> u64 {
    mk_spurious as *const () as u64
}

pub fn syscall_entry() -> u64 {
    mk_syscall_entry as *const () as u64
}

/// Load `ctx` and return to user mode.
pub fn exit_to_user(ctx: &mut Ctx) -> ! {
    ctx.sanitize();
    if stepped() {
        // An outside debugger steps the kernel: keep stepping whoever runs next.
        ctx.rflags |= TF;
    }
    set_current(ctx);
    // SAFETY: `ctx` is sanitized (user ip/sp, IF on, IOPL 0) and lives in the thread
    // table, which never moves; the exit path only reads it.
    unsafe { mk_exit_to_user(ctx) }
}

/// Wait for an interrupt with nothing to run; the interrupt enters `kernel_trap`.
pub fn idle() -> ! {
    // SAFETY: nothing on the stack is needed any more; the IST entry starts afresh.
    unsafe {
        core::arch::asm!("mov rsp, {}", "2:", "sti", "hlt", "cli", "jmp 2b",
                         in(reg) stack_top(), options(noreturn))
    }
}

global_asm!(
    r#"
.altmacro
.macro MKSTUB n
    .align 16
mk_vec_\n:
    .if ((\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30))
    .else
    push 0
    .endif
    push \n
    jmp mk_trap_common
.endm
.macro MKADDR n
    .quad mk_vec_\n
.endm

.section .text
.set mkv, 0
.rept 64
    MKSTUB %mkv
    .set mkv, mkv + 1
.endr

.global mk_spurious
mk_spurious:
    iretq

.global mk_trap_common
mk_trap_common:
    test qword ptr [rsp + 24], 3
    jz 2f
    mov [rip + MK_ENTRY + 8], rax
    mov rax, [rip + MK_ENTRY]
    mov [rax + 8], rbx
    mov [rax + 16], rcx
    mov [rax + 24], rdx
    mov [rax + 32], rsi
    mov [rax + 40], rdi
    mov [rax + 48], rbp
    mov [rax + 64], r8
    mov [rax + 72], r9
    mov [rax + 80], r10
    mov [rax + 88], r11
    mov [rax + 96], r12
    mov [rax + 104], r13
    mov [rax + 112], r14
    mov [rax + 120], r15
    mov rbx, [rip + MK_ENTRY + 8]
    mov [rax], rbx
    mov rbx, [rsp + 16]
    mov [rax + 128], rbx
    mov rbx, [rsp + 32]
    mov [rax + 136], rbx
    mov rbx, [rsp + 40]
    mov [rax + 56], rbx
    mov qword ptr [rax + 144], 1
    fxsave64 [rax + 160]
    mov rdi, [rsp]
    mov rsi, [rsp + 8]
    lea rsp, [rip + MK_KSTACK + {stack}]
    call mk_trap
    ud2
2:
    cmp qword ptr [rsp], 1
    jne 4f
    and qword ptr [rsp + 32], -0x101
    add rsp, 16
    iretq
4:
    mov rdi, [rsp]
    mov rsi, [rsp + 8]
    mov rdx, [rsp + 16]
    lea rsp, [rip + MK_KSTACK + {stack}]
    call mk_kernel_trap
    ud2

.global mk_syscall_entry
mk_syscall_entry:
    mov [rip + MK_ENTRY + 8], rsp
    mov rsp, [rip + MK_ENTRY]
    mov [rsp], rax
    mov [rsp + 8], rbx
    mov [rsp + 24], rdx
    mov [rsp + 32], rsi
    mov [rsp + 40], rdi
    mov [rsp + 48], rbp
    mov [rsp + 64], r8
    mov [rsp + 72], r9
    mov [rsp + 80], r10
    mov [rsp + 96], r12
    mov [rsp + 104], r13
    mov [rsp + 112], r14
    mov [rsp + 120], r15
    mov [rsp + 128], rcx
    mov [rsp + 136], r11
    mov rax, [rip + MK_ENTRY + 8]
    mov [rsp + 56], rax
    mov qword ptr [rsp + 144], 0
    fxsave64 [rsp + 160]
    lea rsp, [rip + MK_KSTACK + {stack}]
    call mk_syscall
    ud2

.global mk_exit_to_user
mk_exit_to_user:
    fxrstor64 [rdi + 160]
    cmp qword ptr [rdi + 144], 0
    jne 3f
    mov rcx, [rdi + 128]
    mov r11, [rdi + 136]
    mov rax, [rdi]
    mov rbx, [rdi + 8]
    mov rdx, [rdi + 24]
    mov rsi, [rdi + 32]
    mov rbp, [rdi + 48]
    mov r8, [rdi + 64]
    mov r9, [rdi + 72]
    mov r10, [rdi + 80]
    mov r12, [rdi + 96]
    mov r13, [rdi + 104]
    mov r14, [rdi + 112]
    mov r15, [rdi + 120]
    mov rsp, [rdi + 56]
    mov rdi, [rdi + 40]
    sysretq
3:
    push 0x23
    push qword ptr [rdi + 56]
    push qword ptr [rdi + 136]
    push 0x2b
    push qword ptr [rdi + 128]
    mov rax, [rdi]
    mov rbx, [rdi + 8]
    mov rcx, [rdi + 16]
    mov rdx, [rdi + 24]
    mov rsi, [rdi + 32]
    mov rbp, [rdi + 48]
    mov r8, [rdi + 64]
    mov r9, [rdi + 72]
    mov r10, [rdi + 80]
    mov r11, [rdi + 88]
    mov r12, [rdi + 96]
    mov r13, [rdi + 104]
    mov r14, [rdi + 112]
    mov r15, [rdi + 120]
    mov rdi, [rdi + 40]
    iretq

.section .rodata
.align 8
.global mk_vectors
mk_vectors:
.set mkv, 0
.rept 64
    MKADDR %mkv
    .set mkv, mkv + 1
.endr
.section .text
.noaltmacro
"#,
    stack = const KSTACK_SIZE,
);
