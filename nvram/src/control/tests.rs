//! The messages decoded as the VMM decodes them: round trips, and every field a guest can get wrong.

use super::*;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use zerocopy::IntoBytes;

/// A message's bytes at the start of a buffer larger than any message, and its length.
fn bytes<T: IntoBytes + Immutable>(m: &T) -> ([u8; 128], usize) {
    let mut out = [0u8; 128];
    let b = m.as_bytes();
    out[..b.len()].copy_from_slice(b);
    (out, b.len())
}

#[test]
fn messages_round_trip() {
    let (b, n) = bytes(&Booted::new(BootKind::Restored, 7, 42).with_work_runs(5));
    assert_eq!(n, core::mem::size_of::<Booted>());
    assert_eq!(
        decode(&b[..n]),
        Ok(Message::Booted { boot_kind: BootKind::Restored, boot_count: 7, generation: 42, work_runs: 5 })
    );
    let (b, n) = bytes(&Heartbeat::new("kv", 3, 1000, 0xabc, Verified::Passed));
    assert_eq!(n, core::mem::size_of::<Heartbeat>());
    match decode(&b[..n]) {
        Ok(Message::Heartbeat { name, pid: 3, progress: 1000, checksum: 0xabc, verified: Verified::Passed }) => {
            assert_eq!(name.as_str(), "kv")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refusals_round_trip_and_unknown_codes_are_refused() {
    use crate::program::ProgramError;
    let (b, n) = bytes(&Refused::new("mine", ProgramError::OutsideWindow(2)));
    match decode(&b[..n]) {
        Ok(Message::Refused { name, error: ProgramError::OutsideWindow(2) }) => assert_eq!(name.as_str(), "mine"),
        other => panic!("{other:?}"),
    }
    // A name that is not printable is sent with `?`s, and a long one cut: both decode.
    let (b, n) = bytes(&Refused::new("a b\u{e9}c-and-a-much-longer-tail", ProgramError::NoMemory));
    match decode(&b[..n]) {
        Ok(Message::Refused { name, .. }) => assert_eq!(name.as_str(), "a?b??c-and-a-muc"),
        other => panic!("{other:?}"),
    }
    let (mut b, n) = bytes(&Refused::new("mine", ProgramError::NoMemory));
    b[24] = 99;
    assert_eq!(decode(&b[..n]), Err(DecodeError::BadRefusal(99)));
    let (mut b, n) = bytes(&Refused::new("mine", ProgramError::NoMemory));
    b[28] = 1;
    assert_eq!(decode(&b[..n]), Err(DecodeError::Reserved));
}

#[test]
fn started_round_trips() {
    let (b, n) = bytes(&Started::new(12, Cause::RequestInterrupt));
    assert_eq!(decode(&b[..n]), Ok(Message::Started { generation: 12, cause: Cause::RequestInterrupt }));
    let (mut b, n) = bytes(&Started::new(12, Cause::Boot));
    b[8] = 6;
    assert_eq!(decode(&b[..n]), Err(DecodeError::BadCause(6)));
    let (b, n) = bytes(&Running::new(3, 12));
    assert_eq!(decode(&b[..n]), Ok(Message::Running { pid: 3, generation: 12 }));
    let (mut b, n) = bytes(&Running::new(3, 12));
    b[12] = 1;
    assert_eq!(decode(&b[..n]), Err(DecodeError::Reserved));
    let (mut b, n) = bytes(&Started::new(12, Cause::Boot));
    b[13] = 1;
    assert_eq!(decode(&b[..n]), Err(DecodeError::Reserved));
}

#[test]
fn metrics_round_trip_and_are_checked() {
    let mut m = Metrics::new(Operation::WriteOut);
    m.plates = 456;
    m.copier = Copier::Engine.into();
    m.generation = 3;
    m.plated_bytes = 8 << 20;
    m.copied_bytes = 1 << 20;
    m.phases = [1, 2, 3, 4, 5, 6, 7];
    m.total = 30;
    let (b, n) = bytes(&m);
    assert_eq!(n, core::mem::size_of::<Metrics>());
    match decode(&b[..n]) {
        Ok(Message::Metrics(r)) => {
            assert_eq!((r.operation, r.plates, r.generation, r.copier), (Operation::WriteOut, 456, 3, Copier::Engine));
            assert_eq!(
                (r.plated_bytes, r.copied_bytes, r.phases, r.total),
                (8 << 20, 1 << 20, [1, 2, 3, 4, 5, 6, 7], 30)
            );
        }
        other => panic!("{other:?}"),
    }
    m.total = 20;
    let (b, n) = bytes(&m);
    assert_eq!(decode(&b[..n]), Err(DecodeError::BadTimes));
    m.total = 30;
    // A rollback is a restore's news; a write-out claiming one is refused.
    m.rolled_back = 2;
    let (b, n) = bytes(&m);
    assert_eq!(decode(&b[..n]), Err(DecodeError::Reserved));
    m.operation = Operation::Restore.into();
    let (b, n) = bytes(&m);
    assert!(matches!(decode(&b[..n]), Ok(Message::Metrics(r)) if r.rolled_back == 2));
    m.operation = 9;
    let (b, n) = bytes(&m);
    assert_eq!(decode(&b[..n]), Err(DecodeError::BadOperation(9)));
}

#[test]
fn bad_messages_are_refused() {
    let (good, n) = bytes(&Heartbeat::new("kv", 3, 1000, 0xabc, Verified::Passed));
    for cut in 0..n {
        assert!(decode(&good[..cut]).is_err(), "truncated at {cut}");
    }
    let mut b = good;
    b[0] = 9;
    assert_eq!(decode(&b[..n]), Err(DecodeError::UnknownKind(9)));
    let mut b = good;
    b[4] = 200;
    assert!(matches!(decode(&b[..n]), Err(DecodeError::Length { .. })));
    let mut b = good;
    b[8] = 0;
    assert_eq!(decode(&b[..n]), Err(DecodeError::BadName), "empty name");
    let mut b = good;
    b[11] = b'x';
    assert_eq!(decode(&b[..n]), Err(DecodeError::BadName), "garbage after the NUL");
    let mut b = good;
    b[9] = 0x07;
    assert_eq!(decode(&b[..n]), Err(DecodeError::BadName), "not printable");
    let mut b = good;
    b[28] = 3;
    assert_eq!(decode(&b[..n]), Err(DecodeError::BadVerified(3)));
    let (mut b, n) = bytes(&Booted::new(BootKind::Cold, 1, 0));
    b[8] = 5;
    assert_eq!(decode(&b[..n]), Err(DecodeError::BadBootKind(5)));
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = SmallRng::seed_from_u64(0x1234_5678_9abc_def0);
    let mut buf = [0u8; 128];
    for round in 0..200_000u32 {
        rng.fill(&mut buf[..]);
        // Make a share of them plausible: a known kind and its length.
        if round % 2 == 0 {
            buf[0] = 1 + (round % 10 / 2) as u8;
            buf[1..4].fill(0);
            buf[4] = [32, 48, 104, 24, 24][buf[0] as usize - 1];
            buf[5..8].fill(0);
        }
        let len = rng.random_range(0..=buf.len());
        let _ = decode(&buf[..len]);
    }
}

/// A console message as the guest builds it: the header for its text, then the text.
fn console_message(text: &[u8]) -> std::vec::Vec<u8> {
    let mut m = console_header(text.len()).as_bytes().to_vec();
    m.extend_from_slice(text);
    m
}

#[test]
fn console_text_decodes_to_its_length_and_bad_lengths_are_refused() {
    let m = console_message(b"NVM: restored generation 2\r\n");
    assert_eq!(decode(&m), Ok(Message::Console { len: 28 }));
    let longest = console_message(&[b'x'; CONSOLE_TEXT_MAX]);
    assert_eq!(longest.len(), MAX_MESSAGE as usize);
    assert_eq!(decode(&longest), Ok(Message::Console { len: CONSOLE_TEXT_MAX }));
    // No text, more text than a message holds, and a header claiming more than was read.
    assert!(matches!(decode(&console_message(b"")), Err(DecodeError::Length { kind: KIND_CONSOLE, len: 8 })));
    let mut over = console_message(&[b'x'; CONSOLE_TEXT_MAX]);
    over.push(b'y');
    over[4..8].copy_from_slice(&(MAX_MESSAGE + 1).to_le_bytes());
    assert!(matches!(decode(&over), Err(DecodeError::Length { .. })));
    let m = console_message(b"cut short");
    assert_eq!(decode(&m[..12]), Err(DecodeError::Truncated { have: 12, need: 17 }));
}
