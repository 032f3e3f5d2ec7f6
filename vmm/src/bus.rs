//! The I/O port bus: which device answers which port. Unclaimed ports read as all ones
//! and ignore writes, like an ISA bus with nothing on it.

use std::sync::{Arc, Mutex};

use devices::{GuestEvent, PioDevice};

/// A shared device on the bus.
pub type SharedPio = Arc<Mutex<dyn PioDevice>>;

#[derive(Default)]
pub struct PioBus {
    ranges: Vec<(u16, u16, SharedPio)>,
}

impl PioBus {
    /// Claim `len` ports from `base` for `dev`. Ranges must not overlap.
    pub fn insert(&mut self, base: u16, len: u16, dev: SharedPio) {
        debug_assert!(self
            .ranges
            .iter()
            .all(|(b, l, _)| base + len <= *b || b + l <= base));
        self.ranges.push((base, len, dev));
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedPio)> {
        self.ranges
            .iter()
            .find(|(base, len, _)| port >= *base && port - base < *len)
            .map(|(base, _, dev)| (port - base, dev))
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((offset, dev)) => dev.lock().unwrap().read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> Option<GuestEvent> {
        let (offset, dev) = self.find(port)?;
        dev.lock().unwrap().write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::platform::ExitPort;

    #[test]
    fn dispatch_by_port() {
        let mut bus = PioBus::default();
        bus.insert(0x501, 1, Arc::new(Mutex::new(ExitPort)));
        assert_eq!(bus.write(0x501, &[9]), Some(GuestEvent::ExitStatus(9)));
        assert_eq!(bus.write(0x502, &[9]), None);
        let mut b = [0u8; 2];
        bus.read(0x80, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
