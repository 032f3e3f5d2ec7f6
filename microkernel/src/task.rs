//! Tasks (address spaces): creation, deletion, `unmap`, and reading user memory.
//!
//! A task's page table is its part of the mapping database (see `mapdb`); a task lives
//! as long as it has threads. User addresses handed to the kernel are allegations: the
//! kernel believes one only after finding every page it covers mapped in the caller's
//! own page table with the rights needed, and then works on the physical frames it
//! found there, never on the user's virtual address.

use crate::abi::{
    guest_route, Error, Fpage, Rights, TaskId, ThreadId, DEBUG_WRITE_MAX, PAGE_BITS, PAGE_SIZE,
};
use crate::kernel::Kernel;
use crate::machine::{Context, Machine, Space};
use crate::mapdb::At;
use crate::syscalls::{Route, SysResult, TaskKind};

#[derive(Clone, Copy, Debug)]
pub struct Task {
    pub live: bool,
    /// May use the privileged calls (`task_new`, `thread_control`, irq attach/detach,
    /// `schedule` and `exchange_registers` on other tasks).
    pub privileged: bool,
    /// A guest VM: the space is guest-physical memory and the threads are vCPUs,
    /// which never run in VM0 (`State::InGuest` or in exit IPC).
    pub guest: bool,
    pub threads: u16,
    /// A guest's exits that go to another thread than the vCPU's pager (`route.rs`).
    pub routes: [Route; guest_route::MAX],
}

impl Task {
    pub const FREE: Self = Self {
        live: false,
        privileged: false,
        guest: false,
        threads: 0,
        routes: [Route::NONE; guest_route::MAX],
    };
}

impl<M: Machine> Kernel<M> {
    pub(crate) fn create_task(&mut self, kind: TaskKind) -> Result<usize, Error> {
        let t = self.tasks.iter().position(|t| !t.live).ok_or(Error::NoMemory)?;
        let guest = kind == TaskKind::Guest;
        let space = if guest { Space::Guest } else { Space::User };
        self.machine.create_space(TaskId(t as u16), space).map_err(|_| Error::NoMemory)?;
        self.mapdb.set_kind(TaskId(t as u16), space);
        let privileged = kind == TaskKind::Privileged;
        self.tasks[t] = Task { live: true, privileged, guest, ..Task::FREE };
        Ok(t)
    }

    /// Remove every mapping of task `t` (and everything derived from them), then the task.
    pub(crate) fn destroy_task(&mut self, t: usize) {
        self.mapdb.clear(&mut self.machine, TaskId(t as u16));
        self.machine.destroy_space(TaskId(t as u16));
        self.tasks[t] = Task::FREE;
    }

    /// `task_new`: a new task with one ready thread at `ip`/`sp`, whose supervisor is the
    /// caller (privileged). A guest task's thread is its vCPU: instead of running it
    /// sends the `guest::START` exit to `pager` (see `fault.rs`).
    pub(crate) fn sys_task_new(
        &mut self,
        me: usize,
        pager: ThreadId,
        ip: u64,
        sp: u64,
        kind: TaskKind,
    ) -> SysResult {
        if !self.privileged(me) {
            return Err(Error::NoPermission);
        }
        let task = self.create_task(kind)?;
        let supervisor = self.threads[me].id;
        let t = match self.create_thread(task, pager, supervisor, self.threads[me].prio) {
            Ok(t) => t,
            Err(e) => {
                self.destroy_task(task);
                return Err(e);
            }
        };
        self.threads[t].ctx.set_ip(ip);
        self.threads[t].ctx.set_sp(sp);
        let id = self.threads[t].id;
        if kind == TaskKind::Guest {
            self.start_vcpu(t);
        } else {
            self.make_ready(t);
        }
        Ok([id.raw(), task as u64])
    }

    /// `unmap`: take the fpage's rights from every mapping derived from the caller's
    /// mappings in the fpage, and from those mappings too if `own` (frames the task owns
    /// as the root task keep their owner mapping).
    pub(crate) fn sys_unmap(&mut self, me: usize, fpage: Fpage, own: bool) -> SysResult {
        if !fpage.is_nil() {
            let task = self.task_id(me);
            let (first, order) = (fpage.first_page(), fpage.page_order());
            self.mapdb.unmap(&mut self.machine, task, first, order, fpage.rights(), own);
        }
        Ok([0, 0])
    }

    /// `debug_write`: print `len` bytes of the caller's memory at `addr`.
    pub(crate) fn sys_debug_write(&mut self, me: usize, addr: u64, len: u64) -> SysResult {
        if len > DEBUG_WRITE_MAX {
            return Err(Error::InvalidArgument);
        }
        let task = self.task_id(me);
        let end = addr.checked_add(len).ok_or(Error::InvalidArgument)?;
        // Check the whole allegation before acting on any of it.
        let mut a = addr;
        while a < end {
            self.user_frame(task, a, Rights::R).ok_or(Error::InvalidArgument)?;
            a = (a | (PAGE_SIZE - 1)).saturating_add(1);
        }
        let mut a = addr;
        while a < end {
            let next = (a | (PAGE_SIZE - 1)).saturating_add(1).min(end);
            let pfn = self.user_frame(task, a, Rights::R).ok_or(Error::InvalidArgument)?;
            self.machine.debug_write(pfn, a % PAGE_SIZE, next - a);
            a = next;
        }
        Ok([len, 0])
    }

