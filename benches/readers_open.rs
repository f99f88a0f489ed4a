//! Only the pod's processes (issue #25): what `readers: pod` costs and how fair the shared
//! listener is. Every reader is a child process (this binary in a helper role) placed in a
//! pod's cgroup, as kubelet places a container's processes.
//!
//! 1. open+read+close by the pod's process: a plain tmpfs file (the baseline), keybroker's
//!    tmpfs volume audited in notification mode, in identify mode (the default, `readers:
//!    any`), protected (`readers: pod`), and a FUSE volume with and without `readers: pod`.
//!    Rounds interleaved; the median round with its ratio to the plain file.
//! 2. A refused open (a process of another pod) against an allowed one on the same volume.
//! 3. Fairness: 10 pods each open their file 1,000 times, timing every open (p50, p99), alone
//!    and while an 11th pod opens its own from 48 threads without pause; the ratio is the
//!    delay the hammering pod adds to everyone else's opens.
//!
//! Run: `cargo bench --bench readers_open` (as root: it mounts filesystems and makes cgroups).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use common::load::PodCgroup;
use keybroker::access::Readers;
use keybroker::audit::{AuditLog, PodRef};
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
const OTHERS: usize = 10;
const TIMED_OPENS: usize = 1_000;
const HAMMER_THREADS: usize = 48;

fn file() -> RenderedFile {
    RenderedFile {
        name: FileName::parse("database-url").unwrap(),
        mode: 0o444,
        bytes: SecretBytes::new(SECRET.to_vec()),
        object: "db".into(),
        version: "1".into(),
    }
}

fn uid(i: usize) -> String {
    format!("5e7c0000-0000-4000-8000-{i:012}")
}

fn pod(i: usize) -> PodRef {
    PodRef {
        namespace: "bench".into(),
        name: format!("pod-{i}"),
        uid: uid(i),
        service_account: "app".into(),
    }
}

