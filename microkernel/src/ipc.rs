//! Synchronous IPC: the rendezvous, message transfer, and map items.
//!
//! Rules:
//! - One `ipc` call has an optional send phase then an optional receive phase: send,
//!   receive (from one thread, an interrupt, or any), call (send + receive from the same
//!   partner), reply-and-wait (send with timeout 0 + open receive). The caller passes
//!   from the send phase to the receive phase without a gap in which a reply could be
//!   lost.
//! - Unbuffered: a message moves only when both sides are there, straight from the
//!   sender's message registers into the receiver's (no kernel buffer). If the partner
//!   is not there the thread blocks, or fails at once with timeout 0.
//! - A waiting sender is queued at its destination in arrival order; an open receive
//!   takes pending interrupts first, then the oldest sender.
//! - Map items in the message map or grant pages of the sender into the receiver's
//!   window; their effect is in the mapping database before either side runs again.
//! - Kernel-originated messages (faults) use the same path: the faulting thread is the
//!   sender, its message is synthesized from the fault, and the reply is consumed by the
//!   kernel instead of being written into its registers.
//! - Nothing here recurses: a chain of senders completing one another's receive phases
//!   is walked in a loop.

use crate::abi::{Error, Fpage, IdKind, MapItem, MsgTag, ThreadId, Timeout, MR_COUNT, PAGE_BITS};
use crate::fault::{Fault, GuestExit};
use crate::kernel::Kernel;
use crate::machine::{Context, Machine};
use crate::mapdb::At;
use crate::thread::{Peer, Receive, State};

impl<M: Machine> Kernel<M> {
    /// The `ipc` system call of the running thread `me`.
    pub(crate) fn sys_ipc(
        &mut self,
        me: usize,
        to: ThreadId,
        from: ThreadId,
        timeouts: u64,
        window: Fpage,
    ) {
        let (send_timeout, recv_timeout) = Timeout::split(timeouts);
        let from = match from.kind() {
            IdKind::Nil => None,
            IdKind::Any => Some(Peer::Any),
            IdKind::Irq(n) => Some(Peer::Irq(n)),
            IdKind::Thread { .. } => Some(Peer::Thread(from)),
        };
        let recv = from.map(|from| Receive { from, window, timeout: recv_timeout });
        if to == ThreadId::NIL {
            match recv {
                Some(recv) => self.receive(me, recv),
                None => self.finish(me, Ok(ThreadId::NIL)),
            }
            return;
        }
        if let Err(e) = check_message(&self.threads[me].ctx.mrs()) {
            return self.finish(me, Err(e));
        }
        if let Some(partner) = self.send(me, to, recv, send_timeout) {
            self.direct_switch(partner);
        }
    }

    /// Send phase of the running thread `s`, followed by `then`. Returns the receiver
    /// if the message was delivered.
    pub(crate) fn send(
        &mut self,
        s: usize,
        to: ThreadId,
        then: Option<Receive>,
        timeout: Timeout,
    ) -> Option<usize> {
        let s_id = self.threads[s].id;
        let Some(r) = self.live(to).filter(|&r| r != s) else {
            self.finish(s, Err(Error::SendNotExist));
            return None;
        };
        let rcv = match self.threads[r].state {
            State::RecvBlocked(rcv) if rcv.from == Peer::Any || rcv.from == Peer::Thread(s_id) => {
                rcv
            }
            _ => {
                self.wait_or_fail(s, r, then, timeout);
                return None;
            }
        };
        let result = self.transfer(s, r, rcv.window);
        self.finish(r, result.map(|()| s_id));
        match (result, then) {
            (Err(e), _) => self.finish(s, Err(e)),
            (Ok(()), None) => self.finish(s, Ok(ThreadId::NIL)),
            (Ok(()), Some(then)) => self.receive(s, then),
        }
        Some(r)
    }

    /// Block `s` sending to `r`, or fail at once with timeout 0.
    fn wait_or_fail(&mut self, s: usize, r: usize, then: Option<Receive>, timeout: Timeout) {
        if timeout == Timeout::ZERO {
            return self.finish(s, Err(Error::SendTimeout));
        }
        self.make_blocked(s, State::SendBlocked { to: self.threads[r].id, then });
        self.senders.push_back(&mut self.threads[r].senders, s);
        self.set_deadline(s, timeout);
    }

