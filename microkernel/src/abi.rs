//! The system-call ABI, shared by the kernel and user-level runtimes.
//!
//! Plain data with fixed bit layouts. Every type that arrives from user registers has a
//! total decoder (`from_raw` returning `Option`) so that no register value can make the
//! kernel misbehave; every type has an encoder (`raw`) for the user side.
//! `microkernel/SYSCALLS.md` is the table of calls built from these pieces.

/// Message registers per thread: MR0 holds the [`MsgTag`], MR1.. the words.
pub const MR_COUNT: usize = 8;
/// Argument registers of a system call (besides the call number).
pub const ARG_COUNT: usize = 4;
/// Result registers of a system call: `[status, value1, value2]`.
pub const RET_COUNT: usize = 3;

pub const PAGE_BITS: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_BITS;

/// The most bytes one `debug_write` accepts.
pub const DEBUG_WRITE_MAX: u64 = 256;

/// System-call numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Sysno {
    Ipc = 0,
    Unmap = 1,
    ThreadSwitch = 2,
    Schedule = 3,
    ExchangeRegisters = 4,
    ThreadControl = 5,
    TaskNew = 6,
    IrqControl = 7,
    DebugWrite = 8,
    GuestRoute = 9,
    GuestInterrupt = 10,
}

impl Sysno {
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            0 => Self::Ipc,
            1 => Self::Unmap,
            2 => Self::ThreadSwitch,
            3 => Self::Schedule,
            4 => Self::ExchangeRegisters,
            5 => Self::ThreadControl,
            6 => Self::TaskNew,
            7 => Self::IrqControl,
            8 => Self::DebugWrite,
            9 => Self::GuestRoute,
            10 => Self::GuestInterrupt,
            _ => return None,
        })
    }
}

/// Error codes, returned in the status register (0 means success).
///
/// IPC errors name the phase they happened in, so a caller knows whether its message
/// was delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Error {
    /// The call number is not a system call.
    UnknownSyscall = 1,
    /// An argument is malformed (reserved bits set, out of range, ...).
    InvalidArgument = 2,
    /// The caller may not do this (not privileged, not its own task, ...).
    NoPermission = 3,
    /// A kernel table or the page-table memory is exhausted.
    NoMemory = 4,
    /// A named thread, task or interrupt does not exist.
    NotExist = 5,
    /// The interrupt is already attached to a live thread.
    InUse = 6,
    /// Send phase: the partner was not ready within the send timeout.
    SendTimeout = 16,
    /// Send phase: the destination does not exist (or was deleted meanwhile).
    SendNotExist = 17,
    /// Send phase: cancelled by `exchange_registers`.
    SendCanceled = 18,
    /// Send phase: the message tag or a map item is malformed.
    InvalidMessage = 19,
    /// Receive phase: no message within the receive timeout.
    RecvTimeout = 32,
    /// Receive phase: the named sender does not exist (or was deleted meanwhile).
    RecvNotExist = 33,
    /// Receive phase: cancelled by `exchange_registers`.
    RecvCanceled = 34,
    /// Transfer (both sides): the message carries map items but the receiver's window
    /// is nil.
    NoWindow = 48,
}

/// A thread id: thread-table index (bits 0..16) and generation (bits 16..32).
///
/// Generation 0 is reserved for ids that do not name threads: [`ThreadId::NIL`] and the
/// interrupt sources [`ThreadId::irq`]. [`ThreadId::ANY`] is the open-receive wildcard.
/// Deleting a thread bumps the generation of its slot, so stale ids stop working.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct ThreadId(pub u32);

/// What a [`ThreadId`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Nil,
    Any,
    Irq(u16),
    Thread { index: u16, gen: u16 },
}

impl ThreadId {
    pub const NIL: Self = Self(0);
    pub const ANY: Self = Self(u32::MAX);
    /// The largest thread index (index 0xFFFF with generation 0xFFFF is `ANY`).
    pub const MAX_INDEX: u16 = 0xFFFE;

    /// The id of thread slot `index` in generation `gen` (which must not be 0).
    pub const fn new(index: u16, gen: u16) -> Self {
        Self(((gen as u32) << 16) | index as u32)
    }

    /// The pseudo-thread that interrupt `n` sends from (`n < 0xFFFF`).
    pub const fn irq(n: u16) -> Self {
        Self(n as u32 + 1)
    }

    pub fn from_raw(raw: u64) -> Option<Self> {
        u32::try_from(raw).ok().map(Self)
    }

