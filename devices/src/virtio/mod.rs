//! Virtio 1.x devices: the `no_std` + `alloc` core shared by native mode (the vmm's
//! event loop) and hosted mode (the microkernel's device tasks).
//!
//! Design rules:
//! - A device model sees the guest only through `GuestMemory` (bounds-checked copies),
//!   its queues (`Queue`, which re-validates everything the driver wrote) and a backend
//!   trait of its own (a block store, a frame pipe, an entropy source, a socket muxer).
//!   Host code implements those traits; nothing here knows about files, fds or KVM.
//! - Guest input never panics a device. A malformed request gets the device's error
//!   status; a corrupt ring makes the transport set `DEVICE_NEEDS_RESET`.
//! - Work per call is bounded: a device copies through fixed-size buffers and handles
//!   at most one queue's worth of chains per notification before re-checking.

#![forbid(unsafe_code)]

pub mod blk;
pub mod mem;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(any(test, feature = "std"))]
pub mod testing;
pub mod vsock;

pub use mem::{GuestMemory, MemError};
pub use queue::{Chain, ChainError, Queue, QueueError};

/// Device IDs (virtio 1.x §5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
}

/// Feature bits every device of ours offers (the transport adds them).
pub mod features {
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// `VIRTIO_F_VERSION_1`: the modern interface, the only one we speak.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Interrupt reasons (the mmio `InterruptStatus` bits).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device failed in a way the driver must reset it for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("virtqueue: {0}")]
    Queue(#[from] QueueError),
}

/// An interrupt line to the guest (an irqfd on the host, an IPC in a device task).
pub trait Interrupt: Send {
    fn trigger(&self);
}

/// A virtio device model behind a transport.
///
/// The transport owns the queues and hands them in; the device owns its backend.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`device_type::*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (powers of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits (the transport adds `VERSION_1` and `RING_EVENT_IDX`).
    fn features(&self) -> u64;
    /// Read the device-specific configuration space (bytes past its end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver wrote configuration space; most devices ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set `DRIVER_OK` with these negotiated features.
    fn activate(&mut self, _features: u64) {}
    /// Device reset: drop in-flight state (queues are reset by the transport).
    fn reset(&mut self) {}
    /// The driver notified queue `index`, which is ready and valid.
    fn queue_notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &dyn GuestMemory,
    ) -> Result<(), DeviceError>;
    /// The backend has something for the guest (a frame arrived, a socket is
    /// readable): move it into the queues if there is room.
    fn backend_ready(
        &mut self,
        _queues: &mut [Queue],
        _mem: &dyn GuestMemory,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// Copy the part of `config` that `[offset, offset + data.len())` covers into `data`;
/// whatever lies past the end reads as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}
