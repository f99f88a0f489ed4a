//! The FUSE wire protocol, as much of it as a read-only filesystem needs: request headers and
//! bodies decoded from the bytes `/dev/fuse` hands over, replies and notifications encoded into
//! the bytes it takes (layouts of `linux/fuse.h`, protocol 7.x, native endianness). No I/O
//! here; `fuse_mux` moves the bytes.

/// Kernel protocol version this server speaks.
pub const KERNEL_VERSION: u32 = 7;
/// Highest minor version this server knows (the kernel picks the lower of both).
pub const MINOR: u32 = 31;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const BATCH_FORGET: u32 = 42;
}

/// `FUSE_NOTIFY_*` codes (sent as the `error` of a header whose `unique` is 0).
pub mod notify {
    pub const INVAL_INODE: i32 = 2;
    pub const INVAL_ENTRY: i32 = 3;
    pub const RESEND: i32 = 7;
}

/// `fuse_init_out.flags` this server asks for.
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const EXPORT_SUPPORT: u32 = 1 << 4;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
}

/// `fuse_open_out.open_flags`.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
/// The smallest read buffer the kernel accepts (`FUSE_MIN_READ_BUFFER`); with `max_write` of
/// 4 KiB (nothing is ever written) every request fits in it.
pub const READ_BUFFER: usize = 8192;
pub const MAX_WRITE: u32 = 4096;

/// `struct fuse_in_header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// One request: its header and its body (the bytes after the header).
pub fn parse_request(b: &[u8]) -> Option<(InHeader, &[u8])> {
    let h = InHeader {
        len: u32_at(b, 0)?,
        opcode: u32_at(b, 4)?,
        unique: u64_at(b, 8)?,
        nodeid: u64_at(b, 16)?,
        uid: u32_at(b, 24)?,
        gid: u32_at(b, 28)?,
        pid: u32_at(b, 32)?,
    };
    let len = h.len as usize;
    if len < IN_HEADER_LEN || len > b.len() {
        return None;
    }
    Some((h, &b[IN_HEADER_LEN..len]))
}

/// `fuse_init_in`: the kernel's major, minor and flags.
pub fn parse_init(body: &[u8]) -> Option<(u32, u32, u32, u32)> {
    Some((
        u32_at(body, 0)?,
        u32_at(body, 4)?,
        u32_at(body, 8)?,
        u32_at(body, 12)?,
    ))
}

/// `fuse_read_in`: (fh, offset, size).
pub fn parse_read(body: &[u8]) -> Option<(u64, u64, u32)> {
    Some((u64_at(body, 0)?, u64_at(body, 8)?, u32_at(body, 16)?))
}

/// `fuse_open_in.flags`.
pub fn parse_open(body: &[u8]) -> Option<u32> {
    u32_at(body, 0)
}

/// `fuse_release_in.fh`.
pub fn parse_release(body: &[u8]) -> Option<u64> {
    u64_at(body, 0)
}

/// `fuse_forget_in.nlookup`.
pub fn parse_forget(body: &[u8]) -> Option<u64> {
    u64_at(body, 0)
}

/// `fuse_batch_forget_in` and its `fuse_forget_one`s: (nodeid, nlookup) pairs.
pub fn parse_batch_forget(body: &[u8]) -> Vec<(u64, u64)> {
    let count = u32_at(body, 0).unwrap_or(0) as usize;
    (0..count)
        .map_while(|i| Some((u64_at(body, 8 + i * 16)?, u64_at(body, 16 + i * 16)?)))
        .collect()
}

/// A NUL-terminated name (LOOKUP).
pub fn parse_name(body: &[u8]) -> Option<&str> {
    let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
    std::str::from_utf8(&body[..end]).ok()
}

/// File attributes as the wire carries them (`struct fuse_attr`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireAttr {
    pub ino: u64,
    pub size: u64,
    /// Seconds and nanoseconds since the epoch (atime, mtime and ctime alike).
    pub time: (u64, u32),
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;

/// Builds replies into one buffer.
#[derive(Default)]
pub struct Reply {
    pub buf: Vec<u8>,
}

