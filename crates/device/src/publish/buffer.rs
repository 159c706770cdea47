//! A bounded on-disk log of outgoing messages.
//!
//! Every message gets an index, one more than the previous one, and the random `run` of
//! the process that appended it (drawn at every open); both are stored with the message and
//! make its `Nats-Msg-Id` (`<device>-<run>-<index>`). A message sent again after a failure,
//! a restart or a power cut carries the id it had the first time, so the stream drops the
//! copy; and an index given out again after a power cut lost unsynced records comes with
//! a new run, so a new message is never taken for an old one.
//!
//! Layout: segment files `seg-<first index>.log` holding records `[len u32][crc32 u32]
//! [index u64][run u64][readings u32][subject len u16][subject][payload]` (little-endian), and a
//! cursor file `cursor` (`acked next dropped_messages dropped_readings`, written to a
//! temporary file, fsynced and renamed). The newest segment is never deleted, so the next
//! index survives even when everything was acknowledged.
//!
//! Durability (see [`Buffer::sync`], run every `sync_interval` by the spool on a blocking
//! thread through [`Buffer::sync_job`], so that a slow fsync never stalls the agent): appended
//! records reach the OS at once and the disk at the next sync (and when a segment is
//! sealed); the acknowledged cursor reaches the disk at the next sync. A power cut loses at
//! most one interval of appended readings, and replays at most one interval of
//! acknowledged ones (their ids make the stream drop them). A torn record at the end of a
//! segment is found by its length and checksum at open and cut off.
//!
//! Bound: segments hold about an eighth of `max_bytes` each; when the total passes
//! `max_bytes` the oldest segment is deleted and its unacknowledged messages and readings
//! are counted as dropped (the counts are kept in the cursor file across restarts).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Smallest `max_bytes` accepted: eight segments of 4 KiB.
pub const MIN_BUFFER_BYTES: u64 = 32 * 1024;
/// Largest record: a subject and a payload well within NATS' default 1 MiB `max_payload`.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
const HEADER: usize = 8;
const FIXED: usize = 8 + 8 + 4 + 2;

/// One buffered message.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Position in the log.
    pub index: u64,
    /// The run that appended it; with the index, the message's id.
    pub run: u64,
    /// The subject to publish on.
    pub subject: String,
    /// The payload as it will be published.
    pub payload: Bytes,
    /// Readings the message carries.
    pub readings: u32,
}

/// Messages and readings deleted unsent because the buffer was full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Messages deleted unsent.
    pub messages: u64,
    /// Readings they carried.
    pub readings: u64,
}

#[derive(Debug)]
struct Segment {
    first: u64,
    count: u64,
    bytes: u64,
    path: PathBuf,
}

