//! Coalesced open records, shared by the two ways a volume sees its opens (FUSE `open`, and
//! fanotify on a tmpfs volume): the first open of one file version by one process is recorded
//! at once; further opens of it by that process within [`READ_WINDOW`] are counted and written
//! as one record with `count` (and `first_time`) when the window closes. A reader in a hot loop
//! costs the audit log one line a second, and every open is still accounted for.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant, SystemTime};

use crate::audit::{AuditLog, Event};

/// Window in which repeated opens of one file version by one process are coalesced.
pub const READ_WINDOW: Duration = Duration::from_secs(1);

struct Window {
    opened: Instant,
    first_time: SystemTime,
    repeats: u64,
    event: Event,
}

/// Open windows by key (who opened which file version; the caller decides what the key holds).
pub struct OpenWindows<K> {
    windows: HashMap<K, Window>,
}

impl<K> Default for OpenWindows<K> {
    fn default() -> Self {
        Self {
            windows: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> OpenWindows<K> {
    /// Accounts for one open. Returns whether a record was queued now (the window's first
    /// open); `event` is only built then.
    pub fn note(&mut self, audit: &AuditLog, key: K, event: impl FnOnce() -> Event) -> bool {
        match self.windows.get_mut(&key) {
            Some(w) if w.opened.elapsed() < READ_WINDOW => {
                w.repeats += 1;
                false
            }
            _ => {
                if let Some(old) = self.windows.remove(&key) {
                    record_repeats(audit, old);
                }
                let event = event();
                audit.record(event.clone());
                self.windows.insert(
                    key,
                    Window {
                        opened: Instant::now(),
                        first_time: SystemTime::now(),
                        repeats: 0,
                        event,
                    },
                );
                true
            }
        }
    }

    /// Records the repeats of windows that have closed (of every window when `all`, or of the
    /// windows `which` selects).
    pub fn flush(&mut self, audit: &AuditLog, all: bool) {
        self.flush_where(audit, |_| all);
    }

    /// Records the repeats of closed windows, and of every window whose key `now` selects.
    pub fn flush_where(&mut self, audit: &AuditLog, now: impl Fn(&K) -> bool) {
        let closed: Vec<K> = self
            .windows
            .iter()
            .filter(|(k, w)| now(k) || w.opened.elapsed() >= READ_WINDOW)
            .map(|(k, _)| k.clone())
            .collect();
        for k in closed {
            if let Some(w) = self.windows.remove(&k) {
                record_repeats(audit, w);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

fn record_repeats(audit: &AuditLog, w: Window) {
    if w.repeats > 0 {
        let mut ev = w.event;
        ev.count = Some(w.repeats);
        ev.first_time = Some(humantime::format_rfc3339_micros(w.first_time).to_string());
        audit.record(ev);
    }
}
