//! The mapping database: who has which physical frame, and from whom.
//!
//! A mapping is a node `(task, vpn) -> (pfn, rights)`. The nodes of one frame form a
//! tree: the root is the frame's owner, entered at boot into the root task (the root
//! pager's role, like sigma0); `map` adds a child, `grant` moves a node to another task
//! keeping its place in the tree, and `unmap` takes rights from everything derived from
//! a mapping. The same nodes indexed by `(task, vpn)` are the tasks' abstract page
//! tables, which the arch layer mirrors through [`PageTables`].
//!
//! Rules:
//! - A node's rights are a non-empty subset of its parent's. Taking rights walks the whole
//!   subtree; a node left with none is removed with everything derived from it.
//! - Roots never move, never lose rights and are never replaced: granting a root maps
//!   it, `unmap` of the owner's own mapping leaves the root alone, and a map or grant
//!   onto a root's page is skipped. So every frame stays owned.
//! - Every change to a `(task, vpn)` entry reaches [`PageTables`] in the same step: the
//!   real page tables never grant what the database does not.
//! - No recursion: trees are walked through parent/child/sibling links, so kernel stack
//!   use does not depend on tree depth.
//! - At most `capacity` nodes; a map beyond that fails with [`NoMemory`].

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::abi::{guest, Error, Rights, TaskId, PAGE_BITS};
use crate::machine::{NoMemory, PageTables, Space};

type NodeId = usize;

/// A page of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    pub task: TaskId,
    pub vpn: u64,
}

#[derive(Clone, Copy, Debug)]
struct Node {
    at: At,
    pfn: u64,
    /// Empty only for free nodes.
    rights: Rights,
    parent: Option<NodeId>,
    child: Option<NodeId>,
    prev: Option<NodeId>,
    next: Option<NodeId>,
}

const FREE: Node = Node {
    at: At { task: TaskId(0), vpn: 0 },
    pfn: 0,
    rights: Rights::NONE,
    parent: None,
    child: None,
    prev: None,
    next: None,
};

pub struct MapDb {
    nodes: Vec<Node>,
    free: Vec<NodeId>,
    capacity: usize,
    /// The abstract page table of each task.
    spaces: Vec<BTreeMap<u64, NodeId>>,
    /// The root node of each owned frame.
    roots: BTreeMap<u64, NodeId>,
    /// The pages that may be mapped in a user space, `first..end`.
    user: (u64, u64),
    /// Which spaces are guest-physical (pages `0..guest::PHYS_END`).
    guest: Vec<bool>,
}

impl MapDb {
    /// A database for `tasks` tasks, holding at most `capacity` mappings, all of pages
    /// in `user` (`first..end`).
    pub fn new(tasks: usize, capacity: usize, user: (u64, u64)) -> Self {
        let mut spaces = Vec::with_capacity(tasks);
        spaces.resize_with(tasks, BTreeMap::new);
        let guest = alloc::vec![false; tasks];
        Self {
            // reserved once: growing by doubling would strand the old blocks in the heap
            nodes: Vec::with_capacity(capacity),
            free: Vec::new(),
            capacity,
            spaces,
            roots: BTreeMap::new(),
            user,
            guest,
        }
    }

    /// Set what the (empty) space of `task` holds, and so which pages it may map.
    pub fn set_kind(&mut self, task: TaskId, kind: Space) {
        if let Some(g) = self.guest.get_mut(task.0 as usize) {
            *g = kind == Space::Guest;
        }
    }

    /// The frame and rights mapped at `at`.
    pub fn lookup(&self, at: At) -> Option<(u64, Rights)> {
        let n = *self.space(at.task)?.get(&at.vpn)?;
        Some((self.nodes[n].pfn, self.nodes[n].rights))
    }

    /// The first mapped page of `task` in `first..=last`.
    pub fn next_mapped(&self, task: TaskId, first: u64, last: u64) -> Option<u64> {
        if first > last {
            return None;
        }
        self.space(task)?.range(first..=last).next().map(|(&vpn, _)| vpn)
    }

