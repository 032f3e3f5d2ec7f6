//! The kernel console: bytes written to the COM1 transmit register, which the vmm
//! copies to its stdout (VM0 has no UART model: no status polling needed). Also the
//! exit port, which ends VM0 with a status.
//!
//! Numbers are printed by `write_num`, not `core::fmt`: the precompiled `core`'s
//! integer formatting uses SSE instructions that kvm-pvm's ring-0 emulator cannot run.
//! `core::fmt` is used only for panic messages with arguments.

use core::fmt::{self, Write};

use super::cpu::outb;

pub const CONSOLE_PORT: u16 = 0x3f8;
/// Writing a byte here ends VM0; the vmm exits with that status.
pub const EXIT_PORT: u16 = 0x510;

pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

pub fn write_bytes(b: &[u8]) {
    for &c in b {
        outb(CONSOLE_PORT, c);
    }
}

/// `n` in decimal, or in hex with a `0x` prefix.
pub fn write_num(n: u64, hex: bool) {
    let mut buf = [0u8; 24];
    let mut i = buf.len();
    let (base, mut n) = (if hex { 16 } else { 10 }, n);
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(n % base) as usize];
        n /= base;
        if n == 0 {
            break;
        }
    }
    if hex {
        write_bytes(b"0x");
    }
    write_bytes(&buf[i..]);
}

/// Print pieces: strings and numbers.
pub enum Piece<'a> {
    S(&'a str),
    D(u64),
    X(u64),
}

pub fn print(pieces: &[Piece]) {
    for p in pieces {
        match *p {
            Piece::S(s) => write_bytes(s.as_bytes()),
            Piece::D(n) => write_num(n, false),
            Piece::X(n) => write_num(n, true),
        }
    }
}

/// The threads and the interrupt lines with handlers, one line each (the vmm asked:
/// `hyper::DUMP_LINE`). Thread ids are printed raw, as `ThreadId::raw`.
pub fn dump(k: &microkernel::Kernel<super::paging::X86>) {
    use Piece::*;
    for t in k.thread_summaries() {
        print(&[S("mk: thread "), X(t.id.raw()), S(" task "), D(t.task as u64)]);
        print(&[S(" prio "), D(t.prio.into()), S(" "), S(t.state)]);
        if t.peer != microkernel::abi::ThreadId::NIL {
            print(&[S(" peer "), X(t.peer.raw())]);
        }
        print(&[S(" ip "), X(t.ip), S(" senders "), D(t.senders as u64)]);
        if t.fault.0 != 0 {
            print(&[S(" fault "), D(t.fault.0.into()), S(" at "), X(t.fault.1)]);
        }
        write_bytes(b"\n");
    }
    for l in k.irq_summaries() {
        print(&[S("mk: line "), D(l.line.into()), S(" handler "), X(l.handler.raw())]);
        print(&[S(if l.pending { " pending\n" } else { "\n" })]);
    }
}

pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    loop {
        super::cpu::halt_forever();
    }
}

pub fn panic(info: &core::panic::PanicInfo) -> ! {
    write_bytes(b"mk: kernel panic");
    if let Some(l) = info.location() {
        print(&[Piece::S(" at "), Piece::S(l.file()), Piece::S(":"), Piece::D(l.line() as u64)]);
    }
    match info.message().as_str() {
        Some(m) => print(&[Piece::S(": "), Piece::S(m), Piece::S("\n")]),
        None => {
            let _ = writeln!(Console, ": {}", info.message());
        }
    }
    exit(3)
}

/// A fatal error with a message and numbers.
pub fn fatal(pieces: &[Piece]) -> ! {
    write_bytes(b"mk: fatal: ");
    print(pieces);
    write_bytes(b"\n");
    exit(3)
}