impl Segment {
    fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// Sequential reading position.
struct Reader {
    next: u64,
    segment_first: u64,
    file: BufReader<File>,
}

/// The log. One task owns it.
pub struct Buffer {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    run: u64,
    /// Oldest first; the last one is the one appended to.
    segments: VecDeque<Segment>,
    active: File,
    next: u64,
    /// Every index below it is acknowledged.
    acked: u64,
    synced_cursor: (u64, u64, Dropped),
    dropped: Dropped,
    dirty: bool,
    total_bytes: u64,
    reader: Option<Reader>,
}

impl Buffer {
    /// Opens (or creates) the buffer in `dir`, limited to `max_bytes` (at least
    /// [`MIN_BUFFER_BYTES`]). Cuts off a torn record at the end of a segment.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Buffer> {
        fs::create_dir_all(dir)?;
        let max_bytes = max_bytes.max(MIN_BUFFER_BYTES);
        let segment_bytes = (max_bytes / 8).clamp(4096, 4 * 1024 * 1024);
        let (mut acked, cursor_next, dropped) = read_cursor(dir);
        let mut firsts: Vec<u64> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name
                .strip_prefix("seg-")
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut segments = VecDeque::new();
        let mut expected: Option<u64> = None;
        for first in firsts {
            let path = segment_path(dir, first);
            // A gap (a torn record cut at the end of a segment) is fine; an overlap is not.
            if expected.is_some_and(|e| first < e) {
                tracing::warn!(segment = %path.display(), "buffer segment overlaps the previous one: it and later ones ignored");
                break;
            }
            let (count, bytes) = scan_and_repair(&path, first)?;
            expected = Some(first + count);
            segments.push_back(Segment {
                first,
                count,
                bytes,
                path,
            });
        }
        let next = segments.back().map_or(0, Segment::end).max(cursor_next);
        if segments.back().is_none_or(|s| s.end() != next) {
            // No segment yet, or the cursor knows of later indices (their segment was lost):
            // start a fresh one at `next` so indices never repeat.
            let path = segment_path(dir, next);
            File::create(&path)?;
            sync_dir(dir)?;
            segments.push_back(Segment {
                first: next,
                count: 0,
                bytes: 0,
                path,
            });
        }
        let oldest = segments.front().map_or(next, |s| s.first);
        acked = acked.clamp(oldest, next);
        let active_path = segments.back().map(|s| s.path.clone()).unwrap_or_default();
        let active = OpenOptions::new().append(true).open(&active_path)?;
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let mut buffer = Buffer {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            run: rand::random(),
            segments,
            active,
            next,
            acked,
            synced_cursor: (u64::MAX, u64::MAX, Dropped::default()),
            dropped,
            dirty: false,
            total_bytes,
            reader: None,
        };
        buffer.prune_acked()?;
        buffer.enforce_limit()?;
        Ok(buffer)
    }

    /// The random id of this run: part of the id of every message appended now.
    pub fn run(&self) -> u64 {
        self.run
    }

    /// The index the next appended message gets.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// The oldest unacknowledged index (= [`Buffer::next_index`] when all are).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Messages not acknowledged yet.
    pub fn pending(&self) -> u64 {
        self.next - self.acked
    }

