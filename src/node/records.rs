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

/// Where the copy of the record at `path` (`<state>/volumes/KEY.json`) is kept:
/// `<state>/volume-copies/KEY.json`. A record damaged by something other than keybroker (a
/// tool, a disk) is read from its copy, so its volume is taken over as if nothing happened.
pub(super) fn copy_path(path: &Path) -> PathBuf {
    let state = path
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    state
        .join("volume-copies")
        .join(path.file_name().unwrap_or_default())
}

/// Writes a volume's record, then its copy, each atomically (write + rename), so a crash
/// never leaves half a record.
pub(super) fn write_record(path: &Path, record: &VolumeRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    for p in [path.to_owned(), copy_path(path)] {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &p)?;
    }
    Ok(())
}

/// Removes a volume's record, then its copy (a crash in between leaves a copy of no record,
/// which the next process removes).
pub(super) fn remove_record(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(copy_path(path));
}

/// Reads the record at `path`, or its copy when the record is damaged (`Ok((record, true))`).
/// `Err` says why neither could be read.
pub(super) fn read_record(path: &Path) -> Result<(VolumeRecord, bool), String> {
    let parse = |p: &Path| -> Result<VolumeRecord, String> {
        let bytes = std::fs::read(p).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    };
    match parse(path) {
        Ok(r) => Ok((r, false)),
        Err(damaged) => match parse(&copy_path(path)) {
            Ok(r) => Ok((r, true)),
            Err(copy) => Err(format!("{damaged}; its copy: {copy}")),
        },
    }
}
