use super::*;

/// What is recorded about a published volume: enough to take it over after a restart, and no
/// secret (no tokens, no values).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct VolumeRecord {
    pub(super) volume_id: String,
    pub(super) target: PathBuf,
    pub(super) kind: VolumeKind,
    pub(super) attributes: BTreeMap<String, String>,
    /// A FUSE volume's session, for the next process to serve it without a second INIT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) fuse: Option<FuseRecord>,
}

/// What a process that takes a FUSE session over must know (nothing secret): which kernel
/// connection it is, the protocol minor agreed at INIT, and the names behind its inodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct FuseRecord {
    /// The connection number (device minor of the mount, /sys/fs/fuse/connections/N).
    pub(super) conn: u32,
    pub(super) minor: u32,
    pub(super) inodes: crate::volume::memfs::InodeTable,
}

/// The name of a target's record (and of its session at the keeper).
/// A volume's name in the state directory: its record's file name and its staging directory's.
pub(super) fn record_key(target: &Path) -> String {
    mountpoint::staging_name(target)
}

pub(super) fn record_path(state_dir: &Path, target: &Path) -> PathBuf {
    state_dir
        .join("volumes")
        .join(format!("{}.json", record_key(target)))
}

/// Whether a FUSE server answers at `target` (a killed one leaves ENOTCONN behind).
pub(super) fn target_alive(target: &Path) -> bool {
    !matches!(std::fs::metadata(target), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
        && mountpoint::mount_at(target).is_some_and(|m| mountpoint::is_keybroker_mount(&m))
}

/// Detaches every keybroker mount at `target` and at its tmpfs staging directory (under
/// `staging_root`), however many are stacked. Returns how many there were.
pub(super) fn detach_all(staging_root: &Path, target: &Path) -> usize {
    let staging = mountpoint::staging_dir(staging_root, target);
    let n =
        mountpoint::detach_keybroker_mounts(target) + mountpoint::detach_keybroker_mounts(&staging);
    let _ = std::fs::remove_dir(&staging);
    n
}

/// Writes a volume's record atomically (write + rename), so a crash never leaves half a record.
pub(super) fn write_record(path: &Path, record: &VolumeRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
