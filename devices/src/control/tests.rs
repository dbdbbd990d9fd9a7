//! The device driven as a guest drives it: good messages update the status, bad ones are counted and logged within bounds.

use super::*;
use nvram::control::{Booted, Heartbeat};
use zerocopy::{Immutable, IntoBytes};

fn device() -> MachineControl {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    MachineControl::new(mem, 2_600_000)
}

fn put<T: IntoBytes + Immutable>(dev: &MachineControl, addr: u64, message: &T) {
    dev.mem.write_slice(message.as_bytes(), GuestAddress(addr)).unwrap();
}

fn ring(dev: &mut MachineControl, addr: u32) {
    dev.write(REG_DOORBELL, &addr.to_le_bytes());
}

#[test]
fn identifies_itself_and_reports_the_tsc_rate() {
    let mut dev = device();
    let mut data = [0u8; 4];
    dev.read(REG_DOORBELL, &mut data);
    assert_eq!(u32::from_le_bytes(data), DEVICE_ID);
    dev.read(REG_TSC_KHZ, &mut data);
    assert_eq!(u32::from_le_bytes(data), 2_600_000);
    let mut byte = [0u8; 1];
    dev.read(REG_DOORBELL, &mut byte);
    assert_eq!(byte, [0xff]);
}

#[test]
fn good_messages_update_the_status() {
    let mut dev = device();
    put(&dev, 0x1000, &Booted::new(BootKind::Restored, 3, 9));
    ring(&mut dev, 0x1000);
    put(&dev, 0x2000, &Heartbeat::new("kv", 1, 500, 0xfeed, Verified::Passed));
    ring(&mut dev, 0x2000);
    put(&dev, 0x2000, &Heartbeat::new("kv", 1, 900, 0xbeef, Verified::Unknown));
    ring(&mut dev, 0x2000);
    let status = lock(&dev.status);
    assert_eq!(status.boot_kind, Some(BootKind::Restored));
    assert_eq!((status.boot_count, status.committed_generation), (3, 9));
    let kv = &status.workloads["kv"];
    assert_eq!((kv.progress, kv.checksum, kv.heartbeats), (900, 0xbeef, 2));
    assert_eq!((kv.verified, kv.last_check), (Verified::Unknown, Verified::Passed));
    assert_eq!((status.accepted, status.rejected), (3, 0));
}

#[test]
fn refused_programs_are_kept_up_to_a_bound_and_the_boot_report_keeps_them() {
    use nvram::control::Refused;
    use nvram::program::ProgramError;
    let mut dev = device();
    for i in 0..(MAX_REFUSED + 5) {
        put(&dev, 0x1000, &Refused::new(&format!("p{i}"), ProgramError::Overlap(1)));
        ring(&mut dev, 0x1000);
    }
    {
        let status = lock(&dev.status);
        assert_eq!((status.refused.len(), status.refused_total), (MAX_REFUSED, MAX_REFUSED as u64 + 5));
        assert_eq!(status.refused[0], RefusedProgram { name: "p0".into(), error: ProgramError::Overlap(1) });
    }
    put(&dev, 0x1000, &Booted::new(BootKind::Cold, 1, 0));
    ring(&mut dev, 0x1000);
    let status = lock(&dev.status);
    assert_eq!(status.refused_total, MAX_REFUSED as u64 + 5, "the refusals come before the boot report");
}

#[test]
fn the_first_process_entered_is_recorded_and_a_boot_clears_it() {
    let mut dev = device();
    put(&dev, 0x1000, &nvram::control::Running::new(2, 7));
    ring(&mut dev, 0x1000);
    let running = lock(&dev.status).running.expect("recorded");
    assert_eq!((running.pid, running.generation), (2, 7));
    put(&dev, 0x1000, &Booted::new(BootKind::Restored, 3, 7));
    ring(&mut dev, 0x1000);
    let status = lock(&dev.status);
    assert!(status.running.is_none() && status.booted_at.is_some());
}

