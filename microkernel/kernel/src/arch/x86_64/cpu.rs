//! CPU tables and registers: GDT, TSS (with the user I/O bitmap), IDT, the SYSCALL
//! MSRs, control registers, and single-instruction wrappers.
//!
//! Segments: 0x08 kernel code, 0x10 kernel data, 0x18 (unused 32-bit user code, for
//! the SYSRET layout), 0x23 user data, 0x2b user code, 0x30 TSS. Every IDT gate uses
//! IST1, the top of the one kernel stack, so an entry always starts on a known stack
//! (#DB uses IST2: a single-step trap can hit kernel code);
//! only #BP (`int3`: a breakpoint, or the system call on kvm-pvm) is open to user mode.
//! User mode may use exactly the ports in `USER_PORTS` (the vmm's VM0 test ports).

use core::arch::asm;
use core::cell::UnsafeCell;
use core::mem::size_of;

use microkernel::bootinfo::SYSCALL_VECTOR;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const TSS_SEL: u16 = 0x30;

/// Ports user mode may access: 0x510 exit, 0x511 raise an IOAPIC line, 0x512 step count.
pub const USER_PORTS: core::ops::Range<u16> = 0x510..0x513;
const IOMAP_BYTES: usize = (USER_PORTS.end as usize).div_ceil(8) + 1;

#[repr(C, packed)]
struct Tss {
    _r0: u32,
    rsp: [u64; 3],
    _r1: u64,
    ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap_base: u16,
    iomap: [u8; IOMAP_BYTES],
}

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 8],
    tss: Tss,
    idt: [[u64; 2]; 256],
}

/// Written once by `init` before anything else runs, read only by the CPU afterwards.
struct Global(UnsafeCell<Tables>);
// SAFETY: one CPU; only `init` (boot, interrupts off) writes the tables.
unsafe impl Sync for Global {}

static TABLES: Global = Global(UnsafeCell::new(Tables {
    gdt: [0; 8],
    tss: Tss {
        _r0: 0,
        rsp: [0; 3],
        _r1: 0,
        ist: [0; 7],
        _r2: 0,
        _r3: 0,
        iomap_base: 0,
        iomap: [0; IOMAP_BYTES],
    },
    idt: [[0; 2]; 256],
}));

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

const MSR_EFER: u32 = 0xc000_0080;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_FMASK: u32 = 0xc000_0084;
const EFER_SCE: u64 = 1 << 0;
const EFER_NXE: u64 = 1 << 11;

