//! Building and running a native guest: KVM VM, memory, devices, boot state, vCPUs.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use devices::platform::{AcpiPm, ExitPort, I8042Reset, PvPanic};
use devices::serial::SerialConsole;
use devices::GuestEvent;

use crate::bus::PioBus;
use crate::console::{self, Console, PanicWatch, TerminalGuard};
use crate::irq::IrqTrigger;
use crate::layout::{self, *};
use crate::seccomp::{Sandbox, ThreadKind};
use crate::virtio::{self, DeviceConfig, MmioBus};
use crate::{acpi, boot, cpuid, pvm, regs, VmmError};

/// Everything `vmm --kernel` needs to start a guest.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_size: u64,
    pub cpus: u8,
    pub devices: DeviceConfig,
    /// Install the per-thread seccomp filters (`crate::seccomp`); off with `--no-seccomp`.
    pub seccomp: bool,
}

/// How a guest's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Power-off or reset; the status the guest passed out (0 if none).
    Stopped { reset: bool, status: u8 },
    /// The guest kernel panicked (pvpanic).
    Panicked,
    /// The guest can not continue: triple fault, internal error, failed entry.
    Crashed {
        vcpu: u8,
        reason: String,
        regs: String,
    },
    /// The user pressed Ctrl-a x.
    UserQuit,
}

/// State shared by the vCPU threads, the console and the main thread.
#[derive(Default)]
pub struct VmState {
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
    exit_status: AtomicU8,
    panic_seen: AtomicBool,
}

impl VmState {
    /// The console saw Linux's panic banner.
    pub fn saw_panic_banner(&self) {
        self.panic_seen.store(true, Ordering::SeqCst);
    }

    pub fn panic_seen(&self) -> bool {
        self.panic_seen.load(Ordering::SeqCst)
    }

    /// Record how the run ended; the first outcome wins.
    pub fn finish(&self, outcome: Outcome) {
        let mut o = self.outcome.lock().unwrap();
        if o.is_none() {
            *o = Some(outcome);
            self.done.notify_all();
        }
    }

    fn wait(&self) -> Outcome {
        let mut o = self.outcome.lock().unwrap();
        loop {
            if let Some(outcome) = o.clone() {
                return outcome;
            }
            o = self.done.wait(o).unwrap();
        }
    }

    fn guest_event(&self, ev: GuestEvent) {
        let status = || self.exit_status.load(Ordering::SeqCst);
        match ev {
            GuestEvent::ExitStatus(s) => self.exit_status.store(s, Ordering::SeqCst),
            GuestEvent::PowerOff => self.finish(Outcome::Stopped {
                reset: false,
                status: status(),
            }),
            // With panic=-1 a panicking kernel resets at once: that is a crash, not a reboot.
            GuestEvent::Reset if self.panic_seen() => self.finish(Outcome::Panicked),
            GuestEvent::Reset => self.finish(Outcome::Stopped {
                reset: true,
                status: status(),
            }),
            GuestEvent::Panic => self.finish(Outcome::Panicked),
        }
    }

    fn has_finished(&self) -> bool {
        self.outcome.lock().unwrap().is_some()
    }
}

/// Open /dev/kvm with an error that says how to fix it.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(|e| {
        let hint = match e.errno() {
            libc::ENOENT => "KVM is not available on this machine: load the kvm_intel or kvm_amd module, \
                             or run the vmm inside the KVM test host (tests/kvm-host/run -- vmm ...)",
            libc::EACCES | libc::EPERM => "permission denied: add your user to the 'kvm' group \
                                           (usermod -aG kvm $USER) or run as root",
            _ => "is KVM enabled in the BIOS and the kernel?",
        };
        VmmError::Kvm(format!("cannot open /dev/kvm: {}; {hint}", io::Error::from_raw_os_error(e.errno())))
    })
}

/// Largest vCPU count this host's KVM accepts (APIC ids must also fit the xAPIC's 8 bits).
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_max_vcpus().min(254)
}

/// Boot the guest and run it to the end. Returns how it ended.
pub fn run(cfg: &VmConfig) -> Result<Outcome, VmmError> {
    // Open disks, taps and sockets first: their errors are the user's to fix.
    let prepared = virtio::prepare(&cfg.devices)?;
    let outcome = run_prepared(cfg, prepared);
    remove_vsock_socket(cfg);
    outcome
}

/// After a run (native or hosted): the vsock listening socket is ours, and a stale one
/// would make the next run fail.
pub(crate) fn remove_vsock_socket(cfg: &VmConfig) {
    if let Some(v) = &cfg.devices.vsock {
        let _ = std::fs::remove_file(&v.socket);
    }
}

