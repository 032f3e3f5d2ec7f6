//! The system-call dispatcher: raw registers in, one typed call out, one function run.
//!
//! This is the attack surface. `Syscall::decode` is total: any register values give a
//! call or an error, checking every reserved bit and range, and nothing here can panic.
//! Decoding checks form only; the `sys_*` function checks meaning (does the thread
//! exist, may the caller do this). Results go to the caller's result registers as
//! `[status, value1, value2]`; a call that blocks gets them when it completes.

use crate::abi::{
    exregs, guest_interrupt, guest_route, irq_control, task_new, thread_control, unmap, Error,
    Fpage, IdKind, Sysno, ThreadId, ARG_COUNT, NO_CHANGE,
};
use crate::kernel::{Kernel, Next};
use crate::machine::{Context, Machine};
use crate::thread::State;

/// What a non-IPC system call returns: two result values, or an error.
pub(crate) type SysResult = Result<[u64; 2], Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Create,
    Configure,
    Delete,
    DeleteTask,
}

/// What `task_new` creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    User,
    Privileged,
    /// A guest VM: guest-physical space, vCPU thread (see `fault.rs`).
    Guest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqOp {
    Attach,
    Detach,
    Ack,
}

/// A decoded system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    Ipc { to: ThreadId, from: ThreadId, timeouts: u64, window: Fpage },
    Unmap { fpage: Fpage, own: bool },
    ThreadSwitch { to: ThreadId },
    Schedule { dest: ThreadId, prio: Option<u8>, timeslice: Option<u32> },
    ExchangeRegisters { dest: ThreadId, flags: u64, ip: u64, sp: u64 },
    ThreadControl { op: Control, target: ThreadId, pager: ThreadId, supervisor: ThreadId },
    TaskNew { pager: ThreadId, ip: u64, sp: u64, kind: TaskKind },
    IrqControl { op: IrqOp, irq: u16, thread: ThreadId },
    DebugWrite { addr: u64, len: u64 },
    GuestRoute { vcpu: ThreadId, route: Route },
    GuestInterrupt { vcpu: ThreadId, pins: u32 },
}

/// A range of a guest's exits and the thread that answers them (`guest_route`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// `guest_route::PORT` or `MMIO`.
    pub space: u8,
    pub base: u64,
    /// Bytes (or ports) from `base`, at least 1; `base + len` does not overflow.
    pub len: u64,
    /// Who gets the exits; NIL removes the route that starts at `base`.
    pub handler: ThreadId,
}

impl Route {
    pub const NONE: Self = Self { space: 0, base: 0, len: 0, handler: ThreadId::NIL };

    /// Does this route catch an access of `space` at `addr`?
    pub fn catches(&self, space: u8, addr: u64) -> bool {
        self.len != 0 && self.space == space && addr.wrapping_sub(self.base) < self.len
    }

    pub(crate) fn overlaps(&self, o: &Route) -> bool {
        self.len != 0
            && o.len != 0
            && self.space == o.space
            && self.base < o.base + o.len
            && o.base < self.base + self.len
    }
}