/// Load GDT, TSS and IDT (gates to `vectors[i]`), set up SYSCALL (`_start` enabled SSE).
/// `stack_top` is the kernel stack (IST1 and RSP0); `syscall_entry` the SYSCALL target.
pub fn init(
    stack_top: u64,
    debug_stack: u64,
    vectors: &[u64; 64],
    spurious: u64,
    syscall_entry: u64,
) {
    // SAFETY: boot, one CPU, interrupts off: nobody else touches TABLES while we fill them.
    let t = unsafe { &mut *TABLES.0.get() };
    t.gdt[1] = 0x00af_9a00_0000_ffff; // kernel code, 64-bit
    t.gdt[2] = 0x00cf_9200_0000_ffff; // kernel data
    t.gdt[3] = 0x00cf_fa00_0000_ffff; // user code, 32-bit (SYSRET layout only)
    t.gdt[4] = 0x00cf_f200_0000_ffff; // user data
    t.gdt[5] = 0x00af_fa00_0000_ffff; // user code, 64-bit
    let base = &t.tss as *const Tss as u64;
    let limit = (size_of::<Tss>() - 1) as u64;
    t.gdt[6] = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    t.gdt[7] = base >> 32;
    t.tss.rsp[0] = stack_top;
    t.tss.ist[0] = stack_top;
    t.tss.ist[1] = debug_stack;
    t.tss.iomap_base = (size_of::<Tss>() - IOMAP_BYTES) as u16;
    t.tss.iomap = [0xff; IOMAP_BYTES];
    for port in USER_PORTS {
        t.tss.iomap[port as usize / 8] &= !(1 << (port % 8));
    }
    let gate = |handler: u64, ist: u64| {
        let lo = (handler & 0xffff)
            | ((KERNEL_CS as u64) << 16)
            | (ist << 32)
            | (0x8e << 40) // present, DPL 0, interrupt gate
            | (((handler >> 16) & 0xffff) << 48);
        [lo, handler >> 32]
    };
    for (i, &v) in vectors.iter().enumerate() {
        t.idt[i] = gate(v, if i == 1 { 2 } else { 1 });
    }
    // The breakpoint (and system call on kvm-pvm, `int3`) may be raised from user mode.
    t.idt[SYSCALL_VECTOR as usize][0] |= 3 << 45;
    for entry in &mut t.idt[64..] {
        *entry = gate(spurious, 1);
    }
    let gdtr = Pointer { limit: (size_of::<[u64; 8]>() - 1) as u16, base: t.gdt.as_ptr() as u64 };
    let idtr =
        Pointer { limit: (size_of::<[[u64; 2]; 256]>() - 1) as u16, base: t.idt.as_ptr() as u64 };
    // SAFETY: the tables are static and valid; the far return reloads CS with the kernel
    // code segment of the new GDT, the data segments with its data segment.
    unsafe {
        asm!(
            "lgdt [{gdtr}]",
            "lidt [{idtr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {ds:x}",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "ltr {tss:x}",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cs = in(reg) KERNEL_CS as u64,
            ds = in(reg) KERNEL_DS as u64,
            tss = in(reg) TSS_SEL as u64,
            tmp = out(reg) _,
        );
    }
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE | EFER_NXE);
    // SYSCALL: CS 0x08, SS 0x10. SYSRET: CS 0x18 + 16 = 0x2b, SS 0x18 + 8 = 0x23.
    wrmsr(MSR_STAR, (0x18u64 << 48) | ((KERNEL_CS as u64) << 32));
    wrmsr(MSR_LSTAR, syscall_entry);
    // Clear IF, DF, IOPL, NT, AC on entry; keep TF (see `entry`).
    wrmsr(MSR_FMASK, 0x47600);
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an architectural MSR; no memory effects.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only called with the architectural MSRs above, set to valid values.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack))
    };
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to the vmm's devices has no effect on kernel memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// A hypercall to the vmm (`microkernel::bootinfo::hyper`).
pub fn hypercall(op: u32, args: [u64; 4]) {
    // SAFETY: port output to the vmm's hypercall port; it changes no register and no
    // memory of ours (the vmm only reads the registers).
    unsafe {
        core::arch::asm!(
            "out dx, eax",
            in("dx") microkernel::bootinfo::hyper::PORT,
            in("eax") op,
            in("rdi") args[0],
            in("rsi") args[1],
            in("r8") args[2],
            in("r9") args[3],
            options(nostack, preserves_flags),
        )
    }
}

/// The guest exit the vmm wrote at `hyper::EXIT_RECORD`, or `None` if the vmm was
/// writing the next one meanwhile.
///
/// An announcement may be taken late (one repeated after `REANNOUNCE_MS` waits in the
/// IOAPIC while the vCPU is answered and exits again), so the vmm can be rewriting the
/// record while it is read here. The record is a sequence lock (`bootinfo::hyper`):
/// the vmm zeroes `seq`, writes the rest, then `seq`; a record read with `seq` 0 or
/// with two different `seq`s is torn and skipped, as the vmm announces it once whole.
pub fn exit_record() -> Option<microkernel::bootinfo::hyper::ExitRecord> {
    use microkernel::bootinfo::hyper::{ExitRecord, EXIT_RECORD};
    let at = |i: usize| {
        // SAFETY: the record page is in the kernel's identity map of the first GiB and
        // belongs to no task; only the vmm writes it.
        unsafe { core::ptr::read_volatile((EXIT_RECORD as *const u64).add(i)) }
    };
    // volatile reads stay in program order, and x86 keeps loads in order
    let seq = at(ExitRecord::WORDS - 1);
    let mut w = [0u64; ExitRecord::WORDS];
    for (i, x) in w.iter_mut().enumerate() {
        *x = at(i);
    }
    (seq != 0 && at(ExitRecord::WORDS - 1) == seq && w[ExitRecord::WORDS - 1] == seq)
        .then(|| ExitRecord::from_words(w))
}

pub fn cr2() -> u64 {
    let v;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack)) };
    v
}

pub fn cr3() -> u64 {
    let v;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// Switch address spaces. The kernel half (first GiB) is the same in every space.
pub fn set_cr3(pml4: u64) {
    // SAFETY: every PML4 `paging` builds maps the kernel identically.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack)) };
}

pub fn invlpg(addr: u64) {
    // SAFETY: flushing a TLB entry is always safe.
    unsafe { asm!("invlpg [{}]", in(reg) addr, options(nostack)) };
}

pub fn halt_forever() {
    // SAFETY: stops the CPU with interrupts off; nothing to return to.
    unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
}
