//! Running VM0: one vCPU in 64-bit mode at the kernel's entry, an in-kernel irqchip
//! (LAPIC timer, IOAPIC), and the VM0 ports served in the vCPU loop, including the
//! hypercalls that make and run guest VMs (`guest`).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_ioctls::{Cap, VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::bench::StepCounter;
use super::guest::{self, Firmware, Guests};
use super::{boot, Mode, VM0_MEMORY};
use crate::layout::*;
use crate::vm::{create_memory, dump_regs, kvm_err, open_kvm, Outcome, VmConfig};
use crate::{cpuid, pvm, regs, VmmError};
use microkernel::bootinfo::hyper;

/// Boot the microkernel in VM0 and run it until it exits.
pub fn run(mode: Mode) -> Result<Outcome, VmmError> {
    let iterations = match mode {
        Mode::BenchExit(n) => n,
        _ => SELFTEST_EXITS,
    };
    boot_vm0(mode, Firmware::ExitLoop(iterations), VM0_MEMORY, None)
}

/// Hosted mode: VM0 with a guest server that runs `cfg`'s Linux guest in a VM of its
/// own, its RAM a region of VM0's.
///
/// The guest's virtio devices are VM0's first: the vmm serves each as a virtio-mmio
/// device of VM0 (the same code as native mode, with its backend: a file, a tap, the
/// host's entropy), and a device task in VM0 drives it as the backend of the guest's device
/// with the same window and interrupt line in the guest VM.
///
/// `faults` (test only, `--test-device-faults`): the guest may make a device task crash
/// through a register of its device's window, to test that VM0 restarts it. `pairing`:
/// wire queue notifications and device interrupts through eventfds inside KVM
/// (`bootinfo::layout::NOTIFY_IRQ_BASE`); without it they are exits through the vmm.
pub fn run_hosted(cfg: &VmConfig, faults: bool, pairing: bool) -> Result<Outcome, VmmError> {
    let prepared = crate::virtio::prepare(&cfg.devices)?;
    check_mappings(cfg.mem_size, prepared.len() as u64)?;
    let mode = Mode::Hosted {
        mib: cfg.mem_size >> 20,
        devices: prepared.len() as u64,
        faults,
        pairing,
        seccomp: cfg.seccomp,
    };
    // the device windows are filled in once VM0's devices are attached
    let firmware = Firmware::Linux(Box::new(cfg.clone()), Vec::new());
    let outcome = boot_vm0(mode, firmware, VM0_MEMORY + cfg.mem_size, Some(prepared));
    crate::vm::remove_vsock_socket(cfg);
    outcome
}

/// Refuse a hosted guest the microkernel cannot map: every page of its RAM is mapped by
/// the root, the guest server, each device task and the guest itself, once more while a
/// faulted device task is being replaced (old and new task both map it), and the root
/// owns every page of VM0's RAM besides.
fn check_mappings(mem: u64, devices: u64) -> Result<(), VmmError> {
    let most = microkernel::bootinfo::layout::MAX_DEVICES;
    if devices > most {
        return Err(VmmError::Config(format!(
            "{devices} virtio devices with --hosted: at most {most} (disks, network interfaces and the rng; --no-rng frees one)"
        )));
    }
    let pages = mem >> 12;
    let need = pages * (4 + devices) + ((VM0_MEMORY + mem) >> 12);
    let limit = microkernel::bootinfo::MAPPINGS;
    if need > limit {
        let fits = ((limit - (VM0_MEMORY >> 12)) / (5 + devices)) >> 8;
        return Err(VmmError::Config(format!(
            "--memory {} MiB with {devices} virtio devices is too big for --hosted: the microkernel maps \
             each guest page once per device task (and one being restarted) besides the root, \
             guest server and guest \
             ({need} mappings of {limit}); at most {fits} MiB with {devices} devices",
            mem >> 20
        )));
    }
    Ok(())
}

