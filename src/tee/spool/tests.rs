use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::checkpoint::{
    write_checkpoint, CHECKPOINT_LEN, CHECKPOINT_MAGIC, CHECKPOINT_VERSION_BYTE,
};
use super::frame::{segment_start, SegmentStart, MAGIC};
use super::segments::{list_segments, list_segments_with_sizes, segment_path};
use super::writer::{SegmentIo, DISK_RETRY_MAX, IDLE_BUF_CAPACITY};
use super::*;

fn entry(i: usize) -> SpoolEntry {
    SpoolEntry {
        kind: if i.is_multiple_of(5) {
            EntryKind::Alert
        } else {
            EntryKind::Record
        },
        timestamp_ms: 1_700_000_000_000 + i as i64,
        key: format!("pred-{i:06}"),
        route: format!("route-{}", i % 3),
        payload: format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 40)).into_bytes(),
    }
}

fn config(dir: &Path, mode: SpoolMode, max_bytes: u64, segment_bytes: u64) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes,
        segment_bytes,
        fsync_interval: Duration::from_millis(5),
        mode,
    }
}

/// Seeded, so failures reproduce.
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(fastrand::Rng::with_seed(seed))
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.usize(..n)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.0.u8(..)).collect()
    }
}

fn disk_bytes(dir: &Path) -> u64 {
    list_segments_with_sizes(dir)
        .unwrap()
        .iter()
        .map(|&(_, s)| s)
        .sum()
}

fn segment_numbers(dir: &Path) -> Vec<u64> {
    list_segments(dir).unwrap()
}

fn assert_gauges_match_disk(metrics: &SpoolMetrics, dir: &Path) {
    assert_eq!(metrics.bytes.get(), disk_bytes(dir) as i64, "bytes gauge");
    assert_eq!(
        metrics.segments.get(),
        segment_numbers(dir).len() as i64,
        "segments gauge"
    );
}

fn read_all(reader: &mut SpoolReader, upto: Position) -> Vec<SpooledEntry> {
    let mut out = Vec::new();
    loop {
        let batch = reader.next_batch(upto, 17).unwrap();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

fn entries_of(read: &[SpooledEntry]) -> Vec<SpoolEntry> {
    read.iter().map(|e| e.entry.clone()).collect()
}

fn write_all(writer: &mut SpoolWriter, entries: &[SpoolEntry], batch: usize) {
    for chunk in entries.chunks(batch) {
        assert_eq!(writer.append_batch(chunk).unwrap(), chunk.len());
        writer.maybe_fsync().unwrap();
    }
}

/// A sender taking what the writer hands over, and reading from disk what it cannot, gets
/// every entry once, in order, at the positions a reader of the disk alone sees: across
/// segment rolls, a hand-off too small for a batch (gaps), and a reader that lags behind.
/// Acknowledging them all deletes every sealed segment.
#[test]
fn handoff_and_disk_together_read_each_entry_once_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = SpoolMetrics::default();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 2000);
    let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    let handoff = Handoff::new(600);
    w.set_handoff(handoff.clone());
    let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
    let mut rng = Rng::new(0x5eed);
    let all: Vec<_> = (0..400).map(entry).collect();
    let (mut got, mut from_memory) = (Vec::new(), 0);
    let mut sender_step = |r: &mut SpoolReader, got: &mut Vec<SpooledEntry>, max: usize| {
        let mut batch = Vec::new();
        handoff.take(r, max, &mut batch);
        from_memory += batch.len();
        let upto = *rx.borrow();
        if batch.len() < max && r.read_position() < upto {
            batch.extend(r.next_batch(upto, max - batch.len()).unwrap());
        }
        let n = batch.len();
        got.extend(batch);
        n
    };
    let mut rest = &all[..];
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(1 + rng.below(9)));
        rest = tail;
        let mut owned = chunk.to_vec();
        assert_eq!(w.append_owned(&mut owned).unwrap(), chunk.len());
        assert!(owned.is_empty());
        // Sometimes the sender keeps up, sometimes it lags a few batches behind.
        if rng.below(3) > 0 {
            sender_step(&mut r, &mut got, 1 + rng.below(12));
        }
    }
    while sender_step(&mut r, &mut got, 16) > 0 {}
    assert!(from_memory > 0, "nothing came from memory");
    assert!(from_memory < all.len(), "nothing came from disk");

    let mut disk = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
    let on_disk = read_all(&mut disk, *rx.borrow());
    assert_eq!(got, on_disk);
    assert_eq!(entries_of(&got), all);

    for e in &got {
        r.ack(e.pos).unwrap();
    }
    assert_eq!(segment_numbers(tmp.path()), vec![rx.borrow().segment]);
    assert_eq!(r.acked_prefix(), Some(r.read_position()));
}

#[test]
fn round_trip_across_segment_rolls() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = SpoolMetrics::default();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1000);
    let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    let all: Vec<_> = (0..300).map(entry).collect();
    write_all(&mut w, &all, 7);
    w.sync().unwrap();
    let upto = *rx.borrow();
    assert!(upto.segment >= 5, "expected several rolls, got {upto:?}");
    assert_eq!(metrics.spooled.get(), 300);
    assert_gauges_match_disk(&metrics, tmp.path());
    for (_, size) in list_segments_with_sizes(tmp.path()).unwrap() {
        assert!(size <= 1000);
    }

    let read_metrics = SpoolMetrics::default();
    let mut r = SpoolReader::open(tmp.path(), read_metrics.clone(), false).unwrap();
    let got = read_all(&mut r, upto);
    assert_eq!(entries_of(&got), all);
    assert!(got.windows(2).all(|p| p[0].pos < p[1].pos));
    assert!(got.iter().all(|e| e.pos < upto));

    let mut cat = SpoolReader::open(tmp.path(), read_metrics.clone(), false).unwrap();
    assert_eq!(entries_of(&read_all(&mut cat, Position::END)), all);
    assert_eq!(read_metrics.corrupt_skipped.get(), 0);
    // A read-only reader deletes nothing.
    assert_gauges_match_disk(&metrics, tmp.path());
}