    pub fn raw(self) -> u64 {
        self.0 as u64
    }

    pub fn kind(self) -> IdKind {
        let index = self.0 as u16;
        let gen = (self.0 >> 16) as u16;
        match (index, gen) {
            (0, 0) => IdKind::Nil,
            (0xFFFF, 0xFFFF) => IdKind::Any,
            (n, 0) => IdKind::Irq(n - 1),
            (index, gen) => IdKind::Thread { index, gen },
        }
    }
}

/// A task (address space) number, as the arch layer names page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct TaskId(pub u16);

/// Access rights of a mapping: read 4, write 2, execute 1 (as in L4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Rights(u8);

impl Rights {
    pub const NONE: Self = Self(0);
    pub const X: Self = Self(1);
    pub const W: Self = Self(2);
    pub const R: Self = Self(4);
    pub const RW: Self = Self(6);
    pub const RX: Self = Self(5);
    pub const ALL: Self = Self(7);

    pub fn from_bits(bits: u64) -> Option<Self> {
        (bits <= 7).then_some(Self(bits as u8))
    }
    pub const fn bits(self) -> u8 {
        self.0
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn and(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }
    pub const fn or(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
    pub const fn minus(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
}

/// A flexpage: `2^log2` bytes at `base` (aligned to its size) with rights.
///
/// Raw layout: bits 0..3 rights, bit 3 reserved, bits 4..11 log2, bit 11 reserved,
/// bits 12..64 base. `log2 == 0` is the nil fpage; otherwise `12 <= log2 <= 64`, and 64
/// (base 0) is the complete address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fpage {
    base: u64,
    log2: u8,
    rights: Rights,
}

impl Fpage {
    pub const NIL: Self = Self { base: 0, log2: 0, rights: Rights::NONE };

    pub fn new(base: u64, log2: u8, rights: Rights) -> Option<Self> {
        if log2 == 0 {
            return (base == 0 && rights.is_empty()).then_some(Self::NIL);
        }
        if !(PAGE_BITS as u8..=64).contains(&log2) {
            return None;
        }
        let mask = if log2 == 64 { u64::MAX } else { (1u64 << log2) - 1 };
        (base & mask == 0).then_some(Self { base, log2, rights })
    }

    /// The whole address space with `rights`.
    pub const fn complete(rights: Rights) -> Self {
        Self { base: 0, log2: 64, rights }
    }

    pub fn from_raw(raw: u64) -> Option<Self> {
        if raw & 0x808 != 0 {
            return None;
        }
        let rights = Rights::from_bits(raw & 7)?;
        Self::new(raw & !0xFFF, ((raw >> 4) & 0x7F) as u8, rights)
    }

    pub fn raw(self) -> u64 {
        self.base | (self.log2 as u64) << 4 | self.rights.bits() as u64
    }

    pub fn is_nil(self) -> bool {
        self.log2 == 0
    }
    pub fn base(self) -> u64 {
        self.base
    }
    pub fn log2(self) -> u8 {
        self.log2
    }
    pub fn rights(self) -> Rights {
        self.rights
    }
    /// The first virtual page number.
    pub fn first_page(self) -> u64 {
        self.base >> PAGE_BITS
    }
    /// log2 of the number of pages (0..=52); meaningless for nil.
    pub fn page_order(self) -> u32 {
        (self.log2 as u32).saturating_sub(PAGE_BITS)
    }
}

/// A timeout in timer ticks: 0 never waits, `u32::MAX` waits forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Timeout(pub u32);

impl Timeout {
    pub const ZERO: Self = Self(0);
    pub const NEVER: Self = Self(u32::MAX);

    /// The send timeout (bits 0..32) and receive timeout (bits 32..64) of `ipc`.
    pub fn split(raw: u64) -> (Self, Self) {
        (Self(raw as u32), Self((raw >> 32) as u32))
    }
    pub fn pair(send: Self, recv: Self) -> u64 {
        send.0 as u64 | (recv.0 as u64) << 32
    }
}

/// MR0: bits 0..6 untyped words `u`, bits 6..12 typed words `t` (two per map item, after
/// the untyped words), bits 12..16 flags, bits 16..64 label. `1 + u + t <= MR_COUNT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct MsgTag(pub u64);

impl MsgTag {
    pub const fn new(label: u64, untyped: u64, typed: u64, flags: u64) -> Self {
        Self((label << 16) | (flags & 0xF) << 12 | (typed & 0x3F) << 6 | (untyped & 0x3F))
    }
    pub const fn untyped(self) -> usize {
        (self.0 & 0x3F) as usize
    }
    pub const fn typed(self) -> usize {
        ((self.0 >> 6) & 0x3F) as usize
    }
    pub const fn flags(self) -> u64 {
        (self.0 >> 12) & 0xF
    }
    pub const fn label(self) -> u64 {
        self.0 >> 16
    }
    /// Whether the counts fit the message registers and the items come in pairs.
    pub const fn is_valid(self) -> bool {
        1 + self.untyped() + self.typed() <= MR_COUNT && self.typed().is_multiple_of(2)
    }
}

/// Labels of messages the kernel sends on a thread's behalf (48-bit label space).
pub mod label {
    /// Page fault: flags = access rights wanted, MR1 = fault address, MR2 = fault ip.
    pub const PAGE_FAULT: u64 = 0xFFFF_FFFF_FFFE;
    /// Exception: MR1 = vector, MR2 = error code, MR3 = ip, MR4 = sp. A reply with at
    /// least two words resumes the thread at ip = MR1, sp = MR2.
    pub const EXCEPTION: u64 = 0xFFFF_FFFF_FFFD;
    /// Interrupt: MR1 = interrupt number; the sender is `ThreadId::irq(n)`.
    pub const INTERRUPT: u64 = 0xFFFF_FFFF_FFFF;
    /// Guest exit (from a vCPU thread of a guest task): MR1 = kind | size << 8 (see
    /// [`super::guest`]), MR2 = port or guest-physical address, MR3 = the value written.
    /// The reply resumes the vCPU: MR1 (if sent) is the value read, MR2 (if sent) a mask
    /// of the guest's IOAPIC pins to pulse first (bit n: pin n), and map items land in
    /// the guest's physical memory.
    pub const GUEST_EXIT: u64 = 0xFFFF_FFFF_FFFC;
}

/// Guest tasks: an address space that is a guest VM's physical memory, whose thread is
/// the guest's vCPU (see `fault.rs`).
pub mod guest {
    /// The vCPU is about to run for the first time: the reply maps the guest's RAM.
    pub const START: u64 = 0;
    /// `in` from an I/O port.
    pub const IO_IN: u64 = 1;
    /// `out` to an I/O port.
    pub const IO_OUT: u64 = 2;
    /// MMIO read.
    pub const MMIO_READ: u64 = 3;
    /// MMIO write.
    pub const MMIO_WRITE: u64 = 4;
    /// HLT with nothing to wake the vCPU (no interrupt controller).
    pub const HALT: u64 = 5;
    /// Triple fault or another end of the vCPU.
    pub const SHUTDOWN: u64 = 6;
    /// Guest-physical pages a guest task may have: below the 3..4 GiB MMIO window.
    pub const PHYS_END: u64 = 0xC000_0000;
}

/// A map item: two typed words. Word 0 is the send base ("hotspot", bits 12..64) and the
/// kind (bits 0..12: 1 map, 2 grant); word 1 is the sender's fpage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapItem {
    pub grant: bool,
    pub hotspot: u64,
    pub fpage: Fpage,
}

impl MapItem {
    pub const MAP: u64 = 1;
    pub const GRANT: u64 = 2;