    /// Make `at` the owner of frame `pfn` (boot only).
    pub fn insert_root(
        &mut self,
        pt: &mut impl PageTables,
        at: At,
        pfn: u64,
        rights: Rights,
    ) -> Result<(), Error> {
        if rights.is_empty() || self.space(at.task).is_none() || !self.mappable(at.task, at.vpn) {
            return Err(Error::InvalidArgument);
        }
        if self.roots.contains_key(&pfn) || self.lookup(at).is_some() {
            return Err(Error::InUse);
        }
        let n = self.alloc(pt, at, pfn, rights).map_err(|NoMemory| Error::NoMemory)?;
        self.roots.insert(pfn, n);
        Ok(())
    }

    /// Map (or grant) the `2^order` pages from `src` to the same number from `dst`,
    /// skipping unmapped source pages and destination pages the destination may not map.
    pub fn transfer(
        &mut self,
        pt: &mut impl PageTables,
        src: At,
        dst: At,
        order: u32,
        rights: Rights,
        grant: bool,
    ) -> Result<(), NoMemory> {
        let last = src.vpn.saturating_add((1u64 << order.min(52)) - 1);
        let mut next = Some(src.vpn);
        while let Some(vpn) = next.and_then(|first| self.next_mapped(src.task, first, last)) {
            next = vpn.checked_add(1);
            let Some(dst_vpn) = dst.vpn.checked_add(vpn - src.vpn) else { break };
            if !self.mappable(dst.task, dst_vpn) {
                continue;
            }
            let (from, to) = (At { task: src.task, vpn }, At { task: dst.task, vpn: dst_vpn });
            if grant {
                self.grant(pt, from, to, rights)?;
            } else {
                self.map(pt, from, to, rights)?;
            }
        }
        Ok(())
    }

    /// Take `rights` from everything derived from the mappings of `task` in
    /// `first .. first + 2^order`, and from those mappings themselves if `own`.
    pub fn unmap(
        &mut self,
        pt: &mut impl PageTables,
        task: TaskId,
        first: u64,
        order: u32,
        rights: Rights,
        own: bool,
    ) {
        let last = first.saturating_add((1u64 << order.min(52)) - 1);
        let mut next = Some(first);
        while let Some(vpn) = next.and_then(|first| self.next_mapped(task, first, last)) {
            next = vpn.checked_add(1);
            if let Some(&n) = self.space(task).and_then(|s| s.get(&vpn)) {
                let own = own && self.nodes[n].parent.is_some();
                self.revoke(pt, n, rights, own);
            }
        }
    }

    /// Remove every mapping of `task` and everything derived from them.
    pub fn clear(&mut self, pt: &mut impl PageTables, task: TaskId) {
        while let Some(n) = self.space(task).and_then(|s| s.first_key_value()).map(|(_, &n)| n) {
            self.remove_subtree(pt, n);
        }
    }

    /// Map one page: the destination gets a child of the source node.
    fn map(
        &mut self,
        pt: &mut impl PageTables,
        src: At,
        dst: At,
        mask: Rights,
    ) -> Result<(), NoMemory> {
        let Some(s) = self.node_at(src) else {
            return Ok(());
        };
        let rights = self.nodes[s].rights.and(mask);
        if rights.is_empty() {
            return Ok(());
        }
        match self.node_at(dst) {
            // Replacing the source or what it derives from would cut the source off;
            // replacing a root would lose the frame.
            Some(d) if self.is_ancestor_or_self(d, s) || self.nodes[d].parent.is_none() => {
                return Ok(())
            }
            // Mapped from the source already: extend its rights.
            Some(d) if self.nodes[d].parent == Some(s) => {
                let more = self.nodes[d].rights.or(rights);
                if more != self.nodes[d].rights {
                    self.nodes[d].rights = more;
                    pt.protect(dst.task, dst.vpn, more);
                }
                return Ok(());
            }
            Some(d) => self.remove_subtree(pt, d),
            None => {}
        }
        let pfn = self.nodes[s].pfn;
        let n = self.alloc(pt, dst, pfn, rights)?;
        self.link_child(s, n);
        Ok(())
    }