    /// Receive phase of thread `x`, and of every sender whose call it completes.
    pub(crate) fn receive(&mut self, x: usize, recv: Receive) {
        let mut next = Some((x, recv));
        while let Some((x, recv)) = next {
            next = self.receive_once(x, recv);
        }
    }

    /// Receive phase of `x`. Returns the sender whose send phase this completed, if it
    /// goes on to a receive phase of its own.
    fn receive_once(&mut self, x: usize, recv: Receive) -> Option<(usize, Receive)> {
        let x_id = self.threads[x].id;
        let sender = match recv.from {
            Peer::Irq(n) => {
                if !self.irq_attached(n, x_id) {
                    self.finish(x, Err(Error::RecvNotExist));
                    return None;
                }
                if self.take_pending(n) {
                    self.deliver_irq(x, n);
                    return None;
                }
                None
            }
            Peer::Thread(t) => {
                let Some(s) = self.live(t).filter(|&s| s != x) else {
                    self.finish(x, Err(Error::RecvNotExist));
                    return None;
                };
                matches!(self.threads[s].state, State::SendBlocked { to, .. } if to == x_id)
                    .then_some(s)
            }
            Peer::Any => {
                if let Some(n) = self.pending_irq_of(x_id) {
                    self.take_pending(n);
                    self.deliver_irq(x, n);
                    return None;
                }
                self.threads[x].senders.front()
            }
        };
        let sending = sender.and_then(|s| match self.threads[s].state {
            State::SendBlocked { then, .. } => Some((s, then)),
            _ => None,
        });
        let Some((s, then)) = sending else {
            if recv.timeout == Timeout::ZERO {
                self.finish(x, Err(Error::RecvTimeout));
            } else {
                self.make_blocked(x, State::RecvBlocked(recv));
                self.set_deadline(x, recv.timeout);
            }
            return None;
        };
        self.senders.remove(&mut self.threads[x].senders, s);
        self.clear_deadline(s);
        let s_id = self.threads[s].id;
        let result = self.transfer(s, x, recv.window);
        self.finish(x, result.map(|()| s_id));
        match (result, then) {
            (Err(e), _) => self.finish(s, Err(e)),
            (Ok(()), None) => self.finish(s, Ok(ThreadId::NIL)),
            (Ok(()), Some(then)) => return Some((s, then)),
        }
        None
    }

    /// Move the message of `s` to `r`, carrying out its map items into `window`.
    fn transfer(&mut self, s: usize, r: usize, window: Fpage) -> Result<(), Error> {
        let mut msg = match self.threads[s].fault {
            Some(fault) => fault.message(),
            None => self.threads[s].ctx.mrs(),
        };
        let len = check_message(&msg)?;
        let tag = MsgTag(msg[0]);
        let items = 1 + tag.untyped()..len;
        if !items.is_empty() && window.is_nil() {
            return Err(Error::NoWindow);
        }
        for k in items.step_by(2) {
            let item = MapItem::from_raw(msg[k], msg[k + 1]).ok_or(Error::InvalidMessage)?;
            msg[k + 1] = self.map_item(s, r, item, window)?.raw();
        }
        match self.threads[r].fault {
            Some(Fault::Exception { .. }) if tag.untyped() >= 2 => {
                self.threads[r].ctx.set_ip(msg[1]);
                self.threads[r].ctx.set_sp(msg[2]);
            }
            Some(Fault::Guest(e)) => {
                let data = if tag.untyped() >= 1 { msg[1] } else { 0 };
                let pulse = if tag.untyped() >= 2 { msg[2] as u32 } else { 0 };
                self.threads[r].fault = Some(Fault::Guest(GuestExit { data, pulse, ..e }));
            }
            Some(_) => {}
            None => {
                let mut mrs = self.threads[r].ctx.mrs();
                mrs[..len].copy_from_slice(&msg[..len]);
                self.threads[r].ctx.set_mrs(&mrs);
            }
        }
        Ok(())
    }