#[test]
fn reader_tails_writer_thread_without_duplicates_or_gaps() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = SpoolMetrics::default();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 30, 2000);
    let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    let n = 3000;
    let writer = std::thread::spawn(move || {
        let mut rng = Rng::new(7);
        let mut i = 0;
        while i < n {
            let k = 1 + rng.below(20);
            let batch: Vec<_> = (i..(i + k).min(n)).map(entry).collect();
            assert_eq!(w.append_batch(&batch).unwrap(), batch.len());
            w.maybe_fsync().unwrap();
            i += batch.len();
            if rng.below(4) == 0 {
                std::thread::yield_now();
            }
        }
        w
    });

    let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next = 0;
    let mut last = None;
    while next < n {
        let upto = *rx.borrow();
        let batch = r.next_batch(upto, 13).unwrap();
        if batch.is_empty() {
            assert!(Instant::now() < deadline, "stuck at entry {next}");
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for e in batch {
            assert!(e.pos < upto, "{:?} not before {upto:?}", e.pos);
            assert!(Some(e.pos) > last, "positions must increase");
            last = Some(e.pos);
            assert_eq!(e.entry, entry(next));
            next += 1;
            r.ack(e.pos).unwrap();
        }
    }
    let _w = writer.join().unwrap();
    let upto = *rx.borrow();
    assert!(upto.segment > 3);
    assert!(r.next_batch(upto, 10).unwrap().is_empty());
    // Every sealed segment was fully acked: only the writer's active one is left.
    assert_eq!(segment_numbers(tmp.path()), vec![upto.segment]);
    assert_gauges_match_disk(&metrics, tmp.path());
    assert_eq!(metrics.corrupt_skipped.get(), 0);
}

#[test]
fn acks_in_random_order_delete_exactly_the_fully_acked_sealed_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = SpoolMetrics::default();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
    let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    let all: Vec<_> = (0..80).map(entry).collect();
    write_all(&mut w, &all, 3);
    let upto = *rx.borrow();
    let before = segment_numbers(tmp.path());
    assert!(before.len() > 5);
    let bytes_before = metrics.bytes.get();

    let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
    let got = read_all(&mut r, upto);
    assert_eq!(entries_of(&got), all);
    // Reading alone deletes nothing: every segment still has unacked entries.
    assert_eq!(segment_numbers(tmp.path()), before);

    let mut unacked: BTreeMap<u64, usize> = BTreeMap::new();
    for e in &got {
        *unacked.entry(e.pos.segment).or_default() += 1;
    }
    let mut order: Vec<usize> = (0..got.len()).collect();
    let mut rng = Rng::new(0x5eed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for idx in order {
        let pos = got[idx].pos;
        r.ack(pos).unwrap();
        *unacked.get_mut(&pos.segment).unwrap() -= 1;
        let expected: Vec<u64> = before
            .iter()
            .copied()
            .filter(|n| *n >= upto.segment || unacked.get(n).copied().unwrap_or(0) > 0)
            .collect();
        assert_eq!(segment_numbers(tmp.path()), expected);
        assert_gauges_match_disk(&metrics, tmp.path());
    }
    // Repeated and unknown acks are harmless.
    r.ack(got[0].pos).unwrap();
    r.ack(Position {
        segment: 999,
        offset: 3,
    })
    .unwrap();
    // The active segment stays even though all its entries are acked.
    assert_eq!(segment_numbers(tmp.path()), vec![upto.segment]);
    assert!(metrics.bytes.get() < bytes_before);
    assert_gauges_match_disk(&metrics, tmp.path());
}

#[test]
fn rotate_mode_drops_oldest_segments_and_keeps_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = SpoolMetrics::default();
    let cfg = config(tmp.path(), SpoolMode::Rotate, 3000, 700);
    let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    let all: Vec<_> = (0..400).map(entry).collect();
    write_all(&mut w, &all, 5);
    let upto = *rx.borrow();
    assert!(disk_bytes(tmp.path()) <= 3000);
    assert_gauges_match_disk(&metrics, tmp.path());
    let created = upto.segment - w.first_segment() + 1;
    let remaining = segment_numbers(tmp.path()).len() as u64;
    assert!(metrics.segments_rotated.get() > 0);
    assert_eq!(metrics.segments_rotated.get(), created - remaining);
    assert_eq!(metrics.dropped_full.get(), 0);
    assert_eq!(metrics.spooled.get(), 400);

    let mut cat = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
    let got = entries_of(&read_all(&mut cat, Position::END));
    assert!(!got.is_empty() && got.len() < all.len());
    assert_eq!(got[..], all[all.len() - got.len()..]);
}

#[test]
fn reader_survives_segment_rotated_away_under_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Rotate, 2000, 500);
    let (mut w, _rx) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
    let all: Vec<_> = (0..200).map(entry).collect();
    write_all(&mut w, &all[..20], 4);
    let mut cat = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
    let mut got = entries_of(&cat.next_batch(Position::END, 2).unwrap());
    assert_eq!(got, all[..2]);
    write_all(&mut w, &all[20..], 4);
    assert!(
        !segment_numbers(tmp.path()).contains(&1),
        "segment 1 rotated"
    );
    got.extend(entries_of(&read_all(&mut cat, Position::END)));
    assert!(got.windows(2).all(|p| p[0].key < p[1].key), "no duplicates");
    assert_eq!(got.last(), all.last());
}

#[test]
fn hold_mode_refuses_when_full_and_accepts_after_acked_segments_go() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = SpoolMetrics::default();
    let cfg = config(tmp.path(), SpoolMode::Hold, 3000, 700);
    let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    let mut written = 0;
    for i in 0..200 {
        if w.append_batch(&[entry(i)]).unwrap() == 0 {
            break;
        }
        written += 1;
    }
    assert!(written > 10 && written < 200);
    assert_eq!(metrics.dropped_full.get(), 1);
    assert!(disk_bytes(tmp.path()) <= 3000);
    assert_gauges_match_disk(&metrics, tmp.path());
    let batch: Vec<_> = (500..505).map(entry).collect();
    assert_eq!(w.append_batch(&batch).unwrap(), 0);
    assert_eq!(metrics.dropped_full.get(), 6);

    let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
    let got = read_all(&mut r, *rx.borrow());
    assert_eq!(
        entries_of(&got),
        (0..written).map(entry).collect::<Vec<_>>()
    );
    for e in &got {
        r.ack(e.pos).unwrap();
    }
    assert_eq!(segment_numbers(tmp.path()), vec![rx.borrow().segment]);
    assert!(metrics.bytes.get() <= 700);
    assert_gauges_match_disk(&metrics, tmp.path());
    assert_eq!(w.append_batch(&batch).unwrap(), 5);
    assert_eq!(metrics.dropped_full.get(), 6);
    let got = read_all(&mut r, *rx.borrow());
    assert_eq!(entries_of(&got), batch);
}

/// Frame length of a read entry, to find its bytes in the file.
fn len_of(e: &SpooledEntry) -> u64 {
    frame_len(&e.entry).unwrap() as u64
}

