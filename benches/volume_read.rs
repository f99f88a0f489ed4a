//! Read-path benchmark (issues #2 and #11): open+read+close of a small mounted secret, and pread
//! on an open fd, for a plain tmpfs file (the baseline), keybroker's tmpfs volume unaudited, the
//! same audited through fanotify (identify mode, the node's default since issue #24: each open
//! waits until its process is identified; notification mode, `--audit-opens
//! notify-best-effort`; and permission mode as with `--audit-fail-closed`), keybroker's FUSE volume (kernel cache on, every open audited) and the
//! same FUSE volume with kernel caching off (the naive baseline). The reads are made by a child
//! process (this binary with `--reader`), as an application's are: the auditor records a
//! process other than itself. Rounds are interleaved so machine noise hits every variant alike;
//! the median round is reported with its ratio to the plain tmpfs file. Then the resident
//! memory of `keybroker mount` serving 10 objects.
//!
//! Run: `cargo bench --bench volume_read` (as root: it mounts filesystems).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keybroker::audit::AuditLog;
use keybroker::secret::SecretBytes;
use keybroker::volume::content::{FileName, RenderedFile};
use keybroker::volume::fanotify::{Audited, Mode, OpenAudit};
use keybroker::volume::fuse::{FuseOptions, FuseVolume};
use keybroker::volume::memfs::MemFs;
use keybroker::volume::tmpfs::TmpfsVolume;
use keybroker::volume::{Owner, Volume};
use nix::mount::{MntFlags, MsFlags};

const SECRET: &[u8] = b"postgresql://app:bench-password-0123456789@db:5432/app\n";
const OPS: usize = 4_000;
const ROUNDS: usize = 7;

fn open_read_close(path: &Path, buf: &mut Vec<u8>) {
    buf.clear();
    let mut f = std::fs::File::open(path).expect("open");
    f.read_to_end(buf).expect("read");
    assert_eq!(buf.len(), SECRET.len());
}

fn ns_per_op(mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..OPS {
        f();
    }
    t.elapsed().as_nanos() as f64 / OPS as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn file() -> RenderedFile {
    RenderedFile {
        name: FileName::parse("database-url").unwrap(),
        mode: 0o444,
        bytes: SecretBytes::new(SECRET.to_vec()),
        object: "db".into(),
        version: "1".into(),
    }
}

/// `--reader PATH`: one round of open+read+close and of pread on PATH, in ns per op.
fn reader(path: &Path) {
    let mut buf = Vec::with_capacity(4096);
    let orc = ns_per_op(|| open_read_close(path, &mut buf));
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 256];
    let pread = ns_per_op(|| {
        let n = f.read_at(&mut b, 0).unwrap();
        assert_eq!(n, SECRET.len());
    });
    println!("{orc} {pread}");
}

