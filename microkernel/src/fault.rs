//! Faults: page faults go as IPC to the thread's pager, exceptions to its supervisor.
//!
//! The kernel makes the faulting thread call its handler: the thread sends a message
//! built from the fault (see `abi::label`) and waits for the handler's reply with an
//! infinite timeout and the whole address space as its receive window. A page-fault
//! reply normally carries map items; the thread then retries the access. An exception
//! reply with two words sets ip and sp, which lets a supervisor restart the thread.
//! The thread's own registers are never touched by the fault message. Without a live
//! handler (a page fault falls back to the supervisor) the thread becomes `Faulted`
//! until `exchange_registers` resumes it.
//!
//! Guest exits are faults too. A guest task's thread is a vCPU of a guest VM that the
//! machine runs outside VM0 (`State::InGuest`); when the VM exits to its monitor for
//! an access nothing below absorbed, the machine calls [`Kernel::guest_exit`] and the
//! vCPU thread calls its pager with the exit (`abi::label::GUEST_EXIT`), exactly as a
//! page fault does. The handler's reply carries the value an `in` or MMIO read returns
//! and may map pages into the guest's physical memory; the machine then resumes the
//! vCPU ([`Machine::guest_resume`]). A vCPU's first exit is `guest::START`, sent when
//! the task is created: its reply maps the guest's RAM. The pager may route ranges of
//! ports or addresses to device tasks (`route.rs`); those exits go there instead.
//! An exit outlives its handler: deleting the thread that has it (or that it waits
//! for) raises it again, to whoever handles it now (`Kernel::redeliver`), which is
//! how a restarted device task takes over the access its predecessor died in.

use crate::abi::{guest, label, Fpage, MsgTag, Rights, ThreadId, Timeout, MR_COUNT, PAGE_BITS};
use crate::kernel::{Kernel, Next};
use crate::machine::{Context, Machine};
use crate::mapdb::At;
use crate::thread::{Peer, Receive, State};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Page { addr: u64, access: Rights, ip: u64 },
    Exception { vector: u64, code: u64, ip: u64, sp: u64 },
    Guest(GuestExit),
}

/// Why a guest vCPU stopped (see `abi::guest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestExit {
    /// `guest::START`, `IO_IN`, ...
    pub kind: u8,
    /// Access size in bytes (1, 2, 4 or 8; 0 for exits that are no access).
    pub size: u8,
    /// Port or guest-physical address.
    pub addr: u64,
    /// The value written (`IO_OUT`, `MMIO_WRITE`); the reply's value once answered.
    pub data: u64,
    /// Once answered: the guest interrupt lines (bit n: IOAPIC pin n) the reply asks to
    /// pulse before the vCPU runs again (the reply's MR2).
    pub pulse: u32,
}

impl Fault {
    /// The message the faulting thread sends.
    pub fn message(self) -> [u64; MR_COUNT] {
        let mut m = [0; MR_COUNT];
        match self {
            Fault::Page { addr, access, ip } => {
                m[..3].copy_from_slice(&[
                    MsgTag::new(label::PAGE_FAULT, 2, 0, access.bits() as u64).0,
                    addr,
                    ip,
                ]);
            }
            Fault::Exception { vector, code, ip, sp } => {
                m[..5].copy_from_slice(&[
                    MsgTag::new(label::EXCEPTION, 4, 0, 0).0,
                    vector,
                    code,
                    ip,
                    sp,
                ]);
            }
            Fault::Guest(e) => {
                m[..4].copy_from_slice(&[
                    MsgTag::new(label::GUEST_EXIT, 3, 0, 0).0,
                    e.kind as u64 | (e.size as u64) << 8,
                    e.addr,
                    e.data,
                ]);
            }
        }
        m
    }
}