#[test]
fn requests_are_read_once() {
    let mut dev = device();
    lock(&dev.status).pending.ask(Request::Checkpoint);
    let mut data = [0u8; 4];
    dev.read(REG_REQUEST, &mut data);
    assert_eq!(u32::from_le_bytes(data), Request::Checkpoint as u32);
    dev.read(REG_REQUEST, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0);
}

#[test]
fn bad_doorbells_are_ignored_and_counted() {
    let mut dev = device();
    put(&dev, 0x1000, &Heartbeat::new("kv", 1, 5, 5, Verified::Passed));
    ring(&mut dev, 0x1004); // misaligned
    ring(&mut dev, (1 << 20) - 8); // header fits, body runs past RAM
    ring(&mut dev, 1 << 20); // past the end of RAM
    ring(&mut dev, 0xffff_fff8);
    dev.mem.write_slice(&[2, 0, 0, 0, 0xff, 0xff, 0, 0], GuestAddress(0x3000)).unwrap();
    ring(&mut dev, 0x3000); // over-long
    dev.mem.write_slice(&[77, 0, 0, 0, 48, 0, 0, 0], GuestAddress(0x4000)).unwrap();
    ring(&mut dev, 0x4000); // unknown kind
    dev.write(REG_DOORBELL, &[1, 2]); // wrong width
    dev.write(REG_TSC_KHZ, &[0, 0, 0, 0]); // read-only register
    let status = lock(&dev.status);
    assert_eq!(status.accepted, 0);
    assert_eq!(status.rejected, 8);
    assert!(status.workloads.is_empty());
}

/// A guest flooding the device: what it keeps stays bounded, the aggregates stay right.
#[test]
fn a_flood_of_messages_keeps_the_device_bounded() {
    let mut dev = device();
    let n: u64 = if cfg!(debug_assertions) { 200_000 } else { 2_000_000 };
    let mut metrics = nvram::control::Metrics::new(Operation::WriteOut);
    for i in 0..n {
        // Totals of 1 to 1000 µs (2,600 ticks a µs), the smallest and largest at known places.
        metrics.generation = i + 1;
        metrics.total = (1 + (i * 7919) % 1000) * 2_600;
        metrics.copied_bytes = 4096;
        put(&dev, 0x1000, &metrics);
        ring(&mut dev, 0x1000);
        if i % 65_536 == 0 {
            assert!(lock(&dev.status).operations.len() <= 1024, "after {i} messages");
        }
    }
    for i in 0..5_000u32 {
        put(&dev, 0x2000, &Heartbeat::new(&format!("w{i}"), i, 1, 1, Verified::Passed));
        ring(&mut dev, 0x2000);
    }
    // The log lines the flood caused are bounded: at most a second's budget a second.
    assert!(dev.logs.operations.suppressed() > 0 && dev.logs.workloads.suppressed() > 0);
    let status = lock(&dev.status);
    assert_eq!(status.accepted, n + 5_000);
    assert!(status.operations.len() <= 1024, "{} records kept", status.operations.len());
    assert!(status.workloads.len() <= 64, "{} workloads kept", status.workloads.len());
    assert_eq!(status.operations.iter().last().map(|r| r.report.generation), Some(n), "the newest is kept");
    assert_eq!(status.ignored_heartbeats, 5_000 - MAX_WORKLOADS as u64);
    let us = Duration::from_micros;
    let stats = status.stats(Operation::WriteOut);
    assert_eq!((stats.count, stats.min, stats.max), (n, Some(us(1)), Some(us(1000))));
    assert_eq!(status.bytes_copied(), 4096 * n);
    assert_eq!(status.count(Operation::Restore), 0);
    let summary = status.summary(Operation::WriteOut).unwrap();
    assert_eq!((summary.count, summary.min, summary.max), (n, us(1), us(1000)));
    assert!(summary.median.abs_diff(us(500)) < us(25), "{summary:?}");
    assert!(summary.p99.abs_diff(us(990)) < us(40), "{summary:?}");
    assert_eq!(status.nth_of(Operation::WriteOut, n - 1).map(|r| r.report.generation), Some(n));
    assert_eq!(status.nth_of(Operation::WriteOut, 0).map(|r| r.report.generation), Some(n - 1023), "the oldest kept");
    assert!(status.nth_of(Operation::WriteOut, n).is_none());
    drop(status);
    // A new boot empties the table: names are kept again.
    put(&dev, 0x1000, &Booted::new(BootKind::Cold, 1, 0));
    ring(&mut dev, 0x1000);
    put(&dev, 0x2000, &Heartbeat::new("kv", 1, 1, 1, Verified::Passed));
    ring(&mut dev, 0x2000);
    assert_eq!(lock(&dev.status).workloads.len(), 1);
}

