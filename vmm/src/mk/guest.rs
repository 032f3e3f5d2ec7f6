//! Guest VMs of VM0: the vmm's side of the hypercall interface
//! (`microkernel::bootinfo::hyper`), the lower half of hosted mode.
//!
//! The microkernel owns every decision. A guest task's address space *is* its VM's
//! physical memory: the kernel reports each page it maps there (`MAP`, VM0-physical
//! frame → guest-physical page) and the vmm mirrors the page table into KVM memory
//! slots, one per run of pages that are consecutive on both sides, backed by VM0's own
//! RAM. So the guest's RAM is a region of VM0's RAM and nothing else. The guest's vCPU
//! runs on a thread of its own; an exit KVM does not absorb is written to the exit
//! record in VM0's memory and announced on VM0's IOAPIC line `EXIT_LINE`; the kernel
//! delivers it as IPC to the vCPU's pager, and its `RESUME` hypercall carries the value
//! back. Per exit: one interrupt into VM0, two IPCs (the exit call and its reply), one
//! VM0 exit to the vmm (`RESUME`), two host thread switches (vCPU thread → VM0's vCPU
//! thread → back).
//!
//! The vmm keeps the firmware role only: when a vCPU first runs, it loads the guest's
//! program and boot registers into the guest's RAM (`Firmware`: the exit-loop guest
//! below, or a Linux kernel, initrd, boot parameters and ACPI tables for `--hosted`,
//! with the same loader as native mode). Everything after that goes through VM0.
//!
//! Limits: one vCPU per guest; a guest is destroyed only while its vCPU waits in an
//! exit (the vCPU thread then ends), which is when its server deletes it.

use std::collections::BTreeMap;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use microkernel::abi::guest as kind;
use microkernel::bootinfo::hyper::{self, ExitRecord};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::IOAPIC_PINS;
use crate::vm::{self, create_memory, dump_regs, kvm_err, VmConfig};
use crate::{pvm, regs, VmmError};

/// Guest RAM of the exit-loop guest (its guest server maps this much at 0).
pub const GUEST_RAM: u64 = 1 << 20;
/// Where the exit-loop program starts (guest-physical; the boot page tables, GDT and
/// stack of `regs::setup_boot_cpu` are below).
pub const PAYLOAD_ADDR: u64 = 0x1_0000;

/// The exit-loop guest's ports.
pub mod ports {
    /// `out`: the null exit (nothing to do but resume).
    pub const NULL: u16 = 0x80;
    /// `in`: the monitor answers 1, 2, 3, ...; the guest adds 16 of them up.
    pub const COUNTER: u16 = 0x81;
    /// `out`: the loop starts.
    pub const START: u16 = 0x82;
    /// `out` (4 bytes): low half of the guest TSC cycles the null exits took.
    pub const CYCLES_LO: u16 = 0x84;
    /// `out` (1 byte): the sum of the 16 `COUNTER` reads (136 when every reply arrived).
    pub const SUM: u16 = 0x85;
    /// `out` (4 bytes): high half of the cycles.
    pub const CYCLES_HI: u16 = 0x86;
    /// `out`: the run is over (then `hlt`, which the in-kernel LAPIC keeps to itself).
    pub const DONE: u16 = 0x87;
}

/// The sum of 1..=16: what `ports::SUM` shows when every `in` got its reply.
pub const EXPECTED_SUM: u8 = 136;

