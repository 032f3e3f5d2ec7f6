//! The console: a 16550A UART (vm-superio) with lossless host input.
//!
//! vm-superio models the registers and a 64-byte receive FIFO. What it cannot know is
//! *when* the guest is ready for input: bytes pushed before the guest's 8250 driver has
//! started are read and thrown away by the driver's start-up, and bytes pushed into a
//! full FIFO are refused. So host input waits in `pending` and moves into the FIFO only
//! while the guest has the received-data interrupt enabled (IER bit 0, with DLAB clear).
//! Linux sets that bit when a tty is opened and clears it when the tty layer throttles
//! the port, so this is also the flow control: input piped into the vmm long before the
//! guest reads it arrives whole and in order.
//!
//! The guest also sets the bit for a moment while probing the UART (autoconfig writes
//! IER = 0x0f and reads it back) and then clears the receive register by reading it.
//! So whenever the guest turns the received-data interrupt off, the bytes still in the
//! FIFO go back to the front of `pending`: the guest consumes input only while it has
//! asked for it.
//!
//! When the host input ends, one end-of-file character (^D) follows the last byte, so a
//! shell in the guest sees end of input.

use std::collections::VecDeque;
use std::io::Write;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::{GuestEvent, PioDevice};

const DATA: u16 = 0;
const IER: u16 = 1;
const LCR: u16 = 3;
const IER_RECEIVED_DATA: u8 = 0x01;
const LCR_DLAB: u8 = 0x80;
const IIR_NONE: u8 = 0x01;
const IIR_RECEIVED_DATA: u8 = 0x04;
const LSR_DATA_READY: u8 = 0x01;
const FIFO_SIZE: usize = 64;
/// ASCII EOT: the tty's default VEOF character.
const EOF_CHAR: u8 = 0x04;

/// A COM port whose input comes from the host and whose output goes to `W`.
pub struct SerialConsole<T: Trigger + Clone, W: Write> {
    /// Always `Some`; an `Option` only so the model can be rebuilt from its state.
    uart: Option<Serial<T, NoEvents, W>>,
    trigger: T,
    /// Shadows of the registers that decide whether the guest is receiving.
    ier: u8,
    lcr: u8,
    /// Host input the guest has not taken yet.
    pending: VecDeque<u8>,
    /// Host input has ended; `eof_sent` once the EOF character went to the guest.
    input_closed: bool,
    eof_sent: bool,
}

impl<T: Trigger + Clone, W: Write> SerialConsole<T, W> {
    /// A console raising its interrupt through `trigger` and writing guest output to `out`.
    pub fn new(trigger: T, out: W) -> Self {
        SerialConsole {
            uart: Some(Serial::new(trigger.clone(), out)),
            trigger,
            ier: 0,
            lcr: 0,
            pending: VecDeque::new(),
            input_closed: false,
            eof_sent: false,
        }
    }

    /// Queue host input for the guest.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        self.pump();
    }

    /// The host input ended (stdin reached end of file).
    pub fn close_input(&mut self) {
        self.input_closed = true;
        self.pump();
    }

    /// Bytes of host input waiting for the guest (for back-pressure on the reader).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The output sink.
    pub fn writer_mut(&mut self) -> &mut W {
        self.uart().writer_mut()
    }

    fn uart(&mut self) -> &mut Serial<T, NoEvents, W> {
        self.uart
            .as_mut()
            .expect("the UART model is only absent inside take_back_fifo")
    }

    /// Move the bytes the guest has not read out of the FIFO, back to the front of `pending`.
    fn take_back_fifo(&mut self) {
        let Some(uart) = self.uart.take() else { return };
        let mut state: SerialState = uart.state();
        let out = uart.into_writer();
        for &b in state.in_buffer.iter().rev() {
            self.pending.push_front(b);
        }
        state.in_buffer.clear();
        state.line_status &= !LSR_DATA_READY;
        state.interrupt_identification &= !IIR_RECEIVED_DATA;
        if state.interrupt_identification & 0x0f == 0 {
            state.interrupt_identification |= IIR_NONE;
        }
        // from_state fails only for an over-full FIFO; this one is empty.
        let rebuilt = Serial::from_state(&state, self.trigger.clone(), NoEvents, out);
        self.uart = Some(rebuilt.unwrap_or_else(|_| unreachable!("an empty FIFO always fits")));
    }

    fn receiving(&self) -> bool {
        self.lcr & LCR_DLAB == 0 && self.ier & IER_RECEIVED_DATA != 0
    }

    /// Move as much pending input into the FIFO as the guest is ready for.
    fn pump(&mut self) {
        if !self.receiving() {
            return;
        }
        if !self.pending.is_empty() {
            let room = self.uart().fifo_capacity();
            let n = room.min(self.pending.len());
            if n == 0 {
                return;
            }
            let chunk: Vec<u8> = self.pending.drain(..n).collect();
            // Cannot fail: we never enqueue more than the FIFO's free space, and a
            // failing trigger (eventfd write) only delays the interrupt until the
            // guest's next register access.
            let _ = self.uart().enqueue_raw_bytes(&chunk);
        } else if self.input_closed && !self.eof_sent && self.uart().fifo_capacity() == FIFO_SIZE {
            self.eof_sent = true;
            let _ = self.uart().enqueue_raw_bytes(&[EOF_CHAR]);
        }
    }
}

