//! The vmm's VM0 test ports, which the kernel opens to user mode (TSS I/O bitmap):
//! see `vmm/src/layout.rs`.

pub const EXIT: u16 = 0x510;
pub const RAISE_IRQ: u16 = 0x511;
pub const STEP_COUNT: u16 = 0x512;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port output to the vmm; the kernel permits exactly these ports.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

/// End VM0: the vmm exits with `status`.
pub fn exit(status: u8) -> ! {
    end(ENDED, status)
}

/// How a hosted guest ended, for [`end`] (the vmm's `Outcome`).
pub const ENDED: u8 = 0;
/// The guest kernel panicked.
pub const ENDED_PANIC: u8 = 1;
/// The guest's vCPU stopped (triple fault, internal error).
pub const ENDED_STOPPED: u8 = 2;
/// The guest could not be started.
pub const ENDED_FAILED: u8 = 3;

/// End VM0 with a two-byte write to the exit port: `status`, then `how`.
pub fn end(how: u8, status: u8) -> ! {
    let word = u16::from(how) << 8 | u16::from(status);
    // SAFETY: port output to the vmm; the kernel permits exactly these ports.
    unsafe {
        core::arch::asm!("out dx, ax", in("dx") EXIT, in("ax") word, options(nomem, nostack))
    };
    loop {
        core::hint::spin_loop();
    }
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time-stamp counter (allowed in user mode).
    unsafe {
        core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    (hi as u64) << 32 | lo as u64
}
