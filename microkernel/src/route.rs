//! Guest exit routing: which thread answers which of a guest's port and MMIO exits.
//!
//! By default every exit of a vCPU goes to the vCPU's pager (the guest server), as a
//! page fault goes to a pager. With `guest_route` the pager hands a range of ports or
//! guest-physical addresses to another thread (a device task): exits in that range
//! are sent to that thread instead and its reply resumes the vCPU. The pager keeps
//! authority: only it may add or remove routes, and an exit whose route names a dead
//! thread falls back to it. Design rules: a guest task has at most
//! `guest_route::MAX` routes, ranges never overlap, lookups are a bounded scan.
//!
//! A device raises the guest's interrupts either in its reply to an exit (the reply's
//! pulse word) or, when it has something to say while the vCPU runs (a received
//! frame), with `guest_interrupt`. Both rights come from the same place: the pager and
//! the handlers the pager routed exits to, and nobody else.

use crate::abi::{guest, guest_route, Error, ThreadId};
use crate::fault::GuestExit;
use crate::kernel::Kernel;
use crate::machine::Machine;
use crate::syscalls::{Route, SysResult};

impl<M: Machine> Kernel<M> {
    /// `guest_route`: send the exits of `route`'s range from `vcpu`'s guest task to
    /// `route.handler` (NIL: remove the route starting at `route.base`).
    pub(crate) fn sys_guest_route(&mut self, me: usize, vcpu: ThreadId, route: Route) -> SysResult {
        let v = self.live(vcpu).ok_or(Error::NotExist)?;
        let task = self.threads[v].task;
        if !self.tasks[task].guest {
            return Err(Error::InvalidArgument);
        }
        if self.threads[v].pager != self.threads[me].id {
            return Err(Error::NoPermission);
        }
        let routes = &mut self.tasks[task].routes;
        if route.handler == ThreadId::NIL {
            let r = routes
                .iter_mut()
                .find(|r| r.len != 0 && r.space == route.space && r.base == route.base)
                .ok_or(Error::NotExist)?;
            *r = Route::NONE;
            return Ok([0, 0]);
        }
        let h = self.live(route.handler).ok_or(Error::NotExist)?;
        if self.tasks[self.threads[h].task].guest {
            return Err(Error::InvalidArgument); // a vCPU cannot answer exits
        }
        let routes = &mut self.tasks[task].routes;
        // the same range again: a new handler takes over in one step (a restarted
        // device task), so no exit in the range can fall to the pager in between
        let same = |r: &Route| r.len == route.len && r.space == route.space && r.base == route.base;
        if let Some(r) = routes.iter_mut().find(|r| same(r)) {
            r.handler = route.handler;
            return Ok([0, 0]);
        }
        if routes.iter().any(|r| r.overlaps(&route)) {
            return Err(Error::InUse);
        }
        let free = routes.iter_mut().find(|r| r.len == 0).ok_or(Error::NoMemory)?;
        *free = route;
        Ok([0, 0])
    }

    /// `guest_interrupt`: pulse the guest IOAPIC pins in `pins` of `vcpu`'s guest now,
    /// whatever the vCPU is doing. Allowed to the vCPU's pager and to the handlers of
    /// its guest's routes.
    pub(crate) fn sys_guest_interrupt(
        &mut self,
        me: usize,
        vcpu: ThreadId,
        pins: u32,
    ) -> SysResult {
        let v = self.live(vcpu).ok_or(Error::NotExist)?;
        let task = self.threads[v].task;
        if !self.tasks[task].guest {
            return Err(Error::InvalidArgument);
        }
        let caller = self.threads[me].id;
        let routed = self.tasks[task].routes.iter().any(|r| r.len != 0 && r.handler == caller);
        if self.threads[v].pager != caller && !routed {
            return Err(Error::NoPermission);
        }
        self.machine.guest_interrupt(self.task_id(v), pins);
        Ok([0, 0])
    }

    /// Who answers exit `e` of vCPU thread `i`: the live thread routed for its address,
    /// else the vCPU's pager.
    pub(crate) fn exit_handler(&self, i: usize, e: &GuestExit) -> ThreadId {
        let space = match e.kind as u64 {
            guest::IO_IN | guest::IO_OUT => guest_route::PORT,
            guest::MMIO_READ | guest::MMIO_WRITE => guest_route::MMIO,
            _ => return self.threads[i].pager,
        } as u8;
        self.tasks[self.threads[i].task]
            .routes
            .iter()
            .find(|r| r.catches(space, e.addr))
            .map(|r| r.handler)
            .filter(|&h| self.live(h).is_some())
            .unwrap_or(self.threads[i].pager)
    }
}