    pub fn from_raw(w0: u64, w1: u64) -> Option<Self> {
        let grant = match w0 & 0xFFF {
            Self::MAP => false,
            Self::GRANT => true,
            _ => return None,
        };
        let fpage = Fpage::from_raw(w1).filter(|f| !f.is_nil())?;
        Some(Self { grant, hotspot: w0 & !0xFFF, fpage })
    }

    pub fn raw(self) -> [u64; 2] {
        let kind = if self.grant { Self::GRANT } else { Self::MAP };
        [self.hotspot & !0xFFF | kind, self.fpage.raw()]
    }
}

/// `unmap` flags.
pub mod unmap {
    /// Also take the rights from the caller's own mappings (not only derived ones).
    pub const SELF: u64 = 1;
    pub const ALL: u64 = SELF;
}

/// `exchange_registers` flags.
pub mod exregs {
    pub const SET_IP: u64 = 1;
    pub const SET_SP: u64 = 2;
    /// Abort an IPC in progress (the thread sees `SendCanceled`/`RecvCanceled`; a thread
    /// in fault IPC becomes faulted).
    pub const CANCEL: u64 = 4;
    /// Stop the thread (cancels IPC first).
    pub const HALT: u64 = 8;
    /// Make a halted or faulted thread ready; a pending fault is forgotten.
    pub const RESUME: u64 = 16;
    pub const ALL: u64 = 31;
}

/// `thread_control` operations.
pub mod thread_control {
    /// Create a halted thread in the task of `a1`; pager `a2`, supervisor `a3`.
    pub const CREATE: u64 = 0;
    /// Set the pager (`a2`) and supervisor (`a3`) of thread `a1`.
    pub const CONFIGURE: u64 = 1;
    /// Delete thread `a1`; deleting a task's last thread deletes the task.
    pub const DELETE: u64 = 2;
    /// Delete every thread of the task of `a1`, and so the task.
    pub const DELETE_TASK: u64 = 3;
}

/// `task_new` flags.
pub mod task_new {
    /// The new task is privileged.
    pub const PRIVILEGED: u64 = 1;
    /// The new task is a guest (its space is guest-physical memory, its first thread
    /// the vCPU, which starts by sending a `guest::START` exit to its pager).
    pub const GUEST: u64 = 2;
    pub const ALL: u64 = PRIVILEGED | GUEST;
}

/// `irq_control` operations.
/// `guest_route`: which of a guest's exits an entry catches (`a2` bits 32..40).
pub mod guest_route {
    /// I/O ports (`IO_IN`, `IO_OUT`); a range ends at or below port 0x1_0000.
    pub const PORT: u64 = 0;
    /// Guest-physical addresses (`MMIO_READ`, `MMIO_WRITE`).
    pub const MMIO: u64 = 1;
    /// Routes one guest task can have.
    pub const MAX: usize = 8;
}

/// `guest_interrupt`: the guest's interrupt pins (`a1` is a mask of them).
pub mod guest_interrupt {
    /// IOAPIC pins 0..24.
    pub const PINS: u32 = 24;
}

pub mod irq_control {
    pub const ATTACH: u64 = 0;
    pub const DETACH: u64 = 1;
    pub const ACK: u64 = 2;
}

/// `schedule`: leave this parameter unchanged.
pub const NO_CHANGE: u64 = u64::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ids() {
        assert_eq!(ThreadId::NIL.kind(), IdKind::Nil);
        assert_eq!(ThreadId::ANY.kind(), IdKind::Any);
        assert_eq!(ThreadId::irq(0).kind(), IdKind::Irq(0));
        assert_eq!(ThreadId::irq(0xFFFE).kind(), IdKind::Irq(0xFFFE));
        assert_eq!(ThreadId::new(5, 3).kind(), IdKind::Thread { index: 5, gen: 3 });
        assert_eq!(ThreadId::from_raw(1 << 32), None);
    }

