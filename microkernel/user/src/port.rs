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
    outb(EXIT, status);
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