    /// Carry out one map item from `s` into `window` of `r`; returns the receiver's
    /// fpage that the item covers. The placement follows L4: the smaller of the two
    /// fpages decides the size, the hotspot picks the part of the larger one.
    fn map_item(
        &mut self,
        s: usize,
        r: usize,
        item: MapItem,
        window: Fpage,
    ) -> Result<Fpage, Error> {
        let f = item.fpage;
        let (p, q) = (f.page_order(), window.page_order());
        let hotspot = item.hotspot >> PAGE_BITS;
        let low = |order: u32| (1u64 << order) - 1;
        let (src, dst, order) = match p <= q {
            true => (f.first_page(), window.first_page() + (hotspot & low(q) & !low(p)), p),
            false => (f.first_page() + (hotspot & low(p) & !low(q)), window.first_page(), q),
        };
        let from = At { task: self.task_id(s), vpn: src };
        let to = At { task: self.task_id(r), vpn: dst };
        self.mapdb
            .transfer(&mut self.machine, from, to, order, f.rights(), item.grant)
            .map_err(|_| Error::NoMemory)?;
        let landed = Fpage::new(dst << PAGE_BITS, (order + PAGE_BITS) as u8, f.rights());
        Ok(landed.unwrap_or(Fpage::NIL))
    }

    /// End the IPC of thread `i` (blocked, or running in its system call) with
    /// `result`: the partner's id, or an error. A thread in fault IPC resumes on success
    /// and becomes faulted on error, except a vCPU whose exit handler died before it
    /// answered: its exit goes to whoever handles it now (`fault::redeliver`). Any other
    /// thread gets the result in its registers.
    pub(crate) fn finish(&mut self, i: usize, result: Result<ThreadId, Error>) {
        if let State::SendBlocked { to, .. } = self.threads[i].state {
            if let Some(r) = self.live(to) {
                self.senders.remove(&mut self.threads[r].senders, i);
            }
        }
        self.clear_deadline(i);
        if self.threads[i].fault.is_some() {
            match result {
                Ok(_) if self.tasks[self.threads[i].task].guest => self.enter_guest(i),
                Ok(_) => {
                    self.threads[i].fault = None;
                    self.make_ready(i);
                }
                Err(Error::SendNotExist | Error::RecvNotExist) if self.redeliver(i) => {}
                Err(_) => self.make_blocked(i, State::Faulted),
            }
            return;
        }
        let ret = match result {
            Ok(from) => [0, from.raw(), 0],
            Err(e) => [e as u64, 0, 0],
        };
        self.threads[i].ctx.set_ret(ret);
        self.make_ready(i);
    }
}