fn run_prepared(cfg: &VmConfig, prepared: virtio::Prepared) -> Result<Outcome, VmmError> {
    let kvm = open_kvm()?;
    let max = max_vcpus(&kvm);
    if usize::from(cfg.cpus) > max {
        return Err(VmmError::Config(format!(
            "--cpus {}: this host's KVM allows at most {max} vCPUs",
            cfg.cpus
        )));
    }
    let quirks = pvm::detected();
    if quirks {
        eprintln!(
            "vmm: kvm-pvm host detected (/sys/module/kvm_pvm): quirks active: kernel parameters '{}', \
             CPUID hides XSAVE/SMAP/SMEP/POPCNT/CX16, INT3/CLAC/STAC/FNCLEX/FWAIT completed in the vmm",
            pvm::KERNEL_PARAMS
        );
    }

    let vm = kvm.create_vm().map_err(kvm_err("create the VM"))?;
    let mem = create_memory(&vm, cfg.mem_size)?;
    setup_platform(&vm, true)?;

    // Every thread — vCPUs, the event loop (if any device), stdin, main — installs its
    // filter and waits for the others before it touches the guest.
    let threads = usize::from(cfg.cpus) + usize::from(!prepared.is_empty()) + 2;
    let sandbox = Arc::new(Sandbox::new(cfg.seccomp, threads)?);
    let (mmio, virtio_devices) = virtio::attach(&vm, &mem, prepared, &sandbox)?;
    let entry = load_guest(cfg, &mem, &virtio_devices, quirks)?;

    // Devices.
    let state = Arc::new(VmState::default());
    let com1_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Io)?;
    vm.register_irqfd(&com1_evt, COM1_IRQ)
        .map_err(kvm_err("register the COM1 irqfd"))?;
    let console: Console = Arc::new(Mutex::new(SerialConsole::new(
        IrqTrigger(Arc::new(com1_evt)),
        PanicWatch::new(io::stdout(), state.clone()),
    )));
    let mut bus = PioBus::default();
    bus.insert(COM1_PORT, 8, console.clone());
    bus.insert(I8042_CMD_PORT, 1, Arc::new(Mutex::new(I8042Reset)));
    bus.insert(EXIT_PORT, 1, Arc::new(Mutex::new(ExitPort)));
    bus.insert(PVPANIC_PORT, 1, Arc::new(Mutex::new(PvPanic)));
    bus.insert(ACPI_PM_PORT, 1, Arc::new(Mutex::new(AcpiPm)));
    let bus = Arc::new(bus);
    let mmio = Arc::new(mmio);

    // vCPUs.
    let (supported, masks) = supported_cpuid(&kvm, quirks)?;
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create a vCPU"))?;
        setup_vcpu(&kvm, &vcpu, (id, cfg.cpus), &supported, &masks)?;
        if id == 0 {
            regs::setup_boot_cpu(&vcpu, &mem, entry)?;
        }
        vcpus.push(vcpu);
    }

    let terminal = TerminalGuard::raw_if_terminal();
    console::spawn_stdin_reader(
        console,
        state.clone(),
        terminal.interactive(),
        sandbox.clone(),
    )
    .map_err(VmmError::Io)?;
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (state, bus, mmio, mem) = (state.clone(), bus.clone(), mmio.clone(), mem.clone());
        let sandbox = sandbox.clone();
        thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if sandbox.enter(ThreadKind::Vcpu) {
                    run_vcpu(id as u8, vcpu, &bus, &mmio, &mem, &state, quirks)
                }
            })
            .map_err(VmmError::Io)?;
    }
    // All threads exist: the main thread's own filter, then the vCPUs may start.
    if !sandbox.enter(ThreadKind::Main) {
        drop(terminal);
        std::mem::forget(vm);
        return Err(VmmError::Config(sandbox.error().unwrap_or_default()));
    }
    let outcome = state.wait();
    drop(terminal);
    // The VM, its memory and the vCPU threads end with the process.
    std::mem::forget(vm);
    Ok(outcome)
}

/// What KVM supports and the CPUID masks of this host (kvm-pvm's, if `quirks`): the
/// inputs of `cpuid::vcpu_cpuid`.
pub fn supported_cpuid(
    kvm: &Kvm,
    quirks: bool,
) -> Result<(kvm_bindings::CpuId, Vec<cpuid::CpuidMask>), VmmError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read supported CPUID"))?;
    let masks = if quirks {
        pvm::cpuid_masks()
    } else {
        Vec::new()
    };
    Ok((supported, masks))
}

