//! The placement controller's durable state on disk: one append-only file of
//! [`Persist`] batches, each appended and fsynced before the controller sends what must
//! follow it (see `botclaw_core::controller`). Replaying the file with
//! [`Restored::write`] gives back what a restarted member hands to `Controller::restore`.
//! A batch holding a snapshot (received or taken) rewrites the file as one record (written aside, fsynced,
//! renamed over, directory fsynced), which is how the log stays bounded.
//!
//! Record: length (u32, little endian), xxh3-64 of the payload (u64, little endian),
//! payload ([`Persist::to_bytes`]). A record cut short at the end of the file, or one failing
//! its checksum with nothing but zeros after it (a file system may extend a file before
//! the data lands), is a write that a crash interrupted before its fsync returned (nothing
//! that followed it was sent): it is dropped and the file truncated. Any other damage
//! refuses to start, naming the offset: a controller member that forgot
//! what it acknowledged could break Raft's safety.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use botclaw_core::controller::{Persist, Restored};
use xxhash_rust::xxh3::xxh3_64;

/// The log's file name in its directory.
pub const LOG_FILE: &str = "controller.log";
/// Largest record read back; a longer length is damage, not a record.
pub const RECORD_BYTES_MAX: usize = 256 << 20;
const HEADER_BYTES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("controller log {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "controller log {path} is damaged at byte {offset}: {reason}; refusing to start \
         (move the directory away to rejoin as a new member; its peers hold the log)"
    )]
    Damaged { path: String, offset: u64, reason: String },
    #[error("controller log record of {0} bytes is larger than {RECORD_BYTES_MAX}")]
    TooLarge(usize),
}

/// The open log and the state it holds.
#[derive(Debug)]
pub struct ControllerLog {
    dir: PathBuf,
    file: File,
    state: Restored,
    /// Records replayed or appended since the file was last rewritten.
    records: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.display().to_string(), source }
}

impl ControllerLog {
    /// Opens (or creates) the log in `dir` and replays it.
    pub fn open(dir: &Path) -> Result<ControllerLog, LogError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOG_FILE);
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io(&path))?;
        }
        let (state, records, good) = replay(&path, &bytes)?;
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        if good < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                kept = good,
                dropped = bytes.len() - good,
                "controller log ended in an interrupted write; dropped it"
            );
            file.set_len(good as u64).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        Ok(ControllerLog { dir: dir.to_path_buf(), file, state, records })
    }

    /// What the log holds (a restarted member's `Restored`).
    pub fn state(&self) -> &Restored {
        &self.state
    }

    /// Records in the file now.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Makes `batch` durable: appended and fsynced, or, when it carries a snapshot, the
    /// whole state rewritten as one record.
    pub fn write(&mut self, batch: Persist) -> Result<(), LogError> {
        if batch.is_empty() {
            return Ok(());
        }
        let snapshot = batch.snapshot.is_some() || batch.compaction.is_some();
        let record = batch.to_bytes();
        self.state.write(batch);
        if snapshot {
            return self.rewrite();
        }
        let path = self.dir.join(LOG_FILE);
        self.file.write_all(&frame(&record)?).map_err(io(&path))?;
        self.file.sync_data().map_err(io(&path))?;
        self.records += 1;
        Ok(())
    }

    fn rewrite(&mut self) -> Result<(), LogError> {
        let path = self.dir.join(LOG_FILE);
        let aside = self.dir.join(format!("{LOG_FILE}.new"));
        let record = frame(&self.state.as_persist().to_bytes())?;
        let mut f = File::create(&aside).map_err(io(&aside))?;
        f.write_all(&record).map_err(io(&aside))?;
        f.sync_all().map_err(io(&aside))?;
        std::fs::rename(&aside, &path).map_err(io(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        self.file = OpenOptions::new().append(true).open(&path).map_err(io(&path))?;
        self.records = 1;
        Ok(())
    }
}

fn frame(payload: &[u8]) -> Result<Vec<u8>, LogError> {
    if payload.len() > RECORD_BYTES_MAX {
        return Err(LogError::TooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&xxh3_64(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// The state the records hold, how many there are, and how many bytes are good.
fn replay(path: &Path, bytes: &[u8]) -> Result<(Restored, u64, usize), LogError> {
    let damaged = |offset: usize, reason: String| LogError::Damaged {
        path: path.display().to_string(),
        offset: offset as u64,
        reason,
    };
    let mut state = Restored::default();
    let (mut at, mut records) = (0, 0);
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEADER_BYTES {
            break; // an interrupted header
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let sum = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
        if len > RECORD_BYTES_MAX {
            return Err(damaged(at, format!("a record claims {len} bytes")));
        }
        let Some(payload) = rest.get(HEADER_BYTES..HEADER_BYTES + len) else {
            break; // an interrupted payload
        };
        if xxh3_64(payload) != sum {
            if rest[HEADER_BYTES + len..].iter().all(|&b| b == 0) {
                break; // the last write, interrupted
            }
            return Err(damaged(at, "checksum mismatch".into()));
        }
        let batch = Persist::from_bytes(payload).map_err(|e| damaged(at, e))?;
        state.write(batch);
        records += 1;
        at += HEADER_BYTES + len;
    }
    Ok((state, records, at))
}

#[cfg(test)]
mod tests;
