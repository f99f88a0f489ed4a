//! Volumes: where rendered files become visible to readers.
//!
//! - [`content`]: what a volume holds (names, modes, encodings, templates, limits);
//! - [`memfs`]: the in-memory read-only filesystem behind a FUSE mount, testable without one;
//! - [`fuse`]: the thin `fuser` adapter that serves [`memfs`] on a real mount;
//! - [`tmpfs`]: the kubelet-compatible atomic writer on a tmpfs mount;
//! - [`mountpoint`]: finding and cleaning mounts left behind by a killed process.

pub mod content;
pub mod fair;
pub mod fanotify;
pub mod fuse;
pub mod fuse_mux;
pub mod fusewire;
pub mod inflight;
pub mod memfs;
pub mod mountpoint;
pub mod opens;
pub mod tmpfs;

use std::path::PathBuf;

use content::RenderedFile;

/// The two ways a volume can be served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// Served from memory by this process (default).
    #[default]
    Fuse,
    /// Real files on a tmpfs mount, kubelet's atomic-writer layout.
    Tmpfs,
}

impl std::fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeKind::Fuse => "fuse",
            VolumeKind::Tmpfs => "tmpfs",
        })
    }
}

/// Owner of every file and directory of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// A mounted volume that can take a new set of files.
pub trait Volume: Send + Sync {
    fn kind(&self) -> VolumeKind;
    /// Makes `files` the volume's content, atomically for readers. Returns the names that
    /// changed (added, replaced or removed); an empty list means nothing was rewritten.
    fn apply(&self, files: &[RenderedFile]) -> Result<Vec<String>, VolumeError>;
    /// Periodic upkeep (about once a second): records coalesced read counts.
    fn tick(&self) {}
    /// Unmounts. The volume's content is dropped (zeroized) with it.
    fn unmount(self: Box<Self>) -> Result<(), VolumeError>;
}

/// A volume that tells `on_change` the names each changing write changed (rotation notices).
pub struct Notifying {
    inner: Box<dyn Volume>,
    on_change: Box<dyn Fn(Vec<String>) + Send + Sync>,
}

impl Notifying {
    pub fn new(
        inner: Box<dyn Volume>,
        on_change: impl Fn(Vec<String>) + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            on_change: Box::new(on_change),
        }
    }
}

impl Volume for Notifying {
    fn kind(&self) -> VolumeKind {
        self.inner.kind()
    }

    fn apply(&self, files: &[RenderedFile]) -> Result<Vec<String>, VolumeError> {
        let changed = self.inner.apply(files)?;
        if !changed.is_empty() {
            (self.on_change)(changed.clone());
        }
        Ok(changed)
    }

    fn tick(&self) {
        self.inner.tick()
    }

    fn unmount(self: Box<Self>) -> Result<(), VolumeError> {
        self.inner.unmount()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot mount {kind} at {path}: {error}")]
    Mount {
        kind: VolumeKind,
        path: PathBuf,
        error: String,
    },
    #[error("cannot unmount {path}: {error}")]
    Unmount { path: PathBuf, error: String },
    #[error("cannot write the volume at {path}: {error}")]
    Write { path: PathBuf, error: String },
    #[error("{path} is already served by a running keybroker (pid {pid}); stop it first")]
    Busy { path: PathBuf, pid: String },
    #[error("{path} is not usable as a mount point: {error}")]
    Target { path: PathBuf, error: String },
}