fn patch(path: &Path, at: u64, f: impl FnOnce(&mut u8)) {
    let mut bytes = fs::read(path).unwrap();
    f(&mut bytes[at as usize]);
    fs::write(path, bytes).unwrap();
}

#[test]
fn torn_tail_and_corrupt_frames_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 800);
    let (mut w, rx) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
    let all: Vec<_> = (0..80).map(entry).collect();
    write_all(&mut w, &all, 4);
    let upto = *rx.borrow();
    let mut cat = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
    let got = read_all(&mut cat, upto);
    assert_eq!(entries_of(&got), all);
    let in_segment =
        |n: u64| -> Vec<&SpooledEntry> { got.iter().filter(|e| e.pos.segment == n).collect() };
    let segs = segment_numbers(tmp.path());
    assert!(segs.len() >= 5);
    let mut lost = Vec::new();

    // Torn tail: the last frame of a sealed segment cut in half.
    let s = in_segment(segs[0]);
    let last = *s.last().unwrap();
    let file = OpenOptions::new()
        .write(true)
        .open(segment_path(tmp.path(), segs[0]))
        .unwrap();
    file.set_len(last.pos.offset + len_of(last) / 2).unwrap();
    lost.push(last.entry.clone());

    // One payload byte flipped in the middle of a segment (CRC mismatch).
    let s = in_segment(segs[1]);
    let mid = s[s.len() / 2];
    patch(
        &segment_path(tmp.path(), segs[1]),
        mid.pos.offset + len_of(mid) - 2,
        |b| *b ^= 0xff,
    );
    lost.push(mid.entry.clone());

    // A length field pointing past the end of the segment.
    let s = in_segment(segs[2]);
    let mid = s[s.len() / 2];
    patch(
        &segment_path(tmp.path(), segs[2]),
        mid.pos.offset + 7,
        |b| *b = 0x7f,
    );
    lost.push(mid.entry.clone());

    // Bad magic.
    let s = in_segment(segs[3]);
    let mid = s[1];
    patch(&segment_path(tmp.path(), segs[3]), mid.pos.offset, |b| {
        *b ^= 1
    });
    lost.push(mid.entry.clone());

    let expected: Vec<_> = all.iter().filter(|e| !lost.contains(e)).cloned().collect();
    for upto in [upto, Position::END] {
        let m = SpoolMetrics::default();
        let mut r = SpoolReader::open(tmp.path(), m.clone(), false).unwrap();
        assert_eq!(entries_of(&read_all(&mut r, upto)), expected);
        assert_eq!(m.corrupt_skipped.get(), 4);
    }
}

#[test]
fn garbage_never_panics_and_valid_frames_behind_it_are_found() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
    let (mut w, rx) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
    let all: Vec<_> = (0..10).map(entry).collect();
    write_all(&mut w, &all, 10);
    w.sync().unwrap();
    let last = rx.borrow().segment;
    drop(w);

    let mut rng = Rng::new(0xdead_beef);
    let mut junk = rng.bytes(5000);
    for _ in 0..20 {
        // Magic followed by random length and CRC: must not be trusted.
        junk.extend_from_slice(&MAGIC);
        let n = 8 + rng.below(64);
        junk.extend(rng.bytes(n));
    }
    junk.extend_from_slice(&MAGIC);
    junk.extend_from_slice(&5u32.to_le_bytes()); // body shorter than the minimum
    junk.extend_from_slice(&[0; 9]);
    let mut bad_crc = Vec::new();
    encode_frame(&entry(98), &mut bad_crc);
    bad_crc[8] ^= 0x55;
    junk.extend(bad_crc);
    encode_frame(&entry(99), &mut junk);
    junk.extend(rng.bytes(100));
    junk.extend_from_slice(&MAGIC[..2]);
    let mut file = OpenOptions::new()
        .append(true)
        .open(segment_path(tmp.path(), last))
        .unwrap();
    file.write_all(&junk).unwrap();
    fs::write(segment_path(tmp.path(), last + 1), rng.bytes(10_000)).unwrap();
    fs::write(segment_path(tmp.path(), last + 2), b"").unwrap();
    fs::write(segment_path(tmp.path(), last + 3), MAGIC).unwrap();
    // Not segments: must be ignored.
    fs::write(tmp.path().join("notes.txt"), b"hello").unwrap();
    fs::write(tmp.path().join("123.seg"), rng.bytes(50)).unwrap();
    fs::create_dir(segment_path(tmp.path(), last + 4)).unwrap();

    let mut expected = all.clone();
    expected.push(entry(99));
    let m = SpoolMetrics::default();
    let mut cat = SpoolReader::open(tmp.path(), m.clone(), false).unwrap();
    assert_eq!(entries_of(&read_all(&mut cat, Position::END)), expected);
    assert!(m.corrupt_skipped.get() >= 3);

    // A producer passes (and deletes) garbage-only and empty segments too.
    let m = SpoolMetrics::default();
    let mut r = SpoolReader::open(tmp.path(), m.clone(), true).unwrap();
    let upto = Position {
        segment: last + 10,
        offset: 0,
    };
    let got = read_all(&mut r, upto);
    assert_eq!(entries_of(&got), expected);
    for e in &got {
        r.ack(e.pos).unwrap();
    }
    assert!(segment_numbers(tmp.path()).is_empty());
}

#[test]
fn mutated_segments_never_panic_or_invent_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let originals: Vec<_> = (0..6).map(entry).collect();
    let mut headerless = Vec::new();
    for e in &originals {
        encode_frame(e, &mut headerless);
    }
    let mut versioned = segment_header(SPOOL_FORMAT_VERSION).to_vec();
    versioned.extend_from_slice(&headerless);
    let path = segment_path(tmp.path(), 1);
    let mut rng = Rng::new(42);
    for i in 0..300 {
        let base = if i % 2 == 0 { &headerless } else { &versioned };
        let mut bytes = base.clone();
        for _ in 0..1 + rng.below(3) {
            match rng.below(5) {
                0 => {
                    let i = rng.below(bytes.len().max(1));
                    if let Some(b) = bytes.get_mut(i) {
                        *b ^= 1 << rng.below(8);
                    }
                }
                1 => bytes.truncate(rng.below(bytes.len() + 1)),
                2 => {
                    let at = rng.below(bytes.len() + 1);
                    let n = rng.below(40);
                    let junk = rng.bytes(n);
                    bytes.splice(at..at, junk);
                }
                3 => {
                    let at = rng.below(bytes.len() + 1);
                    let end = (at + rng.below(30)).min(bytes.len());
                    let junk = rng.bytes(end - at);
                    bytes.splice(at..end, junk);
                }
                _ => {
                    let at = rng.below(bytes.len() + 1);
                    let end = (at + rng.below(60)).min(bytes.len());
                    let copy = bytes[at..end].to_vec();
                    bytes.splice(at..at, copy);
                }
            }
        }
        fs::write(&path, &bytes).unwrap();
        let mut cat = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
        for e in read_all(&mut cat, Position::END) {
            assert!(originals.contains(&e.entry), "invented {e:?}");
        }
    }
}

