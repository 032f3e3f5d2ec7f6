//! Counting the instructions VM0 executes, by privilege level, by single-stepping its
//! vCPU (KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_SINGLESTEP): one KVM_EXIT_DEBUG per
//! instruction, classified by the CPL (CS.DPL) it stopped at. The count does not
//! depend on how fast the host runs guest ring 0.
//!
//! The guest switches the counter with the step-count port: a non-zero byte starts
//! counting and says how many round trips follow, zero stops and prints the figures.
//!
//! Stepping is slow (an exit per instruction), so many timer ticks fall into the
//! window. The kernel does not step interrupt entries (the CPU clears TF on them), and
//! what ring-0 steps there are outside system calls are counted apart: a run of ring-0
//! steps belongs to a system call when its first step is at the SYSCALL entry point
//! (MSR LSTAR).
//!
//! Not on kvm-pvm: guest ring 3 runs natively there, and its single-step traps reach
//! the guest as #DB instead of exiting to the vmm.

use kvm_bindings::{kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};
use kvm_ioctls::VcpuFd;

const MSR_LSTAR: u32 = 0xc000_0082;

#[derive(Debug, Default)]
pub struct StepCounter {
    /// Single-stepping is unavailable (kvm-pvm).
    pub unsupported: bool,
    active: bool,
    iterations: u64,
    /// Ring-0 steps of kernel entries by SYSCALL, of other entries, ring-3 steps.
    pub ring0: u64,
    pub ring0_other: u64,
    pub ring3: u64,
    /// The SYSCALL entry point, and whether the current ring-0 run began there.
    lstar: u64,
    in_syscall: bool,
    prev_ring0: bool,
    entries: u64,
    /// Ring-0 steps per RIP, when `VMM_MK_STEP_PROFILE` is set: printed at the end.
    profile: Option<std::collections::HashMap<u64, u64>>,
}

impl StepCounter {
    /// The guest wrote `value` to the step-count port.
    /// A counter; `unsupported` on kvm-pvm.
    pub fn new(unsupported: bool) -> Self {
        Self {
            unsupported,
            ..Default::default()
        }
    }

    pub fn control(&mut self, vcpu: &VcpuFd, value: u8) -> Result<(), kvm_ioctls::Error> {
        if self.unsupported {
            if value != 0 {
                println!("bench: ring-0 instruction count unavailable on kvm-pvm (single-step traps of native ring 3 go to the guest); run it in the KVM test host");
            }
            return Ok(());
        }
        let control = if value != 0 {
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
        } else {
            0
        };
        vcpu.set_guest_debug(&kvm_guest_debug {
            control,
            ..Default::default()
        })?;
        if value != 0 {
            let profile = std::env::var_os("VMM_MK_STEP_PROFILE").map(|_| Default::default());
            let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index: MSR_LSTAR,
                ..Default::default()
            }])
            .expect("one MSR");
            vcpu.get_msrs(&mut msrs)?;
            let lstar = msrs.as_slice()[0].data;
            *self = StepCounter {
                active: true,
                iterations: u64::from(value),
                profile,
                lstar,
                ..Default::default()
            };
        } else if self.active {
            self.active = false;
            let n = self.iterations.max(1);
            println!(
                "bench: single-stepped {n} round trips ({} system calls): {} ring-0 instructions per round trip in system calls, {} in ring 3 (totals {} / {}; measured by the vmm)",
                self.entries, self.ring0 / n, self.ring3 / n, self.ring0, self.ring3
            );
            println!(
                "bench: not counted above: {} ring-0 instructions stepped outside system calls",
                self.ring0_other
            );
            if let Some(p) = self.profile.take() {
                let mut v: Vec<_> = p.into_iter().collect();
                v.sort_by_key(|&(rip, n)| (std::cmp::Reverse(n), rip));
                for (rip, n) in &v {
                    println!("bench: profile {rip:#x} {n}");
                }
            }
        }
        Ok(())
    }

    /// A single-step exit. (KVM sets TF once, at KVM_SET_GUEST_DEBUG; the kernel
    /// carries it through system calls and into the threads it resumes.)
    pub fn step(&mut self, vcpu: &VcpuFd) {
        match vcpu.get_sregs() {
            Ok(s) if s.cs.dpl == 0 => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                if !self.prev_ring0 {
                    // The first step may land on the entry point or just after it
                    // (SYSCALL itself may not raise the single-step trap).
                    self.in_syscall = (self.lstar..self.lstar + 32).contains(&rip);
                    self.entries += u64::from(self.in_syscall);
                }
                self.prev_ring0 = true;
                if self.in_syscall {
                    self.ring0 += 1;
                    if let Some(p) = self.profile.as_mut() {
                        *p.entry(rip).or_default() += 1;
                    }
                } else {
                    self.ring0_other += 1;
                    if let Some(p) = self.profile.as_mut() {
                        *p.entry(rip | 1 << 63).or_default() += 1;
                    }
                }
            }
            Ok(_) => {
                self.ring3 += 1;
                self.prev_ring0 = false;
            }
            Err(_) => {}
        }
    }
}