    /// Grant one page: the source node moves to the destination, keeping its subtree.
    fn grant(
        &mut self,
        pt: &mut impl PageTables,
        src: At,
        dst: At,
        mask: Rights,
    ) -> Result<(), NoMemory> {
        let Some(s) = self.node_at(src) else {
            return Ok(());
        };
        if self.nodes[s].parent.is_none() {
            return self.map(pt, src, dst, mask);
        }
        let rights = self.nodes[s].rights.and(mask);
        if rights.is_empty() || src == dst {
            return Ok(());
        }
        if let Some(d) = self.node_at(dst) {
            if self.is_ancestor_or_self(d, s) || self.nodes[d].parent.is_none() {
                return Ok(());
            }
            self.remove_subtree(pt, d);
        }
        pt.map(dst.task, dst.vpn, self.nodes[s].pfn, rights)?;
        pt.unmap(src.task, src.vpn);
        if let Some(space) = self.space_mut(src.task) {
            space.remove(&src.vpn);
        }
        if let Some(space) = self.space_mut(dst.task) {
            space.insert(dst.vpn, s);
        }
        let lost = self.nodes[s].rights.minus(rights);
        self.nodes[s].at = dst;
        self.nodes[s].rights = rights;
        self.revoke(pt, s, lost, false);
        Ok(())
    }

    /// Take `rights` from the subtree of `top` (excluding `top` unless `own`).
    fn revoke(&mut self, pt: &mut impl PageTables, top: NodeId, rights: Rights, own: bool) {
        if rights.is_empty() {
            return;
        }
        let mut at = if own { Some(top) } else { self.nodes[top].child };
        while let Some(n) = at {
            let left = self.nodes[n].rights.minus(rights);
            if left == self.nodes[n].rights {
                // Nothing to take here, so nothing below either (rights only shrink).
                at = self.after_subtree(top, n);
            } else if left.is_empty() {
                at = self.after_subtree(top, n);
                self.remove_subtree(pt, n);
            } else {
                self.nodes[n].rights = left;
                pt.protect(self.nodes[n].at.task, self.nodes[n].at.vpn, left);
                at = self.nodes[n].child.or_else(|| self.after_subtree(top, n));
            }
        }
    }

    /// Remove `top` and its subtree, leaves first.
    fn remove_subtree(&mut self, pt: &mut impl PageTables, top: NodeId) {
        let mut x = top;
        loop {
            if let Some(c) = self.nodes[x].child {
                x = c;
                continue;
            }
            let parent = self.nodes[x].parent;
            self.release(pt, x);
            match parent {
                Some(p) if x != top => x = p,
                _ => return,
            }
        }
    }

    /// The next node in pre-order after the subtree of `n`, within the subtree of `top`.
    fn after_subtree(&self, top: NodeId, n: NodeId) -> Option<NodeId> {
        let mut x = n;
        while x != top {
            if let Some(s) = self.nodes[x].next {
                return Some(s);
            }
            x = self.nodes[x].parent?;
        }
        None
    }

    fn mappable(&self, task: TaskId, vpn: u64) -> bool {
        match self.guest.get(task.0 as usize) {
            Some(true) => vpn < guest::PHYS_END >> PAGE_BITS,
            _ => (self.user.0..self.user.1).contains(&vpn),
        }
    }

    fn is_ancestor_or_self(&self, a: NodeId, n: NodeId) -> bool {
        let mut x = Some(n);
        while let Some(y) = x {
            if y == a {
                return true;
            }
            x = self.nodes[y].parent;
        }
        false
    }

    fn node_at(&self, at: At) -> Option<NodeId> {
        self.space(at.task)?.get(&at.vpn).copied()
    }

    fn space(&self, task: TaskId) -> Option<&BTreeMap<u64, NodeId>> {
        self.spaces.get(task.0 as usize)
    }

    fn space_mut(&mut self, task: TaskId) -> Option<&mut BTreeMap<u64, NodeId>> {
        self.spaces.get_mut(task.0 as usize)
    }

