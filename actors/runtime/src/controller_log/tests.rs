use std::io::Write as _;

use botclaw_core::controller::raft_message::{Entry, HardState};
use botclaw_core::controller::{Controller, ControllerConfig, Persist};
use botclaw_core::shardmap::MapCommand;

use super::*;

fn entry(index: u64, term: u64) -> Entry {
    Entry { index, term, data: vec![index as u8; 10].into(), ..Default::default() }
}

fn batch(first: u64, n: u64, term: u64) -> Persist {
    Persist {
        snapshot: None,
        entries: (first..first + n).map(|i| entry(i, term)).collect(),
        hard_state: Some(HardState { term, commit: first, ..Default::default() }),
        compaction: None,
    }
}

fn file_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(LOG_FILE)).unwrap().len()
}

#[test]
fn batches_come_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ControllerLog::open(dir.path()).unwrap();
    log.write(batch(1, 3, 1)).unwrap();
    // A later batch replaces a conflicting suffix, as a new leader's entries do.
    log.write(batch(3, 2, 2)).unwrap();
    let held = log.state().clone();
    assert_eq!(
        held.entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
        [(1, 1), (2, 1), (3, 2), (4, 2)]
    );
    drop(log);
    let log = ControllerLog::open(dir.path()).unwrap();
    assert_eq!(log.state().entries, held.entries);
    assert_eq!(log.state().hard_state, held.hard_state);
    assert_eq!(log.records(), 2);
}

#[test]
fn a_snapshot_rewrites_the_file_as_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ControllerLog::open(dir.path()).unwrap();
    for k in 0..20 {
        log.write(batch(1 + k * 5, 5, 1)).unwrap();
    }
    let before = file_len(dir.path());
    let founding = Controller::founding_state(&[1], 16);
    let mut snap = founding.snapshot.unwrap();
    snap.mut_metadata().index = 95;
    log.write(Persist { compaction: Some(snap), ..Default::default() }).unwrap();
    assert_eq!(log.records(), 1);
    assert!(file_len(dir.path()) < before / 4, "{} -> {}", before, file_len(dir.path()));
    let held = log.state().clone();
    assert!(held.entries.iter().all(|e| e.index > 95) && held.entries.len() == 5);
    drop(log);
    let log = ControllerLog::open(dir.path()).unwrap();
    assert_eq!(log.state().snapshot, held.snapshot);
    assert_eq!(log.state().entries, held.entries);
}

#[test]
fn an_interrupted_last_write_is_dropped_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ControllerLog::open(dir.path()).unwrap();
    log.write(batch(1, 2, 1)).unwrap();
    let good = file_len(dir.path());
    log.write(batch(3, 2, 1)).unwrap();
    drop(log);
    // Cut the last record short, as a crash during its write would.
    let f = OpenOptions::new().write(true).open(dir.path().join(LOG_FILE)).unwrap();
    f.set_len(file_len(dir.path()) - 3).unwrap();
    drop(f);
    let mut log = ControllerLog::open(dir.path()).unwrap();
    assert_eq!(log.state().entries.len(), 2);
    assert_eq!(file_len(dir.path()), good, "the torn record was truncated away");
    log.write(batch(3, 1, 1)).unwrap();
    drop(log);
    assert_eq!(ControllerLog::open(dir.path()).unwrap().state().entries.len(), 3);
    // A last record that fails its checksum is an interrupted write too.
    let mut f = OpenOptions::new().append(true).open(dir.path().join(LOG_FILE)).unwrap();
    f.write_all(&frame(&batch(4, 1, 1).to_bytes()).unwrap()[..20]).unwrap();
    f.write_all(&[0u8; 40]).unwrap();
    drop(f);
    assert_eq!(ControllerLog::open(dir.path()).unwrap().state().entries.len(), 3);
}

#[test]
fn damage_before_the_end_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ControllerLog::open(dir.path()).unwrap();
    log.write(batch(1, 2, 1)).unwrap();
    log.write(batch(3, 2, 1)).unwrap();
    drop(log);
    let path = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[HEADER_BYTES + 3] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = ControllerLog::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("damaged at byte 0") && err.contains("checksum"), "{err}");
    // An absurd length is damage too, not a short read.
    bytes[HEADER_BYTES + 3] ^= 0xff;
    bytes[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = ControllerLog::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("claims"), "{err}");
}

/// A one-voter controller writing through the log, restarted from it: same map.
#[test]
fn a_controller_restarts_from_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = ControllerLog::open(dir.path()).unwrap();
    log.write(Controller::founding_state(&[1], 16).as_persist()).unwrap();
    let cfg = ControllerConfig { log_entries_max: 4, ..Default::default() };
    let mut ctl = Controller::restore(1, log.state().clone(), 16, cfg.clone(), 7).unwrap();
    let drain = |ctl: &mut Controller, log: &mut ControllerLog| {
        while let Some(rd) = ctl.ready() {
            log.write(rd.persist).unwrap();
        }
    };
    for _ in 0..40 {
        ctl.tick().unwrap();
        drain(&mut ctl, &mut log);
    }
    assert!(ctl.is_leader());
    for k in 0..10 {
        let cmd = MapCommand::Join { name: format!("m{k}"), incarnation: 1, capacity: 100 };
        ctl.propose(&cmd).unwrap();
        drain(&mut ctl, &mut log);
    }
    assert_eq!(ctl.map().members().len(), 10);
    drop(log);
    let log = ControllerLog::open(dir.path()).unwrap();
    assert!(log.state().snapshot.as_ref().unwrap().get_metadata().index > 1, "compacted");
    let mut again = Controller::restore(1, log.state().clone(), 16, cfg, 7).unwrap();
    for _ in 0..40 {
        again.tick().unwrap();
        while again.ready().is_some() {}
    }
    assert_eq!(again.map(), ctl.map());
}

mod fuzz {
    use super::*;
    use botclaw_core::fuzz::{cases, mutate};
    use proptest::prelude::*;

    fn valid_log() -> Vec<u8> {
        let mut bytes = Vec::new();
        for b in [batch(1, 3, 1), batch(4, 2, 2)] {
            bytes.extend(frame(&b.to_bytes()).unwrap());
        }
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// A damaged log file: an error or a good prefix, never a panic.
        #[test]
        fn damaged_logs_never_panic(seed in any::<u64>()) {
            let bytes = mutate(&valid_log(), seed);
            if let Ok((_, _, good)) = replay(Path::new("fuzz"), &bytes) {
                prop_assert!(good <= bytes.len());
            }
        }

        /// A record whose checksum holds but whose payload is damaged (a bug, or a file
        /// edited by hand): refused, never a panic.
        #[test]
        fn checksummed_damaged_records_never_panic(seed in any::<u64>()) {
            let payload = mutate(&batch(1, 3, 1).to_bytes(), seed);
            let _ = replay(Path::new("fuzz"), &frame(&payload).unwrap());
        }
    }
}