/// Check the tag and map items of a message; returns the number of words it uses.
fn check_message(mrs: &[u64; MR_COUNT]) -> Result<usize, Error> {
    let tag = MsgTag(mrs[0]);
    if !tag.is_valid() {
        return Err(Error::InvalidMessage);
    }
    let len = 1 + tag.untyped() + tag.typed();
    for k in (1 + tag.untyped()..len).step_by(2) {
        MapItem::from_raw(mrs[k], mrs[k + 1]).ok_or(Error::InvalidMessage)?;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use crate::abi::{Error, Fpage, MapItem, MsgTag, Rights, TaskId, ThreadId, Timeout, MR_COUNT};
    use crate::mapdb::At;
    use crate::testing::*;
    use crate::Next;

    /// A message carrying one map (or grant) item.
    fn map_msg(base: u64, log2: u8, rights: Rights, hotspot: u64, grant: bool) -> [u64; MR_COUNT] {
        let mut m = [0; MR_COUNT];
        m[0] = MsgTag::new(1, 0, 2, 0).0;
        let fpage = Fpage::new(base, log2, rights).unwrap();
        m[1..3].copy_from_slice(&MapItem { grant, hotspot, fpage }.raw());
        m
    }

    fn lookup(k: &K, t: ThreadId, addr: u64) -> Option<(u64, Rights)> {
        k.mapdb.lookup(At { task: k.task_of(t).unwrap(), vpn: addr >> 12 })
    }

    #[test]
    fn ping_pong_call_reply_wait() {
        let (mut k, root) = boot();
        let server = spawn(&mut k, root, 50, NIL);
        let client = spawn(&mut k, root, 40, NIL);
        assert_eq!(settle(&mut k), Some(server));
        assert_eq!(ipc(&mut k, server, NIL, ANY, ZERO, NEVER, [0; MR_COUNT]), switch(&k, client));
        for round in 0..3 {
            let request = msg(7, &[round, 2, 3, 4, 5, 6, 7]);
            assert_eq!(
                ipc(&mut k, client, server, server, NEVER, NEVER, request),
                switch(&k, server)
            );
            let r = regs(&k, server);
            assert_eq!((r.ret, r.mrs), ([0, client.raw(), 0], request));
            let reply = msg(8, &[round * 10, 99]);
            assert_eq!(ipc(&mut k, server, client, ANY, ZERO, NEVER, reply), switch(&k, client));
            let r = regs(&k, client);
            assert_eq!(r.ret, [0, server.raw(), 0]);
            assert_eq!(r.mrs[..3], reply[..3]);
            assert_eq!(r.mrs[3..], request[3..], "registers beyond the reply are the client's own");
        }
    }

    #[test]
    fn direct_switch_passes_the_ready_queue() {
        let (mut k, root) = boot();
        let server = spawn(&mut k, root, 40, NIL);
        let client = spawn(&mut k, root, 40, NIL);
        let other = spawn(&mut k, root, 40, NIL);
        assert_eq!(settle(&mut k), Some(server));
        assert_eq!(ipc(&mut k, server, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, client));
        // `other` waits in the queue ahead of the server, yet the call goes straight there
        assert_eq!(
            ipc(&mut k, client, server, server, NEVER, NEVER, msg(1, &[5])),
            switch(&k, server)
        );
        assert_eq!(ipc(&mut k, server, client, ANY, ZERO, NEVER, msg(2, &[6])), switch(&k, client));
        assert_eq!(regs(&k, client).mrs[1], 6);
        // a plain send to a waiting receiver of equal priority does not switch
        assert_eq!(ipc(&mut k, client, server, NIL, NEVER, ZERO, msg(3, &[])), Next::Resume);
        for _ in 0..2 {
            assert_eq!(k.tick(), Next::Resume);
        }
        assert_eq!(k.tick(), switch(&k, other), "the slice ends; round robin continues");
    }

    #[test]
    fn timeouts() {
        let (mut k, root) = boot();
        let a = spawn(&mut k, root, 50, NIL);
        let b = spawn(&mut k, root, 40, NIL);
        assert_eq!(settle(&mut k), Some(a));
        // timeout 0: fail at once when the partner is not ready
        assert_eq!(ipc(&mut k, a, b, NIL, ZERO, ZERO, msg(1, &[])), Next::Resume);
        assert_eq!(regs(&k, a).ret[0], Error::SendTimeout as u64);
        assert_eq!(ipc(&mut k, a, NIL, b, ZERO, ZERO, msg(1, &[])), Next::Resume);
        assert_eq!(regs(&k, a).ret[0], Error::RecvTimeout as u64);
        // finite receive timeout, expiring by ticks
        assert_eq!(ipc(&mut k, a, NIL, ANY, ZERO, Timeout(5), msg(1, &[])), switch(&k, b));
        for _ in 0..4 {
            assert_eq!(k.tick(), Next::Resume);
        }
        assert_eq!(k.tick(), switch(&k, a));
        assert_eq!(regs(&k, a).ret[0], Error::RecvTimeout as u64);
        // finite send timeout
        assert_eq!(ipc(&mut k, a, b, NIL, Timeout(2), ZERO, msg(1, &[])), switch(&k, b));
        assert_eq!(k.tick(), Next::Resume);
        assert_eq!(k.tick(), switch(&k, a));
        assert_eq!(regs(&k, a).ret[0], Error::SendTimeout as u64);
        // a call whose request is taken but whose reply does not come in time: the
        // receive timeout starts when the send phase ends
        assert_eq!(ipc(&mut k, a, b, b, NEVER, Timeout(2), msg(1, &[42])), switch(&k, b));
        assert_eq!(k.tick(), Next::Resume);
        assert_eq!(ipc(&mut k, b, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!((regs(&k, b).ret[1], regs(&k, b).mrs[1]), (a.raw(), 42));
        assert_eq!(k.tick(), Next::Resume);
        assert_eq!(k.tick(), switch(&k, a));
        assert_eq!(regs(&k, a).ret[0], Error::RecvTimeout as u64);
    }

    #[test]
    fn server_with_two_clients() {
        let (mut k, root) = boot();
        let server = spawn(&mut k, root, 20, NIL);
        let c1 = spawn(&mut k, root, 30, NIL);
        let c2 = spawn(&mut k, root, 30, NIL);
        assert_eq!(settle(&mut k), Some(c1));
        // both clients call while the server is busy
        assert_eq!(ipc(&mut k, c1, server, server, NEVER, NEVER, msg(1, &[11])), switch(&k, c2));
        assert_eq!(
            ipc(&mut k, c2, server, server, NEVER, NEVER, msg(2, &[22])),
            switch(&k, server)
        );
        // open receive takes the oldest caller
        assert_eq!(ipc(&mut k, server, NIL, ANY, ZERO, NEVER, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, server).ret, [0, c1.raw(), 0]);
        assert_eq!(regs(&k, server).mrs[1], 11);
        // reply to c1 and take c2's request in the same call; c1 outranks the server
        assert_eq!(ipc(&mut k, server, c1, ANY, ZERO, NEVER, msg(0, &[111])), switch(&k, c1));
        assert_eq!(regs(&k, server).ret, [0, c2.raw(), 0]);
        assert_eq!(regs(&k, server).mrs[1], 22);
        assert_eq!((regs(&k, c1).ret[1], regs(&k, c1).mrs[1]), (server.raw(), 111));
        assert_eq!(ipc(&mut k, c1, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, server));
        // the reply to c2 goes to c2, not to the waiting c1
        assert_eq!(ipc(&mut k, server, c2, ANY, ZERO, NEVER, msg(0, &[222])), switch(&k, c2));
        assert_eq!((regs(&k, c2).ret, regs(&k, c2).mrs[1]), ([0, server.raw(), 0], 222));
        assert_eq!(regs(&k, c1).ret, [u64::MAX; 3], "c1 still waits");
        // replying to a thread that is not waiting for us fails at once
        assert_eq!(ipc(&mut k, c2, NIL, server, ZERO, ZERO, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, c2).ret[0], Error::RecvTimeout as u64);
    }

    #[test]
    fn bad_partners_and_messages() {
        let (mut k, root) = boot();
        let a = spawn(&mut k, root, 50, NIL);
        settle(&mut k);
        let ghost = ThreadId::new(9, 1);
        ipc(&mut k, a, ghost, NIL, NEVER, NEVER, msg(0, &[]));
        assert_eq!(regs(&k, a).ret[0], Error::SendNotExist as u64);
        ipc(&mut k, a, a, NIL, NEVER, NEVER, msg(0, &[]));
        assert_eq!(regs(&k, a).ret[0], Error::SendNotExist as u64, "no sending to oneself");
        ipc(&mut k, a, NIL, ghost, NEVER, NEVER, msg(0, &[]));
        assert_eq!(regs(&k, a).ret[0], Error::RecvNotExist as u64);
        ipc(&mut k, a, NIL, ThreadId::irq(1), NEVER, NEVER, msg(0, &[]));
        assert_eq!(regs(&k, a).ret[0], Error::RecvNotExist as u64, "interrupt not attached to a");
        let mut bad = msg(0, &[]);
        bad[0] = MsgTag::new(0, 5, 2, 0).0;
        ipc(&mut k, a, root, NIL, NEVER, NEVER, bad);
        assert_eq!(regs(&k, a).ret[0], Error::InvalidMessage as u64);
        let mut bad = map_msg(0x10_0000, 12, Rights::R, 0, false);
        bad[1] |= 7;
        ipc(&mut k, a, root, NIL, NEVER, NEVER, bad);
        assert_eq!(regs(&k, a).ret[0], Error::InvalidMessage as u64);
    }

    #[test]
    fn map_and_grant_in_messages() {
        let (mut k, root) = boot();
        let a = spawn_task(&mut k, 20, root);
        let b = spawn_task(&mut k, 30, root);
        assert_eq!(settle(&mut k), Some(b));
        assert_eq!(ipc(&mut k, b, NIL, a, ZERO, NEVER, msg(0, &[])), switch(&k, a));
        assert_eq!(ipc(&mut k, a, NIL, root, ZERO, NEVER, msg(0, &[])), switch(&k, root));
        // root maps four pages; the hotspot places them in a's 4 MiB window at 0x400000
        let item = map_msg(0x10_0000, 14, Rights::RW, 0x8000, false);
        assert_eq!(ipc(&mut k, root, a, NIL, NEVER, ZERO, item), switch(&k, a));
        for p in 0..4 {
            assert_eq!(lookup(&k, a, 0x40_8000 + p * 0x1000), Some((0x100 + p, Rights::RW)));
        }
        assert_eq!(lookup(&k, a, 0x40_7000), None);
        assert_eq!(
            regs(&k, a).mrs[2],
            Fpage::new(0x40_8000, 14, Rights::RW).unwrap().raw(),
            "receiver sees where it landed"
        );
        // a grants one of them to b: a loses it, b has it
        assert_eq!(
            ipc(&mut k, a, b, NIL, NEVER, ZERO, map_msg(0x40_9000, 12, Rights::R, 0, true)),
            switch(&k, b)
        );
        assert_eq!(lookup(&k, a, 0x40_9000), None);
        assert_eq!(lookup(&k, b, 0x40_0000), Some((0x101, Rights::R)));
        assert_eq!(k.machine.mirror.entries(), k.mapdb.entries());
        // a receiver without a window refuses map items; both sides learn it
        let no_window = [NIL.raw(), a.raw(), Timeout::pair(ZERO, NEVER), Fpage::NIL.raw()];
        assert_eq!(sys(&mut k, b, crate::abi::Sysno::Ipc, no_window, msg(0, &[])), switch(&k, a));
        assert_eq!(
            ipc(&mut k, a, b, NIL, NEVER, ZERO, map_msg(0x40_8000, 12, Rights::R, 0, false)),
            switch(&k, b)
        );
        assert_eq!(regs(&k, b).ret[0], Error::NoWindow as u64);
        assert_eq!(regs(&k, a).ret[0], Error::NoWindow as u64);
        // only what the sender has can be sent
        assert_eq!(ipc(&mut k, b, NIL, a, ZERO, NEVER, msg(0, &[])), switch(&k, a));
        assert_eq!(
            ipc(&mut k, a, b, NIL, NEVER, ZERO, map_msg(0x10_0000, 14, Rights::RW, 0, false)),
            switch(&k, b)
        );
        assert_eq!(regs(&k, b).ret[0], 0);
        assert!(k.mapdb.entries().iter().all(|e| e.0 != TaskId(2) || e.2 != 0x100));
    }

    #[test]
    fn recursive_unmap_through_tasks() {
        let (mut k, root) = boot();
        let a = spawn_task(&mut k, 20, root);
        let b = spawn_task(&mut k, 30, root);
        let c = spawn_task(&mut k, 40, root);
        assert_eq!(settle(&mut k), Some(c));
        assert_eq!(ipc(&mut k, c, NIL, b, ZERO, NEVER, msg(0, &[])), switch(&k, b));
        assert_eq!(ipc(&mut k, b, NIL, a, ZERO, NEVER, msg(0, &[])), switch(&k, a));
        assert_eq!(ipc(&mut k, a, NIL, root, ZERO, NEVER, msg(0, &[])), switch(&k, root));
        assert_eq!(
            ipc(&mut k, root, a, NIL, NEVER, ZERO, map_msg(0x10_0000, 12, Rights::ALL, 0, false)),
            switch(&k, a)
        );
        assert_eq!(
            ipc(&mut k, a, b, NIL, NEVER, ZERO, map_msg(0x40_0000, 12, Rights::RW, 0, false)),
            switch(&k, b)
        );
        assert_eq!(
            ipc(&mut k, b, c, NIL, NEVER, ZERO, map_msg(0x40_0000, 12, Rights::R, 0, false)),
            switch(&k, c)
        );
        assert_eq!(lookup(&k, c, 0x40_0000), Some((0x100, Rights::R)));
        assert_eq!(ipc(&mut k, c, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, b));
        assert_eq!(ipc(&mut k, b, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, a));
        assert_eq!(ipc(&mut k, a, NIL, ANY, ZERO, NEVER, msg(0, &[])), switch(&k, root));
        // unmapping at the first level removes the third
        let page = Fpage::new(0x10_0000, 12, Rights::ALL).unwrap();
        assert_eq!(
            sys(&mut k, root, crate::abi::Sysno::Unmap, [page.raw(), 0, 0, 0], msg(0, &[])),
            Next::Resume
        );
        assert_eq!(regs(&k, root).ret, [0; 3]);
        assert_eq!(
            (lookup(&k, a, 0x40_0000), lookup(&k, b, 0x40_0000), lookup(&k, c, 0x40_0000)),
            (None, None, None)
        );
        assert_eq!(lookup(&k, root, 0x10_0000), Some((0x100, Rights::ALL)));
        assert_eq!(k.machine.mirror.entries(), k.mapdb.entries());
    }
}