    /// A new parentless node entered at `at` (which is unmapped) in both page tables.
    fn alloc(
        &mut self,
        pt: &mut impl PageTables,
        at: At,
        pfn: u64,
        rights: Rights,
    ) -> Result<NodeId, NoMemory> {
        if self.free.is_empty() && self.nodes.len() >= self.capacity {
            return Err(NoMemory);
        }
        pt.map(at.task, at.vpn, pfn, rights)?;
        let node = Node { at, pfn, rights, ..FREE };
        let n = match self.free.pop() {
            Some(n) => {
                self.nodes[n] = node;
                n
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        if let Some(space) = self.space_mut(at.task) {
            space.insert(at.vpn, n);
        }
        Ok(n)
    }

    fn link_child(&mut self, parent: NodeId, n: NodeId) {
        let first = self.nodes[parent].child;
        self.nodes[n].parent = Some(parent);
        self.nodes[n].prev = None;
        self.nodes[n].next = first;
        if let Some(f) = first {
            self.nodes[f].prev = Some(n);
        }
        self.nodes[parent].child = Some(n);
    }

    /// Unlink the childless node `n` from its tree and both page tables; free it.
    fn release(&mut self, pt: &mut impl PageTables, n: NodeId) {
        let Node { at, pfn, parent, prev, next, .. } = self.nodes[n];
        match (prev, parent) {
            (Some(p), _) => self.nodes[p].next = next,
            (None, Some(p)) => self.nodes[p].child = next,
            (None, None) => {
                self.roots.remove(&pfn);
            }
        }
        if let Some(x) = next {
            self.nodes[x].prev = prev;
        }
        pt.unmap(at.task, at.vpn);
        if let Some(space) = self.space_mut(at.task) {
            space.remove(&at.vpn);
        }
        self.nodes[n] = FREE;
        self.free.push(n);
    }
}

#[cfg(any(test, feature = "invariants"))]
impl MapDb {
    /// Every mapping as `(task, vpn, pfn, rights)`, in page-table order.
    pub fn entries(&self) -> Vec<(TaskId, u64, u64, Rights)> {
        let mut all = Vec::new();
        for (t, space) in self.spaces.iter().enumerate() {
            for (&vpn, &n) in space {
                all.push((TaskId(t as u16), vpn, self.nodes[n].pfn, self.nodes[n].rights));
            }
        }
        all
    }

    /// The pages holding mappings derived from the one at `at` (not `at` itself).
    #[cfg(test)]
    pub fn derived(&self, at: At) -> Vec<At> {
        let mut out = Vec::new();
        let Some(top) = self.node_at(at) else {
            return out;
        };
        let mut x = self.nodes[top].child;
        while let Some(n) = x {
            out.push(self.nodes[n].at);
            x = self.nodes[n].child.or_else(|| self.after_subtree(top, n));
        }
        out
    }

    /// Whether the mapping at `at` is the one at `ancestor` or derived from it.
    #[cfg(test)]
    pub fn derives_from(&self, at: At, ancestor: At) -> bool {
        match (self.node_at(at), self.node_at(ancestor)) {
            (Some(n), Some(a)) => self.is_ancestor_or_self(a, n),
            _ => false,
        }
    }

    /// Whether the mapping at `at` is a root (frame owner).
    #[cfg(test)]
    pub fn is_root(&self, at: At) -> bool {
        self.node_at(at).is_some_and(|n| self.nodes[n].parent.is_none())
    }

    /// Check every structural invariant; panics with a description on violation.
    pub fn check(&self) {
        let mut live = 0;
        for (n, node) in self.nodes.iter().enumerate() {
            if node.rights.is_empty() {
                assert!(self.free.contains(&n), "node {n} has no rights but is not free");
                continue;
            }
            live += 1;
            assert_eq!(self.node_at(node.at), Some(n), "page table does not point at node {n}");
            match node.parent {
                Some(p) => {
                    let parent = &self.nodes[p];
                    assert_eq!(parent.pfn, node.pfn, "node {n}: frame differs from parent");
                    assert!(
                        parent.rights.contains(node.rights),
                        "node {n}: rights exceed parent's"
                    );
                    assert!(!parent.rights.is_empty(), "node {n}: parent is free");
                }
                None => assert_eq!(self.roots.get(&node.pfn), Some(&n), "root {n} not registered"),
            }
            let mut prev = None;
            let mut c = node.child;
            while let Some(x) = c {
                assert_eq!(self.nodes[x].parent, Some(n), "child list of {n}");
                assert_eq!(self.nodes[x].prev, prev, "sibling links under {n}");
                prev = Some(x);
                c = self.nodes[x].next;
            }
        }
        let indexed: usize = self.spaces.iter().map(|s| s.len()).sum();
        assert_eq!(indexed, live, "page tables and nodes disagree");
        assert_eq!(live + self.free.len(), self.nodes.len());
        for (&pfn, &n) in &self.roots {
            assert!(self.nodes[n].parent.is_none() && self.nodes[n].pfn == pfn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Mirror;

    const ROOT: TaskId = TaskId(0);
    const A: TaskId = TaskId(1);
    const B: TaskId = TaskId(2);
    const C: TaskId = TaskId(3);

    fn at(task: TaskId, vpn: u64) -> At {
        At { task, vpn }
    }

    fn setup(frames: u64) -> (MapDb, Mirror) {
        let mut db = MapDb::new(4, 64, (0, 1 << 20));
        let mut pt = Mirror::default();
        for f in 0..frames {
            db.insert_root(&mut pt, at(ROOT, 0x100 + f), 0x900 + f, Rights::ALL).unwrap();
        }
        (db, pt)
    }

    fn map(db: &mut MapDb, pt: &mut Mirror, from: At, to: At, r: Rights, grant: bool) {
        db.transfer(pt, from, to, 0, r, grant).unwrap();
        db.check();
        assert_eq!(pt.entries(), db.entries());
    }

    #[test]
    fn map_then_access() {
        let (mut db, mut pt) = setup(1);
        map(&mut db, &mut pt, at(ROOT, 0x100), at(A, 7), Rights::RW, false);
        assert_eq!(db.lookup(at(A, 7)), Some((0x900, Rights::RW)));
        // rights can only shrink along a map
        map(&mut db, &mut pt, at(A, 7), at(B, 8), Rights::ALL, false);
        assert_eq!(db.lookup(at(B, 8)), Some((0x900, Rights::RW)));
        // mapping an unmapped page does nothing
        map(&mut db, &mut pt, at(C, 1), at(B, 9), Rights::ALL, false);
        assert_eq!(db.lookup(at(B, 9)), None);
    }

    #[test]
    fn grant_moves_the_mapping() {
        let (mut db, mut pt) = setup(1);
        map(&mut db, &mut pt, at(ROOT, 0x100), at(A, 1), Rights::RW, false);
        map(&mut db, &mut pt, at(A, 1), at(C, 5), Rights::RW, false);
        map(&mut db, &mut pt, at(A, 1), at(B, 2), Rights::R, true);
        assert_eq!(db.lookup(at(A, 1)), None, "the granter loses it");
        assert_eq!(db.lookup(at(B, 2)), Some((0x900, Rights::R)));
        assert_eq!(
            db.lookup(at(C, 5)),
            Some((0x900, Rights::R)),
            "derived mapping lost write with the grant"
        );
        // revoking at the root still reaches the granted mapping and its children
        db.unmap(&mut pt, ROOT, 0x100, 0, Rights::ALL, false);
        db.check();
        assert_eq!(db.entries().len(), 1);
    }

    #[test]
    fn recursive_unmap() {
        let (mut db, mut pt) = setup(2);
        map(&mut db, &mut pt, at(ROOT, 0x100), at(A, 1), Rights::ALL, false);
        map(&mut db, &mut pt, at(A, 1), at(B, 2), Rights::RW, false);
        map(&mut db, &mut pt, at(B, 2), at(C, 3), Rights::R, false);
        map(&mut db, &mut pt, at(ROOT, 0x101), at(C, 4), Rights::R, false);
        // taking write from A's children leaves read everywhere
        db.unmap(&mut pt, A, 1, 0, Rights::W, false);
        assert_eq!(db.lookup(at(A, 1)), Some((0x900, Rights::ALL)));
        assert_eq!(db.lookup(at(B, 2)), Some((0x900, Rights::R)));
        assert_eq!(db.lookup(at(C, 3)), Some((0x900, Rights::R)));
        // the first-level mapping goes and the third level with it
        db.unmap(&mut pt, ROOT, 0x100, 0, Rights::ALL, false);
        db.check();
        assert_eq!(pt.entries(), db.entries());
        assert_eq!(db.lookup(at(A, 1)), None);
        assert_eq!(db.lookup(at(B, 2)), None);
        assert_eq!(db.lookup(at(C, 3)), None);
        assert_eq!(db.lookup(at(C, 4)), Some((0x901, Rights::R)), "other frame untouched");
        assert_eq!(db.lookup(at(ROOT, 0x100)), Some((0x900, Rights::ALL)), "the owner keeps it");
    }

    #[test]
    fn own_unmap_and_roots() {
        let (mut db, mut pt) = setup(1);
        map(&mut db, &mut pt, at(ROOT, 0x100), at(A, 1), Rights::ALL, false);
        map(&mut db, &mut pt, at(A, 1), at(B, 1), Rights::ALL, false);
        db.unmap(&mut pt, A, 1, 0, Rights::W, true);
        assert_eq!(db.lookup(at(A, 1)), Some((0x900, Rights::RX)));
        assert_eq!(db.lookup(at(B, 1)), Some((0x900, Rights::RX)));
        db.unmap(&mut pt, ROOT, 0x100, 0, Rights::ALL, true);
        db.check();
        assert_eq!(db.entries(), [(ROOT, 0x100, 0x900, Rights::ALL)], "roots survive own unmap");
        // granting a root maps it
        map(&mut db, &mut pt, at(ROOT, 0x100), at(A, 2), Rights::R, true);
        assert!(db.is_root(at(ROOT, 0x100)));
        assert_eq!(db.lookup(at(A, 2)), Some((0x900, Rights::R)));
    }

    #[test]
    fn replacing_and_extending() {
        let (mut db, mut pt) = setup(2);
        map(&mut db, &mut pt, at(ROOT, 0x100), at(A, 1), Rights::R, false);
        map(&mut db, &mut pt, at(ROOT, 0x100), at(A, 1), Rights::W, false);
        assert_eq!(db.lookup(at(A, 1)), Some((0x900, Rights::RW)), "same source extends");
        map(&mut db, &mut pt, at(A, 1), at(B, 1), Rights::R, false);
        map(&mut db, &mut pt, at(ROOT, 0x101), at(A, 1), Rights::R, false);
        assert_eq!(db.lookup(at(A, 1)), Some((0x901, Rights::R)), "other source replaces");
        assert_eq!(db.lookup(at(B, 1)), None, "and the replaced mapping's children go");
        // a mapping can't overwrite its own source
        map(&mut db, &mut pt, at(A, 1), at(B, 1), Rights::R, false);
        map(&mut db, &mut pt, at(B, 1), at(A, 1), Rights::R, false);
        map(&mut db, &mut pt, at(B, 1), at(ROOT, 0x101), Rights::R, true);
        assert_eq!(db.lookup(at(A, 1)), Some((0x901, Rights::R)));
        assert_eq!(db.lookup(at(B, 1)), Some((0x901, Rights::R)));
    }

    #[test]
    fn capacity_and_clear() {
        let mut db = MapDb::new(2, 3, (0, 16));
        let mut pt = Mirror::default();
        db.insert_root(&mut pt, at(ROOT, 0), 0, Rights::ALL).unwrap();
        assert_eq!(db.insert_root(&mut pt, at(ROOT, 1), 0, Rights::ALL), Err(Error::InUse));
        assert_eq!(db.insert_root(&mut pt, at(ROOT, 0), 1, Rights::ALL), Err(Error::InUse));
        let mut map = |from, to| db.transfer(&mut pt, from, to, 0, Rights::ALL, false);
        map(at(ROOT, 0), at(A, 0)).unwrap();
        map(at(A, 0), at(A, 1)).unwrap();
        assert_eq!(map(at(A, 1), at(A, 2)), Err(NoMemory));
        db.clear(&mut pt, A);
        db.check();
        assert_eq!(pt.entries(), db.entries());
        assert_eq!(db.entries().len(), 1);
    }
}