    /// The frame behind user address `addr` of `task`, if mapped there with `rights`
    /// (the database holds user pages only).
    pub(crate) fn user_frame(&self, task: TaskId, addr: u64, rights: Rights) -> Option<u64> {
        let (pfn, have) = self.mapdb.lookup(At { task, vpn: addr >> PAGE_BITS })?;
        have.contains(rights).then_some(pfn)
    }
}

#[cfg(test)]
mod tests {
    use crate::abi::{task_new, Error, Rights, Sysno, ThreadId, DEBUG_WRITE_MAX};
    use crate::testing::*;
    use crate::Next;

    #[test]
    fn task_new_starts_a_thread() {
        let (mut k, root) = boot();
        let args = [root.raw(), 0x40_0000, 0x50_0000, 0];
        assert_eq!(sys(&mut k, root, Sysno::TaskNew, args, msg(0, &[])), Next::Resume);
        let [status, id, task] = regs(&k, root).ret;
        let t = ThreadId(id as u32);
        assert_eq!((status, k.task_of(t).map(|t| t.0 as u64)), (0, Some(task)));
        assert_eq!((regs(&k, t).ip, regs(&k, t).sp), (0x40_0000, 0x50_0000));
        let tcb = tcb(&mut k, t);
        assert_eq!((tcb.pager, tcb.supervisor, tcb.prio), (root, root, 10));
        assert!(k.machine.mirror.spaces.contains(&k.task_of(t).unwrap()));
        // the new task is not privileged, so it cannot make tasks
        assert_eq!(
            sys(&mut k, root, Sysno::ThreadSwitch, [0; 4], msg(0, &[])),
            Next::Switch { thread: t, task: k.task_of(t).unwrap() }
        );
        assert_eq!(sys(&mut k, t, Sysno::TaskNew, args, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, t).ret[0], Error::NoPermission as u64);
        let bad_flags = [root.raw(), 0, 0, task_new::ALL + 1];
        assert_eq!(sys(&mut k, t, Sysno::TaskNew, bad_flags, msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, t).ret[0], Error::InvalidArgument as u64);
    }

    #[test]
    fn debug_write_checks_the_allegation() {
        let (mut k, root) = boot();
        // across a page boundary: two frames, in order
        assert_eq!(
            sys(&mut k, root, Sysno::DebugWrite, [0x10_0ff0, 32, 0, 0], msg(0, &[])),
            Next::Resume
        );
        assert_eq!(regs(&k, root).ret, [0, 32, 0]);
        assert_eq!(k.machine.console, [(0x100, 0xff0, 16), (0x101, 0, 16)]);
        // one unmapped byte at the end spoils the whole write
        let end = 0x100 + ROOT_PAGES;
        let tail = [(end << 12) - 8, 16, 0, 0];
        let cases = [
            tail,
            [0x5000, 1, 0, 0],
            [u64::MAX - 3, 8, 0, 0],
            [0x10_0000, DEBUG_WRITE_MAX + 1, 0, 0],
        ];
        for args in cases {
            assert_eq!(sys(&mut k, root, Sysno::DebugWrite, args, msg(0, &[])), Next::Resume);
            assert_eq!(regs(&k, root).ret[0], Error::InvalidArgument as u64, "{args:x?}");
        }
        assert_eq!(k.machine.console.len(), 2);
        // write-only or execute-only mappings are not readable
        let t = spawn_task(&mut k, 20, root);
        give(&mut k, root, 0x100, t, 0x300, Rights::W);
        assert_eq!(settle(&mut k), Some(t));
        assert_eq!(
            sys(&mut k, t, Sysno::DebugWrite, [0x30_0000, 1, 0, 0], msg(0, &[])),
            Next::Resume
        );
        assert_eq!(regs(&k, t).ret[0], Error::InvalidArgument as u64);
    }

    #[test]
    fn unmap_own_and_derived() {
        let (mut k, root) = boot();
        let t = spawn_task(&mut k, 20, root);
        let u = spawn_task(&mut k, 20, root);
        give(&mut k, root, 0x100, t, 0x300, Rights::RW);
        give(&mut k, t, 0x300, u, 0x310, Rights::RW);
        assert_eq!(settle(&mut k), Some(t));
        let page = crate::abi::Fpage::new(0x30_0000, 12, Rights::W).unwrap();
        assert_eq!(sys(&mut k, t, Sysno::Unmap, [page.raw(), 0, 0, 0], msg(0, &[])), Next::Resume);
        let lookup = |k: &K, th: ThreadId, vpn: u64| {
            k.mapdb.lookup(crate::mapdb::At { task: k.task_of(th).unwrap(), vpn })
        };
        assert_eq!(
            (lookup(&k, t, 0x300), lookup(&k, u, 0x310)),
            (Some((0x100, Rights::RW)), Some((0x100, Rights::R)))
        );
        let all = crate::abi::Fpage::complete(Rights::ALL);
        assert_eq!(
            sys(&mut k, t, Sysno::Unmap, [all.raw(), crate::abi::unmap::SELF, 0, 0], msg(0, &[])),
            Next::Resume
        );
        assert_eq!((lookup(&k, t, 0x300), lookup(&k, u, 0x310)), (None, None));
        assert_eq!(sys(&mut k, t, Sysno::Unmap, [all.raw(), 2, 0, 0], msg(0, &[])), Next::Resume);
        assert_eq!(regs(&k, t).ret[0], Error::InvalidArgument as u64);
    }
}