    /// Bytes on disk, acknowledged records of partly acknowledged segments included.
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// What the size limit has dropped so far, over the life of the directory.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    /// Appends a message and returns its index. Deletes the oldest segment when over the
    /// limit (counting what it drops).
    pub fn append(&mut self, subject: &str, payload: &[u8], readings: u32) -> io::Result<u64> {
        let body_len = FIXED + subject.len() + payload.len();
        if body_len > MAX_RECORD_BYTES || subject.len() > u16::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("message of {body_len} bytes is over the buffer's record limit"),
            ));
        }
        if self
            .segments
            .back()
            .is_some_and(|s| s.bytes >= self.segment_bytes)
        {
            self.roll()?;
        }
        let index = self.next;
        let mut rec = Vec::with_capacity(HEADER + body_len);
        rec.extend_from_slice(&(body_len as u32).to_le_bytes());
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(&index.to_le_bytes());
        rec.extend_from_slice(&self.run.to_le_bytes());
        rec.extend_from_slice(&readings.to_le_bytes());
        rec.extend_from_slice(&(subject.len() as u16).to_le_bytes());
        rec.extend_from_slice(subject.as_bytes());
        rec.extend_from_slice(payload);
        let crc = crc32(&rec[HEADER..]);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        self.active.write_all(&rec)?;
        self.dirty = true;
        self.next += 1;
        if let Some(s) = self.segments.back_mut() {
            s.count += 1;
            s.bytes += rec.len() as u64;
        }
        self.total_bytes += rec.len() as u64;
        self.enforce_limit()?;
        Ok(index)
    }

    /// Marks every index below `upto` acknowledged, deleting segments wholly acknowledged.
    pub fn ack_below(&mut self, upto: u64) -> io::Result<()> {
        let upto = upto.min(self.next);
        if upto > self.acked {
            self.acked = upto;
            self.prune_acked()?;
        }
        Ok(())
    }

    /// The record at `index` if it is still buffered, or the oldest one after it when
    /// `index` was dropped; `None` when `index` is past the newest. Reads sequentially, so
    /// reading `index + 1` next is cheap.
    pub fn read(&mut self, index: u64) -> io::Result<Option<Record>> {
        let index = index.max(self.segments.front().map_or(self.next, |s| s.first));
        if index >= self.next {
            return Ok(None);
        }
        let reuse = self.reader.as_ref().is_some_and(|r| {
            r.next == index && self.segments.iter().any(|s| s.first == r.segment_first)
        });
        if !reuse {
            self.reader = None;
            let Some(seg) = self.segments.iter().find(|s| index < s.end()) else {
                return Ok(None);
            };
            let file = BufReader::with_capacity(16 * 1024, File::open(&seg.path)?);
            self.reader = Some(Reader {
                next: seg.first,
                segment_first: seg.first,
                file,
            });
        }
        loop {
            let Some(reader) = self.reader.as_mut() else {
                return Ok(None);
            };
            let seg_end = self
                .segments
                .iter()
                .find(|s| s.first == reader.segment_first)
                .map_or(0, Segment::end);
            if reader.next >= seg_end {
                // On to the next segment.
                let Some(seg) = self.segments.iter().find(|s| s.first >= seg_end) else {
                    self.reader = None;
                    return Ok(None);
                };
                let file = BufReader::with_capacity(16 * 1024, File::open(&seg.path)?);
                self.reader = Some(Reader {
                    next: seg.first,
                    segment_first: seg.first,
                    file,
                });
                continue;
            }
            let record = match read_record(&mut reader.file)? {
                Some(r) => r,
                None => {
                    self.reader = None;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "buffer segment ended before its last record",
                    ));
                }
            };
            reader.next = record.index + 1;
            if record.index >= index {
                return Ok(Some(record));
            }
        }
    }

    /// Makes appended records and the acknowledged cursor durable: fdatasync of the active
    /// segment when written to, and the cursor file (temporary file, fsync, rename, fsync
    /// of the directory) when it changed.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(job) = self.sync_job()? {
            if let Err(e) = job.run() {
                self.sync_failed();
                return Err(e);
            }
            self.synced(&job);
        }
        Ok(())
    }

    /// What [`Buffer::sync`] would do, to run on another thread ([`SyncJob::run`], then
    /// [`Buffer::synced`]): fsyncs take seconds on slow flash, and the agent's one runtime
    /// thread must not wait for them. `None` when nothing changed since the last sync.
    /// Records appended meanwhile are made durable by the next sync.
    pub fn sync_job(&mut self) -> io::Result<Option<SyncJob>> {
        let data = if self.dirty {
            Some(self.active.try_clone()?)
        } else {
            None
        };
        let cursor = (self.acked, self.next, self.dropped);
        let cursor = (cursor != self.synced_cursor).then_some(cursor);
        if data.is_none() && cursor.is_none() {
            return Ok(None);
        }
        self.dirty = false;
        Ok(Some(SyncJob {
            dir: self.dir.clone(),
            data,
            cursor,
        }))
    }

    /// Records what `job` made durable, once [`SyncJob::run`] succeeded. After a failure,
    /// do not call it: the next sync writes the cursor again, and the records appended
    /// before it are synced with the next ones (an fsync covers all of the file).
    pub fn synced(&mut self, job: &SyncJob) {
        if let Some(cursor) = job.cursor {
            self.synced_cursor = cursor;
        }
    }

    /// Marks the active segment as written to, after a failed [`SyncJob`].
    pub fn sync_failed(&mut self) {
        self.dirty = true;
    }

    fn roll(&mut self) -> io::Result<()> {
        self.active.sync_data()?;
        self.dirty = false;
        let path = segment_path(&self.dir, self.next);
        self.active = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(&self.dir)?;
        self.segments.push_back(Segment {
            first: self.next,
            count: 0,
            bytes: 0,
            path,
        });
        Ok(())
    }

    /// Deletes the oldest segments while wholly acknowledged (never the active one).
    fn prune_acked(&mut self) -> io::Result<()> {
        while self.segments.len() > 1 && self.segments[0].end() <= self.acked {
            self.remove_oldest()?;
        }
        Ok(())
    }

    /// Deletes the oldest segments while over the limit, counting what was not acknowledged.
    fn enforce_limit(&mut self) -> io::Result<()> {
        while self.total_bytes > self.max_bytes && self.segments.len() > 1 {
            let seg = &self.segments[0];
            if seg.end() > self.acked {
                let readings = unacked_readings(&seg.path, self.acked).unwrap_or(0);
                let messages = seg.end() - self.acked.max(seg.first);
                self.dropped.messages += messages;
                self.dropped.readings += readings;
                tracing::warn!(
                    messages,
                    readings,
                    "buffer full: dropped the oldest unsent readings"
                );
                self.acked = seg.end();
            }
            self.remove_oldest()?;
        }
        Ok(())
    }

    fn remove_oldest(&mut self) -> io::Result<()> {
        if let Some(seg) = self.segments.pop_front() {
            self.total_bytes -= seg.bytes;
            if self
                .reader
                .as_ref()
                .is_some_and(|r| r.segment_first == seg.first)
            {
                self.reader = None;
            }
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.log"))
}

/// The fsyncs of one [`Buffer::sync`], taken out of the buffer (see [`Buffer::sync_job`]).
pub struct SyncJob {
    dir: PathBuf,
    /// The active segment, when appended to since the last sync.
    data: Option<File>,
    /// The cursor to write, when it changed: `(acked, next, dropped)`.
    cursor: Option<(u64, u64, Dropped)>,
}

impl SyncJob {
    /// Blocks until the data and the cursor are on disk.
    pub fn run(&self) -> io::Result<()> {
        if let Some(active) = &self.data {
            active.sync_data()?;
        }
        if let Some((acked, next, dropped)) = self.cursor {
            let tmp = self.dir.join("cursor.tmp");
            let text = format!("{acked} {next} {} {}\n", dropped.messages, dropped.readings);
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, self.dir.join("cursor"))?;
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_cursor(dir: &Path) -> (u64, u64, Dropped) {
    let text = fs::read_to_string(dir.join("cursor")).unwrap_or_default();
    let n: Vec<u64> = text
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    match n[..] {
        [acked, next, messages, readings] => (acked, next, Dropped { messages, readings }),
        _ => (0, 0, Dropped::default()),
    }
}

/// Counts the records of a segment, cutting it at the first torn or corrupt record.
fn scan_and_repair(path: &Path, first: u64) -> io::Result<(u64, u64)> {
    let mut file = BufReader::new(File::open(path)?);
    let mut count = 0u64;
    let mut good = 0u64;
    loop {
        match read_record(&mut file) {
            Ok(Some(r)) if r.index == first + count => {
                count += 1;
                good = file.stream_position()?;
            }
            Ok(None) => break,
            Ok(Some(_)) | Err(_) => {
                tracing::warn!(segment = %path.display(), offset = good, "buffer: cutting a torn or corrupt record and what follows");
                break;
            }
        }
    }
    let len = fs::metadata(path)?.len();
    if len != good {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(good)?;
        f.sync_all()?;
    }
    Ok((count, good))
}

fn unacked_readings(path: &Path, acked: u64) -> io::Result<u64> {
    let mut file = BufReader::new(File::open(path)?);
    let mut sum = 0;
    while let Some(r) = read_record(&mut file)? {
        if r.index >= acked {
            sum += u64::from(r.readings);
        }
    }
    Ok(sum)
}

/// The next record, `None` at a clean end of file; an error for a torn or corrupt one.
fn read_record(r: &mut impl Read) -> io::Result<Option<Record>> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut header[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if !(FIXED..=MAX_RECORD_BYTES).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad record length",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    if crc32(&body) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad record checksum",
        ));
    }
    let index = u64::from_le_bytes(body[0..8].try_into().unwrap_or_default());
    let run = u64::from_le_bytes(body[8..16].try_into().unwrap_or_default());
    let readings = u32::from_le_bytes(body[16..20].try_into().unwrap_or_default());
    let subject_len = u16::from_le_bytes([body[20], body[21]]) as usize;
    if FIXED + subject_len > len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad subject length",
        ));
    }
    let subject = String::from_utf8(body[FIXED..FIXED + subject_len].to_vec())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "subject is not UTF-8"))?;
    let payload = Bytes::from(body).slice(FIXED + subject_len..);
    Ok(Some(Record {
        index,
        run,
        subject,
        payload,
        readings,
    }))
}

