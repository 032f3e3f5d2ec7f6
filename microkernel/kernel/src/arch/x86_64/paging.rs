//! Physical frames and the real page tables, mirroring the core's abstract ones; and
//! `X86`, the `Machine` the core calls.
//!
//! Every address space has its own PML4 and first PDPT. PDPT entries 0 (the first GiB,
//! identity mapped with 2 MiB pages, supervisor only) and 3 (the APIC window) are copied
//! from the boot tables into every space, so the kernel is mapped identically
//! everywhere and physical memory is reachable at its own address. User pages (1..3
//! GiB) get 4 KiB entries under PDPT entries 1 and 2. Intermediate tables are freed
//! only with the space.

use core::ptr;

use microkernel::abi::{Rights, TaskId, ThreadId};
use microkernel::bootinfo::hyper;
use microkernel::{Machine, NoMemory, PageTables, Space};

use super::{apic, console, cpu};

const PRESENT: u64 = 1;
const WRITE: u64 = 2;
const USER: u64 = 4;
const PWT_PCD: u64 = 0x18;
const HUGE: u64 = 0x80;
const NX: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
const PAGE: u64 = 4096;

/// Physical memory below this is identity mapped; frames must come from here.
pub const IDENTITY_LIMIT: u64 = 1 << 30;
pub const MAX_TASKS: usize = 64;

/// A table of 512 entries at physical (= virtual) `frame`.
fn table(frame: u64) -> *mut u64 {
    debug_assert!(frame < IDENTITY_LIMIT && frame.is_multiple_of(PAGE));
    frame as *mut u64
}

fn read(frame: u64, i: usize) -> u64 {
    // SAFETY: `frame` is a page-table frame the allocator handed out (identity mapped,
    // owned by this module), and `i < 512`.
    unsafe { ptr::read_volatile(table(frame).add(i & 511)) }
}

fn write(frame: u64, i: usize, v: u64) {
    // SAFETY: as in `read`.
    unsafe { ptr::write_volatile(table(frame).add(i & 511), v) }
}

/// A page-granular bump allocator with a free list threaded through free frames.
pub struct Frames {
    next: u64,
    end: u64,
    free: u64,
}

impl Frames {
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end: end.min(IDENTITY_LIMIT), free: 0 }
    }

    /// A zeroed frame.
    pub fn alloc(&mut self) -> Option<u64> {
        let f = if self.free != 0 {
            let f = self.free;
            self.free = read(f, 0);
            f
        } else if self.next < self.end {
            self.next += PAGE;
            self.next - PAGE
        } else {
            return None;
        };
        for i in 0..512 {
            write(f, i, 0);
        }
        Some(f)
    }

    pub fn free(&mut self, f: u64) {
        write(f, 0, self.free);
        self.free = f;
    }
}

pub struct X86 {
    pub frames: Frames,
    /// PML4 frame per task (0: none).
    spaces: [u64; MAX_TASKS],
    /// Guest tasks: no page table here, the vmm keeps the VM's memory (`hyper`).
    guests: [bool; MAX_TASKS],
    /// The boot PDPT whose kernel entries every space copies.
    kernel_pdpt: u64,
    loaded: Option<TaskId>,
    /// Tasks enter the kernel by `int3` (see `trap`).
    pub int_syscall: bool,
}

impl X86 {
    pub fn new(frames: Frames, kernel_pdpt: u64) -> Self {
        Self {
            frames,
            spaces: [0; MAX_TASKS],
            guests: [false; MAX_TASKS],
            kernel_pdpt,
            loaded: None,
            int_syscall: false,
        }
    }

    /// Load `task`'s page table.
    pub fn activate(&mut self, task: TaskId) {
        if self.loaded != Some(task) {
            let pml4 = self.spaces[task.0 as usize];
            assert!(pml4 != 0, "activate a task without an address space");
            cpu::set_cr3(pml4);
            self.loaded = Some(task);
        }
    }

    /// The leaf table and index for `vpn` in `task`, creating tables if `create`.
    fn is_guest(&self, task: TaskId) -> bool {
        self.guests.get(task.0 as usize).copied().unwrap_or(false)
    }

    fn leaf(&mut self, task: TaskId, vpn: u64, create: bool) -> Option<(u64, usize)> {
        let mut t = *self.spaces.get(task.0 as usize).filter(|&&p| p != 0)?;
        for shift in [27u32, 18, 9] {
            let i = ((vpn >> shift) & 511) as usize;
            let e = read(t, i);
            if e & PRESENT != 0 {
                debug_assert!(e & HUGE == 0, "user address in a kernel huge page");
                t = e & ADDR;
            } else if create {
                let f = self.frames.alloc()?;
                write(t, i, f | PRESENT | WRITE | USER);
                t = f;
            } else {
                return None;
            }
        }
        Some((t, (vpn & 511) as usize))
    }

    fn flush(&self, task: TaskId, vpn: u64) {
        if self.loaded == Some(task) {
            cpu::invlpg(vpn << 12);
        }
    }
}

fn pte(pfn: u64, rights: Rights) -> u64 {
    let mut e = (pfn << 12) | PRESENT | USER;
    if rights.contains(Rights::W) {
        e |= WRITE;
    }
    if !rights.contains(Rights::X) {
        e |= NX;
    }
    e
}

