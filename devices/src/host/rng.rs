//! The host's `getrandom(2)` as the virtio-rng entropy source.

use crate::virtio::rng::{EntropyError, EntropySource};

#[derive(Debug, Default)]
pub struct HostEntropy;

impl EntropySource for HostEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer we pass.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            match n {
                n if n > 0 => done += n as usize,
                _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                _ => return Err(EntropyError),
            }
        }
        Ok(())
    }
}
