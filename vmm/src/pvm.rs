//! Quirks for kvm-pvm, the software virtualizer behind `/dev/kvm` on some cloud VMs.
//!
//! kvm-pvm runs guest ring 3 natively but emulates guest ring 0 instruction by
//! instruction, and its emulator gives up (KVM_EXIT_INTERNAL_ERROR, suberror 1) on
//! several instructions Linux uses while booting. On such a host, and only there:
//!
//! 1. kernel parameters steer Linux away from what the emulator lacks: `noxsave`
//!    (XSAVE/XRSTOR), `nosmap`/`nosmep` (CLAC/STAC), `clearcpuid=` for POPCNT and
//!    CMPXCHG16B;
//! 2. CPUID hides the same features, so user space does not pick them either;
//! 3. what still stops the guest is completed here: the instruction is decoded, its
//!    effect applied to the vCPU, RIP advanced, and the vCPU resumed. INT3 (Linux runs
//!    an int3 self-test at every boot) becomes an injected #BP, as the CPU would raise.
//!
//! On hardware KVM none of this is active.

use std::path::Path;

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::cpuid::{CpuidMask, Reg};

/// Is `/dev/kvm` served by kvm-pvm?
pub fn detected() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Kernel parameters added on a kvm-pvm host.
pub const KERNEL_PARAMS: &str = "noxsave nosmap nosmep clearcpuid=popcnt,cx16 tsc=reliable";

/// CPUID bits hidden on a kvm-pvm host.
pub fn cpuid_masks() -> Vec<CpuidMask> {
    let m = |leaf, index, reg, clear| CpuidMask {
        leaf,
        index,
        reg,
        clear,
    };
    vec![
        // Leaf 1 ECX: CX16 (13), POPCNT (23), XSAVE (26), OSXSAVE (27), AVX (28).
        m(
            1,
            None,
            Reg::Ecx,
            (1 << 13) | (1 << 23) | (1 << 26) | (1 << 27) | (1 << 28),
        ),
        // Leaf 7 EBX: SMEP (7), SMAP (20), and the AVX2/AVX-512 family that needs XSAVE.
        m(
            7,
            Some(0),
            Reg::Ebx,
            (1 << 7) | (1 << 20) | (1 << 5) | (1 << 16) | (1 << 17) | (1 << 30) | (1 << 31),
        ),
        // Leaf 0xD: no XSAVE state components at all.
        m(0xd, None, Reg::Eax, u32::MAX),
        m(0xd, None, Reg::Ebx, u32::MAX),
        m(0xd, None, Reg::Ecx, u32::MAX),
        m(0xd, None, Reg::Edx, u32::MAX),
    ]
}

/// What happened to an instruction the emulator refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Completion {
    /// Done in the vmm; resume the vCPU.
    Completed(&'static str),
    /// Not something we can complete; the bytes at RIP for the error report.
    Unsupported(Vec<u8>),
}

/// How an instruction we complete changes the vCPU.
#[derive(Debug, PartialEq, Eq)]
enum Effect {
    /// Trap to the guest's #BP handler after the instruction.
    Breakpoint,
    /// Set or clear RFLAGS.AC.
    AlignmentCheck(bool),
    /// Clear the x87 exception flags.
    ClearFpuExceptions,
    /// Only advance RIP.
    Nothing,
}

/// Decode the few instructions we complete: returns (name, length, effect).
fn decode(bytes: &[u8]) -> Option<(&'static str, u64, Effect)> {
    match bytes {
        [0xcc, ..] => Some(("int3", 1, Effect::Breakpoint)),
        [0x0f, 0x01, 0xca, ..] => Some(("clac", 3, Effect::AlignmentCheck(false))),
        [0x0f, 0x01, 0xcb, ..] => Some(("stac", 3, Effect::AlignmentCheck(true))),
        [0xdb, 0xe2, ..] => Some(("fnclex", 2, Effect::ClearFpuExceptions)),
        [0x9b, 0xdb, 0xe2, ..] => Some(("fclex", 3, Effect::ClearFpuExceptions)),
        // WAIT/FWAIT: raises #MF only if an unmasked x87 exception is pending, which
        // the FPU state we give the guest never has; otherwise it does nothing.
        [0x9b, ..] => Some(("fwait", 1, Effect::Nothing)),
        _ => None,
    }
}

/// The suberror of the last KVM_EXIT_INTERNAL_ERROR.
pub fn internal_error_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: reading the `internal` member of the exit union is what KVM filled in
    // for KVM_EXIT_INTERNAL_ERROR; the caller only calls this after that exit, and
    // every bit pattern of the two u32s is a valid value.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// Read up to 15 instruction bytes at the vCPU's RIP through its page tables.