#[test]
fn reopened_writer_starts_new_segment_and_old_entries_are_read_first() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 500);
    let all: Vec<_> = (0..30).map(entry).collect();
    let (mut w1, rx1) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
    assert_eq!(w1.first_segment(), 1);
    write_all(&mut w1, &all[..20], 4);
    w1.sync().unwrap();
    let last1 = rx1.borrow().segment;
    drop(w1);
    let last1_len = fs::metadata(segment_path(tmp.path(), last1)).unwrap().len();

    let metrics = SpoolMetrics::default();
    let (mut w2, rx2) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    assert_eq!(w2.first_segment(), last1 + 1);
    assert_eq!(
        *rx2.borrow(),
        Position {
            segment: last1 + 1,
            offset: 0
        }
    );
    assert_gauges_match_disk(&metrics, tmp.path());
    write_all(&mut w2, &all[20..], 4);
    assert_eq!(
        fs::metadata(segment_path(tmp.path(), last1)).unwrap().len(),
        last1_len,
        "an old segment is never appended to"
    );

    let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
    let got = read_all(&mut r, *rx2.borrow());
    assert_eq!(entries_of(&got), all);
    let replayed = got
        .iter()
        .filter(|e| e.pos.segment < w2.first_segment())
        .count();
    assert_eq!(replayed, 20);
    for e in &got {
        r.ack(e.pos).unwrap();
    }
    assert_eq!(segment_numbers(tmp.path()), vec![rx2.borrow().segment]);
    assert_gauges_match_disk(&metrics, tmp.path());
}

#[test]
fn dead_letters_are_written_apart_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = SpoolMetrics::default();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
    let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    let all: Vec<_> = (0..3).map(entry).collect();
    write_all(&mut w, &all, 3);

    let mut dl = DeadLetter::open(tmp.path(), metrics.clone()).unwrap();
    dl.append(&entry(100), "larger than message.max.bytes")
        .unwrap();
    dl.append(&entry(101), "rejected").unwrap();
    assert_eq!(metrics.dead_lettered.get(), 2);
    let bad = SpoolEntry {
        key: "k".repeat(70_000),
        ..entry(102)
    };
    assert_eq!(
        dl.append(&bad, "x").unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
    drop(dl);
    let mut dl = DeadLetter::open(tmp.path(), metrics.clone()).unwrap();
    dl.append(&entry(103), "rejected").unwrap();
    assert_eq!(metrics.dead_lettered.get(), 3);

    // The spool reader ignores the dead-letter directory, and its bytes are not counted.
    let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
    assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), all);
    assert_gauges_match_disk(&metrics, tmp.path());

    let dl_dir = tmp.path().join(DEAD_LETTER_DIR);
    assert_eq!(segment_numbers(&dl_dir), vec![1, 2]);
    let mut cat = SpoolReader::open(&dl_dir, SpoolMetrics::default(), false).unwrap();
    assert_eq!(
        entries_of(&read_all(&mut cat, Position::END)),
        vec![entry(100), entry(101), entry(103)]
    );
}

#[test]
fn idle_writer_gives_back_a_burst_s_frame_buffer() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Rotate, 64 << 20, 16 << 20);
    let (mut w, rx) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
    let burst: Vec<SpoolEntry> = (0..32)
        .map(|i| SpoolEntry {
            payload: vec![b'7'; 64 * 1024],
            ..entry(i)
        })
        .collect();
    assert_eq!(w.append_batch(&burst).unwrap(), 32);
    assert!(w.buf.capacity() > 2 * 1024 * 1024);
    w.release_idle_buffers();
    assert!(w.buf.capacity() <= IDLE_BUF_CAPACITY);
    // Still writes, and what it wrote is whole.
    assert_eq!(w.append_batch(&[entry(32)]).unwrap(), 1);
    let mut r = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
    assert_eq!(read_all(&mut r, *rx.borrow()).len(), 33);
}

#[test]
fn oversized_entries_go_alone_or_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = SpoolMetrics::default();
    let cfg = config(tmp.path(), SpoolMode::Hold, 4000, 300);
    let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    let big = SpoolEntry {
        payload: vec![b'7'; 1000],
        ..entry(1)
    };
    let huge = SpoolEntry {
        payload: vec![b'7'; 5000],
        ..entry(2)
    };
    let long_key = SpoolEntry {
        key: "k".repeat(usize::from(u16::MAX) + 1),
        ..entry(3)
    };
    let long_route = SpoolEntry {
        route: "r".repeat(usize::from(u16::MAX) + 1),
        ..entry(4)
    };
    assert_eq!(frame_len(&long_key), None);
    let mut buf = Vec::new();
    encode_frame(&long_route, &mut buf);
    assert!(buf.is_empty());

    let batch = [
        entry(0),
        big.clone(),
        entry(5),
        huge,
        long_key,
        long_route,
        entry(6),
    ];
    assert_eq!(w.append_batch(&batch).unwrap(), 4);
    assert_eq!(metrics.dropped_full.get(), 3);
    assert_eq!(metrics.spooled.get(), 4);
    let mut r = SpoolReader::open(tmp.path(), metrics.clone(), false).unwrap();
    let got = read_all(&mut r, *rx.borrow());
    assert_eq!(
        entries_of(&got),
        vec![entry(0), big.clone(), entry(5), entry(6)]
    );
    let big_seg = got[1].pos.segment;
    assert!(got[0].pos.segment < big_seg && big_seg < got[2].pos.segment);
    assert_eq!(
        got[1].pos.offset, SEGMENT_HEADER_LEN as u64,
        "first behind the header"
    );
}

/// A producer's restart: the writer reopened on the same directory, a fresh reader.
fn restart(
    cfg: &SpoolConfig,
) -> (
    SpoolWriter,
    watch::Receiver<Position>,
    SpoolReader,
    SpoolMetrics,
) {
    let metrics = SpoolMetrics::default();
    let (w, rx) = SpoolWriter::open(cfg.clone(), metrics.clone()).unwrap();
    let r = SpoolReader::open(&cfg.dir, metrics.clone(), true).unwrap();
    (w, rx, r, metrics)
}

