//! virtio-rng (entropy device, virtio 1.x §5.4): one queue of device-writable buffers
//! that the device fills from its entropy source.

use super::{device_type, DeviceError, GuestMemory, Queue, VirtioDevice};

/// The entropy source failed; the request gets what was filled before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("entropy source failed")]
pub struct EntropyError;

/// Where the entropy comes from (the host's `getrandom` in native mode).
pub trait EntropySource: Send {
    /// Fill `buf` completely, or fail.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError>;
}

/// At most this many bytes per request: Linux asks for 64 at a time, and a guest that
/// offers a gigabyte buffer gets a short fill rather than a gigabyte of work.
pub const MAX_FILL: usize = 64 * 1024;
const CHUNK: usize = 256;

pub struct Rng<E> {
    source: E,
}

impl<E: EntropySource> Rng<E> {
    pub fn new(source: E) -> Self {
        Rng { source }
    }
}

impl<E: EntropySource> VirtioDevice for Rng<E> {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[64]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn queue_notify(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &dyn GuestMemory,
    ) -> Result<(), DeviceError> {
        let source = &mut self.source;
        queues[0].process_all(mem, |chain| {
            let mut w = chain.writer();
            let mut chunk = [0u8; CHUNK];
            while (w.written() as usize) < MAX_FILL && w.remaining() > 0 {
                let n = (w.remaining() as usize)
                    .min(CHUNK)
                    .min(MAX_FILL - w.written() as usize);
                if source.fill(&mut chunk[..n]).is_err() {
                    break;
                }
                // A buffer outside RAM ends the fill; what was written stands.
                if w.write(mem, &chunk[..n]).is_err() {
                    break;
                }
            }
            w.written()
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mem::VecMemory;
    use crate::virtio::testing::DriverQueue;

    struct Counter(u8);
    impl EntropySource for Counter {
        fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
            for b in buf {
                self.0 = self.0.wrapping_add(1);
                *b = self.0;
            }
            Ok(())
        }
    }

    #[test]
    fn fills_writable_buffers_and_caps_huge_ones() {
        let mem = VecMemory::new(0, 1 << 20);
        let mut dq = DriverQueue::new(16, 0);
        let mut queues = [Queue::new(64)];
        dq.configure(&mut queues[0]);
        let mut rng = Rng::new(Counter(0));
        dq.add(&mem, &[(0x8000, 3, true), (0x9000, 5, true)]);
        dq.add(&mem, &[(0x10000, 0x80000, true)]);
        // A readable-only chain gets nothing written.
        dq.add(&mem, &[(0x8000, 16, false)]);
        rng.queue_notify(0, &mut queues, &mem).unwrap();
        let used = dq.used(&mem);
        assert_eq!(used.len(), 3);
        assert_eq!(used[0].1, 8);
        assert_eq!(used[1].1 as usize, MAX_FILL);
        assert_eq!(used[2].1, 0);
        let mut b = [0; 5];
        mem.read(0x9000, &mut b).unwrap();
        assert_eq!(b, [4, 5, 6, 7, 8]);
    }
}