impl Syscall {
    pub fn decode(nr: u64, a: [u64; ARG_COUNT]) -> Result<Self, Error> {
        use Error::InvalidArgument as Bad;
        let sysno = Sysno::from_raw(nr).ok_or(Error::UnknownSyscall)?;
        let id = |raw: u64| ThreadId::from_raw(raw).ok_or(Bad);
        let thread = |raw: u64| thread_id(raw, false);
        let thread_or_nil = |raw: u64| thread_id(raw, true);
        let fpage = |raw: u64| Fpage::from_raw(raw).ok_or(Bad);
        let flags = |raw: u64, all: u64| if raw & !all == 0 { Ok(raw) } else { Err(Bad) };
        Ok(match sysno {
            Sysno::Ipc => Syscall::Ipc {
                to: thread_or_nil(a[0])?,
                from: id(a[1])?,
                timeouts: a[2],
                window: fpage(a[3])?,
            },
            Sysno::Unmap => Syscall::Unmap {
                fpage: fpage(a[0])?,
                own: flags(a[1], unmap::ALL)? & unmap::SELF != 0,
            },
            Sysno::ThreadSwitch => Syscall::ThreadSwitch { to: thread_or_nil(a[0])? },
            Sysno::Schedule => Syscall::Schedule {
                dest: thread(a[0])?,
                prio: match a[1] {
                    NO_CHANGE => None,
                    p => Some(u8::try_from(p).map_err(|_| Bad)?),
                },
                timeslice: match a[2] {
                    NO_CHANGE => None,
                    0 => return Err(Bad),
                    s => Some(u32::try_from(s).map_err(|_| Bad)?),
                },
            },
            Sysno::ExchangeRegisters => {
                let f = flags(a[1], exregs::ALL)?;
                if f & exregs::HALT != 0 && f & exregs::RESUME != 0 {
                    return Err(Bad);
                }
                Syscall::ExchangeRegisters { dest: thread(a[0])?, flags: f, ip: a[2], sp: a[3] }
            }
            Sysno::ThreadControl => Syscall::ThreadControl {
                op: match a[0] {
                    thread_control::CREATE => Control::Create,
                    thread_control::CONFIGURE => Control::Configure,
                    thread_control::DELETE => Control::Delete,
                    thread_control::DELETE_TASK => Control::DeleteTask,
                    _ => return Err(Bad),
                },
                target: thread(a[1])?,
                pager: thread_or_nil(a[2])?,
                supervisor: thread_or_nil(a[3])?,
            },
            Sysno::TaskNew => Syscall::TaskNew {
                pager: thread_or_nil(a[0])?,
                ip: a[1],
                sp: a[2],
                kind: match flags(a[3], task_new::ALL)? {
                    0 => TaskKind::User,
                    task_new::PRIVILEGED => TaskKind::Privileged,
                    task_new::GUEST => TaskKind::Guest,
                    _ => return Err(Bad),
                },
            },
            Sysno::IrqControl => Syscall::IrqControl {
                op: match a[0] {
                    irq_control::ATTACH => IrqOp::Attach,
                    irq_control::DETACH => IrqOp::Detach,
                    irq_control::ACK => IrqOp::Ack,
                    _ => return Err(Bad),
                },
                irq: u16::try_from(a[1]).map_err(|_| Bad)?,
                thread: thread_or_nil(a[2])?,
            },
            Sysno::DebugWrite => Syscall::DebugWrite { addr: a[0], len: a[1] },
            Sysno::GuestRoute => {
                let (len, space) = (a[2] & 0xFFFF_FFFF, a[2] >> 32);
                let limit = match space {
                    guest_route::PORT => 0x1_0000,
                    guest_route::MMIO => u64::MAX,
                    _ => return Err(Bad),
                };
                if len == 0 || a[1].checked_add(len).is_none_or(|end| end > limit) {
                    return Err(Bad);
                }
                let route =
                    Route { space: space as u8, base: a[1], len, handler: thread_or_nil(a[3])? };
                Syscall::GuestRoute { vcpu: thread(a[0])?, route }
            }
            Sysno::GuestInterrupt => {
                if a[1] == 0 || a[1] >> guest_interrupt::PINS != 0 {
                    return Err(Bad);
                }
                Syscall::GuestInterrupt { vcpu: thread(a[0])?, pins: a[1] as u32 }
            }
        })
    }
}

/// An id that names a thread (or is NIL, if `nil` allows it).
fn thread_id(raw: u64, nil: bool) -> Result<ThreadId, Error> {
    let id = ThreadId::from_raw(raw).ok_or(Error::InvalidArgument)?;
    match id.kind() {
        IdKind::Thread { .. } => Ok(id),
        IdKind::Nil if nil => Ok(id),
        _ => Err(Error::InvalidArgument),
    }
}

impl<M: Machine> Kernel<M> {
    /// The running thread made a system call; its context holds the registers.
    pub fn syscall(&mut self) -> Next {
        let Some(me) = self.sched.current else {
            return self.reschedule(None);
        };
        let (nr, args) = self.threads[me].ctx.syscall();
        let result = match Syscall::decode(nr, args) {
            Ok(call) => self.execute(me, call),
            Err(e) => Some(Err(e)),
        };
        if let Some(result) = result {
            if self.threads[me].state != State::Free {
                let ret = match result {
                    Ok([a, b]) => [0, a, b],
                    Err(e) => [e as u64, 0, 0],
                };
                self.threads[me].ctx.set_ret(ret);
            }
        }
        self.reschedule(Some(me))
    }

