//! What the kernel can say about itself when something hangs: one summary per live
//! thread and per attached interrupt line, as plain numbers and names for the arch
//! layer to print (the vmm asks for it when a hosted guest's exit waits too long; the
//! kernel prints nothing on its own).
//!
//! Reading only: nothing here changes a thread, so a dump in the middle of a hang
//! does not disturb what it shows.

use crate::abi::ThreadId;
use crate::fault::Fault;
use crate::machine::{Context, Machine};
use crate::thread::{Peer, State};
use crate::Kernel;

/// One live thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadSummary {
    pub id: ThreadId,
    pub task: usize,
    pub prio: u8,
    /// The state's name: `halted`, `ready`, `running`, `send`, `recv`, `faulted`,
    /// `in-guest`.
    pub state: &'static str,
    /// Whom it sends to or receives from: a thread, an interrupt line's id
    /// (`ThreadId::irq`), or NIL (anyone, or nobody).
    pub peer: ThreadId,
    /// Its user instruction pointer.
    pub ip: u64,
    /// The fault being handled: 1 page, 2 exception, 3 guest exit (0 none), and the
    /// address (the fault address, vector, or the exit's port or MMIO address).
    pub fault: (u8, u64),
    /// Threads queued sending to it.
    pub senders: usize,
}

/// One interrupt line with a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqSummary {
    pub line: u16,
    pub handler: ThreadId,
    /// It fired while the handler was not waiting for it.
    pub pending: bool,
}

impl<M: Machine> Kernel<M> {
    /// Every live thread, in slot order.
    pub fn thread_summaries(&self) -> impl Iterator<Item = ThreadSummary> + '_ {
        self.threads.iter().enumerate().filter(|(_, t)| t.state != State::Free).map(
            move |(i, t)| {
                let (state, peer) = match t.state {
                    State::Free | State::Halted => ("halted", ThreadId::NIL),
                    State::Ready if self.sched.current == Some(i) => ("running", ThreadId::NIL),
                    State::Ready => ("ready", ThreadId::NIL),
                    State::SendBlocked { to, .. } => ("send", to),
                    State::RecvBlocked(r) => match r.from {
                        Peer::Thread(from) => ("recv", from),
                        Peer::Irq(line) => ("recv", ThreadId::irq(line)),
                        Peer::Any => ("recv", ThreadId::NIL),
                    },
                    State::Faulted => ("faulted", ThreadId::NIL),
                    State::InGuest => ("in-guest", ThreadId::NIL),
                };
                let fault = match t.fault {
                    None => (0, 0),
                    Some(Fault::Page { addr, .. }) => (1, addr),
                    Some(Fault::Exception { vector, .. }) => (2, vector),
                    Some(Fault::Guest(e)) => (3, e.addr),
                };
                ThreadSummary {
                    id: t.id,
                    task: t.task,
                    prio: t.prio,
                    state,
                    peer,
                    ip: t.ctx.ip(),
                    fault,
                    senders: self.senders.iter(&t.senders).count(),
                }
            },
        )
    }

    /// Every interrupt line that has a handler.
    pub fn irq_summaries(&self) -> impl Iterator<Item = IrqSummary> + '_ {
        self.irqs.iter().enumerate().filter(|(_, l)| l.handler != ThreadId::NIL).map(|(line, l)| {
            IrqSummary { line: line as u16, handler: l.handler, pending: l.pending }
        })
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::IrqSummary;
    use crate::abi::{irq_control, Sysno, ThreadId};
    use crate::testing::*;

    #[test]
    fn a_blocked_receiver_and_its_queued_sender_are_shown() {
        let (mut k, root) = boot();
        let server = spawn(&mut k, root, 30, NIL);
        let client = spawn(&mut k, root, 20, NIL);
        assert_eq!(settle(&mut k), Some(server));
        // the server waits for the root only; the client sends to it and queues
        ipc(&mut k, server, NIL, root, ZERO, NEVER, msg(0, &[]));
        assert_eq!(settle(&mut k), Some(client));
        ipc(&mut k, client, server, NIL, NEVER, ZERO, msg(0, &[]));
        let s: Vec<_> = k.thread_summaries().collect();
        let of = |t: ThreadId| *s.iter().find(|x| x.id == t).unwrap();
        assert_eq!((of(server).state, of(server).peer, of(server).senders), ("recv", root, 1));
        assert_eq!((of(client).state, of(client).peer), ("send", server));
        assert_eq!(s.len(), 3, "root, server, client: {s:?}");
        assert_eq!(k.irq_summaries().count(), 0);
    }

    #[test]
    fn a_driver_waiting_for_its_interrupt_names_the_line() {
        let (mut k, root) = boot();
        let driver = spawn(&mut k, root, 30, NIL);
        let attach = [irq_control::ATTACH, 2, driver.raw(), 0];
        sys(&mut k, root, Sysno::IrqControl, attach, msg(0, &[]));
        assert_eq!(settle(&mut k), Some(driver));
        // it fires while the driver runs: pending
        k.interrupt(2);
        let lines: Vec<_> = k.irq_summaries().collect();
        assert_eq!(lines, [IrqSummary { line: 2, handler: driver, pending: true }]);
        // the driver takes it, acknowledges, and waits for the next one
        let wait = |k: &mut K| ipc(k, driver, NIL, ThreadId::irq(2), ZERO, NEVER, msg(0, &[]));
        wait(&mut k);
        sys(&mut k, driver, Sysno::IrqControl, [irq_control::ACK, 2, 0, 0], msg(0, &[]));
        wait(&mut k);
        let d = k.thread_summaries().find(|t| t.id == driver).unwrap();
        assert_eq!((d.state, d.peer), ("recv", ThreadId::irq(2)));
        assert!(k.irq_summaries().all(|l| !l.pending));
    }
}