fn boot_vm0(
    mode: Mode,
    mut firmware: Firmware,
    vm0_memory: u64,
    devices: Option<crate::virtio::Prepared>,
) -> Result<Outcome, VmmError> {
    let native = match mode {
        Mode::BenchExit(n) => Some(guest::native(n)?),
        _ => None,
    };
    let kvm = open_kvm()?;
    let quirks = pvm::detected();
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create the VM"))?);
    let mem = create_memory(&vm, vm0_memory)?;
    crate::vm::setup_platform(&vm, false)?;
    // VM0's virtio devices (hosted mode): the native event loop — the thread that
    // touches the host's files, taps and sockets with what the guest sends — under its
    // native seccomp filter (unless --no-seccomp). It enters the sandbox alone; the
    // vCPU threads have no filters yet.
    let (bus, ndevices) = match devices {
        Some(p) if !p.is_empty() => {
            let filter = matches!(mode, Mode::Hosted { seccomp: true, .. });
            let sandbox = Arc::new(crate::seccomp::Sandbox::new(filter, 1)?);
            let (bus, infos) = crate::virtio::attach(&vm, &mem, p, &sandbox)?;
            let n = infos.len() as u64;
            // the guest sees each device where VM0 does: same window, same pin
            if let Firmware::Linux(_, windows) = &mut firmware {
                *windows = infos;
            }
            (bus, n)
        }
        _ => Default::default(),
    };
    // kvm-pvm does not enter ring 0 on SYSCALL for a guest that is not PVM-aware:
    // tasks use the software-interrupt entry there.
    let mut flags = if quirks {
        microkernel::bootinfo::flags::INT_SYSCALL
    } else {
        0
    };
    let mut pairing = false;
    if let Mode::Hosted {
        faults, pairing: p, ..
    } = mode
    {
        if faults {
            flags |= microkernel::bootinfo::flags::DEVICE_FAULTS;
        }
        if p && ndevices > 0 {
            flags |= microkernel::bootinfo::flags::EVENTFD_PAIRING;
            pairing = true;
        }
    }
    let entry = boot::load(&mem, vm0_memory, mode.raw(), flags, ndevices)?;

    let (supported, masks) = crate::vm::supported_cpuid(&kvm, quirks)?;
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
    let tsc_khz = kvm
        .check_extension(Cap::GetTscKhz)
        .then(|| vcpu.get_tsc_khz().ok())
        .flatten();
    let cpuid = cpuid::vcpu_cpuid(&supported, 0, 1, tsc_khz, &masks);
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
    regs::setup_common(&vcpu)?;
    regs::setup_boot_cpu(&vcpu, &mem, GuestAddress(entry))?;
    if mode == Mode::BenchIpc {
        match tsc_khz {
            Some(khz) => println!(
                "bench: TSC {} MHz{}",
                khz / 1000,
                if quirks { " (kvm-pvm host)" } else { "" }
            ),
            None => println!("bench: TSC rate unknown"),
        }
    }
    let guests = Guests::new(open_kvm()?, vm.clone(), mem.clone(), firmware, pairing);
    let stats = guests.stats.clone();
    let (outcome, vm0_exits) = vcpu_loop(&vm, vcpu, &mem, quirks, guests, &bus);
    if let Some(native) = native {
        report_exits(native, &stats, vm0_exits);
    }
    if let Mode::Hosted { .. } = mode {
        // what passed through the vmm's user space (eventfd pairing keeps the queue
        // notifications and device interrupts out of it)
        println!(
            "hosted guest: {} exits through the vmm to VM0, {} VM0 exits to the vmm",
            stats.exits.load(Ordering::Relaxed),
            vm0_exits
        );
    }
    let again = stats.reannounced.load(Ordering::Relaxed);
    if again > 0 {
        eprintln!(
            "vmm: note: {again} guest exit announcements repeated after {} ms without an \
             answer from VM0 (of {} exits)",
            hyper::REANNOUNCE_MS,
            stats.exits.load(Ordering::Relaxed)
        );
    }
    // The guest vCPU threads may still hold the VMs: the process exit tears them down.
    std::mem::forget(vm);
    Ok(outcome)
}

/// Null exits of the exit-loop guest in the selftest's hosted test.
const SELFTEST_EXITS: u32 = 200;

/// `--bench-exit`: the exit-loop guest natively and hosted, side by side.
fn report_exits(native: guest::LoopReport, stats: &guest::Stats, vm0_exits: u64) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let hosted = guest::LoopReport {
        nulls: load(&stats.nulls),
        cycles: load(&stats.cycles),
        sum: load(&stats.sum) as u8,
    };
    let exits = load(&stats.exits).max(1);
    println!(
        "bench-exit: null exit round trip, guest TSC cycles: native {:.0}, hosted {:.0} \
         (hosted/native {:.1}) over {} and {} exits",
        native.per_exit(),
        hosted.per_exit(),
        hosted.per_exit() / native.per_exit().max(1.0),
        native.nulls,
        hosted.nulls
    );
    println!(
        "bench-exit: per hosted exit: {:.2} VM0 exits to the vmm, {:.2} RESUME hypercalls, \
         1 interrupt into VM0, 2 IPCs (exit, reply), 2 host thread switches \
         ({} exits forwarded)",
        vm0_exits as f64 / exits as f64,
        load(&stats.resumes) as f64 / exits as f64,
        exits
    );
    if native.sum != guest::EXPECTED_SUM || hosted.sum != guest::EXPECTED_SUM {
        println!(
            "bench-exit: WRONG in values: sums native {} hosted {} (want {})",
            native.sum,
            hosted.sum,
            guest::EXPECTED_SUM
        );
    }
}

/// VM0's end: `status` and, from a two-byte write, how a hosted guest ended
/// (`mkrt::port::ENDED*`).
fn ended(status: u8, how: u8) -> Outcome {
    let crashed = |reason: &str| Outcome::Crashed {
        vcpu: 0,
        reason: reason.into(),
        regs: String::new(),
    };
    match how {
        0 => Outcome::Stopped {
            reset: false,
            status,
        },
        1 => Outcome::Panicked,
        2 => crashed("the hosted guest's vCPU stopped (its exit and registers are above)"),
        _ => crashed("the guest server could not start the hosted guest (see above)"),
    }
}