impl Reply {
    fn header(&mut self, unique: u64, error: i32) {
        self.buf.clear();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&error.to_ne_bytes());
        self.buf.extend_from_slice(&unique.to_ne_bytes());
    }

    fn finish(&mut self) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        &self.buf
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_ne_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_ne_bytes());
    }

    fn attr(&mut self, a: &WireAttr) {
        self.u64(a.ino);
        self.u64(a.size);
        self.u64(a.size.div_ceil(512));
        for _ in 0..3 {
            self.u64(a.time.0);
        }
        for _ in 0..3 {
            self.u32(a.time.1);
        }
        self.u32(a.mode);
        self.u32(a.nlink);
        self.u32(a.uid);
        self.u32(a.gid);
        self.u32(0); // rdev
        self.u32(4096); // blksize
        self.u32(0); // flags
    }

    /// An error reply (`errno` positive, as in `libc::ENOENT`).
    pub fn error(&mut self, unique: u64, errno: i32) -> &[u8] {
        self.header(unique, -errno);
        self.finish()
    }

    /// A reply with no body (RELEASE, RELEASEDIR, ACCESS).
    pub fn empty(&mut self, unique: u64) -> &[u8] {
        self.header(unique, 0);
        self.finish()
    }

    /// `fuse_init_out`.
    pub fn init(&mut self, unique: u64, minor: u32, max_readahead: u32, flags: u32) -> &[u8] {
        self.header(unique, 0);
        self.u32(KERNEL_VERSION);
        self.u32(minor);
        self.u32(max_readahead);
        self.u32(flags);
        self.buf.extend_from_slice(&16u16.to_ne_bytes()); // max_background
        self.buf.extend_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
        self.u32(MAX_WRITE);
        self.u32(1); // time_gran
        self.buf.extend_from_slice(&[0u8; 4]); // max_pages, map_alignment
        self.u32(0); // flags2
        self.u32(0); // max_stack_depth
        self.buf.extend_from_slice(&[0u8; 24]); // request_timeout, unused[11]
        self.finish()
    }

    /// `fuse_entry_out` (LOOKUP).
    pub fn entry(&mut self, unique: u64, a: &WireAttr, ttl: (u64, u32)) -> &[u8] {
        self.header(unique, 0);
        self.u64(a.ino);
        self.u64(0); // generation
        self.u64(ttl.0);
        self.u64(ttl.0);
        self.u32(ttl.1);
        self.u32(ttl.1);
        self.attr(a);
        self.finish()
    }

    /// `fuse_attr_out` (GETATTR).
    pub fn attr_out(&mut self, unique: u64, a: &WireAttr, ttl: (u64, u32)) -> &[u8] {
        self.header(unique, 0);
        self.u64(ttl.0);
        self.u32(ttl.1);
        self.u32(0);
        self.attr(a);
        self.finish()
    }

    /// `fuse_open_out` (OPEN, OPENDIR).
    pub fn open(&mut self, unique: u64, fh: u64, open_flags: u32) -> &[u8] {
        self.header(unique, 0);
        self.u64(fh);
        self.u32(open_flags);
        self.u32(0);
        self.finish()
    }

    /// Raw bytes (READ).
    pub fn data(&mut self, unique: u64, data: &[u8]) -> &[u8] {
        self.header(unique, 0);
        self.buf.extend_from_slice(data);
        self.finish()
    }

    /// `fuse_statfs_out` for a volume of `files` files and `bytes` bytes.
    pub fn statfs(&mut self, unique: u64, files: u64, bytes: u64) -> &[u8] {
        self.header(unique, 0);
        self.u64(bytes.div_ceil(4096)); // blocks
        self.u64(0); // bfree
        self.u64(0); // bavail
        self.u64(files);
        self.u64(0); // ffree
        self.u32(4096); // bsize
        self.u32(255); // namelen
        self.u32(4096); // frsize
        self.u32(0);
        self.buf.extend_from_slice(&[0u8; 24]); // spare
        self.finish()
    }

    /// READDIR: entries from index `offset` on, as many as fit in `size` bytes. Each entry's
    /// `off` is the index of the next one.
    pub fn dirents<'a>(
        &mut self,
        unique: u64,
        offset: u64,
        size: u32,
        entries: impl Iterator<Item = (u64, bool, &'a str)>,
    ) -> &[u8] {
        self.header(unique, 0);
        let limit = OUT_HEADER_LEN + size as usize;
        for (i, (ino, dir, name)) in entries.enumerate().skip(offset as usize) {
            let rec = (24 + name.len()).next_multiple_of(8);
            if self.buf.len() + rec > limit {
                break;
            }
            self.u64(ino);
            self.u64(i as u64 + 1);
            self.u32(name.len() as u32);
            self.u32(if dir { 4 } else { 8 }); // DT_DIR, DT_REG
            self.buf.extend_from_slice(name.as_bytes());
            let pad = rec - 24 - name.len();
            self.buf.extend_from_slice(&[0u8; 8][..pad]);
        }
        self.finish()
    }

    /// `FUSE_NOTIFY_INVAL_ENTRY`: the kernel forgets `name` in directory `parent`.
    pub fn inval_entry(&mut self, parent: u64, name: &str) -> &[u8] {
        self.header(0, notify::INVAL_ENTRY);
        self.u64(parent);
        self.u32(name.len() as u32);
        self.u32(0);
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.finish()
    }

    /// `FUSE_NOTIFY_INVAL_INODE` for `ino`'s attributes and all its cached pages (offset 0,
    /// length 0: to the end).
    pub fn inval_inode(&mut self, ino: u64) -> &[u8] {
        self.header(0, notify::INVAL_INODE);
        self.u64(ino);
        self.u64(0);
        self.u64(0);
        self.finish()
    }

    /// `FUSE_NOTIFY_RESEND` (Linux ≥ 6.9): the kernel queues again every request a previous
    /// server read and did not answer.
    pub fn resend(&mut self) -> &[u8] {
        self.header(0, notify::RESEND);
        self.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((IN_HEADER_LEN + body.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&opcode.to_ne_bytes());
        b.extend_from_slice(&unique.to_ne_bytes());
        b.extend_from_slice(&nodeid.to_ne_bytes());
        for v in [1000u32, 1001, 4242] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&[0u8; 4]);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn requests_decode() {
        let b = request(op::LOOKUP, 7, 1, b"password\0");
        let (h, body) = parse_request(&b).unwrap();
        assert_eq!(
            h,
            InHeader {
                len: 49,
                opcode: op::LOOKUP,
                unique: 7,
                nodeid: 1,
                uid: 1000,
                gid: 1001,
                pid: 4242
            }
        );
        assert_eq!(parse_name(body), Some("password"));
        // A length beyond the bytes read, or shorter than a header, is refused.
        let mut bad = b.clone();
        bad[..4].copy_from_slice(&200u32.to_ne_bytes());
        assert!(parse_request(&bad).is_none());
        assert!(parse_request(&b[..30]).is_none());
        let mut body = Vec::new();
        body.extend_from_slice(&2u32.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for (n, c) in [(5u64, 1u64), (6, 3)] {
            body.extend_from_slice(&n.to_ne_bytes());
            body.extend_from_slice(&c.to_ne_bytes());
        }
        assert_eq!(parse_batch_forget(&body), vec![(5, 1), (6, 3)]);
        assert_eq!(parse_batch_forget(&body[..24]), vec![(5, 1)]);
    }

    #[test]
    fn replies_have_the_kernel_layouts() {
        let mut r = Reply::default();
        assert_eq!(r.error(9, libc::ENOENT).len(), OUT_HEADER_LEN);
        assert_eq!(
            i32::from_ne_bytes(r.buf[4..8].try_into().unwrap()),
            -libc::ENOENT
        );
        let a = WireAttr {
            ino: 2,
            size: 5,
            mode: S_IFREG | 0o440,
            nlink: 1,
            ..Default::default()
        };
        // fuse_entry_out is 128 bytes, fuse_attr_out 104, fuse_open_out 16, fuse_init_out 64,
        // fuse_statfs_out 80.
        assert_eq!(r.entry(1, &a, (1, 0)).len(), OUT_HEADER_LEN + 128);
        assert_eq!(r.attr_out(1, &a, (1, 0)).len(), OUT_HEADER_LEN + 104);
        assert_eq!(r.open(1, 3, FOPEN_KEEP_CACHE).len(), OUT_HEADER_LEN + 16);
        assert_eq!(r.init(1, 31, 0, 0).len(), OUT_HEADER_LEN + 64);
        assert_eq!(r.statfs(1, 1, 1).len(), OUT_HEADER_LEN + 80);
        let names = [(1u64, true, "."), (2, false, "password")];
        let len = r.dirents(1, 0, 4096, names.iter().copied()).len();
        assert_eq!(len, OUT_HEADER_LEN + 32 + 32);
        // Resuming at index 1, and a buffer too small for the second entry.
        assert_eq!(
            r.dirents(1, 1, 4096, names.iter().copied()).len(),
            OUT_HEADER_LEN + 32
        );
        assert_eq!(
            r.dirents(1, 0, 40, names.iter().copied()).len(),
            OUT_HEADER_LEN + 32
        );
        assert_eq!(r.inval_entry(1, "password").len(), OUT_HEADER_LEN + 16 + 9);
        assert_eq!(r.resend().len(), OUT_HEADER_LEN);
        assert_eq!(
            i32::from_ne_bytes(r.buf[4..8].try_into().unwrap()),
            notify::RESEND
        );
    }
}
