//! The embedded store killed with SIGKILL in the middle of writing and sealing: whatever
//! a write reported stored is there after a restart, exactly once, and the rollups count
//! every reading once.
//!
//! The writer is this test binary run again as a child (`writer_child`, which only acts
//! when `FLEETPIPE_CRASH_DB` is set): it writes numbered batches, prints each one it got
//! `Ok` for, announces each compaction, and is killed right after such an announcement,
//! so most kills land inside a seal.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use fleetpipe_proto::{Reading, Timestamp};
use fleetpipe_store::{Range, Record};

const T0: i64 = 1_771_149_600_000_000;
/// More series than one seal transaction takes (500), so that a seal is several
/// transactions and kills land between them too.
const SERIES: u64 = 1_200;
const PER_SERIES: u64 = 5;

/// The new readings of batch `k`: `PER_SERIES` for each of `SERIES` series, in time order
/// after those of batch `k - 1`.
fn fresh(k: u64) -> Vec<Record> {
    let mut out = Vec::new();
    for s in 0..SERIES {
        for j in 0..PER_SERIES {
            let i = k * PER_SERIES + j;
            out.push(Record {
                seq: k * SERIES * PER_SERIES + s * PER_SERIES + j + 1,
                reading: Reading {
                    device: format!("c{s:04}").into(),
                    sensor: "v".into(),
                    value: (i % 97) as f64,
                    ts: Timestamp::from_micros(T0 + i as i64 * 100_000),
                    unit: None,
                    quality: None,
                    tags: Default::default(),
                },
            });
        }
    }
    out
}

/// What the writer sends as batch `k`: its new readings, and every third batch a
/// redelivery of the one before.
fn batch(k: u64) -> Vec<Record> {
    let mut out = fresh(k);
    if k % 3 == 0 && k > 0 {
        out.extend(fresh(k - 1));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the child side of sealing_survives_sigkill"]
async fn writer_child() {
    let Ok(path) = std::env::var("FLEETPIPE_CRASH_DB") else {
        return;
    };
    let start: u64 = std::env::var("FLEETPIPE_CRASH_FROM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let store = fleetpipe_store::open(&path).await.expect("open");
    for k in start.. {
        store.write_readings(&batch(k)).await.expect("write");
        println!("written {k}");
        if k % 4 == 3 {
            println!("sealing");
            store.compact().await.expect("compact");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sealing_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let path = path.to_str().unwrap().to_string();
    let exe = std::env::current_exe().unwrap();
    let mut next = 0u64;
    for round in 0..4u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "writer_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FLEETPIPE_CRASH_DB", &path)
            .env("FLEETPIPE_CRASH_FROM", next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seals = 0;
        // Kill at the (round + 2)th seal's start, a moment into it.
        while let Some(Ok(line)) = lines.next() {
            if let Some(k) = line.strip_prefix("written ") {
                next = k.parse::<u64>().unwrap() + 1;
            } else if line == "sealing" {
                seals += 1;
                if seals == round + 2 {
                    std::thread::sleep(Duration::from_millis(15 * round));
                    break;
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(next >= 4, "round {round}: the writer wrote nothing");

        let (writes, rows): (i64, i64) = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT (SELECT count(*) FROM hot_writes), (SELECT count(*) FROM hot)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        println!(
            "round {round}: killed after batch {}: {writes} writes not wholly sealed, {rows} \
             of their (write, series) rows left",
            next - 1
        );
        // Every batch reported written is stored, once; the one in flight at the kill,
        // wholly or not at all; nothing else.
        let store = fleetpipe_store::open(&path).await.unwrap();
        let stored = store.count_readings().await.unwrap();
        let reported = next * SERIES * PER_SERIES;
        assert!(
            stored == reported || stored == reported + SERIES * PER_SERIES,
            "round {round}: {stored} readings stored, {reported} reported written"
        );
        let everything = Range {
            from: Timestamp::from_micros(0),
            to: Timestamp::from_micros(i64::MAX),
        };
        store.compact().await.unwrap();
        for s in 0..SERIES {
            let device = format!("c{s:04}");
            let points = store
                .history(&device, "v", everything, 1_000_000)
                .await
                .unwrap();
            assert_eq!(
                points.len() as u64 * SERIES,
                stored,
                "round {round}: {device}"
            );
            assert!(
                points.windows(2).all(|w| w[0].ts < w[1].ts),
                "round {round}: {device} holds a reading twice or out of order"
            );
            let rolled: u64 = store
                .rollups(&device, "v", everything)
                .await
                .unwrap()
                .iter()
                .map(|r| r.count)
                .sum();
            assert_eq!(
                rolled,
                points.len() as u64,
                "round {round}: rollups of {device}"
            );
        }
        drop(store);
    }
}