/// Run VM0's vCPU until VM0 ends; also returns how many exits reached this loop.
fn vcpu_loop(
    vm: &kvm_ioctls::VmFd,
    mut vcpu: VcpuFd,
    mem: &GuestMemoryMmap,
    quirks: bool,
    mut guests: Guests,
    bus: &crate::virtio::MmioBus,
) -> (Outcome, u64) {
    let mut exits = 0u64;
    let mut out = std::io::stdout().lock();
    let mut steps = StepCounter::new(quirks);
    let crash = |reason: String, vcpu: &VcpuFd| Outcome::Crashed {
        vcpu: 0,
        reason,
        regs: dump_regs(vcpu),
    };
    let mut recent = Recent::default();
    loop {
        let exit = vcpu.run();
        exits += 1;
        recent.note(&exit);
        let outcome = match exit {
            Ok(VcpuExit::IoOut(hyper::PORT, data)) => {
                let op = guest::le(data) as u32;
                match vcpu.get_regs() {
                    Ok(r) => guests
                        .hypercall(op, [r.rdi, r.rsi, r.r8, r.r9])
                        .err()
                        .map(|e| crash(format!("hypercall {op}: {e}"), &vcpu)),
                    Err(e) => Some(crash(format!("read VM0 registers: {e}"), &vcpu)),
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let (port, value) = (port, data.first().copied().unwrap_or(0));
                match port {
                    COM1_PORT => {
                        let _ = out.write_all(&[value]);
                        if value == b'\n' {
                            let _ = out.flush();
                        }
                        None
                    }
                    MK_EXIT_PORT => Some(ended(value, data.get(1).copied().unwrap_or(0))),
                    // the dump and exit lines (and above) are the vmm's alone: a task must
                    // not forge exits
                    MK_RAISE_IRQ_PORT if u16::from(value) >= hyper::DUMP_LINE => None,
                    MK_RAISE_IRQ_PORT => {
                        let line = u32::from(value);
                        let _ = vm.set_irq_line(line, true);
                        let _ = vm.set_irq_line(line, false);
                        None
                    }
                    MK_STEP_PORT => {
                        let _ = out.flush();
                        steps
                            .control(&vcpu, value)
                            .err()
                            .map(|e| crash(format!("KVM_SET_GUEST_DEBUG: {e}"), &vcpu))
                    }
                    _ => None,
                }
            }
            Ok(VcpuExit::IoIn(_, data)) => {
                data.fill(0xff);
                None
            }
            Ok(VcpuExit::Debug(_)) => {
                steps.step(&vcpu);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !bus.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => Some(crash("VM0 halted with interrupts off".into(), &vcpu)),
            Ok(VcpuExit::Shutdown) => {
                let why = format!("VM0 triple fault (KVM_EXIT_SHUTDOWN); {recent}");
                Some(crash(why, &vcpu))
            }
            Ok(VcpuExit::InternalError) => pvm::on_internal_error(&mut vcpu, mem, quirks)
                .err()
                .map(|reason| crash(reason, &vcpu)),
            Ok(other) => Some(crash(format!("unexpected exit {other:?}"), &vcpu)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(crash(format!("KVM_RUN failed: {e}"), &vcpu)),
        };
        if let Some(o) = outcome {
            let _ = out.flush();
            return (o, exits);
        }
    }
}

/// VM0's last exits, for the report of a crash that leaves no registers (a triple
/// fault resets the vCPU).
#[derive(Default)]
struct Recent {
    ring: [(char, u64, u64); Recent::LEN],
    next: usize,
}

impl Recent {
    const LEN: usize = 24;

    fn note(&mut self, exit: &Result<VcpuExit, kvm_ioctls::Error>) {
        let e = match exit {
            // the console's bytes are in its output already
            Ok(VcpuExit::IoOut(COM1_PORT, _)) => return,
            Ok(VcpuExit::IoOut(port, data)) => ('o', u64::from(*port), guest::le(data)),
            Ok(VcpuExit::IoIn(port, _)) => ('i', u64::from(*port), u64::MAX),
            Ok(VcpuExit::MmioRead(addr, _)) => ('r', *addr, 0),
            Ok(VcpuExit::MmioWrite(addr, data)) => ('w', *addr, guest::le(data)),
            _ => return,
        };
        self.ring[self.next % Self::LEN] = e;
        self.next += 1;
    }
}

impl std::fmt::Display for Recent {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "its last exits (o/i port out/in, w/r MMIO write/read), oldest first:"
        )?;
        let first = self.next.saturating_sub(Self::LEN);
        for n in first..self.next {
            match self.ring[n % Self::LEN] {
                // the value an `in` reads is not kept
                ('i', at, _) => write!(f, " i{at:#x}")?,
                (kind, at, value) => write!(f, " {kind}{at:#x}={value:#x}")?,
            }
        }
        Ok(())
    }
}