#[test]
fn a_restart_resumes_at_the_checkpoint_of_the_contiguous_acked_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
    let all: Vec<_> = (0..40).map(entry).collect();
    let (mut w, rx) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
    write_all(&mut w, &all, 4);
    let mut r = SpoolReader::open(tmp.path(), SpoolMetrics::default(), true).unwrap();
    let got = read_all(&mut r, *rx.borrow());
    assert_eq!(entries_of(&got), all);
    assert!(got[25].pos.segment > got[0].pos.segment, "spans segments");
    // Acked out of order, all but entry 25: only the prefix before it is checkpointed.
    for e in got.iter().rev().filter(|e| e.entry != all[25]) {
        r.ack(e.pos).unwrap();
    }
    r.checkpoint().unwrap();
    assert_eq!(read_checkpoint(tmp.path()).unwrap(), Some(got[25].pos));
    drop((w, r));
    // Segments acknowledged whole were deleted already, whatever their place.
    let kept = segment_numbers(tmp.path());
    let expected: Vec<_> = got[25..]
        .iter()
        .filter(|e| kept.contains(&e.pos.segment))
        .map(|e| e.entry.clone())
        .collect();
    assert!(expected.len() < 15 && expected[0] == all[25]);

    let (mut w, rx, mut r, metrics) = restart(&cfg);
    assert!(w.first_segment() > got[39].pos.segment);
    let again = read_all(&mut r, *rx.borrow());
    assert_eq!(
        entries_of(&again),
        expected,
        "resent from the first unacked on"
    );
    assert_gauges_match_disk(&metrics, tmp.path());
    assert!(segment_numbers(tmp.path())[0] == got[25].pos.segment);
    for e in &again {
        r.ack(e.pos).unwrap();
    }
    write_all(&mut w, &[entry(40)], 1);
    let got = read_all(&mut r, *rx.borrow());
    assert_eq!(entries_of(&got), vec![entry(40)]);
    r.ack(got[0].pos).unwrap();
    r.checkpoint().unwrap();
    drop((w, r));

    // Everything acked: a graceful restart sends nothing and clears the old segments.
    let (w, rx, mut r, metrics) = restart(&cfg);
    assert!(read_all(&mut r, *rx.borrow()).is_empty());
    assert_eq!(segment_numbers(tmp.path()), vec![w.first_segment()]);
    assert_gauges_match_disk(&metrics, tmp.path());
}

#[test]
fn a_torn_or_corrupt_checkpoint_replays_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
    let all: Vec<_> = (0..20).map(entry).collect();
    let (mut w, rx) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
    write_all(&mut w, &all, 5);
    let mut r = SpoolReader::open(tmp.path(), SpoolMetrics::default(), true).unwrap();
    for e in read_all(&mut r, *rx.borrow()) {
        r.ack(e.pos).unwrap();
    }
    r.checkpoint().unwrap();
    drop((w, r));
    let path = tmp.path().join(CHECKPOINT_FILE);
    let good = fs::read(&path).unwrap();
    assert_eq!(good.len(), CHECKPOINT_LEN);

    let mut flipped = good.clone();
    flipped[13] ^= 0x01;
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut longer = good.clone();
    longer.push(0);
    let mut past_the_end = Vec::new();
    past_the_end.extend_from_slice(&CHECKPOINT_MAGIC);
    past_the_end.push(CHECKPOINT_VERSION_BYTE);
    past_the_end.extend_from_slice(&1u64.to_le_bytes());
    past_the_end.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let crc = crc32fast::hash(&past_the_end);
    past_the_end.extend_from_slice(&crc.to_le_bytes());
    for (what, bytes) in [
        ("empty", Vec::new()),
        ("torn", good[..CHECKPOINT_LEN / 2].to_vec()),
        ("bit flipped", flipped),
        ("bad magic", bad_magic),
        ("trailing byte", longer),
        ("offset past the segment's end", past_the_end),
    ] {
        fs::write(&path, &bytes).unwrap();
        let (_w, rx, mut r, _) = restart(&cfg);
        assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), all, "{what}");
    }
    fs::write(&path, &good).unwrap();
    let (_w, rx, mut r, _) = restart(&cfg);
    assert!(read_all(&mut r, *rx.borrow()).is_empty());
}

#[test]
fn a_stale_checkpoint_never_covers_entries_written_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
    write_checkpoint(
        tmp.path(),
        Position {
            segment: 7,
            offset: 1 << 20,
        },
    )
    .unwrap();
    // No segment left (removed by hand): the writer still numbers above the checkpoint.
    let all: Vec<_> = (0..5).map(entry).collect();
    let (mut w, _, _, _) = restart(&cfg);
    assert_eq!(w.first_segment(), 8);
    write_all(&mut w, &all, 5);
    drop(w);
    let (_w, rx, mut r, _) = restart(&cfg);
    assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), all);
}

/// A disk with `free` bytes left (`None`: no limit) that can also fail every call with EIO.
#[derive(Debug, Default)]
struct Disk {
    free: Option<u64>,
    eio: bool,
    writes: u64,
}

#[derive(Clone, Debug)]
struct FaultyIo(std::sync::Arc<std::sync::Mutex<Disk>>);

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

impl SegmentIo for FaultyIo {
    fn write_all(&mut self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        let mut disk = self.0.lock().unwrap();
        disk.writes += 1;
        if disk.eio {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        match disk.free {
            // As a real full disk does: part of the write lands, then ENOSPC.
            Some(free) if free < buf.len() as u64 => {
                file.write_all(&buf[..free as usize])?;
                disk.free = Some(0);
                Err(io::Error::from_raw_os_error(ENOSPC))
            }
            Some(free) => {
                disk.free = Some(free - buf.len() as u64);
                file.write_all(buf)
            }
            None => file.write_all(buf),
        }
    }

    fn sync_data(&mut self, file: &File) -> io::Result<()> {
        if self.0.lock().unwrap().eio {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        file.sync_data()
    }
}

#[test]
fn a_full_or_failing_disk_is_backed_off_from_on_the_same_segment_then_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = SpoolMetrics::default();
    let disk = std::sync::Arc::new(std::sync::Mutex::new(Disk {
        free: Some(3000),
        ..Disk::default()
    }));
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1000);
    let (mut w, rx) =
        SpoolWriter::open_with(cfg, metrics.clone(), Box::new(FaultyIo(disk.clone()))).unwrap();

