//! Console output through the `debug_write` system call.

use core::fmt::{self, Write};

use microkernel::abi::DEBUG_WRITE_MAX;

/// Formats into a stack buffer and writes it in `DEBUG_WRITE_MAX` pieces.
pub struct Out {
    buf: [u8; DEBUG_WRITE_MAX as usize],
    len: usize,
}

impl Out {
    pub const fn new() -> Self {
        Self { buf: [0; DEBUG_WRITE_MAX as usize], len: 0 }
    }
    pub fn flush(&mut self) {
        if self.len > 0 {
            let _ = crate::sys::debug_write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for Out {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Out {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut out = $crate::print::Out::new();
        let _ = writeln!(out, $($arg)*);
        out.flush();
    }};
}
