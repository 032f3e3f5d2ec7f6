//! Intrusive FIFO queues of thread indices.
//!
//! A thread sits in at most one queue of each kind (one ready queue, one sender queue),
//! so each kind needs one pair of links per thread, kept in a [`Links`] table by the
//! owner of that kind of queue. Insertion and removal are O(1) and never allocate.

use alloc::vec;
use alloc::vec::Vec;

/// The two ends of one queue; its members are linked through a [`Links`] table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queue {
    head: Option<usize>,
    tail: Option<usize>,
}

impl Queue {
    pub const EMPTY: Self = Self { head: None, tail: None };

    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }
    pub fn front(&self) -> Option<usize> {
        self.head
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Link {
    prev: Option<usize>,
    next: Option<usize>,
    linked: bool,
}

/// The links of every thread for one kind of queue.
#[derive(Debug)]
pub struct Links {
    links: Vec<Link>,
}

impl Links {
    pub fn new(threads: usize) -> Self {
        Self { links: vec![Link::default(); threads] }
    }

    pub fn is_linked(&self, i: usize) -> bool {
        self.links.get(i).is_some_and(|l| l.linked)
    }

    pub fn push_back(&mut self, q: &mut Queue, i: usize) {
        debug_assert!(!self.is_linked(i));
        self.links[i] = Link { prev: q.tail, next: None, linked: true };
        match q.tail {
            Some(t) => self.links[t].next = Some(i),
            None => q.head = Some(i),
        }
        q.tail = Some(i);
    }

    pub fn push_front(&mut self, q: &mut Queue, i: usize) {
        debug_assert!(!self.is_linked(i));
        self.links[i] = Link { prev: None, next: q.head, linked: true };
        match q.head {
            Some(h) => self.links[h].prev = Some(i),
            None => q.tail = Some(i),
        }
        q.head = Some(i);
    }

    /// Unlink `i` from `q`, the queue it is in; no effect if it is in none.
    pub fn remove(&mut self, q: &mut Queue, i: usize) {
        let Some(&l) = self.links.get(i).filter(|l| l.linked) else {
            return;
        };
        match l.prev {
            Some(p) => self.links[p].next = l.next,
            None => q.head = l.next,
        }
        match l.next {
            Some(n) => self.links[n].prev = l.prev,
            None => q.tail = l.prev,
        }
        self.links[i] = Link::default();
    }

    pub fn pop_front(&mut self, q: &mut Queue) -> Option<usize> {
        let h = q.head?;
        self.remove(q, h);
        Some(h)
    }

    /// The members of `q`, front to back.
    pub fn iter<'a>(&'a self, q: &Queue) -> impl Iterator<Item = usize> + 'a {
        let mut at = q.head;
        core::iter::from_fn(move || {
            let i = at?;
            at = self.links[i].next;
            Some(i)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn fifo_with_removal() {
        let mut links = Links::new(8);
        let mut q = Queue::EMPTY;
        for i in [3, 1, 4, 5] {
            links.push_back(&mut q, i);
        }
        links.push_front(&mut q, 7);
        links.remove(&mut q, 4);
        links.remove(&mut q, 4);
        assert_eq!(links.iter(&q).collect::<Vec<_>>(), [7, 3, 1, 5]);
        assert_eq!(links.pop_front(&mut q), Some(7));
        links.remove(&mut q, 5);
        assert_eq!(links.iter(&q).collect::<Vec<_>>(), [3, 1]);
        assert!(links.is_linked(1) && !links.is_linked(5));
        links.remove(&mut q, 3);
        links.remove(&mut q, 1);
        assert!(q.is_empty() && q == Queue::EMPTY);
    }
}