fn bytes_at_rip(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(15);
    for i in 0..15u64 {
        let Ok(t) = vcpu.translate_gva(rip.wrapping_add(i)) else {
            break;
        };
        if t.valid == 0 {
            break;
        }
        let Ok(b) = mem.read_obj::<u8>(GuestAddress(t.physical_address)) else {
            break;
        };
        out.push(b);
    }
    out
}

/// Try to complete the instruction an emulation failure stopped at.
pub fn complete_instruction(vcpu: &mut VcpuFd, mem: &GuestMemoryMmap) -> Completion {
    if internal_error_suberror(vcpu) != KVM_INTERNAL_ERROR_EMULATION {
        return Completion::Unsupported(Vec::new());
    }
    let Ok(mut regs) = vcpu.get_regs() else {
        return Completion::Unsupported(Vec::new());
    };
    let bytes = bytes_at_rip(vcpu, mem, regs.rip);
    let Some((name, len, effect)) = decode(&bytes) else {
        return Completion::Unsupported(bytes);
    };
    regs.rip = regs.rip.wrapping_add(len);
    let applied = match effect {
        Effect::Breakpoint => vcpu.set_regs(&regs).is_ok() && inject_breakpoint(vcpu),
        Effect::Nothing => vcpu.set_regs(&regs).is_ok(),
        Effect::AlignmentCheck(set) => {
            const AC: u64 = 1 << 18;
            regs.rflags = if set {
                regs.rflags | AC
            } else {
                regs.rflags & !AC
            };
            vcpu.set_regs(&regs).is_ok()
        }
        Effect::ClearFpuExceptions => match vcpu.get_fpu() {
            Ok(mut fpu) => {
                // Exception flags (bits 0-5), stack fault (6), summary (7) and busy (15).
                fpu.fsw &= !0x80ff;
                vcpu.set_fpu(&fpu).is_ok() && vcpu.set_regs(&regs).is_ok()
            }
            Err(_) => false,
        },
    };
    if applied {
        Completion::Completed(name)
    } else {
        Completion::Unsupported(bytes)
    }
}

/// Handle KVM_EXIT_INTERNAL_ERROR: on a kvm-pvm host (`quirks`), complete the
/// instruction the emulator refused; otherwise, or when that is impossible, the reason
/// the vCPU cannot continue.
pub fn on_internal_error(
    vcpu: &mut VcpuFd,
    mem: &GuestMemoryMmap,
    quirks: bool,
) -> Result<(), String> {
    if !quirks {
        return Err(format!(
            "KVM internal error, suberror {}",
            internal_error_suberror(vcpu)
        ));
    }
    match complete_instruction(vcpu, mem) {
        Completion::Completed(_) => Ok(()),
        Completion::Unsupported(bytes) => Err(format!(
            "kvm-pvm cannot emulate the instruction at RIP (bytes {bytes:02x?})"
        )),
    }
}

fn inject_breakpoint(vcpu: &VcpuFd) -> bool {
    const BP_VECTOR: u8 = 3;
    let Ok(mut events) = vcpu.get_vcpu_events() else {
        return false;
    };
    events.exception.injected = 1;
    events.exception.nr = BP_VECTOR;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_vcpu_events(&events).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_what_it_can_complete() {
        assert_eq!(decode(&[0xcc, 0x90]).map(|d| (d.0, d.1)), Some(("int3", 1)));
        assert_eq!(
            decode(&[0x0f, 0x01, 0xca]).map(|d| d.2),
            Some(Effect::AlignmentCheck(false))
        );
        assert_eq!(
            decode(&[0x0f, 0x01, 0xcb]).map(|d| d.2),
            Some(Effect::AlignmentCheck(true))
        );
        assert_eq!(decode(&[0x9b, 0xdb, 0xe2]).map(|d| d.1), Some(3));
        assert_eq!(
            decode(&[0x9b, 0x65, 0x48]).map(|d| (d.0, d.1)),
            Some(("fwait", 1))
        );
        // POPCNT, XRSTOR, CMPXCHG16B and truncated input are not completed.
        assert_eq!(decode(&[0xf3, 0x0f, 0xb8, 0xc0]), None);
        assert_eq!(decode(&[0x0f, 0xae, 0x2f]), None);
        assert_eq!(decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]), None);
        assert_eq!(decode(&[0x0f, 0x01]), None);
        assert_eq!(decode(&[]), None);
    }
}