/// The exit-loop guest, 64-bit code for `regs::setup_boot_cpu`'s flat long mode:
///
/// ```text
///     out 0x82, al            ; START
///     rdtsc; shl rdx, 32; or rax, rdx; mov rsi, rax
///     mov ecx, N
/// l1: out 0x80, al            ; N null exits
///     dec ecx; jnz l1
///     rdtsc; shl rdx, 32; or rax, rdx; sub rax, rsi
///     out 0x84, eax; shr rax, 32; out 0x86, eax   ; cycles
///     xor ebx, ebx; mov ecx, 16
/// l2: in al, 0x81; add bl, al ; 16 reads
///     dec ecx; jnz l2
///     mov al, bl; out 0x85, al                    ; their sum
///     out 0x87, al                                ; DONE
/// l3: hlt; jmp l3
/// ```
pub fn payload(n: u32) -> Vec<u8> {
    let mut code = vec![
        0xe6, 0x82, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x48, 0x89, 0xc6, 0xb9,
        0, 0, 0, 0, 0xe6, 0x80, 0xff, 0xc9, 0x75, 0xfa, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48,
        0x09, 0xd0, 0x48, 0x29, 0xf0, 0xe7, 0x84, 0x48, 0xc1, 0xe8, 0x20, 0xe7, 0x86, 0x31, 0xdb,
        0xb9, 0x10, 0x00, 0x00, 0x00, 0xe4, 0x81, 0x00, 0xc3, 0xff, 0xc9, 0x75, 0xf8, 0x88, 0xd8,
        0xe6, 0x85, 0xe6, 0x87, 0xf4, 0xeb, 0xfd,
    ];
    // `dec ecx; jnz` from 0 would loop 2^32 times
    code[15..19].copy_from_slice(&n.max(1).to_le_bytes());
    code
}

/// What one run of the exit-loop guest reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopReport {
    /// Null exits seen.
    pub nulls: u64,
    /// Guest TSC cycles of the null-exit loop.
    pub cycles: u64,
    /// What the guest wrote to `ports::SUM`.
    pub sum: u8,
}

impl LoopReport {
    /// Note one `out`; returns whether it was the null exit.
    fn out(&mut self, port: u16, value: u64) {
        match port {
            ports::NULL => self.nulls += 1,
            ports::CYCLES_LO => self.cycles = (self.cycles & !0xffff_ffff) | (value & 0xffff_ffff),
            ports::CYCLES_HI => self.cycles = (self.cycles & 0xffff_ffff) | (value << 32),
            ports::SUM => self.sum = value as u8,
            _ => {}
        }
    }

    /// Cycles per null exit.
    pub fn per_exit(&self) -> f64 {
        self.cycles as f64 / self.nulls.max(1) as f64
    }
}

/// What the vmm loads into a guest before its vCPU first runs.
#[derive(Clone, Debug)]
pub enum Firmware {
    /// The exit-loop guest with this many null exits.
    ExitLoop(u32),
    /// A Linux guest (`--hosted`): kernel, initrd, command line, RAM size, and the
    /// virtio-mmio windows its ACPI tables describe (served by VM0's device tasks).
    Linux(Box<VmConfig>, Vec<crate::acpi::MmioDeviceInfo>),
}

impl Firmware {
    /// Bytes of guest RAM at 0 the guest needs.
    fn ram(&self) -> u64 {
        match self {
            Firmware::ExitLoop(_) => GUEST_RAM,
            Firmware::Linux(cfg, _) => cfg.mem_size,
        }
    }

    /// Write the guest into `mem` and point `vcpu` at it.
    fn load(&self, kvm: &Kvm, vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
        let quirks = pvm::detected();
        let entry = match self {
            Firmware::ExitLoop(n) => {
                mem.write_slice(&payload(*n), GuestAddress(PAYLOAD_ADDR))
                    .map_err(|e| {
                        VmmError::Config(format!("cannot load the exit-loop guest: {e}"))
                    })?;
                GuestAddress(PAYLOAD_ADDR)
            }
            Firmware::Linux(cfg, devices) => vm::load_guest(cfg, mem, devices, quirks)?,
        };
        let (supported, masks) = vm::supported_cpuid(kvm, quirks)?;
        vm::setup_vcpu(kvm, vcpu, (0, 1), &supported, &masks)?;
        regs::setup_boot_cpu(vcpu, mem, entry)?;
        Ok(())
    }

    fn exit_loop(&self) -> bool {
        matches!(self, Firmware::ExitLoop(_))
    }
}