impl<M: Machine> Kernel<M> {
    /// The running thread faulted on user address `addr` wanting `access`.
    pub fn page_fault(&mut self, addr: u64, access: Rights) -> Next {
        let Some(me) = self.sched.current else {
            return self.reschedule(None);
        };
        let want = if access.is_empty() { Rights::R } else { access };
        let at = At { task: self.task_id(me), vpn: addr >> PAGE_BITS };
        if self.mapdb.lookup(at).is_some_and(|(_, have)| have.contains(want)) {
            // Already resolved (e.g. a stale TLB entry): just retry.
            return self.reschedule(Some(me));
        }
        let ip = self.threads[me].ctx.ip();
        let pager = self.threads[me].pager;
        let handler = match self.live(pager) {
            Some(p) if p != me => pager,
            _ => self.threads[me].supervisor,
        };
        self.raise(me, Fault::Page { addr, access: want, ip }, handler);
        self.reschedule(Some(me))
    }

    /// The running thread raised CPU exception `vector` with error `code`.
    pub fn exception(&mut self, vector: u64, code: u64) -> Next {
        let Some(me) = self.sched.current else {
            return self.reschedule(None);
        };
        let ctx = &self.threads[me].ctx;
        let fault = Fault::Exception { vector, code, ip: ctx.ip(), sp: ctx.sp() };
        self.raise(me, fault, self.threads[me].supervisor);
        self.reschedule(Some(me))
    }

    fn raise(&mut self, me: usize, fault: Fault, handler: ThreadId) {
        if let Some(partner) = self.raise_to(me, fault, handler) {
            self.direct_switch(partner);
        }
    }

    /// Make `me` call `handler` with `fault`; returns the handler if it got it at once.
    fn raise_to(&mut self, me: usize, fault: Fault, handler: ThreadId) -> Option<usize> {
        self.threads[me].fault = Some(fault);
        if self.live(handler).is_none_or(|h| h == me) {
            self.make_blocked(me, State::Faulted);
            return None;
        }
        let reply = Receive {
            from: Peer::Thread(handler),
            window: Fpage::complete(Rights::ALL),
            timeout: Timeout::NEVER,
        };
        self.send(me, handler, Some(reply), Timeout::NEVER)
    }

    /// The new vCPU thread `i` of a guest task sends its `START` exit.
    pub(crate) fn start_vcpu(&mut self, i: usize) {
        let start = GuestExit { kind: guest::START as u8, size: 0, addr: 0, data: 0, pulse: 0 };
        self.raise_to(i, Fault::Guest(start), self.threads[i].pager);
    }

    /// Guest vCPU `vcpu`, running in its VM, exited with `exit`: it calls its pager, or
    /// the thread routed for the exit's port or address (`route.rs`).
    /// Ignored unless `vcpu` is a vCPU thread in the guest (a stale or forged report).
    pub fn guest_exit(&mut self, vcpu: ThreadId, exit: GuestExit) -> Next {
        let entered = self.sched.current;
        if let Some(i) = self.live(vcpu).filter(|&i| self.threads[i].state == State::InGuest) {
            let handler = self.exit_handler(i, &exit);
            self.raise_to(i, Fault::Guest(exit), handler);
        }
        self.reschedule(entered)
    }

    /// The handler of vCPU `i`'s pending exit is gone (deleted before it answered, or
    /// while the exit waited for it): raise the exit again, to the thread that handles
    /// it now — a route's new handler (a restarted device task), else the pager. Returns
    /// false if `i` has no unanswered guest exit. The guest's access has not completed:
    /// whoever gets it now performs it, perhaps again (the dead handler may have done
    /// part of it), so handlers must tolerate a replay.
    pub(crate) fn redeliver(&mut self, i: usize) -> bool {
        let Some(Fault::Guest(exit)) = self.threads[i].fault else {
            return false;
        };
        let handler = self.exit_handler(i, &exit);
        // `raise_to` only sends to a live handler, so this cannot fail back here.
        self.raise_to(i, Fault::Guest(exit), handler);
        true
    }