    // A batch every 2 ms for a second, on a disk that is full after 3000 bytes.
    let mut next = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        let batch: Vec<_> = (next..next + 4).map(entry).collect();
        next += 4;
        let _ = w.append_batch(&batch);
        let _ = w.maybe_fsync();
        std::thread::sleep(Duration::from_millis(2));
    }
    let batches = next / 4;
    let files = segment_numbers(tmp.path()).len();
    let full_at = *rx.borrow();
    let writes = disk.lock().unwrap().writes;
    let errors = metrics.write_errors.get();
    eprintln!(
        "disk full for 1 s, {batches} batches: {errors} failed writes, {writes} writes in all, \
         {files} segment files, {} of {next} entries dropped and counted",
        metrics.dropped_error.get()
    );
    assert!(
        (2..=6).contains(&errors),
        "{errors} failed writes: backed off"
    );
    assert!(files <= 4, "{files} segment files: the open one is reused");
    let spooled = metrics.spooled.get();
    assert!(spooled > 0 && spooled < next as u64 / 10);
    assert_eq!(
        metrics.dropped_error.get() + spooled,
        next as u64,
        "all counted"
    );
    assert_eq!(metrics.dropped_full.get(), 0);
    assert_eq!(metrics.disk_error.get(), 1);
    assert_gauges_match_disk(&metrics, tmp.path());
    let mut r = SpoolReader::open(tmp.path(), metrics.clone(), false).unwrap();
    let got = read_all(&mut r, full_at);
    assert_eq!(got.len() as u64, spooled);
    assert!(got.windows(2).all(|p| p[0].entry.key < p[1].entry.key));
    assert_eq!(got[0].entry, entry(0));
    assert_eq!(metrics.corrupt_skipped.get(), 0, "torn tails were cut off");

    // Space returns: writes resume on the same segment within the longest back-off.
    disk.lock().unwrap().free = None;
    let returned = Instant::now();
    let resume = |w: &mut SpoolWriter, next: &mut usize| loop {
        let batch: Vec<_> = (*next..*next + 4).map(entry).collect();
        *next += 4;
        if w.append_batch(&batch).is_ok() {
            return batch;
        }
        assert!(returned.elapsed() < 2 * DISK_RETRY_MAX);
        std::thread::sleep(Duration::from_millis(10));
    };
    let resumed = resume(&mut w, &mut next);
    eprintln!(
        "writes resumed {:?} after space returned",
        returned.elapsed()
    );
    assert_eq!(metrics.disk_error.get(), 0);
    assert_eq!(rx.borrow().segment, full_at.segment);
    let got = read_all(&mut r, *rx.borrow());
    assert_eq!(entries_of(&got), resumed);

    // EIO: one failed write, then batches dropped without touching the disk.
    disk.lock().unwrap().eio = true;
    assert!(w.append_batch(&[entry(next)]).is_err());
    let writes = disk.lock().unwrap().writes;
    assert!(w.append_batch(&[entry(next + 1)]).is_err());
    assert_eq!(disk.lock().unwrap().writes, writes, "paused");
    assert_eq!(metrics.disk_error.get(), 1);
    next += 2;
    disk.lock().unwrap().eio = false;
    let resumed = resume(&mut w, &mut next);
    assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), resumed);
    assert_gauges_match_disk(&metrics, tmp.path());
}

#[test]
fn deleted_and_rotated_segments_are_closed_at_once() {
    let open_deleted = |dir: &Path| {
        // Descriptors of this process on deleted files in `dir`.
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|d| fs::read_link(d.ok()?.path()).ok())
            .filter(|p| p.to_string_lossy().ends_with(" (deleted)") && p.starts_with(dir))
            .count()
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), SpoolMode::Rotate, 3000, 1000);
    cfg.fsync_interval = Duration::from_secs(3600);
    let (mut w, _) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
    write_all(&mut w, &(0..100).map(entry).collect::<Vec<_>>(), 2);
    assert!(segment_numbers(tmp.path()).len() <= 4);
    assert_eq!(open_deleted(tmp.path()), 0, "rotated segments closed");

    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1000);
    cfg.fsync_interval = Duration::from_secs(3600);
    let metrics = SpoolMetrics::default();
    let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
    write_all(&mut w, &(0..100).map(entry).collect::<Vec<_>>(), 2);
    let mut r = SpoolReader::open(tmp.path(), metrics, true).unwrap();
    for e in read_all(&mut r, *rx.borrow()) {
        r.ack(e.pos).unwrap();
    }
    assert_eq!(segment_numbers(tmp.path()).len(), 1);
    assert!(open_deleted(tmp.path()) > 0);
    w.maybe_fsync().unwrap();
    assert_eq!(open_deleted(tmp.path()), 0, "acked segments closed");
}

/// Writes `entries` as the build before versions did: frames only, no segment header.
fn write_legacy_segment(dir: &Path, number: u64, entries: &[SpoolEntry]) {
    let mut bytes = Vec::new();
    for e in entries {
        encode_frame(e, &mut bytes);
    }
    fs::write(segment_path(dir, number), bytes).unwrap();
}

/// Rewrites the header of the segment at `path` to say `version`.
fn set_version(path: &Path, version: u32) {
    let mut bytes = fs::read(path).unwrap();
    bytes[..SEGMENT_HEADER_LEN].copy_from_slice(&segment_header(version));
    fs::write(path, bytes).unwrap();
}

fn listing(dir: &Path) -> Vec<(u64, u64)> {
    list_segments_with_sizes(dir).unwrap()
}