    #[test]
    fn fpages() {
        let f = Fpage::new(0x20_0000, 21, Rights::RW).unwrap();
        assert_eq!(Fpage::from_raw(f.raw()), Some(f));
        assert_eq!((f.first_page(), f.page_order()), (0x200, 9));
        assert_eq!(Fpage::new(0x1000, 13, Rights::R), None, "misaligned");
        assert_eq!(Fpage::new(0, 11, Rights::R), None, "smaller than a page");
        assert_eq!(Fpage::new(0, 65, Rights::R), None);
        assert_eq!(Fpage::new(0x1000, 64, Rights::R), None);
        let c = Fpage::complete(Rights::ALL);
        assert_eq!(Fpage::from_raw(c.raw()), Some(c));
        assert_eq!(c.page_order(), 52);
        assert_eq!(Fpage::from_raw(0), Some(Fpage::NIL));
        assert_eq!(Fpage::from_raw(8), None, "reserved bit");
        for raw in [u64::MAX, 0x7F0, 0xC0, 0x1005] {
            let _ = Fpage::from_raw(raw);
        }
    }

    #[test]
    fn tags_and_items() {
        let t = MsgTag::new(0x1234, 3, 2, 5);
        assert_eq!((t.label(), t.untyped(), t.typed(), t.flags()), (0x1234, 3, 2, 5));
        assert!(t.is_valid());
        assert!(!MsgTag::new(0, 6, 2, 0).is_valid());
        assert!(!MsgTag::new(0, 0, 3, 0).is_valid());
        let item = MapItem {
            grant: true,
            hotspot: 0x5000,
            fpage: Fpage::new(0x4000, 14, Rights::R).unwrap(),
        };
        let [w0, w1] = item.raw();
        assert_eq!(MapItem::from_raw(w0, w1), Some(item));
        assert_eq!(MapItem::from_raw(0x5003, w1), None);
        assert_eq!(MapItem::from_raw(1, 0), None, "nil fpage");
    }
}