    /// The vCPU thread `i` got its handler's answer: back into the guest.
    pub(crate) fn enter_guest(&mut self, i: usize) {
        let (value, pulse) = match self.threads[i].fault.take() {
            Some(Fault::Guest(e)) => (e.data, e.pulse),
            _ => (0, 0),
        };
        self.make_blocked(i, State::InGuest);
        let (id, task) = (self.threads[i].id, self.task_id(i));
        self.machine.guest_resume(id, task, value, pulse);
    }
}

#[cfg(test)]
mod tests {
    use crate::abi::{exregs, label, Fpage, MapItem, MsgTag, Rights, Sysno, ThreadId, MR_COUNT};
    use crate::mapdb::At;
    use crate::testing::*;
    use crate::thread::State;
    use crate::Next;

    fn state(k: &K, t: ThreadId) -> State {
        k.threads[k.live(t).unwrap()].state
    }

    #[test]
    fn page_fault_goes_to_the_pager() {
        let (mut k, root) = boot();
        // a pager thread in the root task (which owns the memory)
        let pager = spawn(&mut k, root, 30, NIL);
        let t = spawn_task(&mut k, 20, pager);
        assert_eq!(settle(&mut k), Some(pager));
        assert_eq!(ipc(&mut k, pager, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, t));
        let before =
            Regs { ip: 0x40_1234, sp: 0x7000, mrs: [5; MR_COUNT], ret: [6; 3], ..Regs::default() };
        *k.context_mut(t).unwrap() = before.clone();
        // the write fault becomes a message from t, and the pager runs at once
        assert_eq!(k.page_fault(0x40_1234, Rights::W), switch(&k, pager));
        k.check();
        let r = regs(&k, pager);
        assert_eq!(r.ret, [0, t.raw(), 0]);
        assert_eq!(
            r.mrs[..3],
            [MsgTag::new(label::PAGE_FAULT, 2, 0, Rights::W.bits() as u64).0, 0x40_1234, 0x40_1234]
        );
        // the pager replies with a mapping; the hotspot places it at the fault address
        let mut reply = [0; MR_COUNT];
        reply[0] = MsgTag::new(0, 0, 2, 0).0;
        let fpage = Fpage::new(0x10_3000, 12, Rights::RW).unwrap();
        reply[1..3].copy_from_slice(&MapItem { grant: false, hotspot: 0x40_1234, fpage }.raw());
        assert_eq!(ipc(&mut k, pager, t, ANY, ZERO, NEVER, reply), switch(&k, t));
        assert_eq!(
            k.mapdb.lookup(At { task: k.task_of(t).unwrap(), vpn: 0x401 }),
            Some((0x103, Rights::RW))
        );
        assert_eq!(state(&k, t), State::Ready);
        assert_eq!(regs(&k, t), before, "the fault IPC left the thread's registers alone");
        // the access now succeeds: a repeated fault is spurious and just resumes
        assert_eq!(k.page_fault(0x40_1234, Rights::W), Next::Resume);
        assert_eq!(k.page_fault(0x40_1000, Rights::X), switch(&k, pager), "no execute right");
    }

