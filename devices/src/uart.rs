//! A 16550A UART reduced to what a console needs without input: the transmitter, the
//! registers Linux's 8250 driver probes, and the transmitter-empty interrupt. `no_std`:
//! the guest server task of hosted mode runs it in VM0 (native mode uses the full
//! vm-superio model in `serial`, which also takes input).
//!
//! The transmitter is always empty (a byte written leaves at once), so the only
//! interrupt is "THR empty": raised when the guest writes THR or enables the interrupt
//! with IER, cleared when the guest reads IIR (or writes THR again). The caller turns a
//! raised interrupt into an edge on the UART's interrupt line.

/// Register offsets from the base port.
const DATA: u8 = 0; // RBR/THR, DLL when LCR.DLAB
const IER: u8 = 1; // DLM when LCR.DLAB
const IIR_FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const MSR: u8 = 6;
const SCR: u8 = 7;

const LCR_DLAB: u8 = 0x80;
const IER_THRI: u8 = 0x02;
const IIR_NONE: u8 = 0x01;
const IIR_THRI: u8 = 0x02;
/// IIR bits 6..8: FIFOs enabled (a 16550A).
const IIR_FIFO: u8 = 0xc0;
const FCR_ENABLE: u8 = 0x01;
/// THR empty and transmitter idle.
const LSR_IDLE: u8 = 0x60;
const MCR_LOOP: u8 = 0x10;

/// What a register write did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// A byte the guest transmitted.
    pub byte: Option<u8>,
    /// The interrupt line should see an edge.
    pub interrupt: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    divisor: [u8; 2],
    fifo: bool,
    thr_empty_pending: bool,
}

impl Uart16550 {
    pub fn new() -> Self {
        Self::default()
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    /// The guest reads the register at `offset` (0..8; others read as all ones).
    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            DATA if self.dlab() => self.divisor[0],
            DATA => 0, // nothing received, ever
            IER if self.dlab() => self.divisor[1],
            IER => self.ier,
            IIR_FCR => {
                let fifo = if self.fifo { IIR_FIFO } else { 0 };
                if self.thr_empty_pending {
                    self.thr_empty_pending = false;
                    IIR_THRI | fifo
                } else {
                    IIR_NONE | fifo
                }
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => LSR_IDLE,
            // Loopback: the modem outputs come back as inputs (DTR→DSR, RTS→CTS,
            // OUT1→RI, OUT2→DCD); otherwise a connected line (DCD, DSR, CTS).
            MSR if self.mcr & MCR_LOOP != 0 => {
                let m = self.mcr;
                ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            }
            MSR => 0xb0,
            SCR => self.scr,
            _ => 0xff,
        }
    }

    /// The guest writes `value` to the register at `offset`.
    pub fn write(&mut self, offset: u8, value: u8) -> Written {
        let mut w = Written::default();
        match offset {
            DATA if self.dlab() => self.divisor[0] = value,
            DATA => {
                // in loopback mode the byte would come back as input: it is dropped
                if self.mcr & MCR_LOOP == 0 {
                    w.byte = Some(value);
                }
                self.thr_empty_pending = self.ier & IER_THRI != 0;
                w.interrupt = self.thr_empty_pending;
            }
            IER if self.dlab() => self.divisor[1] = value,
            IER => {
                let enabled = value & !self.ier & IER_THRI != 0;
                self.ier = value & 0x0f;
                // the transmitter is empty: enabling its interrupt raises it
                if enabled {
                    self.thr_empty_pending = true;
                    w.interrupt = true;
                } else if self.ier & IER_THRI == 0 {
                    self.thr_empty_pending = false;
                }
            }
            IIR_FCR => self.fifo = value & FCR_ENABLE != 0,
            LCR => self.lcr = value,
            MCR => self.mcr = value & 0x1f,
            SCR => self.scr = value,
            _ => {}
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_leave_and_the_transmitter_is_always_empty() {
        let mut u = Uart16550::new();
        assert_eq!(
            u.write(DATA, b'x'),
            Written {
                byte: Some(b'x'),
                interrupt: false
            }
        );
        assert_eq!(u.read(LSR), LSR_IDLE);
        assert_eq!(u.read(IIR_FCR), IIR_NONE, "no interrupt while IER is clear");
    }

    #[test]
    fn thr_empty_interrupt_is_raised_by_ier_and_thr_and_cleared_by_iir() {
        let mut u = Uart16550::new();
        assert!(
            u.write(IER, IER_THRI).interrupt,
            "enabling it raises it: THR is empty"
        );
        assert!(
            !u.write(IER, IER_THRI).interrupt,
            "already enabled: no second edge"
        );
        assert_eq!(u.read(IIR_FCR), IIR_THRI);
        assert_eq!(u.read(IIR_FCR), IIR_NONE, "reading IIR cleared it");
        assert!(u.write(DATA, b'a').interrupt);
        u.write(IIR_FCR, FCR_ENABLE);
        assert_eq!(u.read(IIR_FCR), IIR_THRI | IIR_FIFO);
        u.write(IER, 0);
        assert!(!u.write(DATA, b'b').interrupt);
        assert_eq!(u.read(IIR_FCR), IIR_NONE | IIR_FIFO);
    }

    #[test]
    fn divisor_latch_and_scratch_hold_what_was_written() {
        let mut u = Uart16550::new();
        u.write(LCR, LCR_DLAB | 3);
        assert_eq!(u.write(DATA, 0x0c), Written::default(), "DLL, not a byte");
        u.write(IER, 0x00);
        assert_eq!((u.read(DATA), u.read(IER)), (0x0c, 0));
        u.write(LCR, 3);
        u.write(SCR, 0x5a);
        assert_eq!((u.read(LCR), u.read(SCR), u.read(IER)), (3, 0x5a, 0));
    }

    #[test]
    fn loopback_reflects_modem_control_as_linux_probes_it() {
        let mut u = Uart16550::new();
        // 8250 autoconfig: MCR = LOOP | OUT2 | RTS must read back MSR & 0xf0 == 0x90
        u.write(MCR, MCR_LOOP | 0x0a);
        assert_eq!(u.read(MSR) & 0xf0, 0x90);
        assert_eq!(u.write(DATA, b'q').byte, None, "looped back, not sent");
        u.write(MCR, 0);
        assert_eq!(u.read(MSR), 0xb0);
        assert_eq!(u.read(9), 0xff);
    }
}