/// Microseconds per short-lived reader: `cat` processes started one after another, each
/// opening the file once (its first open is the one that needs a full /proc lookup).
fn cats(path: &Path, n: usize) -> f64 {
    let t = Instant::now();
    let out = common::output_ok(Command::new("sh").arg("-c").arg(format!(
        "for i in $(seq {n}); do cat {} > /dev/null || exit 1; done",
        path.display()
    )));
    assert!(out.status.success());
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn in_child(path: &Path) -> (f64, f64) {
    let out = common::output_ok(
        Command::new(std::env::current_exe().unwrap())
            .arg("--reader")
            .arg(path),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text.split_whitespace().map(|n| n.parse::<f64>().unwrap());
    (v.next().unwrap(), v.next().unwrap())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--reader") {
        return reader(Path::new(&args[i + 1]));
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: the benchmark mounts tmpfs and FUSE"
    );
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| -> PathBuf {
        let p = tmp.path().join(n);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let owner = Owner { uid: 0, gid: 0 };

    // Baseline: a plain file on a tmpfs.
    let plain = d("plain");
    nix::mount::mount(
        Some("tmpfs"),
        &plain,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    std::fs::write(plain.join("database-url"), SECRET).unwrap();

    // keybroker tmpfs volume (symlinks through ..data).
    let kt = d("kb-tmpfs");
    let tv = TmpfsVolume::mount(&kt, &d("kb-tmpfs-staging"), 1 << 20, owner).unwrap();
    tv.apply(&[file()]).unwrap();

    // keybroker FUSE volume, every open audited.
    let audit = AuditLog::open(&tmp.path().join("audit.jsonl"), false).unwrap();

    // keybroker tmpfs volumes with every open audited through fanotify, as the node mounts them.
    let fan_audit = AuditLog::open(&tmp.path().join("fanotify-audit.jsonl"), false).unwrap();
    let audited_tmpfs = |name: &str, mode: Mode| {
        let dir = d(name);
        let staging = d(&format!("{name}-staging"));
        // As the node starts it: the opens being decided journaled in its state directory.
        let opens = OpenAudit::start_in(
            fan_audit.clone(),
            mode,
            None,
            None,
            Some(&d(&format!("{name}-state"))),
        )
        .unwrap();
        let v = TmpfsVolume::mount(&dir, &staging, 1 << 20, owner).unwrap();
        opens
            .watch(name, &staging, None, Default::default())
            .unwrap();
        let v = Audited::new(Box::new(v), opens.clone(), staging);
        v.apply(&[file()]).unwrap();
        (dir, v, opens)
    };
    let (kn, kn_vol, kn_opens) = audited_tmpfs("kb-tmpfs-notify", Mode::Notify);
    let (ki, ki_vol, ki_opens) = audited_tmpfs("kb-tmpfs-identify", Mode::Identify);
    let (kp, kp_vol, kp_opens) = audited_tmpfs("kb-tmpfs-perm", Mode::Permission);
    let mount_fuse = |dir: &Path, kernel_cache: bool| {
        let use_audit = std::env::var("KB_BENCH_NOAUDIT").is_err();
        let fs = Arc::new(MemFs::new("bench", owner, use_audit.then(|| audit.clone())));
        fs.apply(&[file()]);
        let threads = std::env::var("KB_BENCH_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(2);
        let opts = FuseOptions {
            kernel_cache,
            threads,
            ..FuseOptions::default()
        };
        FuseVolume::mount(dir, fs, &opts).unwrap()
    };
    let kf = d("kb-fuse");
    let fv = mount_fuse(&kf, true);
    let nf = d("naive-fuse");
    let nv = mount_fuse(&nf, false);

    let variants: [(&str, PathBuf); 7] = [
        ("plain tmpfs file", plain.join("database-url")),
        ("keybroker tmpfs volume, unaudited", kt.join("database-url")),
        ("keybroker tmpfs, fanotify notify", kn.join("database-url")),
        (
            "keybroker tmpfs, fanotify identify",
            ki.join("database-url"),
        ),
        (
            "keybroker tmpfs, fanotify fail-closed",
            kp.join("database-url"),
        ),
        ("keybroker FUSE (cached, audited)", kf.join("database-url")),
        ("naive FUSE (no kernel cache)", nf.join("database-url")),
    ];
    // Warm up every path (dentries, pages, process lookup).
    for (_, p) in &variants {
        in_child(p);
    }
    let mut orc: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut pread: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, p)) in variants.iter().enumerate() {
            let (o, r) = in_child(p);
            orc[i].push(o);
            pread[i].push(r);
        }
    }
    audit.flush();
    std::thread::sleep(Duration::from_millis(1500));
    fan_audit.flush();
    let base_orc = median(orc[0].clone());
    let base_pread = median(pread[0].clone());
    println!(
        "open+read+close of a {}-byte file, {OPS} ops x {ROUNDS} interleaved rounds, median round:",
        SECRET.len()
    );
    println!(
        "{:<36} {:>12} {:>10} {:>14} {:>10}",
        "variant", "o+r+c µs", "ratio", "pread µs", "ratio"
    );
    for (i, (name, _)) in variants.iter().enumerate() {
        let o = median(orc[i].clone());
        let p = median(pread[i].clone());
        println!(
            "{name:<36} {:>12.2} {:>9.1}x {:>14.3} {:>9.1}x",
            o / 1e3,
            o / base_orc,
            p / 1e3,
            p / base_pread
        );
    }
    let rtt = median((0..ROUNDS).map(|_| pipe_round_trip_ns()).collect());
    println!(
        "{:<36} {:>12.2} {:>9.1}x   (two cross-thread wakeups, as one FUSE request needs: the floor)",
        "pipe round trip between 2 threads",
        rtt / 1e3,
        rtt / base_orc
    );
    // Short-lived readers: 200 `cat`s per round, rounds interleaved.
    let short: [(&str, &Path); 4] = [
        ("plain tmpfs file", &variants[0].1),
        ("keybroker tmpfs, fanotify notify", &variants[2].1),
        ("keybroker tmpfs, fanotify identify", &variants[3].1),
        ("keybroker FUSE (cached, audited)", &variants[5].1),
    ];
    let mut per_cat: Vec<Vec<f64>> = vec![Vec::new(); short.len()];
    for _ in 0..ROUNDS {
        for (i, (_, p)) in short.iter().enumerate() {
            per_cat[i].push(cats(p, 200));
        }
    }
    let base_cat = median(per_cat[0].clone());
    println!("short-lived readers (a `cat` process per open, 200 x {ROUNDS} rounds, median):");
    for (i, (name, _)) in short.iter().enumerate() {
        let c = median(per_cat[i].clone());
        println!(
            "{name:<36} {c:>12.1} µs per cat {:>9.2}x (+{:.1} µs)",
            c / base_cat,
            c - base_cat
        );
    }
    let audited = std::fs::read_to_string(tmp.path().join("audit.jsonl"))
        .unwrap()
        .lines()
        .count();
    println!("audit records written for FUSE opens: {audited}");
    let fan_records = std::fs::read_to_string(tmp.path().join("fanotify-audit.jsonl"))
        .unwrap()
        .lines()
        .count();
    println!(
        "fanotify: {} opens seen in notification mode, {} in identify mode, {} in permission mode, {fan_records} records",
        kn_opens.opens(),
        ki_opens.opens(),
        kp_opens.opens()
    );
    Box::new(kn_vol).unmount().unwrap();
    Box::new(ki_vol).unmount().unwrap();
    Box::new(kp_vol).unmount().unwrap();
    kn_opens.stop();
    ki_opens.stop();
    kp_opens.stop();

    Box::new(fv).unmount().unwrap();
    Box::new(nv).unmount().unwrap();
    Box::new(tv).unmount().unwrap();
    nix::mount::umount2(&plain, MntFlags::MNT_DETACH).unwrap();

    rss_of_mount(tmp.path());
}

/// One byte to another thread and back over pipes: the cost of the two wakeups a FUSE request
/// needs (the server's, then the caller's), without FUSE.
fn pipe_round_trip_ns() -> f64 {
    use std::io::Write;
    let (mut a_rx, mut b_tx) = std::io::pipe().unwrap();
    let (mut b_rx, mut a_tx) = std::io::pipe().unwrap();
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while a_rx.read_exact(&mut byte).is_ok() {
            if a_tx.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let mut byte = [0u8; 1];
    for _ in 0..200 {
        b_tx.write_all(&[1]).unwrap();
        b_rx.read_exact(&mut byte).unwrap();
    }
    let ns = ns_per_op(|| {
        b_tx.write_all(&[1]).unwrap();
        b_rx.read_exact(&mut byte).unwrap();
    });
    drop(b_tx);
    echo.join().unwrap();
    ns
}

/// Resident memory of the `keybroker mount` binary serving 10 objects, idle and after reads.
fn rss_of_mount(tmp: &Path) {
    let src = tmp.join("secrets");
    std::fs::create_dir_all(&src).unwrap();
    let mut files = String::new();
    for i in 0..10 {
        std::fs::write(
            src.join(format!("obj{i}")),
            format!("value-{i}-{}", "x".repeat(200)),
        )
        .unwrap();
        files.push_str(&format!("  - {{name: file{i}, object: obj{i}}}\n"));
    }
    let cfg = tmp.join("ten.yaml");
    std::fs::write(&cfg, format!("provider: {{local: {{path: secrets}}}}\naudit: {{path: rss-audit.jsonl}}\nfiles:\n{files}")).unwrap();
    let mnt = tmp.join("rss-mnt");
    let bin = env!("CARGO_BIN_EXE_keybroker");
    let mut child = Command::new(bin)
        .args(["mount", "--config"])
        .arg(&cfg)
        .arg(&mnt)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read(mnt.join("file9")).is_err() {
        assert!(Instant::now() < deadline, "mount not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss = |pid: u32| {
        keybroker::procinfo::resident_bytes(pid).expect("/proc status") as f64 / (1 << 20) as f64
    };
    let idle = rss(child.id());
    let mut buf = Vec::new();
    for _ in 0..2_000 {
        for i in 0..10 {
            buf.clear();
            std::fs::File::open(mnt.join(format!("file{i}")))
                .unwrap()
                .read_to_end(&mut buf)
                .unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let busy = rss(child.id());
    println!(
        "keybroker mount ({}), 10 objects: RSS idle {idle:.1} MiB, after 20,000 audited opens {busy:.1} MiB",
        bin_profile(bin)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
}

fn bin_profile(bin: &str) -> &'static str {
    if bin.contains("/release/") {
        "release build"
    } else {
        "debug build"
    }
}