/// Runs this binary with `args` in `cgroup` (a pod's), returning its stdout.
fn in_pod(cgroup: &Path, args: &[&str]) -> String {
    let out = common::output_ok(&mut helper(cgroup, args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn helper(cgroup: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("{}exec \"$0\" \"$@\"", PodCgroup::enter(cgroup)))
        .arg(std::env::current_exe().unwrap())
        .args(args);
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// ---- helper roles (run as children) ----

/// ns per open+read+close of `path`, OPS times.
fn role_orc(path: &Path) {
    let mut buf = Vec::with_capacity(4096);
    let t = Instant::now();
    for _ in 0..OPS {
        buf.clear();
        std::fs::File::open(path)
            .expect("open")
            .read_to_end(&mut buf)
            .unwrap();
        assert_eq!(buf.len(), SECRET.len());
    }
    println!("{}", t.elapsed().as_nanos() as f64 / OPS as f64);
}

/// ns per refused open of `path`, OPS times (every one must be refused).
fn role_refused(path: &Path) {
    let t = Instant::now();
    for _ in 0..OPS {
        let e = std::fs::File::open(path).expect_err("a refused open succeeded");
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    }
    println!("{}", t.elapsed().as_nanos() as f64 / OPS as f64);
}

/// `TIMED_OPENS` timed opens of `path`: prints p50 and p99 in ns.
fn role_timed(path: &Path) {
    let mut buf = Vec::with_capacity(4096);
    let mut lat = Vec::with_capacity(TIMED_OPENS);
    for _ in 0..TIMED_OPENS {
        let t = Instant::now();
        buf.clear();
        std::fs::File::open(path)
            .expect("open")
            .read_to_end(&mut buf)
            .unwrap();
        lat.push(t.elapsed().as_nanos() as f64);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("{} {}", lat[TIMED_OPENS / 2], lat[TIMED_OPENS * 99 / 100]);
}

/// Opens `path` from `HAMMER_THREADS` threads until `stop` exists; prints the opens made.
fn role_hammer(path: &Path, stop: &Path) {
    let made = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..HAMMER_THREADS {
            s.spawn(|| {
                let mut buf = Vec::with_capacity(4096);
                while !stop.exists() {
                    buf.clear();
                    std::fs::File::open(path)
                        .expect("open")
                        .read_to_end(&mut buf)
                        .unwrap();
                    made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    println!("{}", made.into_inner());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--orc") => return role_orc(Path::new(&args[2])),
        Some("--refused") => return role_refused(Path::new(&args[2])),
        Some("--timed") => return role_timed(Path::new(&args[2])),
        Some("--hammer") => return role_hammer(Path::new(&args[2]), Path::new(&args[3])),
        _ => {}
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: the benchmark mounts tmpfs and FUSE and makes cgroups"
    );
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| -> PathBuf {
        let p = tmp.path().join(n);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let owner = Owner { uid: 0, gid: 0 };
    let protected = Readers::parse(Some("pod"), None).unwrap();
    let cgroups: Vec<PodCgroup> = (0..=OTHERS + 1).map(|i| PodCgroup::new(&uid(i))).collect();
    let me = &cgroups[0].pod;

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

    let audit = AuditLog::open(&tmp.path().join("audit.jsonl"), false).unwrap();
    let notify = OpenAudit::start(audit.clone(), Mode::Notify, None, None).unwrap();
    // As the node starts it: the opens being decided journaled in its state directory.
    // (KB_BENCH_NO_JOURNAL=1: without it, to see what the journal costs.)
    let state = d("state");
    let journal = std::env::var("KB_BENCH_NO_JOURNAL")
        .is_err()
        .then_some(state.as_path());
    let identify = OpenAudit::start_in(audit.clone(), Mode::Identify, None, None, journal).unwrap();
    let mut tmpfs_volumes = Vec::new();
    let mut tmpfs = |name: &str, opens: &Arc<OpenAudit>, p: usize, readers: &Readers| {
        let dir = d(name);
        let staging = d(&format!("{name}-staging"));
        let v = TmpfsVolume::mount(&dir, &staging, 1 << 20, owner).unwrap();
        opens
            .watch(name, &staging, Some(pod(p)), readers.clone())
            .unwrap();
        let v = Audited::new(Box::new(v), opens.clone(), staging);
        v.apply(&[file()]).unwrap();
        tmpfs_volumes.push(v);
        dir.join("database-url")
    };
    let t_notify = tmpfs("notify", &notify, 0, &Readers::default());
    let t_identify = tmpfs("identify", &identify, 0, &Readers::default());
    let t_protected = tmpfs("protected", &identify, 0, &protected);
    // The fairness pods' volumes, protected, on the same listener.
    let fair: Vec<PathBuf> = (1..=OTHERS + 1)
        .map(|i| tmpfs(&format!("pod-{i}"), &identify, i, &protected))
        .collect();
    let fuse = |name: &str, readers: Readers| {
        let fs = Arc::new(
            MemFs::new(name, owner, Some(audit.clone()))
                .with_pod(pod(0))
                .with_readers(readers),
        );
        fs.apply(&[file()]);
        let dir = d(name);
        let v = FuseVolume::mount(&dir, fs, &FuseOptions::default()).unwrap();
        (dir.join("database-url"), v)
    };
    let (f_any, f_any_vol) = fuse("fuse-any", Readers::default());
    let (f_protected, f_protected_vol) = fuse("fuse-protected", protected.clone());

    // 1. The pod's own opens.
    let variants: [(&str, &Path); 6] = [
        ("plain tmpfs file", &plain.join("database-url")),
        ("tmpfs, fanotify notify (readers: any)", &t_notify),
        ("tmpfs, fanotify identify (readers: any)", &t_identify),
        ("tmpfs, readers: pod", &t_protected),
        ("FUSE (readers: any)", &f_any),
        ("FUSE, readers: pod", &f_protected),
    ];
    let run = |p: &Path| -> f64 {
        in_pod(me, &["--orc", p.to_str().unwrap()])
            .trim()
            .parse()
            .unwrap()
    };
    for (_, p) in &variants {
        run(p);
    }
    let mut orc: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, p)) in variants.iter().enumerate() {
            orc[i].push(run(p));
        }
    }
    let base = median(orc[0].clone());
    println!(
        "open+read+close of a {}-byte file by the pod's process, {OPS} ops x {ROUNDS} interleaved rounds, median round:",
        SECRET.len()
    );
    for (i, (name, _)) in variants.iter().enumerate() {
        let o = median(orc[i].clone());
        println!("  {name:<42} {:>8.2} µs {:>6.2}x", o / 1e3, o / base);
    }

    // 2. Refused opens (another pod's process) against allowed ones.
    let other = &cgroups[OTHERS + 1].pod;
    let mut refused: [Vec<f64>; 4] = Default::default();
    for _ in 0..ROUNDS {
        for (i, (cg, role, p)) in [
            (me, "--orc", &t_protected),
            (other, "--refused", &t_protected),
            (me, "--orc", &f_protected),
            (other, "--refused", &f_protected),
        ]
        .into_iter()
        .enumerate()
        {
            refused[i].push(
                in_pod(cg, &[role, p.to_str().unwrap()])
                    .trim()
                    .parse()
                    .unwrap(),
            );
        }
    }
    let m: Vec<f64> = refused.iter().map(|v| median(v.clone())).collect();
    println!("refused opens (a process of another pod), {OPS} x {ROUNDS} rounds, median:");
    println!(
        "  tmpfs, readers: pod: allowed o+r+c {:.2} µs, refused open {:.2} µs ({:.2}x)",
        m[0] / 1e3,
        m[1] / 1e3,
        m[1] / m[0]
    );
    println!(
        "  FUSE, readers: pod:  allowed o+r+c {:.2} µs, refused open {:.2} µs ({:.2}x)",
        m[2] / 1e3,
        m[3] / 1e3,
        m[3] / m[2]
    );

    // 3. Fairness: 10 pods timing their opens, alone and beside a hammering pod.
    let timed = |with_hammer: bool| -> (f64, f64, u64) {
        let stop = tmp.path().join("stop");
        let _ = std::fs::remove_file(&stop);
        let mut hammer = with_hammer.then(|| {
            helper(
                &cgroups[OTHERS + 1].pod,
                &[
                    "--hammer",
                    fair[OTHERS].to_str().unwrap(),
                    stop.to_str().unwrap(),
                ],
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
        });
        if hammer.is_some() {
            // Let its opens pile up first.
            let before = identify.opens();
            while identify.opens() < before + 5_000 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let readers: Vec<_> = (0..OTHERS)
            .map(|i| {
                helper(&cgroups[i + 1].pod, &["--timed", fair[i].to_str().unwrap()])
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        for r in readers {
            let out = r.wait_with_output().unwrap();
            assert!(out.status.success());
            let text = String::from_utf8_lossy(&out.stdout);
            let mut v = text.split_whitespace().map(|n| n.parse::<f64>().unwrap());
            p50.push(v.next().unwrap());
            p99.push(v.next().unwrap());
        }
        std::fs::write(&stop, "").unwrap();
        let made = hammer.take().map_or(0, |h| {
            let out = h.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        });
        (median(p50), p99.into_iter().fold(0.0, f64::max), made)
    };
    let mut alone = Vec::new();
    let mut beside = Vec::new();
    for _ in 0..3 {
        alone.push(timed(false));
        beside.push(timed(true));
    }
    let pick = |v: &[(f64, f64, u64)]| {
        (
            median(v.iter().map(|x| x.0).collect()),
            median(v.iter().map(|x| x.1).collect()),
            median(v.iter().map(|x| x.2 as f64).collect()),
        )
    };
    let (a50, a99, _) = pick(&alone);
    let (b50, b99, made) = pick(&beside);
    let f = identify.fairness();
    println!(
        "fairness: {OTHERS} pods x {TIMED_OPENS} timed opens of their protected tmpfs file (p50 = median of the pods' medians, p99 = worst pod's p99; median of 3 runs):"
    );
    println!(
        "  alone:                                 p50 {:>8.1} µs   p99 {:>8.1} µs",
        a50 / 1e3,
        a99 / 1e3
    );
    println!(
        "  beside a pod opening from {HAMMER_THREADS} threads: p50 {:>8.1} µs   p99 {:>8.1} µs   ({:.2}x, {:.2}x; the hammer made {made:.0} opens meanwhile)",
        b50 / 1e3,
        b99 / 1e3,
        b50 / a50,
        b99 / a99
    );
    println!(
        "  turns: a lone open waited behind at most {} answers; widest round {} pods; longest line {}",
        f.lone_waited_behind, f.widest_round, f.longest_line
    );

    for v in tmpfs_volumes {
        Box::new(v).unmount().unwrap();
    }
    notify.stop();
    identify.stop();
    Box::new(f_any_vol).unmount().unwrap();
    Box::new(f_protected_vol).unmount().unwrap();
    nix::mount::umount2(&plain, MntFlags::MNT_DETACH).unwrap();
    drop(cgroups);
}