/// CRC-32 (IEEE), bitwise with a table built at compile time.
fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(b: &mut Buffer, n: usize) {
        for i in 0..n {
            b.append("vehicle.d.x", format!("{i}").as_bytes(), 1)
                .unwrap();
        }
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn records_read_back_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(dir.path(), 1 << 20).unwrap();
        let run = b.run();
        fill(&mut b, 100);
        for i in 0..100 {
            let r = b.read(i).unwrap().unwrap();
            assert_eq!((r.index, &r.payload[..]), (i, format!("{i}").as_bytes()));
        }
        assert!(b.read(100).unwrap().is_none());
        b.ack_below(40).unwrap();
        b.sync().unwrap();
        drop(b);
        let mut b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_ne!(b.run(), run);
        assert_eq!((b.acked(), b.next_index(), b.pending()), (40, 100, 60));
        let r = b.read(40).unwrap().unwrap();
        assert_eq!((r.index, r.run), (40, run));
        // Indices never repeat, even with everything acknowledged.
        b.ack_below(100).unwrap();
        b.sync().unwrap();
        drop(b);
        let mut b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(b.append("s", b"1", 1).unwrap(), 100);
    }

    /// The sync the spool runs on a blocking thread does what `sync` does, and only what
    /// changed.
    #[test]
    fn a_sync_job_makes_the_same_state_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(dir.path(), 1 << 20).unwrap();
        fill(&mut b, 10);
        b.ack_below(4).unwrap();
        let job = b
            .sync_job()
            .unwrap()
            .expect("appends and a new cursor to sync");
        // Appended while the job runs: not covered by it, so the next sync has work.
        fill(&mut b, 1);
        std::thread::spawn(move || job.run().map(|()| job))
            .join()
            .unwrap()
            .map(|job| b.synced(&job))
            .unwrap();
        let next = b.sync_job().unwrap().expect("the later append");
        assert!(next.data.is_some());
        assert_eq!(next.cursor, Some((4, 11, Dropped::default())));
        next.run().unwrap();
        b.synced(&next);
        assert!(b.sync_job().unwrap().is_none(), "nothing changed since");
        drop(b);
        let b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((b.acked(), b.next_index()), (4, 11));
    }

    #[test]
    fn a_torn_tail_is_cut_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(dir.path(), 1 << 20).unwrap();
        fill(&mut b, 10);
        b.sync().unwrap();
        let seg = b.segments.back().unwrap().path.clone();
        drop(b);
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let mut b = Buffer::open(dir.path(), 1 << 20).unwrap();
        // Record 9 is gone, but its index is not given out again: it may have been sent.
        assert_eq!(b.next_index(), 10);
        assert_eq!(b.read(8).unwrap().unwrap().index, 8);
        assert_eq!(b.append("s", b"x", 1).unwrap(), 10);
        assert_eq!(b.read(9).unwrap().unwrap().index, 10);
        drop(b);
        let mut b = Buffer::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            (b.next_index(), b.read(9).unwrap().unwrap().index),
            (11, 10)
        );
    }

    #[test]
    fn when_full_the_oldest_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(dir.path(), MIN_BUFFER_BYTES).unwrap();
        let payload = vec![b'1'; 200];
        for _ in 0..1000 {
            b.append("vehicle.d.x", &payload, 2).unwrap();
        }
        assert!(b.bytes() <= MIN_BUFFER_BYTES, "{}", b.bytes());
        let dropped = b.dropped();
        assert!(dropped.messages > 800, "{dropped:?}");
        assert_eq!(dropped.readings, dropped.messages * 2);
        assert_eq!(b.acked(), dropped.messages);
        assert_eq!(b.pending() + dropped.messages, 1000);
        // Reading a dropped index gives the oldest one kept.
        assert_eq!(b.read(0).unwrap().unwrap().index, b.acked());
        b.sync().unwrap();
        drop(b);
        let b = Buffer::open(dir.path(), MIN_BUFFER_BYTES).unwrap();
        assert_eq!(b.dropped(), dropped);
    }
}