/// A VM's platform in KVM: TSS and identity-map pages, LAPIC + IOAPIC + PIC, and with
/// `pit` the PIT (a native and a hosted guest get it; VM0 has no PIT).
pub fn setup_platform(vm: &VmFd, pit: bool) -> Result<(), VmmError> {
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("set the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("set the identity map address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    if pit {
        let config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(config)
            .map_err(kvm_err("create the in-kernel PIT"))?;
    }
    Ok(())
}

/// Load the kernel, initrd, ACPI tables, command line and boot parameters into `mem`
/// (`cfg.mem_size` bytes at 0): the firmware's work. Returns the kernel entry.
pub fn load_guest(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    virtio_devices: &[acpi::MmioDeviceInfo],
    quirks: bool,
) -> Result<GuestAddress, VmmError> {
    let kernel = boot::load_kernel(mem, cfg.mem_size, &cfg.kernel)?;
    let initrd = cfg
        .initrd
        .as_ref()
        .map(|p| boot::load_initrd(mem, cfg.mem_size, &kernel, p))
        .transpose()?;
    let rsdp = acpi::write_tables(mem, cfg.cpus, virtio_devices)?;
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
    let (kernel_args, init_args) = split_init_args(&cfg.cmdline);
    cmdline.insert_str(kernel_args)?;
    if quirks {
        cmdline.insert_str(pvm::KERNEL_PARAMS)?;
    }
    if kernel_args.split(' ').any(|w| w == "acpi=off") {
        // No DSDT to find the devices in: name them on the command line
        // (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
        for (i, d) in virtio_devices.iter().enumerate() {
            cmdline.add_virtio_mmio_device(d.len, GuestAddress(d.base), d.gsi, Some(i as u32))?;
        }
    }
    if let Some(init) = init_args {
        cmdline.insert_init_args(init)?;
    }
    boot::write_boot_params(mem, cfg.mem_size, &kernel, initrd.as_ref(), &cmdline, rsdp)?;
    Ok(kernel.entry)
}

/// CPUID, TSC rate and the common registers of vCPU `id` of `cpus`.
pub fn setup_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    (id, cpus): (u8, u8),
    supported: &kvm_bindings::CpuId,
    masks: &[cpuid::CpuidMask],
) -> Result<(), VmmError> {
    let tsc_khz = if kvm.check_extension(Cap::GetTscKhz) {
        vcpu.get_tsc_khz().ok()
    } else {
        None
    };
    if let (Some(khz), true) = (tsc_khz, kvm.check_extension(Cap::TscControl)) {
        // Pin the guest TSC to the host's rate so the guest can trust it.
        let _ = vcpu.set_tsc_khz(khz);
    }
    let cpuid = cpuid::vcpu_cpuid(supported, id, cpus, tsc_khz, masks);
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    regs::setup_common(vcpu)?;
    Ok(())
}

/// Split `kernel args -- init args` at the first standalone `--`.
fn split_init_args(cmdline: &str) -> (&str, Option<&str>) {
    let mut offset = 0;
    for word in cmdline.split(' ') {
        if word == "--" {
            let init = cmdline[offset + 2..].trim();
            return (
                cmdline[..offset].trim_end(),
                (!init.is_empty()).then_some(init),
            );
        }
        offset += word.len() + 1;
    }
    (cmdline, None)
}

/// Linux hands at most this many words after `--` to init, and panics ("Too many boot
/// init vars") beyond it (`CONFIG_INIT_ENV_ARG_LIMIT` = 32 slots, one for init itself).
pub const MAX_INIT_WORDS: usize = 31;

/// Count command-line words as Linux's `next_arg` splits them: on spaces, except inside
/// double quotes.
pub fn linux_words(s: &str) -> usize {
    let (mut words, mut in_word, mut in_quote) = (0, false, false);
    for c in s.chars() {
        if c == '"' {
            in_quote = !in_quote;
        }
        if c.is_ascii_whitespace() && !in_quote {
            in_word = false;
        } else if !in_word {
            in_word = true;
            words += 1;
        }
    }
    words
}

/// Check what Linux would refuse late, with a panic, about a command line.
pub fn check_cmdline(cmdline: &str) -> Result<(), VmmError> {
    if let (_, Some(init)) = split_init_args(cmdline) {
        let n = linux_words(init);
        if n > MAX_INIT_WORDS {
            return Err(VmmError::Config(format!(
                "--cmdline passes {n} words after `--` to init, but Linux accepts at most \
                 {MAX_INIT_WORDS} (it panics beyond that); quote the command as one word: -- \"...\""
            )));
        }
    }
    Ok(())
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(format!("cannot {what}: {e}"))
}