    /// Run `call` for `me`; `None` if the call writes its results itself (IPC, which may
    /// complete later).
    fn execute(&mut self, me: usize, call: Syscall) -> Option<SysResult> {
        Some(match call {
            Syscall::Ipc { to, from, timeouts, window } => {
                self.sys_ipc(me, to, from, timeouts, window);
                return None;
            }
            Syscall::Unmap { fpage, own } => self.sys_unmap(me, fpage, own),
            Syscall::ThreadSwitch { to } => self.sys_thread_switch(me, to),
            Syscall::Schedule { dest, prio, timeslice } => {
                self.sys_schedule(me, dest, prio, timeslice)
            }
            Syscall::ExchangeRegisters { dest, flags, ip, sp } => {
                self.sys_exchange_registers(me, dest, flags, ip, sp)
            }
            Syscall::ThreadControl { op, target, pager, supervisor } => {
                self.sys_thread_control(me, op, target, pager, supervisor)
            }
            Syscall::TaskNew { pager, ip, sp, kind } => self.sys_task_new(me, pager, ip, sp, kind),
            Syscall::IrqControl { op, irq, thread } => self.sys_irq_control(me, op, irq, thread),
            Syscall::DebugWrite { addr, len } => self.sys_debug_write(me, addr, len),
            Syscall::GuestRoute { vcpu, route } => self.sys_guest_route(me, vcpu, route),
            Syscall::GuestInterrupt { vcpu, pins } => self.sys_guest_interrupt(me, vcpu, pins),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{Rights, Timeout};

    #[test]
    fn decode_checks_form() {
        let t = ThreadId::new(3, 1).raw();
        let window = Fpage::complete(Rights::ALL);
        let pair = Timeout::pair(Timeout::ZERO, Timeout::NEVER);
        let ipc = Syscall::decode(0, [t, ThreadId::ANY.raw(), pair, window.raw()]);
        assert_eq!(
            ipc,
            Ok(Syscall::Ipc {
                to: ThreadId(t as u32),
                from: ThreadId::ANY,
                timeouts: pair,
                window
            })
        );
        let bad = [
            (0, [ThreadId::ANY.raw(), 0, 0, 0]),    // cannot send to ANY
            (0, [ThreadId::irq(1).raw(), 0, 0, 0]), // nor to an interrupt
            (0, [t, 0, 0, 0x808]),                  // reserved fpage bits
            (1, [0, 2, 0, 0]),                      // unknown unmap flag
            (3, [t, 256, NO_CHANGE, 0]),            // priority out of range
            (3, [t, NO_CHANGE, 1 << 32, 0]),        // time slice out of range
            (4, [t, exregs::HALT | exregs::RESUME, 0, 0]),
            (4, [t, 32, 0, 0]),
            (5, [4, t, 0, 0]),                   // unknown operation
            (5, [0, 0, 0, 0]),                   // target NIL
            (6, [ThreadId::ANY.raw(), 0, 0, 0]), // pager ANY
            (7, [3, 0, 0, 0]),
            (7, [0, 1 << 16, t, 0]),
        ];
        for (nr, args) in bad {
            assert_eq!(Syscall::decode(nr, args), Err(Error::InvalidArgument), "{nr} {args:x?}");
        }
        let mmio = guest_route::MMIO << 32;
        for a2 in [0, mmio, 2 << 32 | 1, 1 << 40 | 1] {
            assert_eq!(Syscall::decode(9, [t, 0, a2, t]), Err(Error::InvalidArgument), "{a2:x}");
        }
        assert_eq!(Syscall::decode(9, [t, 0xffff, 2, t]), Err(Error::InvalidArgument));
        assert_eq!(Syscall::decode(9, [t, u64::MAX, mmio | 1, t]), Err(Error::InvalidArgument));
        assert_eq!(Syscall::decode(9, [0, 0, 1, t]), Err(Error::InvalidArgument), "no guest");
        let r = Route { space: 1, base: 0xd000_0000, len: 0x1000, handler: ThreadId::NIL };
        assert_eq!(
            Syscall::decode(9, [t, 0xd000_0000, mmio | 0x1000, 0]),
            Ok(Syscall::GuestRoute { vcpu: ThreadId(t as u32), route: r })
        );
        assert!(
            r.catches(1, 0xd000_0fff) && !r.catches(1, 0xd000_1000) && !r.catches(0, 0xd000_0000)
        );
        for pins in [0, 1 << 24, u64::MAX] {
            assert_eq!(Syscall::decode(10, [t, pins, 0, 0]), Err(Error::InvalidArgument));
        }
        assert_eq!(Syscall::decode(10, [0, 1, 0, 0]), Err(Error::InvalidArgument), "no guest");
        assert_eq!(
            Syscall::decode(10, [t, 1 << 23 | 1 << 5, 0, 0]),
            Ok(Syscall::GuestInterrupt { vcpu: ThreadId(t as u32), pins: 1 << 23 | 1 << 5 })
        );
        assert_eq!(Syscall::decode(11, [0; 4]), Err(Error::UnknownSyscall));
        assert_eq!(Syscall::decode(u64::MAX, [0; 4]), Err(Error::UnknownSyscall));
    }
}