impl PageTables for X86 {
    fn create_space(&mut self, task: TaskId, kind: Space) -> Result<(), NoMemory> {
        let slot = self.spaces.get(task.0 as usize).ok_or(NoMemory)?;
        debug_assert!(*slot == 0);
        if kind == Space::Guest {
            self.guests[task.0 as usize] = true;
            cpu::hypercall(hyper::CREATE, [task.0 as u64, 0, 0, 0]);
            return Ok(());
        }
        let pml4 = self.frames.alloc().ok_or(NoMemory)?;
        let Some(pdpt) = self.frames.alloc() else {
            self.frames.free(pml4);
            return Err(NoMemory);
        };
        write(pdpt, 0, read(self.kernel_pdpt, 0));
        write(pdpt, 3, read(self.kernel_pdpt, 3));
        write(pml4, 0, pdpt | PRESENT | WRITE | USER);
        self.spaces[task.0 as usize] = pml4;
        Ok(())
    }

    fn destroy_space(&mut self, task: TaskId) {
        if self.is_guest(task) {
            self.guests[task.0 as usize] = false;
            cpu::hypercall(hyper::DESTROY, [task.0 as u64, 0, 0, 0]);
            return;
        }
        let pml4 = core::mem::take(&mut self.spaces[task.0 as usize]);
        if pml4 == 0 {
            return;
        }
        let pdpt = read(pml4, 0) & ADDR;
        for i in 1..3 {
            let pd = read(pdpt, i);
            if pd & PRESENT == 0 {
                continue;
            }
            for j in 0..512 {
                let pt = read(pd & ADDR, j);
                if pt & PRESENT != 0 {
                    self.frames.free(pt & ADDR);
                }
            }
            self.frames.free(pd & ADDR);
        }
        self.frames.free(pdpt);
        self.frames.free(pml4);
        if self.loaded == Some(task) {
            self.loaded = None;
        }
    }

    fn map(&mut self, task: TaskId, vpn: u64, pfn: u64, rights: Rights) -> Result<(), NoMemory> {
        if self.is_guest(task) {
            cpu::hypercall(hyper::MAP, [task.0 as u64, vpn, pfn, rights.bits() as u64]);
            return Ok(());
        }
        let (t, i) = self.leaf(task, vpn, true).ok_or(NoMemory)?;
        write(t, i, pte(pfn, rights));
        self.flush(task, vpn);
        Ok(())
    }

    fn protect(&mut self, task: TaskId, vpn: u64, rights: Rights) {
        if self.is_guest(task) {
            cpu::hypercall(hyper::PROTECT, [task.0 as u64, vpn, rights.bits() as u64, 0]);
            return;
        }
        if let Some((t, i)) = self.leaf(task, vpn, false) {
            let e = read(t, i);
            write(t, i, pte((e & ADDR) >> 12, rights));
            self.flush(task, vpn);
        }
    }

    fn unmap(&mut self, task: TaskId, vpn: u64) {
        if self.is_guest(task) {
            cpu::hypercall(hyper::UNMAP, [task.0 as u64, vpn, 0, 0]);
            return;
        }
        if let Some((t, i)) = self.leaf(task, vpn, false) {
            write(t, i, 0);
            self.flush(task, vpn);
        }
    }
}

impl Machine for X86 {
    type Context = super::entry::Ctx;

    fn irq_mask(&mut self, irq: u16) {
        apic::ioapic_set(irq, true);
    }

    fn irq_unmask(&mut self, irq: u16) {
        apic::ioapic_set(irq, false);
    }

    fn guest_resume(&mut self, vcpu: ThreadId, task: TaskId, value: u64, pulse: u32) {
        cpu::hypercall(hyper::RESUME, [task.0 as u64, vcpu.raw(), value, pulse as u64]);
    }

    fn guest_interrupt(&mut self, task: TaskId, pins: u32) {
        cpu::hypercall(hyper::INTERRUPT, [task.0 as u64, pins as u64, 0, 0]);
    }

    fn debug_write(&mut self, pfn: u64, offset: u64, len: u64) {
        let start = (pfn << 12) + offset;
        if start + len > IDENTITY_LIMIT || offset + len > PAGE {
            return;
        }
        // SAFETY: the core checked that the frame is the caller's and the range lies
        // inside it; frames below IDENTITY_LIMIT are identity mapped.
        let bytes = unsafe { core::slice::from_raw_parts(start as *const u8, len as usize) };
        console::write_bytes(bytes);
    }
}

/// Map the APIC window (3..4 GiB, uncached 2 MiB pages for the IOAPIC and the LAPIC)
/// into the boot PDPT, before any address space copies it.
pub fn map_apic_window(frames: &mut Frames, pdpt: u64) {
    let pd = frames.alloc().expect("a frame for the APIC window");
    for base in [apic::IOAPIC_BASE, apic::LAPIC_BASE] {
        let i = ((base >> 21) & 511) as usize;
        write(pd, i, (base & !0x1f_ffff) | PRESENT | WRITE | HUGE | PWT_PCD);
    }
    write(pdpt, 3, pd | PRESENT | WRITE);
    cpu::set_cr3(cpu::cr3());
}