/// The exit-loop guest in a plain KVM VM of its own, its exits answered right here in
/// its vCPU thread: the native column of `--bench-exit`.
pub fn native(n: u32) -> Result<LoopReport, VmmError> {
    let kvm = crate::vm::open_kvm()?;
    let vm = kvm.create_vm().map_err(kvm_err("create the VM"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let mem = create_memory(&vm, GUEST_RAM)?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
    Firmware::ExitLoop(n).load(&kvm, &vcpu, &mem)?;
    let (mut report, mut counter) = (LoopReport::default(), 0u8);
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(ports::DONE, _)) | Ok(VcpuExit::Hlt) => return Ok(report),
            Ok(VcpuExit::IoOut(port, data)) => report.out(port, le(data)),
            Ok(VcpuExit::IoIn(_, data)) => {
                counter = counter.wrapping_add(1);
                data.fill(0);
                data[0] = counter;
            }
            Ok(other) => {
                return Err(VmmError::Kvm(format!(
                    "exit-loop guest: unexpected exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(VmmError::Kvm(format!("exit-loop guest: KVM_RUN: {e}"))),
        }
    }
}

/// A little-endian value of up to 8 bytes (an exit's data).
pub(crate) fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Counters shared with the vCPU threads (`--bench-exit` prints them).
#[derive(Debug, Default)]
pub struct Stats {
    /// Exits forwarded to VM0.
    pub exits: AtomicU64,
    /// `RESUME` hypercalls.
    pub resumes: AtomicU64,
    /// Exits announced again because VM0 had not answered within `REANNOUNCE_MS`.
    pub reannounced: AtomicU64,
    /// What the exit-loop guest reported through its exits.
    pub cycles: AtomicU64,
    pub nulls: AtomicU64,
    pub sum: AtomicU64,
}

/// One guest VM.
struct GuestVm {
    vm: VmFd,
    /// Guest-physical page → (VM0-physical page, `abi::Rights` bits).
    pages: BTreeMap<u64, (u64, u64)>,
    /// Memory slots in use (0..slots).
    slots: u32,
    /// `pages` changed since the slots were made.
    dirty: bool,
    /// The running vCPU: the thread waits on this for each exit's answer.
    resume: Option<mpsc::Sender<u64>>,
    /// Eventfd pairing, per device (`bootinfo::layout::NOTIFY_IRQ_BASE`).
    pairs: Vec<Pair>,
}

/// One device's eventfd pairs between the guest's VM and VM0 (registered on both VMs;
/// the guest's side goes with its VM, VM0's is taken back when the guest goes).
struct Pair {
    /// Guest `QueueNotify` write → VM0 line `line`.
    notify: EventFd,
    line: u32,
    /// VM0 write to `doorbell` → guest pin.
    bell: EventFd,
    doorbell: u64,
}

/// Every guest VM of VM0, indexed by guest task number.
pub struct Guests {
    kvm: Kvm,
    vm0: Arc<VmFd>,
    vm0_mem: GuestMemoryMmap,
    vms: BTreeMap<u64, GuestVm>,
    firmware: Firmware,
    /// Wire the devices' notifications and interrupts through eventfds (`Pair`).
    pairing: bool,
    pub stats: Arc<Stats>,
}

impl Guests {
    pub fn new(
        kvm: Kvm,
        vm0: Arc<VmFd>,
        vm0_mem: GuestMemoryMmap,
        firmware: Firmware,
        pairing: bool,
    ) -> Self {
        Self {
            kvm,
            vm0,
            vm0_mem,
            vms: BTreeMap::new(),
            firmware,
            pairing,
            stats: Arc::default(),
        }
    }

    /// Pair each of the guest's virtio devices with VM0 inside KVM: the guest's
    /// `QueueNotify` writes become an interrupt of VM0 (no exit), and writes to the
    /// device's doorbell page in VM0 an interrupt of the guest.
    fn pair(&self, vm: &VmFd) -> Result<Vec<Pair>, String> {
        let mut pairs = Vec::new();
        let made = self.pair_each(vm, &mut pairs);
        if made.is_err() {
            // VM0's side of what was made; the guest's side goes with its VM
            self.unpair(&pairs);
        }
        made.map(|()| pairs)
    }

    fn pair_each(&self, vm: &VmFd, pairs: &mut Vec<Pair>) -> Result<(), String> {
        use microkernel::bootinfo::layout::{DOORBELL_PHYS, NOTIFY_IRQ_BASE};
        let Firmware::Linux(_, windows) = &self.firmware else {
            return Ok(());
        };
        for (i, w) in windows.iter().enumerate() {
            let e = |what: &str, err: &dyn std::fmt::Display| {
                format!("eventfd pairing, device {i}: {what}: {err}")
            };
            let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(|x| e("eventfd", &x))?;
            let bell = EventFd::new(libc::EFD_NONBLOCK).map_err(|x| e("eventfd", &x))?;
            let (line, doorbell) = (
                u32::from(NOTIFY_IRQ_BASE) + i as u32,
                DOORBELL_PHYS + 4096 * i as u64,
            );
            // in the list before anything is registered: `unpair` takes back what was
            pairs.push(Pair {
                notify,
                line,
                bell,
                doorbell,
            });
            let p = &pairs[pairs.len() - 1];
            // any write to the register, whichever queue it names
            let at = IoEventAddress::Mmio(w.base + crate::layout::VIRTIO_MMIO_NOTIFY_OFFSET);
            vm.register_ioevent(&p.notify, &at, NoDatamatch)
                .map_err(|x| e("guest ioeventfd", &x))?;
            self.vm0
                .register_irqfd(&p.notify, line)
                .map_err(|x| e("VM0 irqfd", &x))?;
            self.vm0
                .register_ioevent(&p.bell, &IoEventAddress::Mmio(doorbell), NoDatamatch)
                .map_err(|x| e("VM0 ioeventfd", &x))?;
            vm.register_irqfd(&p.bell, w.gsi)
                .map_err(|x| e("guest irqfd", &x))?;
        }
        Ok(())
    }

    /// Take VM0's side of a guest's pairs back.
    fn unpair(&self, pairs: &[Pair]) {
        for p in pairs {
            let _ = self.vm0.unregister_irqfd(&p.notify, p.line);
            let _ = self.vm0.unregister_ioevent(
                &p.bell,
                &IoEventAddress::Mmio(p.doorbell),
                NoDatamatch,
            );
        }
    }

    /// Carry out hypercall `op` with `args` (rdi, rsi, r8, r9). Errors are VM0 bugs
    /// or hostile arguments; the vmm reports them and stops VM0.
    pub fn hypercall(&mut self, op: u32, args: [u64; 4]) -> Result<(), String> {
        let [task, a1, a2, a3] = args;
        match op {
            hyper::CREATE => {
                if self.vms.contains_key(&task) {
                    return Err(format!("CREATE: guest {task} exists"));
                }
                let vm = self
                    .kvm
                    .create_vm()
                    .map_err(|e| format!("create a guest VM: {e}"))?;
                // LAPIC, IOAPIC, PIC and PIT in KVM, as for a native guest (HLT and the
                // timers stay in KVM)
                vm::setup_platform(&vm, true).map_err(|e| e.to_string())?;
                let pairs = if self.pairing {
                    self.pair(&vm)?
                } else {
                    Vec::new()
                };
                let g = GuestVm {
                    vm,
                    pages: BTreeMap::new(),
                    slots: 0,
                    dirty: false,
                    resume: None,
                    pairs,
                };
                self.vms.insert(task, g);
                Ok(())
            }
            hyper::DESTROY => {
                // Dropping the sender ends a vCPU thread waiting for its answer.
                let g = self
                    .vms
                    .remove(&task)
                    .ok_or(format!("DESTROY: no guest {task}"))?;
                self.unpair(&g.pairs);
                Ok(())
            }
            hyper::MAP | hyper::PROTECT | hyper::UNMAP => {
                let vm0_pages = self.vm0_mem.last_addr().0 >> 12;
                let g = self
                    .vms
                    .get_mut(&task)
                    .ok_or(format!("op {op}: no guest {task}"))?;
                if a1 >= microkernel::abi::guest::PHYS_END >> 12 {
                    return Err(format!("op {op}: guest page {a1:#x} outside guest RAM"));
                }
                match op {
                    hyper::MAP if a2 > vm0_pages => {
                        return Err(format!("MAP: frame {a2:#x} outside VM0's RAM"))
                    }
                    hyper::MAP => {
                        g.pages.insert(a1, (a2, a3));
                    }
                    hyper::PROTECT => {
                        if let Some(p) = g.pages.get_mut(&a1) {
                            p.1 = a2;
                        }
                    }
                    _ => {
                        g.pages.remove(&a1);
                    }
                }
                g.dirty = true;
                Ok(())
            }
            hyper::RESUME => self.resume(task, a1, a2, a3),
            hyper::INTERRUPT => {
                let g = self
                    .vms
                    .get(&task)
                    .ok_or(format!("INTERRUPT: no guest {task}"))?;
                pulse(g, a1)
            }
            _ => Err(format!("unknown hypercall {op}")),
        }
    }

    fn resume(&mut self, task: u64, vcpu: u64, value: u64, pins: u64) -> Result<(), String> {
        self.stats.resumes.fetch_add(1, Ordering::Relaxed);
        let vm0_mem = self.vm0_mem.clone();
        let g = self
            .vms
            .get_mut(&task)
            .ok_or(format!("RESUME: no guest {task}"))?;
        if g.dirty {
            sync_slots(g, &vm0_mem)?;
        }
        pulse(g, pins)?;
        if let Some(tx) = &g.resume {
            return tx
                .send(value)
                .map_err(|_| "RESUME: the vCPU thread is gone".to_string());
        }
        // First run: the firmware loads the guest into the RAM its server mapped.
        let vcpu_fd =
            g.vm.create_vcpu(0)
                .map_err(|e| format!("create the guest vCPU: {e}"))?;
        let ram = self.firmware.ram();
        let scratch = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram as usize)])
            .map_err(|e| format!("firmware scratch memory: {e}"))?;
        self.firmware
            .load(&self.kvm, &vcpu_fd, &scratch)
            .map_err(|e| e.to_string())?;
        copy_to_guest(g, &vm0_mem, &scratch, ram)?;
        let (tx, rx) = mpsc::channel();
        g.resume = Some(tx);
        let link = Link {
            vm0: self.vm0.clone(),
            vm0_mem,
            vcpu,
            stats: self.stats.clone(),
            exit_loop: self.firmware.exit_loop(),
        };
        thread::Builder::new()
            .name("guest-vcpu0".into())
            .spawn(move || link.run(vcpu_fd, rx))
            .map_err(|e| format!("start the guest vCPU thread: {e}"))?;
        Ok(())
    }
}