#[test]
fn the_current_version_round_trips_behind_a_header() {
    let header = segment_header(SPOOL_FORMAT_VERSION);
    assert_eq!(&header[..4], b"SGSV");
    assert_eq!(header[4..8], SPOOL_FORMAT_VERSION.to_le_bytes());
    for version in 1..=SPOOL_FORMAT_VERSION {
        assert_eq!(
            segment_start(&segment_header(version), true),
            SegmentStart::Frames {
                version: Some(version),
                data: SEGMENT_HEADER_LEN as u64
            }
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
    let metrics = SpoolMetrics::default();
    let (mut w, rx) = SpoolWriter::open(cfg.clone(), metrics.clone()).unwrap();
    let all: Vec<_> = (0..40).map(entry).collect();
    write_all(&mut w, &all, 3);
    assert_gauges_match_disk(&metrics, tmp.path());
    let segs = segment_numbers(tmp.path());
    assert!(segs.len() > 3);
    for &n in &segs {
        let bytes = fs::read(segment_path(tmp.path(), n)).unwrap();
        assert_eq!(bytes[..SEGMENT_HEADER_LEN], header, "segment {n}");
    }
    let mut dl = DeadLetter::open(tmp.path(), metrics.clone()).unwrap();
    dl.append(&entry(100), "rejected").unwrap();
    dl.append(&entry(101), "rejected").unwrap();
    let dl_dir = tmp.path().join(DEAD_LETTER_DIR);
    let dl_bytes = fs::read(segment_path(&dl_dir, 1)).unwrap();
    assert_eq!(dl_bytes[..SEGMENT_HEADER_LEN], header, "dead letters too");
    let mut cat = SpoolReader::open(&dl_dir, SpoolMetrics::default(), false).unwrap();
    assert_eq!(
        entries_of(&read_all(&mut cat, Position::END)),
        vec![entry(100), entry(101)]
    );

    let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
    let got = read_all(&mut r, *rx.borrow());
    assert_eq!(entries_of(&got), all);
    let mut first_offsets = BTreeMap::new();
    for e in &got {
        first_offsets.entry(e.pos.segment).or_insert(e.pos.offset);
    }
    assert!(first_offsets
        .values()
        .all(|&o| o == SEGMENT_HEADER_LEN as u64));
    for e in &got[..30] {
        r.ack(e.pos).unwrap();
    }
    r.checkpoint().unwrap();
    let ckpt = fs::read(tmp.path().join(CHECKPOINT_FILE)).unwrap();
    assert_eq!(
        &ckpt[..4],
        b"SGA1",
        "the checkpoint's bytes are as before versions"
    );
    assert_eq!(metrics.corrupt_skipped.get(), 0);
    drop((w, r));
    let (_w, rx, mut r, _) = restart(&cfg);
    assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), all[30..]);

    // An entry fits alone if it does with its segment's header.
    let tmp = tempfile::tempdir().unwrap();
    let e = entry(7);
    let max = (SEGMENT_HEADER_LEN + frame_len(&e).unwrap()) as u64;
    let metrics = SpoolMetrics::default();
    let (mut w, _) = SpoolWriter::open(
        config(tmp.path(), SpoolMode::Rotate, max - 1, 1 << 20),
        metrics.clone(),
    )
    .unwrap();
    assert_eq!(w.append_batch(std::slice::from_ref(&e)).unwrap(), 0);
    let (mut w, _) = SpoolWriter::open(
        config(tmp.path(), SpoolMode::Hold, max, 1 << 20),
        metrics.clone(),
    )
    .unwrap();
    assert_eq!(w.append_batch(std::slice::from_ref(&e)).unwrap(), 1);
    assert_eq!(disk_bytes(tmp.path()), max);
    assert_eq!(w.append_batch(&[entry(8)]).unwrap(), 0, "full");
}

#[test]
fn a_legacy_headerless_spool_is_replayed_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
    let old: Vec<_> = (0..30).map(entry).collect();
    write_legacy_segment(tmp.path(), 1, &old[..10]);
    write_legacy_segment(tmp.path(), 2, &old[10..]);
    let m = SpoolMetrics::default();
    let mut cat = SpoolReader::open(tmp.path(), m.clone(), false).unwrap();
    let got = read_all(&mut cat, Position::END);
    assert_eq!(entries_of(&got), old);
    assert_eq!(
        got[10].pos,
        Position {
            segment: 2,
            offset: 0
        },
        "frames from the first byte"
    );
    assert_eq!(m.corrupt_skipped.get(), 0);

    // The older build's checkpoint, byte for byte: acknowledged up to entry 15.
    let mut ckpt = b"SGA1".to_vec();
    ckpt.extend_from_slice(&got[15].pos.segment.to_le_bytes());
    ckpt.extend_from_slice(&got[15].pos.offset.to_le_bytes());
    let crc = crc32fast::hash(&ckpt);
    ckpt.extend_from_slice(&crc.to_le_bytes());
    fs::write(tmp.path().join(CHECKPOINT_FILE), ckpt).unwrap();

    // This build writes versioned segments after them and replays the old ones first, from
    // the old checkpoint on.
    let (mut w, rx, mut r, metrics) = restart(&cfg);
    assert_eq!(w.first_segment(), 3);
    let new: Vec<_> = (30..40).map(entry).collect();
    write_all(&mut w, &new, 5);
    let again = read_all(&mut r, *rx.borrow());
    assert_eq!(entries_of(&again), [&old[15..], &new[..]].concat());
    assert_eq!(metrics.corrupt_skipped.get(), 0);
    for e in &again {
        r.ack(e.pos).unwrap();
    }
    assert_eq!(segment_numbers(tmp.path()), vec![rx.borrow().segment]);
    assert_gauges_match_disk(&metrics, tmp.path());

    // Dead letters of the older build, too.
    let dl_dir = tmp.path().join(DEAD_LETTER_DIR);
    fs::create_dir_all(&dl_dir).unwrap();
    write_legacy_segment(&dl_dir, 1, &old[..2]);
    let mut dl = DeadLetter::open(tmp.path(), SpoolMetrics::default()).unwrap();
    dl.append(&entry(100), "rejected").unwrap();
    let mut cat = SpoolReader::open(&dl_dir, SpoolMetrics::default(), false).unwrap();
    assert_eq!(
        entries_of(&read_all(&mut cat, Position::END)),
        vec![entry(0), entry(1), entry(100)]
    );
}