impl<T: Trigger + Clone, W: Write + Send> PioDevice for SerialConsole<T, W>
where
    T: Send,
{
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let Ok(reg) = u8::try_from(offset) else {
            data.fill(0xff);
            return;
        };
        if let Some(first) = data.first_mut() {
            *first = self.uart().read(reg);
        }
        if offset == DATA {
            self.pump();
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<GuestEvent> {
        let (Ok(reg), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return None;
        };
        let was_receiving = self.receiving();
        match offset {
            LCR => self.lcr = value,
            IER if self.lcr & LCR_DLAB == 0 => self.ier = value,
            _ => {}
        }
        // Output errors (a closed stdout) lose console output but must not stop the guest.
        let _ = self.uart().write(reg, value);
        if offset == IER || offset == LCR {
            if was_receiving && !self.receiving() {
                self.take_back_fifo();
            }
            self.pump();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Count(Arc<AtomicUsize>);
    impl Trigger for Count {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn read_byte(c: &mut SerialConsole<Count, Vec<u8>>) -> u8 {
        let mut b = [0u8];
        c.read(DATA, &mut b);
        b[0]
    }

    fn lsr_data_ready(c: &mut SerialConsole<Count, Vec<u8>>) -> bool {
        let mut b = [0u8];
        c.read(5, &mut b);
        b[0] & 1 != 0
    }

    #[test]
    fn input_waits_until_guest_enables_receive_interrupt() {
        let mut c = SerialConsole::new(Count::default(), Vec::new());
        let text: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        c.queue_input(&text);
        // Like the Linux driver's start-up: read RX to clear it, while IER is 0.
        assert!(!lsr_data_ready(&mut c));
        assert_eq!(c.pending_len(), 1000);
        c.write(IER, &[IER_RECEIVED_DATA]);
        let mut got = Vec::new();
        while lsr_data_ready(&mut c) {
            got.push(read_byte(&mut c));
        }
        assert_eq!(got, text, "every byte arrives, in order");
    }

    #[test]
    fn throttling_stops_input_and_eof_follows_the_last_byte() {
        let mut c = SerialConsole::new(Count::default(), Vec::new());
        c.write(IER, &[IER_RECEIVED_DATA]);
        c.queue_input(&[b'x'; 100]);
        c.close_input();
        // Throttle: the driver clears IER; what it has not read goes back to pending.
        let first = read_byte(&mut c);
        c.write(IER, &[0]);
        assert!(
            !lsr_data_ready(&mut c),
            "nothing is offered while throttled"
        );
        assert_eq!(c.pending_len(), 99);
        c.write(IER, &[IER_RECEIVED_DATA]);
        let mut got = vec![first];
        while lsr_data_ready(&mut c) {
            got.push(read_byte(&mut c));
        }
        assert_eq!(&got[..100], &[b'x'; 100][..]);
        assert_eq!(&got[100..], &[EOF_CHAR], "exactly one EOF after the data");
    }

    #[test]
    fn a_probe_that_flashes_ier_and_flushes_rx_loses_nothing() {
        // What Linux's 8250 autoconfig and start-up do, in this order.
        let mut c = SerialConsole::new(Count::default(), Vec::new());
        c.queue_input(b"echo hello\n");
        c.write(IER, &[0x0f]);
        let mut ier = [0u8];
        c.read(IER, &mut ier);
        assert_eq!(ier[0], 0x0f);
        c.write(IER, &[0]);
        for _ in 0..3 {
            read_byte(&mut c); // "clear the receive register"
        }
        assert!(!lsr_data_ready(&mut c));
        let mut iir = [0u8];
        c.read(2, &mut iir);
        assert_ne!(
            iir[0] & 0x0f,
            IIR_RECEIVED_DATA,
            "no stale received-data interrupt"
        );
        c.write(IER, &[0x05]);
        let mut got = Vec::new();
        while lsr_data_ready(&mut c) {
            got.push(read_byte(&mut c));
        }
        assert_eq!(got, b"echo hello\n");
    }

    #[test]
    fn dlab_writes_do_not_enable_input() {
        let mut c = SerialConsole::new(Count::default(), Vec::new());
        c.write(LCR, &[LCR_DLAB]);
        c.write(IER, &[IER_RECEIVED_DATA]); // divisor latch high byte, not IER
        c.queue_input(b"hi");
        c.write(LCR, &[0x03]);
        assert!(!lsr_data_ready(&mut c));
        c.write(IER, &[IER_RECEIVED_DATA]);
        assert!(lsr_data_ready(&mut c));
    }

    #[test]
    fn output_reaches_the_writer_and_bad_offsets_are_harmless() {
        let mut c = SerialConsole::new(Count::default(), Vec::new());
        for b in b"hello" {
            c.write(DATA, &[*b]);
        }
        assert_eq!(c.writer_mut().as_slice(), b"hello");
        let mut b = [0u8; 4];
        c.read(0x1234, &mut b);
        assert_eq!(c.write(0x1234, &[1]), None);
        assert_eq!(c.write(DATA, &[]), None);
    }
}
