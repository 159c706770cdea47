//! The device registry: `<data-dir>/security/devices.log`, one JSON line per event (a
//! device's credentials issued, a key revoked), appended under an exclusive `flock` on
//! `devices.lock`, so concurrent `fleetpipe device add` processes never lose or mix
//! records. Reading it back is one pass (100,000 devices: about 10 MB, well under a
//! second). Device seeds are never stored: they go to the caller once, in the `.creds`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SecurityError;

/// One line of the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Event {
    /// Credentials issued for `id` with user key `key` at `at` (Unix seconds).
    Add { id: String, key: String, at: i64 },
    /// `key` (of device `id`) revoked at `at`.
    Revoke { id: String, key: String, at: i64 },
}

/// What the registry knows of one device.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: String,
    /// The user public key of its current credentials.
    pub public_key: String,
    /// When they were issued (Unix seconds).
    pub issued: i64,
    /// When they were revoked, if they were.
    pub revoked: Option<i64>,
}

/// The registry's files.
#[derive(Debug, Clone)]
pub struct Registry {
    log: PathBuf,
    lock: PathBuf,
}

/// The registry read under its lock; dropped, it releases the lock.
pub struct Locked {
    _lock: File,
    log: File,
    /// Devices by id, in the order they were first added.
    pub devices: HashMap<String, DeviceInfo>,
    pub order: Vec<String>,
    /// Every revoked key with its time, the account JWT's revocation list.
    pub revocations: Vec<(String, i64)>,
}

impl Registry {
    pub fn under(security_dir: &Path) -> Registry {
        Registry {
            log: security_dir.join("devices.log"),
            lock: security_dir.join("devices.lock"),
        }
    }

    /// Takes the exclusive lock (waiting for other processes) and reads the log.
    pub fn lock(&self) -> Result<Locked, SecurityError> {
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| SecurityError::io(p, e))
        };
        let lock = open(&self.lock)?;
        // flock(2): held until `lock` is closed, released by the kernel if the process dies.
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| SecurityError::io(&self.lock, e.into()))?;
        let mut log = open(&self.log)?;
        let mut text = String::new();
        log.read_to_string(&mut text)
            .map_err(|e| SecurityError::io(&self.log, e))?;
        // A crash in the middle of an append leaves a line without its newline: drop it,
        // so the next record starts on a line of its own.
        if !text.is_empty() && !text.ends_with('\n') {
            let keep = text.rfind('\n').map_or(0, |i| i + 1);
            log.set_len(keep as u64)
                .map_err(|e| SecurityError::io(&self.log, e))?;
            text.truncate(keep);
        }
        log.seek(SeekFrom::End(0))
            .map_err(|e| SecurityError::io(&self.log, e))?;
        let mut locked = Locked {
            _lock: lock,
            log,
            devices: HashMap::new(),
            order: Vec::new(),
            revocations: Vec::new(),
        };
        for (n, line) in text.lines().enumerate() {
            let event: Event = serde_json::from_str(line).map_err(|e| {
                SecurityError::Invalid(format!(
                    "{} line {}: {e}; the registry is damaged (restore it from a backup)",
                    self.log.display(),
                    n + 1
                ))
            })?;
            locked.apply(event);
        }
        Ok(locked)
    }
}

impl Locked {
    fn apply(&mut self, event: Event) {
        match event {
            Event::Add { id, key, at } => {
                if !self.devices.contains_key(&id) {
                    self.order.push(id.clone());
                }
                self.devices.insert(
                    id.clone(),
                    DeviceInfo {
                        id,
                        public_key: key,
                        issued: at,
                        revoked: None,
                    },
                );
            }
            Event::Revoke { id, key, at } => {
                if let Some(d) = self.devices.get_mut(&id) {
                    if d.public_key == key {
                        d.revoked = Some(at);
                    }
                }
                self.revocations.push((key, at));
            }
        }
    }

    /// Appends events in one write and syncs, then applies them.
    pub fn append(&mut self, events: Vec<Event>) -> Result<(), SecurityError> {
        let mut text = String::with_capacity(events.len() * 100);
        for e in &events {
            // Serialising a struct of strings and integers cannot fail.
            text.push_str(&serde_json::to_string(e).unwrap_or_default());
            text.push('\n');
        }
        let io = |e| SecurityError::Invalid(format!("cannot append to the device registry: {e}"));
        self.log.write_all(text.as_bytes()).map_err(io)?;
        self.log.sync_data().map_err(io)?;
        for e in events {
            self.apply(e);
        }
        Ok(())
    }

    /// Devices in the order they were first added.
    pub fn list(&self) -> Vec<DeviceInfo> {
        self.order
            .iter()
            .filter_map(|id| self.devices.get(id).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_replay_and_a_torn_line_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::under(tmp.path());
        {
            let mut l = reg.lock().unwrap();
            l.append(vec![
                Event::Add {
                    id: "a".into(),
                    key: "UA1".into(),
                    at: 1,
                },
                Event::Add {
                    id: "b".into(),
                    key: "UB1".into(),
                    at: 2,
                },
                Event::Revoke {
                    id: "a".into(),
                    key: "UA1".into(),
                    at: 3,
                },
                Event::Add {
                    id: "a".into(),
                    key: "UA2".into(),
                    at: 4,
                },
            ])
            .unwrap();
        }
        // A torn append.
        let mut f = OpenOptions::new().append(true).open(&reg.log).unwrap();
        f.write_all(br#"{"op":"add","id":"c""#).unwrap();
        let mut l = reg.lock().unwrap();
        let list = l.list();
        assert_eq!(list.len(), 2);
        assert_eq!(
            (list[0].id.as_str(), list[0].public_key.as_str()),
            ("a", "UA2")
        );
        assert_eq!(list[0].revoked, None);
        assert_eq!(l.revocations, vec![("UA1".to_string(), 3)]);
        l.append(vec![Event::Add {
            id: "c".into(),
            key: "UC1".into(),
            at: 5,
        }])
        .unwrap();
        drop(l);
        assert_eq!(reg.lock().unwrap().list().len(), 3);
    }
}