/// Guest RAM, mapped into the VM as one memory slot per region.
pub(crate) fn create_memory(vm: &VmFd, mem_size: u64) -> Result<GuestMemoryMmap, VmmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_size)
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| {
        VmmError::Config(format!(
            "cannot allocate {} MiB of guest memory: {e}",
            mem_size >> 20
        ))
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(VmmError::Memory)?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`,
        // which the vCPU threads keep alive (they hold clones) for as long as the VM runs.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("add guest memory to the VM"))?;
    }
    Ok(mem)
}

/// One vCPU's loop: run the guest, dispatch exits, stop when the VM's run has ended.
fn run_vcpu(
    id: u8,
    mut vcpu: VcpuFd,
    bus: &PioBus,
    mmio: &MmioBus,
    mem: &GuestMemoryMmap,
    state: &VmState,
    quirks: bool,
) {
    loop {
        let crash = |reason: String, vcpu: &VcpuFd| Outcome::Crashed {
            vcpu: id,
            reason,
            regs: dump_regs(vcpu),
        };
        let outcome = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.read(port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if let Some(ev) = bus.write(port, data) {
                    state.guest_event(ev);
                }
                None
            }
            // Unassigned MMIO reads as all ones; writes to it are dropped.
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Shutdown) => Some(crash("triple fault (KVM_EXIT_SHUTDOWN)".into(), &vcpu)),
            Ok(VcpuExit::Hlt) => Some(crash(
                "vCPU halted with interrupts off (KVM_EXIT_HLT)".into(),
                &vcpu,
            )),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    state.guest_event(GuestEvent::PowerOff);
                    None
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    state.guest_event(GuestEvent::Reset);
                    None
                }
                other => Some(crash(format!("system event {other}"), &vcpu)),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(crash(
                format!("KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on cpu {cpu}"),
                &vcpu,
            )),
            Ok(VcpuExit::InternalError) => pvm::on_internal_error(&mut vcpu, mem, quirks)
                .err()
                .map(|reason| crash(reason, &vcpu)),
            Ok(other) => Some(crash(format!("unexpected exit {other:?}"), &vcpu)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(crash(format!("KVM_RUN failed: {e}"), &vcpu)),
        };
        if let Some(o) = outcome {
            state.finish(o);
            return;
        }
        if state.has_finished() {
            return;
        }
    }
}

/// The vCPU's registers on two lines, for crash reports.
pub(crate) fn dump_regs(vcpu: &VcpuFd) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "registers unavailable".into();
    };
    format!(
        "rip={:#018x} rsp={:#018x} rflags={:#010x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}\n\
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} cpl={}",
        r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
        s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.dpl
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_args_after_double_dash() {
        assert_eq!(split_init_args("console=ttyS0"), ("console=ttyS0", None));
        assert_eq!(
            split_init_args("console=ttyS0 -- echo hi; exit 3"),
            ("console=ttyS0", Some("echo hi; exit 3"))
        );
        assert_eq!(split_init_args("-- true"), ("", Some("true")));
        assert_eq!(split_init_args("a --"), ("a", None));
        assert_eq!(split_init_args("a --b=c"), ("a --b=c", None));
    }

    #[test]
    fn words_are_counted_like_linux() {
        assert_eq!(linux_words(""), 0);
        assert_eq!(linux_words("  a  b c "), 3);
        assert_eq!(linux_words("\"echo a; echo b\" x"), 2);
        assert!(check_cmdline(&format!("console=ttyS0 -- {}", "w ".repeat(31))).is_ok());
        assert!(check_cmdline(&format!("console=ttyS0 -- {}", "w ".repeat(32))).is_err());
        assert!(check_cmdline(&format!("console=ttyS0 -- \"{}\"", "w ".repeat(100))).is_ok());
    }

    #[test]
    fn first_outcome_wins_and_status_is_kept() {
        let s = VmState::default();
        s.guest_event(GuestEvent::ExitStatus(42));
        s.guest_event(GuestEvent::PowerOff);
        s.guest_event(GuestEvent::Panic);
        assert_eq!(
            s.wait(),
            Outcome::Stopped {
                reset: false,
                status: 42
            }
        );
    }

    #[test]
    fn reset_after_panic_banner_is_a_panic() {
        let s = VmState::default();
        s.saw_panic_banner();
        s.guest_event(GuestEvent::Reset);
        assert_eq!(s.wait(), Outcome::Panicked);
    }
}
