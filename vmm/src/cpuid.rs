//! The CPUID a vCPU sees: what KVM supports, with the topology made consistent
//! (APIC ids, logical processor counts) and the hypervisor leaves the guest needs for
//! a trustworthy clock (KVM's signature and features leaf with kvmclock, and the
//! TSC frequency leaf 0x4000_0010).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: TSC-deadline LAPIC timer (KVM's in-kernel LAPIC emulates it).
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const TIMING_LEAF: u32 = 0x4000_0010;

/// CPUID bits to hide from the guest, as (leaf, subleaf, register, mask of bits to clear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidMask {
    pub leaf: u32,
    pub index: Option<u32>,
    pub reg: Reg,
    pub clear: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Shape `supported` for vCPU `cpu` of `num_cpus`. `tsc_khz` feeds the timing leaf.
pub fn vcpu_cpuid(
    supported: &CpuId,
    cpu: u8,
    num_cpus: u8,
    tsc_khz: Option<u32>,
    masks: &[CpuidMask],
) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let core_bits = u32::BITS - (u32::from(num_cpus).saturating_sub(1)).leading_zeros();
    let is_amd = entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| e.ebx == u32::from_le_bytes(*b"Auth"));

    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (u32::from(cpu) << 24) | (u32::from(num_cpus) << 16) | (e.ebx & 0xffff);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if num_cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // Intel deterministic cache parameters: cores per package.
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(num_cpus).saturating_sub(1) << 26);
            }
            // Extended topology: one thread per core, `num_cpus` cores per package.
            0xb | 0x1f => {
                e.edx = u32::from(cpu);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = u32::from(num_cpus);
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            // AMD: number of cores per package in ECX[7:0].
            0x8000_0008 if is_amd => {
                e.ecx = (e.ecx & !0xff) | u32::from(num_cpus).saturating_sub(1);
            }
            KVM_CPUID_SIGNATURE if tsc_khz.is_some() => e.eax = e.eax.max(TIMING_LEAF),
            _ => {}
        }
    }
    if let Some(khz) = tsc_khz {
        entries.retain(|e| e.function != TIMING_LEAF);
        // eax: TSC frequency in kHz; ebx: LAPIC bus frequency in kHz (KVM: 1 GHz).
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: 1_000_000,
            ..Default::default()
        });
    }
    for m in masks {
        for e in entries
            .iter_mut()
            .filter(|e| e.function == m.leaf && m.index.is_none_or(|i| i == e.index))
        {
            let r = match m.reg {
                Reg::Eax => &mut e.eax,
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            *r &= !m.clear;
        }
    }
    CpuId::from_entries(&entries).unwrap_or_else(|_| supported.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                ebx: u32::from_le_bytes(*b"Auth"),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0800,
                ecx: 1 << 26,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                ecx: 0x3007,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: KVM_CPUID_SIGNATURE,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_is_consistent_per_vcpu() {
        let c = vcpu_cpuid(&supported(), 2, 4, Some(2_500_000), &[]);
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(leaf(&c, 0xb, 1).ebx, 4);
        assert_eq!(leaf(&c, 0xb, 1).eax, 2);
        assert_eq!(leaf(&c, 0xb, 0).edx, 2);
        assert_eq!(leaf(&c, 0x8000_0008, 0).ecx & 0xff, 3);
        assert_eq!(leaf(&c, TIMING_LEAF, 0).eax, 2_500_000);
        assert_eq!(leaf(&c, KVM_CPUID_SIGNATURE, 0).eax, TIMING_LEAF);
    }

    #[test]
    fn masks_clear_only_their_bits() {
        let mask = CpuidMask {
            leaf: 1,
            index: None,
            reg: Reg::Ecx,
            clear: 1 << 26,
        };
        let c = vcpu_cpuid(&supported(), 0, 1, None, &[mask]);
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ecx & (1 << 26), 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert!(c.as_slice().iter().all(|e| e.function != TIMING_LEAF));
    }
}
