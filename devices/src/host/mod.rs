//! The host side of the virtio devices: the core's traits implemented over vm-memory
//! (`GuestMemory`), eventfds (`Interrupt`), files (`BlockBackend`), `getrandom`
//! (`EntropySource`), tap devices (`NetBackend`) and Unix sockets (the vsock muxer).

pub mod blk;
pub mod memory;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::unix::io::RawFd;

/// Host file descriptors a device's backend wants watched by the event loop.
///
/// The loop asks for `fds()` after every event it delivers to the device and updates
/// its epoll set to match (adding, changing and removing registrations), so a backend
/// can stop reading a tap while the guest has no receive buffers, or add a socket when
/// a connection is accepted. After `fd_ready` the loop calls the transport's
/// `backend_ready`, which moves whatever the backend now holds into the queues.
pub trait HostFds {
    /// `(fd, epoll events)` pairs (`libc::EPOLLIN`, `libc::EPOLLOUT`) to watch now.
    fn fds(&self) -> Vec<(RawFd, u32)> {
        Vec::new()
    }
    /// `fd` reported `events`.
    fn fd_ready(&mut self, _fd: RawFd, _events: u32) {}
}

impl<B: crate::virtio::blk::BlockBackend> HostFds for crate::virtio::blk::Block<B> {}
impl<E: crate::virtio::rng::EntropySource> HostFds for crate::virtio::rng::Rng<E> {}