    #[test]
    fn pager_not_waiting_yet() {
        let (mut k, root) = boot();
        let t = spawn_task(&mut k, 20, root);
        assert_eq!(settle(&mut k), Some(t));
        assert_eq!(k.page_fault(0x5000, Rights::R), switch(&k, root));
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).mrs[1], 0x5000);
        // an empty reply resumes the thread, which will fault again
        assert_eq!(ipc(&mut k, root, t, NIL, ZERO, ZERO, msg(0, &[])), switch(&k, t));
        assert_eq!(k.page_fault(0x5000, Rights::R), switch(&k, root));
    }

    #[test]
    fn exception_to_supervisor_restarts() {
        let (mut k, root) = boot();
        let sup = spawn(&mut k, root, 30, NIL);
        let t = spawn_task(&mut k, 20, root);
        tcb(&mut k, t).supervisor = sup;
        assert_eq!(settle(&mut k), Some(sup));
        assert_eq!(ipc(&mut k, sup, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, t));
        k.context_mut(t).unwrap().ip = 0xdead;
        k.context_mut(t).unwrap().sp = 0xbeef;
        assert_eq!(k.exception(13, 0x18), switch(&k, sup));
        let r = regs(&k, sup);
        assert_eq!(
            (r.ret[1], r.mrs[..5].to_vec()),
            (
                t.raw(),
                [MsgTag::new(label::EXCEPTION, 4, 0, 0).0, 13, 0x18, 0xdead, 0xbeef].to_vec()
            )
        );
        // the supervisor restarts the thread at a new ip and sp
        assert_eq!(ipc(&mut k, sup, t, ANY, ZERO, NEVER, msg(0, &[0x1000, 0x9000])), switch(&k, t));
        assert_eq!((regs(&k, t).ip, regs(&k, t).sp), (0x1000, 0x9000));
        assert_eq!(state(&k, t), State::Ready);
    }

    #[test]
    fn no_handler_means_faulted_until_resumed() {
        let (mut k, root) = boot();
        let t = spawn_task(&mut k, 20, NIL);
        tcb(&mut k, t).supervisor = NIL;
        (k.context_mut(t).unwrap().ip, k.context_mut(t).unwrap().sp) = (0x2222, 0x3333);
        assert_eq!(settle(&mut k), Some(t));
        assert_eq!(k.page_fault(0x5000, Rights::R), switch(&k, root));
        assert_eq!(state(&k, t), State::Faulted);
        // the handler dying during fault IPC also leaves the thread faulted
        let u = spawn_task(&mut k, 20, NIL);
        let helper = spawn(&mut k, root, 5, NIL);
        tcb(&mut k, u).supervisor = helper;
        assert_eq!(settle(&mut k), Some(u));
        assert_eq!(k.exception(6, 0), switch(&k, root));
        assert!(matches!(state(&k, u), State::SendBlocked { .. }));
        let delete = [crate::abi::thread_control::DELETE, helper.raw(), 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::ThreadControl, delete, msg(0, &[])), Next::Resume);
        assert_eq!(state(&k, u), State::Faulted);
        // exchange_registers resumes a faulted thread elsewhere
        let args = [t.raw(), exregs::RESUME | exregs::SET_IP, 0x3000, 0];
        assert_eq!(sys(&mut k, root, Sysno::ExchangeRegisters, args, msg(0, &[])), switch(&k, t));
        assert_eq!((state(&k, t), regs(&k, t).ip), (State::Ready, 0x3000));
        assert_eq!(regs(&k, root).ret, [0, 0x2222, 0x3333], "old ip and sp");
    }

    /// `who` routes `vcpu`'s MMIO exits in `base..base + len` to `h` (NIL: removes the
    /// route at `base`); returns the status.
    fn route_mmio(
        k: &mut K,
        who: ThreadId,
        vcpu: ThreadId,
        base: u64,
        len: u64,
        h: ThreadId,
    ) -> u64 {
        use crate::abi::guest_route;
        let a = [vcpu.raw(), base, guest_route::MMIO << 32 | len, h.raw()];
        sys(k, who, Sysno::GuestRoute, a, msg(0, &[]));
        regs(k, who).ret[0]
    }

    /// Root makes a guest task whose pager it is: the vCPU's exits reach it as IPC.
    fn guest(k: &mut K, root: ThreadId) -> (ThreadId, crate::abi::TaskId) {
        let flags = crate::abi::task_new::GUEST;
        assert_eq!(
            sys(k, root, Sysno::TaskNew, [root.raw(), 0, 0, flags], msg(0, &[])),
            Next::Resume
        );
        let r = regs(k, root);
        assert_eq!(r.ret[0], 0, "task_new(GUEST)");
        let vcpu = ThreadId(r.ret[1] as u32);
        (vcpu, k.task_of(vcpu).unwrap())
    }

    #[test]
    fn guest_exits_are_ipc_to_the_pager_and_replies_resume_the_vcpu() {
        use crate::abi::guest;
        use crate::GuestExit;
        let (mut k, root) = boot();
        let (vcpu, task) = guest(&mut k, root);
        assert!(matches!(state(&k, vcpu), State::SendBlocked { .. }), "START waits for the pager");
        // START: the pager maps 16 pages of its RAM at guest-physical 0
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        let r = regs(&k, root);
        assert_eq!(r.ret[1], vcpu.raw());
        assert_eq!(r.mrs[..4], [MsgTag::new(label::GUEST_EXIT, 3, 0, 0).0, guest::START, 0, 0]);
        let mut reply = [0; MR_COUNT];
        reply[0] = MsgTag::new(0, 0, 2, 0).0;
        let ram = Fpage::new(0x10_0000, 16, Rights::ALL).unwrap();
        reply[1..3].copy_from_slice(&MapItem { grant: false, hotspot: 0, fpage: ram }.raw());
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, reply), Next::Resume);
        assert_eq!(state(&k, vcpu), State::InGuest);
        assert_eq!(k.machine.resumed, [(vcpu, task, 0, 0)]);
        for p in 0..16 {
            assert_eq!(k.mapdb.lookup(At { task, vpn: p }), Some((0x100 + p, Rights::ALL)));
        }
        // an `in` exit: the reply's first word is the value read
        let exit = GuestExit { kind: guest::IO_IN as u8, size: 1, addr: 0x81, data: 0, pulse: 0 };
        assert_eq!(k.guest_exit(vcpu, exit), Next::Resume, "root runs on; the vCPU waits");
        k.check();
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).mrs[1..4], [guest::IO_IN | 1 << 8, 0x81, 0]);
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, msg(0, &[0x42])), Next::Resume);
        assert_eq!(k.machine.resumed.last(), Some(&(vcpu, task, 0x42, 0)));
        // an `out` exit carries the value written; an empty reply resumes with 0
        let out = GuestExit {
            kind: guest::IO_OUT as u8,
            size: 4,
            addr: 0x84,
            data: 0xdead_beef,
            pulse: 0,
        };
        assert_eq!(k.guest_exit(vcpu, out), Next::Resume);
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).mrs[1..4], [guest::IO_OUT | 4 << 8, 0x84, 0xdead_beef]);
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, msg(0, &[])), Next::Resume);
        assert_eq!(k.machine.resumed.last(), Some(&(vcpu, task, 0, 0)));
        // the reply's second word names guest interrupt lines to pulse on resume
        assert_eq!(k.guest_exit(vcpu, out), Next::Resume);
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, msg(0, &[0, 1 << 4])), Next::Resume);
        assert_eq!(k.machine.resumed.last(), Some(&(vcpu, task, 0, 1 << 4)));
        // and a value left over from an earlier reply is not pulsed again
        assert_eq!(k.guest_exit(vcpu, out), Next::Resume);
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, msg(0, &[7])), Next::Resume);
        assert_eq!(k.machine.resumed.last(), Some(&(vcpu, task, 7, 0)));
        // reports for threads that are not in a guest change nothing
        assert_eq!(k.guest_exit(root, exit), Next::Resume);
        assert_eq!(k.guest_exit(ThreadId::new(15, 9), exit), Next::Resume);
        assert_eq!(state(&k, root), State::Ready);
        // a vCPU's registers are its VM's: no exchange_registers, no second vCPU yet
        let ex = [vcpu.raw(), exregs::HALT, 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::ExchangeRegisters, ex, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).ret[0], crate::abi::Error::InvalidArgument as u64);
        let create = [crate::abi::thread_control::CREATE, vcpu.raw(), 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::ThreadControl, create, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).ret[0], crate::abi::Error::InvalidArgument as u64);
        assert_eq!(state(&k, vcpu), State::InGuest);
        // deleting the guest removes its memory and its space
        let delete = [crate::abi::thread_control::DELETE_TASK, vcpu.raw(), 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::ThreadControl, delete, msg(0, &[])), Next::Resume);
        assert!(!k.machine.mirror.spaces.contains(&task));
        assert!(k.mappings().iter().all(|m| m.0 != task));
    }

    #[test]
    fn routed_exits_go_to_their_device_thread_and_its_reply_resumes_the_vcpu() {
        use crate::abi::{guest, guest_route, Error};
        use crate::GuestExit;
        let (mut k, root) = boot();
        let (vcpu, task) = guest(&mut k, root);
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, msg(0, &[])), Next::Resume);
        // a device task (higher priority than root) waits for messages
        let dev = spawn_task(&mut k, 20, root);
        assert_eq!(settle(&mut k), Some(dev));
        assert_eq!(ipc(&mut k, dev, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, root));
        let route = |k: &mut K, who: ThreadId, base: u64, len: u64, h: ThreadId| {
            route_mmio(k, who, vcpu, base, len, h)
        };
        assert_eq!(route(&mut k, root, 0xd000_0000, 0x1000, dev), 0);
        assert_eq!(route(&mut k, root, 0xd000_0800, 0x1000, dev), Error::InUse as u64);
        assert_eq!(route(&mut k, root, 0xd000_1000, 0x1000, vcpu), Error::InvalidArgument as u64);
        let bad = [root.raw(), 0, guest_route::MMIO << 32 | 1, dev.raw()];
        sys(&mut k, root, Sysno::GuestRoute, bad, msg(0, &[]));
        assert_eq!(regs(&k, root).ret[0], Error::InvalidArgument as u64, "root is no vCPU");
        // an MMIO exit in the range reaches the device thread, not the pager
        let write = GuestExit {
            kind: guest::MMIO_WRITE as u8,
            size: 4,
            addr: 0xd000_0050,
            data: 1,
            pulse: 0,
        };
        assert_eq!(k.guest_exit(vcpu, write), switch(&k, dev));
        assert_eq!(regs(&k, dev).ret[1], vcpu.raw());
        assert_eq!(regs(&k, dev).mrs[1..4], [guest::MMIO_WRITE | 4 << 8, 0xd000_0050, 1]);
        // a routed device may raise the guest's interrupts any time, not only in replies
        let interrupt = |k: &mut K, who: ThreadId, vcpu: ThreadId, pins: u64| {
            sys(k, who, Sysno::GuestInterrupt, [vcpu.raw(), pins, 0, 0], msg(0, &[]));
            regs(k, who).ret[0]
        };
        assert_eq!(interrupt(&mut k, dev, vcpu, 1 << 6), 0);
        assert_eq!(interrupt(&mut k, dev, root, 1 << 6), Error::InvalidArgument as u64);
        assert_eq!(k.machine.interrupted, [(task, 1 << 6)]);
        // its reply resumes the vCPU with the interrupt it asks for; the pager saw nothing
        let next = ipc(&mut k, dev, vcpu, ANY, ZERO, NEVER, msg(0, &[0, 1 << 5]));
        assert_eq!(next, switch(&k, root));
        assert_eq!(k.machine.resumed.last(), Some(&(vcpu, task, 0, 1 << 5)));
        // only the pager may route; the device thread cannot (it is not the vCPU's pager)
        let port = GuestExit { kind: guest::IO_IN as u8, size: 1, addr: 0x3f8, data: 0, pulse: 0 };
        assert_eq!(k.guest_exit(vcpu, port), Next::Resume, "ports still go to the pager");
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).mrs[2], 0x3f8);
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, msg(0, &[0])), Next::Resume);
        // the device thread dies: its exits fall back to the pager
        let del = [crate::abi::thread_control::DELETE_TASK, dev.raw(), 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::ThreadControl, del, msg(0, &[])), Next::Resume);
        assert_eq!(k.guest_exit(vcpu, write), Next::Resume);
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).mrs[2], 0xd000_0050);
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, msg(0, &[0])), Next::Resume);
        // NIL removes the route; removing it twice is an error; the table is bounded
        assert_eq!(route(&mut k, root, 0xd000_0000, 1, NIL), 0);
        assert_eq!(route(&mut k, root, 0xd000_0000, 1, NIL), Error::NotExist as u64);
        for i in 0..guest_route::MAX as u64 {
            assert_eq!(route(&mut k, root, i << 12, 0x1000, root), 0);
        }
        assert_eq!(route(&mut k, root, 0x10_0000, 0x1000, root), Error::NoMemory as u64);
        // the pager may raise interrupts; a task that handles none of the routes may not
        assert_eq!(interrupt(&mut k, root, vcpu, 1 << 4), 0);
        let stranger = spawn_task(&mut k, 30, root);
        assert_eq!(settle(&mut k), Some(stranger));
        assert_eq!(interrupt(&mut k, stranger, vcpu, 1 << 5), Error::NoPermission as u64);
        assert_eq!(k.machine.interrupted, [(task, 1 << 6), (task, 1 << 4)]);
    }

    #[test]
    fn an_exit_whose_handler_dies_goes_to_the_new_handler_or_the_pager() {
        use crate::abi::{guest, thread_control};
        use crate::GuestExit;
        let (mut k, root) = boot();
        let (vcpu, task) = guest(&mut k, root);
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, msg(0, &[])), Next::Resume);
        let route = |k: &mut K, base: u64, h: ThreadId| route_mmio(k, root, vcpu, base, 0x1000, h);
        let device = |k: &mut K| {
            let d = spawn_task(k, 20, root);
            assert_eq!(settle(k), Some(d));
            assert_eq!(ipc(k, d, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(k, root));
            d
        };
        let delete = |k: &mut K, t: ThreadId| {
            let del = [thread_control::DELETE_TASK, t.raw(), 0, 0];
            sys(k, root, Sysno::ThreadControl, del, msg(0, &[]));
            assert_eq!(regs(k, root).ret[0], 0);
            k.check();
        };
        let old = device(&mut k);
        assert_eq!(route(&mut k, 0xd000_0000, old), 0);
        let write = GuestExit {
            kind: guest::MMIO_WRITE as u8,
            size: 4,
            addr: 0xd000_0050,
            data: 7,
            pulse: 0,
        };
        let words = [guest::MMIO_WRITE | 4 << 8, 0xd000_0050, 7];
        // the device thread takes the exit and dies in it (a page fault nobody answers)
        assert_eq!(k.guest_exit(vcpu, write), switch(&k, old));
        assert_eq!(k.page_fault(0xdead_0000, Rights::R), switch(&k, root));
        // its replacement takes over the route before the old task is deleted ...
        let new = device(&mut k);
        assert_eq!(route(&mut k, 0xd000_0000, new), 0, "the same range: a new handler");
        delete(&mut k, old);
        // ... and gets the unanswered exit, whose answer resumes the vCPU
        assert_eq!(regs(&k, new).ret[1], vcpu.raw());
        assert_eq!(regs(&k, new).mrs[1..4], words);
        assert_eq!(k.machine.resumed.len(), 1, "only START so far");
        assert_eq!(settle(&mut k), Some(new));
        assert_eq!(
            ipc(&mut k, new, vcpu, ANY, ZERO, NEVER, msg(0, &[0, 1 << 5])),
            switch(&k, root)
        );
        assert_eq!(k.machine.resumed.last(), Some(&(vcpu, task, 0, 1 << 5)));
        // a handler that dies with no successor: the exit goes to the pager
        assert_eq!(k.guest_exit(vcpu, write), switch(&k, new));
        assert_eq!(k.page_fault(0xdead_0000, Rights::R), switch(&k, root));
        delete(&mut k, new);
        assert_eq!(ipc(&mut k, root, NIL, vcpu, ZERO, ZERO, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).mrs[1..4], words, "the pager has the exit");
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, msg(0, &[])), Next::Resume);
        assert_eq!(state(&k, vcpu), State::InGuest);
        // an exit still queued for a busy handler (here: one waiting for its pager) too
        let busy = device(&mut k);
        assert_eq!(route(&mut k, 0xd000_0000, busy), 0);
        assert_eq!(ipc(&mut k, root, busy, NIL, ZERO, ZERO, msg(0, &[])), switch(&k, busy));
        let r = ipc(&mut k, busy, root, root, NEVER, NEVER, msg(0, &[]));
        assert_eq!(r, switch(&k, root));
        assert_eq!(k.guest_exit(vcpu, write), Next::Resume);
        assert!(matches!(state(&k, vcpu), State::SendBlocked { .. }));
        delete(&mut k, busy);
        assert_eq!(ipc(&mut k, root, NIL, vcpu, ZERO, ZERO, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, root).mrs[1..4], words);
    }

    #[test]
    fn guest_memory_is_guest_physical_and_exits_without_a_pager_stop_the_vcpu() {
        use crate::abi::guest;
        use crate::GuestExit;
        let (mut k, root) = boot();
        let (vcpu, task) = guest(&mut k, root);
        assert_eq!(ipc(&mut k, root, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        // a map item aimed at the MMIO window (at PHYS_END and above) lands nowhere
        let mut reply = [0; MR_COUNT];
        reply[0] = MsgTag::new(0, 0, 2, 0).0;
        let ram = Fpage::new(0x10_0000, 12, Rights::RW).unwrap();
        reply[1..3]
            .copy_from_slice(&MapItem { grant: false, hotspot: guest::PHYS_END, fpage: ram }.raw());
        assert_eq!(ipc(&mut k, root, vcpu, NIL, ZERO, ZERO, reply), Next::Resume);
        assert!(k.mappings().iter().all(|m| m.0 != task));
        assert_eq!(state(&k, vcpu), State::InGuest);
        // the pager goes away: the next exit leaves the vCPU faulted, not resumed
        let server = spawn(&mut k, root, 5, NIL);
        tcb(&mut k, vcpu).pager = server;
        tcb(&mut k, vcpu).supervisor = NIL;
        let del = [crate::abi::thread_control::DELETE, server.raw(), 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::ThreadControl, del, msg(0, &[])), Next::Resume);
        let halt = GuestExit { kind: guest::HALT as u8, size: 0, addr: 0, data: 0, pulse: 0 };
        assert_eq!(k.guest_exit(vcpu, halt), Next::Resume);
        k.check();
        assert_eq!(state(&k, vcpu), State::Faulted);
        assert_eq!(k.machine.resumed.len(), 1);
        // ... and exchange_registers cannot restart it behind its VM's back
        let ex = [vcpu.raw(), exregs::RESUME, 0, 0];
        assert_eq!(sys(&mut k, root, Sysno::ExchangeRegisters, ex, msg(0, &[])), Next::Resume);
        assert_eq!(state(&k, vcpu), State::Faulted);
        // an unprivileged task cannot make guests, nor a privileged guest
        let flags = crate::abi::task_new::GUEST | crate::abi::task_new::PRIVILEGED;
        assert_eq!(
            sys(&mut k, root, Sysno::TaskNew, [root.raw(), 0, 0, flags], msg(0, &[])),
            Next::Resume
        );
        assert_eq!(regs(&k, root).ret[0], crate::abi::Error::InvalidArgument as u64);
    }
}