#[test]
fn summaries_are_exact_while_the_ring_holds_everything() {
    let mut dev = device();
    for ms in 1..=100u64 {
        let mut metrics = nvram::control::Metrics::new(Operation::Restore);
        metrics.total = ms * 2_600_000;
        put(&dev, 0x1000, &metrics);
        ring(&mut dev, 0x1000);
    }
    let status = lock(&dev.status);
    let s = status.summary(Operation::Restore).unwrap();
    let ms = Duration::from_millis;
    assert_eq!((s.count, s.min, s.median, s.p99, s.max), (100, ms(1), ms(51), ms(99), ms(100)));
    assert_eq!(status.summary(Operation::WriteOut), None);
    assert_eq!(status.nth_of(Operation::Restore, 4).map(|r| r.total), Some(ms(5)));
}

#[test]
fn a_restore_that_left_pages_is_unended_until_its_tail_arrives() {
    let mut dev = device();
    let send = |dev: &mut MachineControl, op, plated: u64, copied: u64| {
        let mut m = nvram::control::Metrics::new(op);
        (m.plated_bytes, m.copied_bytes) = (plated, copied);
        put(dev, 0x1000, &m);
        ring(dev, 0x1000);
    };
    send(&mut dev, Operation::Restore, 100, 100);
    assert!(!lock(&dev.status).left_pages_unrestored(), "an eager restore leaves nothing");
    send(&mut dev, Operation::Restore, 100, 10);
    assert!(lock(&dev.status).left_pages_unrestored(), "a lazy one, not ended");
    send(&mut dev, Operation::RestoreTail, 90, 90);
    let status = lock(&dev.status);
    assert!(!status.left_pages_unrestored(), "ended");
    assert_eq!(status.count(Operation::RestoreTail), 1);
    assert_eq!(status.bytes_copied(), 200);
}

/// A writer the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn put_console(dev: &MachineControl, addr: u64, text: &[u8]) {
    dev.mem.write_slice(nvram::control::console_header(text.len()).as_bytes(), GuestAddress(addr)).unwrap();
    dev.mem.write_slice(text, GuestAddress(addr + 8)).unwrap();
}

/// Console text reaches the console the UART prints on, in order with the UART's bytes;
/// a console message with no text, or claiming more than a message holds, prints nothing.
#[test]
fn console_text_is_printed_between_the_uarts_bytes() {
    let captured = Captured::default();
    let console = crate::SharedConsole::new(Box::new(captured.clone()));
    let mut dev = device().with_console(console.clone());
    let mut uart = console.clone();
    uart.write_all(b"A").unwrap();
    put_console(&dev, 0x1000, b"NVM: restored generation 2\r\n");
    ring(&mut dev, 0x1000);
    uart.write_all(b"B").unwrap();
    dev.mem.write_slice(nvram::control::console_header(0).as_bytes(), GuestAddress(0x2000)).unwrap();
    ring(&mut dev, 0x2000);
    dev.mem.write_slice(nvram::control::console_header(MAX_MESSAGE as usize).as_bytes(), GuestAddress(0x3000)).unwrap();
    ring(&mut dev, 0x3000);
    assert_eq!(captured.0.lock().unwrap().as_slice(), b"ANVM: restored generation 2\r\nB");
    let status = lock(&dev.status);
    assert_eq!((status.accepted, status.rejected), (0, 2), "text is not a report; the bad two are refused");
    assert_eq!(status.console_messages, 1);
}