/// Edges on the guest's IOAPIC pins in `pins`; KVM injects them when the vCPU runs
/// (and wakes it from `hlt`).
fn pulse(g: &GuestVm, pins: u64) -> Result<(), String> {
    for pin in (0..IOAPIC_PINS).filter(|p| pins & (1 << p) != 0) {
        g.vm.set_irq_line(pin, true)
            .and_then(|_| g.vm.set_irq_line(pin, false))
            .map_err(|e| format!("pulse guest pin {pin}: {e}"))?;
    }
    Ok(())
}

/// Copy the firmware's scratch image into the guest's pages (through VM0's RAM).
fn copy_to_guest(
    g: &GuestVm,
    vm0: &GuestMemoryMmap,
    scratch: &GuestMemoryMmap,
    ram: u64,
) -> Result<(), String> {
    let mut page = [0u8; 4096];
    for gpn in 0..ram >> 12 {
        let (pfn, rights) = *g.pages.get(&gpn).ok_or(format!(
            "guest page {gpn:#x} is not mapped: the guest needs {ram} bytes at 0"
        ))?;
        if rights & 2 == 0 {
            return Err(format!("guest page {gpn:#x} is read-only"));
        }
        scratch
            .read_slice(&mut page, GuestAddress(gpn << 12))
            .map_err(|e| e.to_string())?;
        vm0.write_slice(&page, GuestAddress(pfn << 12))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Make the guest VM's memory slots equal its page table: one slot per run of pages
/// consecutive in both spaces with the same writability.
fn sync_slots(g: &mut GuestVm, vm0: &GuestMemoryMmap) -> Result<(), String> {
    let mut runs: Vec<(u64, u64, u64, bool)> = Vec::new(); // gpn, pfn, pages, writable
    for (&gpn, &(pfn, rights)) in &g.pages {
        let w = rights & 2 != 0;
        match runs.last_mut() {
            Some((g0, p0, n, w0)) if *g0 + *n == gpn && *p0 + *n == pfn && *w0 == w => *n += 1,
            _ => runs.push((gpn, pfn, 1, w)),
        }
    }
    let region = |slot: u32, gpn: u64, pfn: u64, pages: u64, w: bool| -> Result<_, String> {
        let host = vm0
            .get_host_address(GuestAddress(pfn << 12))
            .map_err(|e| format!("frame {pfn:#x}: {e}"))?;
        // the whole run must lie in VM0's RAM too
        vm0.get_host_address(GuestAddress(((pfn + pages) << 12) - 1))
            .map_err(|e| format!("frame {:#x}: {e}", pfn + pages - 1))?;
        Ok(kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpn << 12,
            memory_size: pages << 12,
            userspace_addr: host as u64,
            flags: if w { 0 } else { KVM_MEM_READONLY },
        })
    };
    for slot in 0..g.slots {
        let gone = kvm_userspace_memory_region {
            slot,
            ..Default::default()
        };
        // SAFETY: deleting a slot (size 0) hands no memory to KVM.
        unsafe { g.vm.set_user_memory_region(gone) }.map_err(|e| format!("delete slot: {e}"))?;
    }
    g.slots = 0;
    for (i, &(gpn, pfn, pages, w)) in runs.iter().enumerate() {
        let r = region(i as u32, gpn, pfn, pages, w)?;
        // SAFETY: the range lies inside VM0's RAM mapping (both ends checked above),
        // which lives as long as the vmm (run.rs keeps it); KVM may read and write it.
        unsafe { g.vm.set_user_memory_region(r) }.map_err(|e| format!("add a slot: {e}"))?;
        g.slots = i as u32 + 1;
    }
    g.dirty = false;
    Ok(())
}

/// What a guest vCPU thread needs to hand its exits to VM0.
struct Link {
    vm0: Arc<VmFd>,
    vm0_mem: GuestMemoryMmap,
    vcpu: u64,
    stats: Arc<Stats>,
    /// The exit-loop guest: its ports report to `stats`.
    exit_loop: bool,
}

impl Link {
    fn run(self, mut vcpu: VcpuFd, resume: mpsc::Receiver<u64>) {
        let mut report = LoopReport::default();
        loop {
            let (exit, value_out) = match vcpu.run() {
                Ok(VcpuExit::IoIn(port, data)) => (
                    self.rec(kind::IO_IN, data.len(), port.into(), 0),
                    Some(data),
                ),
                Ok(VcpuExit::IoOut(port, data)) => {
                    if self.exit_loop {
                        report.out(port, le(data));
                    }
                    (
                        self.rec(kind::IO_OUT, data.len(), port.into(), le(data)),
                        None,
                    )
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    (self.rec(kind::MMIO_READ, data.len(), addr, 0), Some(data))
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    (self.rec(kind::MMIO_WRITE, data.len(), addr, le(data)), None)
                }
                Ok(VcpuExit::Hlt) => (self.rec(kind::HALT, 0, 0, 0), None),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                other => {
                    let why = match other {
                        Ok(exit) => format!("{exit:?}"),
                        Err(e) => format!("KVM_RUN failed: {e}"),
                    };
                    eprintln!(
                        "vmm: the hosted guest's vCPU stopped: {why}\n{}",
                        dump_regs(&vcpu)
                    );
                    (self.rec(kind::SHUTDOWN, 0, 0, 0), None)
                }
            };
            let shutdown = exit.kind == kind::SHUTDOWN;
            if self.exit_loop && exit.kind == kind::IO_OUT && exit.addr == u64::from(ports::DONE) {
                self.publish(&report);
            }
            let Some(value) = self.exit(exit, &resume) else {
                return;
            };
            if let Some(data) = value_out {
                let n = data.len().min(8);
                data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
            }
            if shutdown {
                // Its server answered; there is nothing to resume.
                return;
            }
        }
    }

    fn rec(&self, kind: u64, size: usize, addr: u64, data: u64) -> ExitRecord {
        ExitRecord {
            seq: 0,
            vcpu: self.vcpu,
            kind,
            size: size as u64,
            addr,
            data,
        }
    }

    fn publish(&self, r: &LoopReport) {
        self.stats.nulls.store(r.nulls, Ordering::Relaxed);
        self.stats.cycles.store(r.cycles, Ordering::Relaxed);
        self.stats.sum.store(r.sum.into(), Ordering::Relaxed);
    }

    /// Hand `exit` to VM0 and wait for the answer (None: the guest was destroyed).
    fn exit(&self, mut exit: ExitRecord, resume: &mpsc::Receiver<u64>) -> Option<u64> {
        exit.seq = self.stats.exits.fetch_add(1, Ordering::Relaxed) + 1;
        // a sequence lock (`hyper`): `seq` 0 while the words change, the new `seq` last
        let words = exit.to_words();
        let seq_at = GuestAddress(hyper::EXIT_RECORD + 8 * (hyper::ExitRecord::WORDS as u64 - 1));
        self.vm0_mem.write_obj(0u64, seq_at).ok()?;
        fence(Ordering::SeqCst);
        for (i, w) in words.iter().enumerate() {
            let at = GuestAddress(hyper::EXIT_RECORD + 8 * i as u64);
            self.vm0_mem.write_obj(*w, at).ok()?;
        }
        let line = u32::from(hyper::EXIT_LINE);
        let announce = || {
            self.vm0.set_irq_line(line, true).ok()?;
            self.vm0.set_irq_line(line, false).ok()
        };
        announce()?;
        // VM0 answers in microseconds to milliseconds. Announce again if it does not
        // (the kernel takes each `seq` once), and say so every 30 s.
        // After `DUMP_AFTER_MS` ask the kernel, once, to print what its threads wait for.
        let every = std::time::Duration::from_millis(hyper::REANNOUNCE_MS);
        let mut waited = std::time::Duration::ZERO;
        let mut dumped = false;
        loop {
            match resume.recv_timeout(every) {
                Ok(v) => return Some(v),
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.stats.reannounced.fetch_add(1, Ordering::Relaxed);
                    announce()?;
                    waited += every;
                    if !dumped && waited.as_millis() >= u128::from(hyper::DUMP_AFTER_MS) {
                        dumped = true;
                        eprintln!(
                            "vmm: the hosted guest's exit {exit:?} has waited {waited:?} for \
                             VM0; the kernel's threads (mk: lines):"
                        );
                        // a diagnostic: if the pulse fails, the exit still waits
                        let dump = u32::from(hyper::DUMP_LINE);
                        let _ = self.vm0.set_irq_line(dump, true);
                        let _ = self.vm0.set_irq_line(dump, false);
                    }
                    if waited.as_millis() % 30_000 < every.as_millis() {
                        eprintln!(
                            "vmm: the hosted guest's exit {exit:?} has waited {waited:?} for VM0"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_patches_the_iteration_count() {
        let p = payload(0x1122_3344);
        assert_eq!(
            &p[14..19],
            &[0xb9, 0x44, 0x33, 0x22, 0x11],
            "mov ecx, imm32"
        );
        assert_eq!(
            &payload(0)[15..19],
            &1u32.to_le_bytes(),
            "never zero iterations"
        );
        assert_eq!(p.len(), 69);
    }

    #[test]
    fn report_assembles_cycles_from_two_halves() {
        let mut r = LoopReport::default();
        r.out(ports::CYCLES_LO, 0x9999_0000_1234_5678);
        r.out(ports::CYCLES_HI, 0x2);
        r.out(ports::NULL, 0);
        r.out(ports::NULL, 0);
        r.out(ports::SUM, 0x188);
        assert_eq!((r.cycles, r.nulls, r.sum), (0x2_1234_5678, 2, 0x88));
        assert_eq!(r.per_exit(), 0x2_1234_5678u64 as f64 / 2.0);
    }
}
