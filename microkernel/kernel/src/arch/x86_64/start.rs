//! Boot: the vmm starts the vCPU in 64-bit mode at `_start` with its identity map of
//! the first GiB and `rsi` pointing at the boot information (`microkernel::bootinfo`).
//! We take over the CPU (GDT, IDT, TSS, SYSCALL, SSE), the APICs, build the core with
//! the root task's memory (its image regions, stack and pool), and run it.

use microkernel::abi::{Rights, ThreadId};
use microkernel::bootinfo::{self, hyper, layout, BootInfo};
use microkernel::{Config, Kernel};

use super::console::Piece::{D, S, X};
use super::entry::{self, R8, R9, RCX, RDI, RDX, RSI};
use super::paging::{self, Frames, X86};
use super::{apic, console, cpu, trap};

/// Frames the kernel keeps for page tables; everything else goes to the root pool.
const KERNEL_FRAMES: u64 = 4 << 20;

core::arch::global_asm!(
    ".section .text.start",
    ".global _start",
    "_start:",
    "lea rsp, [rip + MK_KSTACK + {stack}]",
    // SSE before any Rust code runs: CR0.MP on, EM and TS off; CR4.OSFXSR, OSXMMEXCPT.
    "mov rax, cr0",
    "and rax, -13",
    "or rax, 2",
    "mov cr0, rax",
    "mov rax, cr4",
    "or rax, 0x600",
    "mov cr4, rax",
    "mov rdi, rsi",
    "call mk_start",
    "ud2",
    ".section .text",
    stack = const entry::KSTACK_SIZE,
);

#[no_mangle]
extern "C" fn mk_start(boot_info: u64) -> ! {
    console::print(&[S("mk: microkernel starting\n")]);
    let mut words = [0u64; bootinfo::WORDS];
    for (i, w) in words.iter_mut().enumerate() {
        // SAFETY: the vmm wrote the boot information at this identity-mapped address.
        *w = unsafe { core::ptr::read_volatile((boot_info as *const u64).add(i)) };
    }
    let Some(info) = BootInfo::from_words(&words) else {
        console::fatal(&[S("bad boot information at "), X(boot_info)]);
    };
    cpu::init(
        entry::stack_top(),
        entry::debug_stack_top(),
        entry::vectors(),
        entry::spurious_entry(),
        entry::syscall_entry(),
    );

    let kernel_end = info.free_start + KERNEL_FRAMES;
    let mut frames = Frames::new(info.free_start, kernel_end);
    let boot_pdpt = cpu::cr3() & !0xfff;
    let boot_pdpt = {
        // SAFETY: CR3 is the vmm's PML4 (identity mapped); entry 0 is its PDPT.
        let e = unsafe { core::ptr::read_volatile(boot_pdpt as *const u64) };
        e & 0x000f_ffff_ffff_f000
    };
    paging::map_apic_window(&mut frames, boot_pdpt);
    apic::init();

    let config = Config {
        threads: 128,
        tasks: paging::MAX_TASKS as u16,
        // a hosted guest's page is mapped by the root, the guest server, each device task
        // and the guest, and the root owns every VM0 page: a 128 MiB guest (vmm's
        // MAX_HOSTED_MEMORY) with two devices is about 215,000
        mappings: bootinfo::MAPPINGS as u32,
        // the last two lines are the vmm's (`bootinfo::hyper`): a dump request and guest
        // exits; no task gets them
        irqs: hyper::DUMP_LINE,
        user_start: layout::USER_START,
        user_end: layout::USER_END,
        timeslice: 2,
        root_priority: 100,
    };
    let mut machine = X86::new(frames, boot_pdpt);
    machine.int_syscall = info.flags & bootinfo::flags::INT_SYSCALL != 0;
    let mut k = match Kernel::new(machine, config) {
        Ok(k) => k,
        Err(_) => console::fatal(&[S("cannot allocate the kernel tables")]),
    };
    for r in &info.regions[..info.nregions as usize] {
        let rights = Rights::from_bits(r.rights).unwrap_or(Rights::R);
        for off in (0..r.size).step_by(4096) {
            root_map(&mut k, r.vaddr + off, r.paddr + off, rights);
        }
    }
    let mut next_frame = kernel_end;
    let stack_bottom = layout::ROOT_STACK_TOP - layout::ROOT_STACK_SIZE;
    for va in (stack_bottom..layout::ROOT_STACK_TOP).step_by(4096) {
        root_map(&mut k, va, next_frame, Rights::RW);
        next_frame += 4096;
    }
    let pool_end = info.free_end.min(paging::IDENTITY_LIMIT);
    let pool_size = pool_end.saturating_sub(next_frame);
    for off in (0..pool_size).step_by(4096) {
        root_map(&mut k, layout::POOL_BASE + off, next_frame + off, Rights::RW);
    }
    console::print(&[
        S("mk: "),
        D(KERNEL_FRAMES >> 10),
        S(" KiB for page tables, root pool "),
        D(pool_size >> 10),
        S(" KiB, tick "),
        D(apic::TICK_MS),
        S(" ms\n"),
    ]);
    let root: ThreadId = k.root_thread();
    let ctx = k.context_mut(root).expect("root thread");
    ctx.gpr[RDI] = layout::POOL_BASE;
    ctx.gpr[RSI] = pool_size;
    ctx.gpr[RDX] = info.mode;
    ctx.gpr[RCX] = root.raw();
    ctx.gpr[R8] = info.flags;
    // where the pool is in VM0-physical memory: device tasks give it to VM0's devices
    ctx.gpr[R9] = next_frame;
    let next = k.boot(info.root_entry, layout::ROOT_STACK_TOP - 8);
    trap::install(k);
    trap::run(trap::kernel(), next)
}

fn root_map(k: &mut Kernel<X86>, vaddr: u64, paddr: u64, rights: Rights) {
    if k.root_map(vaddr, paddr, rights).is_err() {
        console::fatal(&[S("root_map "), X(vaddr), S(" -> "), X(paddr)]);
    }
}