#[test]
fn a_newer_version_is_refused_never_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
    let all: Vec<_> = (0..40).map(entry).collect();
    let (mut w, rx) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
    write_all(&mut w, &all, 4);
    let upto = *rx.borrow();
    drop(w);
    let segs = segment_numbers(tmp.path());
    assert!(segs.len() > 3);
    let path = segment_path(tmp.path(), segs[2]);
    let newer = SPOOL_FORMAT_VERSION + 1;
    let expected = NewerFormat {
        path: path.clone(),
        version: newer,
    };
    let refused = |e: io::Error| {
        assert_eq!(NewerFormat::of(&e), Some(&expected), "{e}");
        e.to_string()
    };
    set_version(&path, newer);

    // Every way in refuses, before touching anything.
    let before = listing(tmp.path());
    let message = refused(SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap_err());
    eprintln!("{message}");
    for part in [
        path.display().to_string(),
        format!("version {newer}"),
        format!("versions up to {SPOOL_FORMAT_VERSION}"),
        "move the spool directory aside".into(),
    ] {
        assert!(message.contains(&part), "{part:?} not in {message:?}");
    }
    for delete_acked in [true, false] {
        refused(SpoolReader::open(tmp.path(), SpoolMetrics::default(), delete_acked).unwrap_err());
    }
    assert_eq!(listing(tmp.path()), before, "nothing created or deleted");

    // A reader that meets it after opening (someone else writing the spool): the entries
    // before it, then the error on every call, never a skip.
    set_version(&path, SPOOL_FORMAT_VERSION);
    let m = SpoolMetrics::default();
    let mut r = SpoolReader::open(tmp.path(), m.clone(), true).unwrap();
    set_version(&path, newer);
    let mut got = Vec::new();
    let err = loop {
        match r.next_batch(upto, 7) {
            Ok(batch) => {
                assert!(!batch.is_empty(), "stopped without the error");
                got.extend(batch);
            }
            Err(e) => break e,
        }
    };
    refused(err);
    assert!(!got.is_empty() && got.iter().all(|e| e.pos.segment < segs[2]));
    assert_eq!(got.last().unwrap().pos.segment, segs[1]);
    for _ in 0..3 {
        refused(r.next_batch(upto, 7).unwrap_err());
    }
    assert_eq!(m.corrupt_skipped.get(), 0);
    // Once the file is one it reads, the same reader goes on where it stopped.
    set_version(&path, SPOOL_FORMAT_VERSION);
    got.extend(read_all(&mut r, upto));
    assert_eq!(entries_of(&got), all);

    // A newer checkpoint stops the writer and the producer (not `spool cat`, which does not
    // read it); a damaged one is ignored as before.
    let mut ckpt = b"SGA".to_vec();
    ckpt.push(b'0' + newer as u8);
    ckpt.extend_from_slice(&[0; 16]);
    let crc = crc32fast::hash(&ckpt);
    ckpt.extend_from_slice(&crc.to_le_bytes());
    let ckpt_path = tmp.path().join(CHECKPOINT_FILE);
    fs::write(&ckpt_path, &ckpt).unwrap();
    let expected = NewerFormat {
        path: ckpt_path.clone(),
        version: newer,
    };
    let refused = |e: io::Error| assert_eq!(NewerFormat::of(&e), Some(&expected), "{e}");
    refused(SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap_err());
    refused(SpoolReader::open(tmp.path(), SpoolMetrics::default(), true).unwrap_err());
    SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
    ckpt[10] ^= 1;
    fs::write(&ckpt_path, &ckpt).unwrap();
    assert_eq!(read_checkpoint(tmp.path()).unwrap(), None);

    // A newer dead-letter file stops `spool cat --dead-letter`; `serve` only adds its own.
    let dl_dir = tmp.path().join(DEAD_LETTER_DIR);
    let mut dl = DeadLetter::open(tmp.path(), SpoolMetrics::default()).unwrap();
    dl.append(&entry(100), "rejected").unwrap();
    drop(dl);
    set_version(&segment_path(&dl_dir, 1), newer);
    let mut dl = DeadLetter::open(tmp.path(), SpoolMetrics::default()).unwrap();
    dl.append(&entry(101), "rejected").unwrap();
    let e = SpoolReader::open(&dl_dir, SpoolMetrics::default(), false).unwrap_err();
    assert_eq!(NewerFormat::of(&e).unwrap().path, segment_path(&dl_dir, 1));
}

#[test]
fn a_torn_header_is_skipped_and_counted_like_a_torn_frame() {
    let header = segment_header(SPOOL_FORMAT_VERSION);
    // While the segment may still grow, a partial start is waited for, not judged.
    for partial in [&b""[..], &header[..3], &header[..7], &MAGIC[..2]] {
        assert_eq!(segment_start(partial, false), SegmentStart::Unknown);
    }
    let damaged = SegmentStart::Frames {
        version: None,
        data: 0,
    };
    assert_eq!(segment_start(&header[..7], true), damaged);
    let mut flipped = header;
    flipped[5] ^= 1;
    assert_eq!(segment_start(&flipped, true), damaged, "CRC mismatch");

    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
    let all: Vec<_> = (0..10).map(entry).collect();
    let (mut w, _) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
    write_all(&mut w, &all[..5], 5);
    drop(w);
    // Crashes right after a segment was created: the first write cut inside the header (at
    // two places), cut in the first frame behind a whole header, or not begun.
    fs::write(segment_path(tmp.path(), 2), &header[..7]).unwrap();
    fs::write(segment_path(tmp.path(), 3), &header[..3]).unwrap();
    let mut torn_frame = header.to_vec();
    encode_frame(&entry(99), &mut torn_frame);
    torn_frame.truncate(SEGMENT_HEADER_LEN + 5);
    fs::write(segment_path(tmp.path(), 4), torn_frame).unwrap();
    fs::write(segment_path(tmp.path(), 5), b"").unwrap();
    // A flipped bit in a header: the frames behind it are still found.
    let mut damaged_header = flipped.to_vec();
    encode_frame(&entry(98), &mut damaged_header);
    fs::write(segment_path(tmp.path(), 6), damaged_header).unwrap();

    let m = SpoolMetrics::default();
    let mut cat = SpoolReader::open(tmp.path(), m.clone(), false).unwrap();
    let mut expected = all[..5].to_vec();
    expected.push(entry(98));
    assert_eq!(entries_of(&read_all(&mut cat, Position::END)), expected);
    assert_eq!(
        m.corrupt_skipped.get(),
        4,
        "one per damaged segment, none for the empty one"
    );

    let (mut w, rx, mut r, metrics) = restart(&cfg);
    assert_eq!(w.first_segment(), 7);
    write_all(&mut w, &all[5..], 5);
    expected.extend_from_slice(&all[5..]);
    let got = read_all(&mut r, *rx.borrow());
    assert_eq!(entries_of(&got), expected);
    assert_eq!(metrics.corrupt_skipped.get(), 4);
    for e in &got {
        r.ack(e.pos).unwrap();
    }
    assert_eq!(
        segment_numbers(tmp.path()),
        vec![7],
        "the torn ones passed and deleted"
    );
    assert_gauges_match_disk(&metrics, tmp.path());
}

#[test]
fn metric_names_match_the_contract() {
    let metrics = SpoolMetrics::default();
    let mut registry = Registry::with_prefix("sluicegate_tee");
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for name in [
        "sluicegate_tee_spool_bytes",
        "sluicegate_tee_spool_segments",
        "sluicegate_tee_records_spooled_total",
        "sluicegate_tee_records_dropped_spool_full_total",
        "sluicegate_tee_spool_segments_rotated_total",
        "sluicegate_tee_spool_corrupt_frames_total",
        "sluicegate_tee_records_dead_lettered_total",
        "sluicegate_tee_records_dropped_spool_error_total",
        "sluicegate_tee_spool_write_errors_total",
        "sluicegate_tee_spool_disk_error",
        "sluicegate_tee_records_sent_from_memory_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} missing from:\n{text}"
        );
    }
}
