//! glibc malloc tuning for the node (many FUSE sessions) and the pod-side runs.

/// Stops glibc from raising its mmap threshold as large blocks are freed.
///
/// fuser gives every FUSE session thread a 16 MiB zeroed read buffer. Fresh mmap'd memory is
/// zero for free and only the pages the kernel writes become resident. But once such a block is
/// freed, glibc's dynamic threshold lets the next 16 MiB calloc come from the heap, where it is
/// memset and fully resident. Measured: 101 volumes took 242 MiB RSS with the dynamic
/// threshold and 16 MiB with a fixed 128 KiB threshold (BENCHMARKS.md). Setting the threshold
/// explicitly turns the dynamic adjustment off.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn fix_malloc_mmap_threshold() {
    // SAFETY: mallopt only changes allocator tuning parameters; it is called once, before any
    // other thread exists, with a constant that glibc documents as valid for M_MMAP_THRESHOLD.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    if ok != 1 {
        eprintln!(
            "warning: mallopt(M_MMAP_THRESHOLD) failed; memory use with many FUSE volumes will be higher"
        );
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn fix_malloc_mmap_threshold() {}

/// Returns the free memory of glibc's heaps to the kernel (after volumes were unpublished: the
/// freed pages would otherwise stay resident at the high-water mark).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases memory glibc already considers free; it takes the
    // allocator's own locks and may be called from any thread at any time.
    let _ = unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_heap() {}

/// glibc gives each thread that allocates its own arena (up to 8 per core), each with its own
/// resident heap pages; in the pod one arena serves the few threads there are.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn in_pod_malloc() {
    // SAFETY: as in fix_malloc_mmap_threshold: a tuning parameter, set once before any other
    // thread exists, to a value glibc documents as valid for M_ARENA_MAX.
    let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn in_pod_malloc() {}
