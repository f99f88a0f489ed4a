//! Accepts any HTTP/2 `:authority` on a unix socket.
//!
//! gRPC clients put whatever names the socket into `:authority`: grpc-core (grpc-python, and
//! the C++ and Ruby clients) sends the percent-encoded path (`%2Fcsi%2Fcsi.sock`), grpc-go does
//! the same for a passthrough target with a custom dialer, which is how kubelet dials CSI
//! drivers. The `h2` crate under tonic rejects such a value as a malformed URI authority and
//! resets the stream (PROTOCOL_ERROR), so those clients could not call keybroker at all. On a
//! unix socket the authority names nothing that matters, so this adapter sits between the
//! socket and the HTTP/2 server and rewrites it.
//!
//! What it does to the client's byte stream: the connection preface and every frame except
//! HEADERS and CONTINUATION pass through untouched. Each header block (HEADERS plus its
//! CONTINUATION frames) is decoded with the client's HPACK state and re-encoded as literals
//! that never touch the dynamic table, with an `:authority` the server would refuse replaced
//! by `localhost`. Re-encoding every block (not only the ones that need it) keeps the server's
//! HPACK table empty and so always consistent. Bytes from the server to the client are not
//! touched.
//!
//! Bounds: a header block is buffered up to [`MAX_BLOCK_BYTES`] compressed and
//! [`MAX_DECODED_BYTES`] decoded; beyond either the connection is closed, as the server would
//! close it for an oversized header list.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest header block (all its frames' fragments) accepted from a client, compressed.
pub const MAX_BLOCK_BYTES: usize = 64 * 1024;
/// Largest header list accepted from a client, decoded (names and values).
pub const MAX_DECODED_BYTES: usize = 256 * 1024;
/// The HPACK dynamic table size the server advertises (HTTP/2's default; tonic keeps it).
const HPACK_TABLE_BYTES: usize = 4096;
/// Frames written to the server are no larger than HTTP/2's minimum SETTINGS_MAX_FRAME_SIZE,
/// which every server accepts.
const MAX_FRAME_BYTES: usize = 16_384;

const PREFACE_BYTES: usize = 24;
const FRAME_HEAD_BYTES: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// What replaces an `:authority` the server would refuse.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// A client connection whose `:authority` values are made acceptable (see the module docs).
pub struct AuthorityRepair<S> {
    inner: S,
    rewriter: Rewriter,
    chunk: Box<[u8]>,
    eof: bool,
}

impl<S> AuthorityRepair<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            chunk: vec![0; MAX_FRAME_BYTES].into_boxed_slice(),
            eof: false,
        }
    }

    /// How many `:authority` values this connection had replaced so far.
    pub fn replaced(&self) -> u64 {
        self.rewriter.replaced
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityRepair<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let out = &mut this.rewriter.out;
            if !out.is_empty() {
                let n = out.len().min(buf.remaining());
                buf.put_slice(&out[..n]);
                out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // A frame cut short by the client stays cut short: the server sees EOF.
                this.eof = true;
                continue;
            }
            this.rewriter.push(read.filled())?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityRepair<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityRepair<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Bytes of the client connection preface still to pass.
    Preface(usize),
    /// Waiting for a 9-byte frame header.
    FrameHead,
    /// Bytes of a frame that passes unchanged, still to pass.
    Pass(usize),
    /// A HEADERS or CONTINUATION frame with this payload length, being buffered.
    Headers {
        len: usize,
        kind: u8,
        flags: u8,
        stream: u32,
    },
}

/// A header block whose END_HEADERS has not arrived yet.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The protocol logic, free of I/O: bytes from the client in, bytes for the server out.
struct Rewriter {
    state: State,
    input: BytesMut,
    out: BytesMut,
    open: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
    replaced: u64,
}

fn refused(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_BYTES);
        Self {
            state: State::Preface(PREFACE_BYTES),
            input: BytesMut::new(),
            out: BytesMut::new(),
            open: None,
            decoder,
            replaced: 0,
        }
    }

    /// Takes bytes from the client; what is ready for the server is appended to `out`.
    fn push(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.input.extend_from_slice(bytes);
        loop {
            match self.state {
                State::Preface(left) | State::Pass(left) => {
                    let n = left.min(self.input.len());
                    if n == 0 && left > 0 {
                        return Ok(());
                    }
                    self.out.extend_from_slice(&self.input.split_to(n));
                    self.state = match self.state {
                        State::Preface(_) if n < left => State::Preface(left - n),
                        State::Pass(_) if n < left => State::Pass(left - n),
                        _ => State::FrameHead,
                    };
                }
                State::FrameHead => {
                    if self.input.len() < FRAME_HEAD_BYTES {
                        return Ok(());
                    }
                    let h = &self.input[..FRAME_HEAD_BYTES];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
                        if len > MAX_BLOCK_BYTES {
                            return Err(refused("HTTP/2 header frame larger than 64 KiB"));
                        }
                        self.state = State::Headers {
                            len,
                            kind,
                            flags,
                            stream,
                        };
                    } else {
                        if self.open.is_some() {
                            return Err(refused(
                                "HTTP/2 header block interrupted by another frame",
                            ));
                        }
                        self.out
                            .extend_from_slice(&self.input.split_to(FRAME_HEAD_BYTES));
                        self.state = State::Pass(len);
                    }
                }
                State::Headers {
                    len,
                    kind,
                    flags,
                    stream,
                } => {
                    if self.input.len() < FRAME_HEAD_BYTES + len {
                        return Ok(());
                    }
                    let frame = self.input.split_to(FRAME_HEAD_BYTES + len);
                    self.header_frame(kind, flags, stream, &frame[FRAME_HEAD_BYTES..])?;
                    self.state = State::FrameHead;
                }
            }
        }
    }

    fn header_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> io::Result<()> {
        if kind == TYPE_HEADERS {
            if self.open.is_some() {
                return Err(refused("HTTP/2 HEADERS while a header block is open"));
            }
            let mut p = payload;
            let mut pad = 0;
            if flags & FLAG_PADDED != 0 {
                let (&n, rest) = p
                    .split_first()
                    .ok_or_else(|| refused("HTTP/2 HEADERS padding"))?;
                pad = usize::from(n);
                p = rest;
            }
            let priority = if flags & FLAG_PRIORITY != 0 {
                let (head, rest) = p
                    .split_first_chunk::<5>()
                    .ok_or_else(|| refused("HTTP/2 HEADERS priority"))?;
                p = rest;
                Some(*head)
            } else {
                None
            };
            if pad > p.len() {
                return Err(refused("HTTP/2 HEADERS padding longer than the frame"));
            }
            self.open = Some(OpenBlock {
                stream,
                end_stream: flags & FLAG_END_STREAM != 0,
                priority,
                fragment: p[..p.len() - pad].to_vec(),
            });
        } else {
            let open = self
                .open
                .as_mut()
                .filter(|o| o.stream == stream)
                .ok_or_else(|| refused("HTTP/2 CONTINUATION without its HEADERS"))?;
            if open.fragment.len() + payload.len() > MAX_BLOCK_BYTES {
                return Err(refused("HTTP/2 header block larger than 64 KiB"));
            }
            open.fragment.extend_from_slice(payload);
        }
        if flags & FLAG_END_HEADERS != 0 {
            let block = self.open.take().expect("a header block is open");
            self.reencode(block)?;
        }
        Ok(())
    }

    fn reencode(&mut self, block: OpenBlock) -> io::Result<()> {
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        let mut decoded = 0usize;
        let mut replaced = 0u64;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded += name.len() + value.len();
                if decoded > MAX_DECODED_BYTES {
                    return;
                }
                let value: &[u8] = if &*name == b":authority" && !acceptable_authority(&value) {
                    replaced += 1;
                    REPLACEMENT_AUTHORITY
                } else {
                    &value
                };
                encode_literal(&mut encoded, &name, value);
            })
            .map_err(|e| refused(format!("HTTP/2 header block does not decode: {e}")))?;
        if decoded > MAX_DECODED_BYTES {
            return Err(refused("HTTP/2 header list larger than 256 KiB"));
        }
        self.replaced += replaced;

        let prio_len = if block.priority.is_some() { 5 } else { 0 };
        let first_len = encoded.len().min(MAX_FRAME_BYTES - prio_len);
        let (first, rest) = encoded.split_at(first_len);
        let mut flags = 0;
        if block.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if block.priority.is_some() {
            flags |= FLAG_PRIORITY;
        }
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        self.frame_head(prio_len + first.len(), TYPE_HEADERS, flags, block.stream);
        if let Some(p) = block.priority {
            self.out.extend_from_slice(&p);
        }
        self.out.extend_from_slice(first);
        let mut chunks = rest.chunks(MAX_FRAME_BYTES).peekable();
        while let Some(chunk) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                FLAG_END_HEADERS
            } else {
                0
            };
            self.frame_head(chunk.len(), TYPE_CONTINUATION, flags, block.stream);
            self.out.extend_from_slice(chunk);
        }
        Ok(())
    }

    fn frame_head(&mut self, len: usize, kind: u8, flags: u8, stream: u32) {
        debug_assert!(len <= MAX_FRAME_BYTES);
        self.out.put_uint(len as u64, 3);
        self.out.put_u8(kind);
        self.out.put_u8(flags);
        self.out.put_u32(stream);
    }
}

/// Whether the HTTP/2 server would take this `:authority` (the `http` crate's URI rules).
fn acceptable_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field without indexing, new name", both strings raw (RFC 7541 6.2.2).
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0);
    encode_string(out, name);
    encode_string(out, value);
}

/// An HPACK string literal without Huffman coding: a 7-bit-prefix length, then the bytes.
fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 0x7f {
        out.push(n as u8);
    } else {
        out.push(0x7f);
        n -= 0x7f;
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Splits the rewritten stream back into frames: (type, flags, stream, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&b[..PREFACE.len()], PREFACE);
        b = &b[PREFACE.len()..];
        let mut v = Vec::new();
        while !b.is_empty() {
            let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            v.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        v
    }

    fn request_headers(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/csi.v1.Identity/GetPluginInfo"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    /// Runs `input` through a rewriter, `step` bytes at a time.
    fn rewrite(input: &[u8], step: usize) -> io::Result<Vec<u8>> {
        let mut r = Rewriter::new();
        for piece in input.chunks(step) {
            r.push(piece)?;
        }
        Ok(r.out.to_vec())
    }

    fn decode_all(frames: &[(u8, u8, u32, Vec<u8>)]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut d = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut cur = Vec::new();
        for (kind, flags, _, payload) in frames {
            if *kind != TYPE_HEADERS && *kind != TYPE_CONTINUATION {
                continue;
            }
            let p = if *kind == TYPE_HEADERS && flags & FLAG_PRIORITY != 0 {
                &payload[5..]
            } else {
                &payload[..]
            };
            cur.extend_from_slice(p);
            if flags & FLAG_END_HEADERS != 0 {
                blocks.push(d.decode(&cur).unwrap());
                cur.clear();
            }
        }
        blocks
    }

    #[test]
    fn percent_encoded_authority_is_replaced_and_the_rest_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let first = request_headers("%2Fcsi%2Fcsi.sock");
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS, passes through
        let block = enc.encode(first.iter().map(|(n, v)| (&n[..], &v[..])));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
        // The second request leans on the client's dynamic table (the encoder indexes).
        let block = enc.encode(first.iter().map(|(n, v)| (&n[..], &v[..])));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block));
        for step in [1, 7, 4096] {
            let out = rewrite(&input, step).unwrap();
            let fr = frames(&out);
            assert_eq!(fr[0].0, 0x4);
            assert_eq!(
                (fr[2].0, fr[2].1, fr[2].3.clone()),
                (0x0, FLAG_END_STREAM, vec![0; 5])
            );
            let blocks = decode_all(&fr);
            assert_eq!(blocks.len(), 2);
            for b in blocks {
                assert_eq!(b, request_headers("localhost"));
            }
        }
    }

    #[test]
    fn an_acceptable_authority_is_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let h = request_headers("localhost:50051");
        let mut input = PREFACE.to_vec();
        let block = enc.encode(h.iter().map(|(n, v)| (&n[..], &v[..])));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &block,
        ));
        let out = rewrite(&input, 3).unwrap();
        let fr = frames(&out);
        assert_eq!(fr[0].1, FLAG_END_HEADERS | FLAG_END_STREAM);
        assert_eq!(decode_all(&fr), vec![h]);
    }

    #[test]
    fn padding_priority_and_continuations_are_handled() {
        let mut enc = loona_hpack::Encoder::new();
        let mut h = request_headers("%2Ftmp%2Fx.sock");
        // A header list bigger than one frame, so the output needs CONTINUATIONs too.
        h.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let block = enc.encode(h.iter().map(|(n, v)| (&n[..], &v[..])));
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 0, 16]); // exclusive dependency, weight
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            5,
            &payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, 0, 5, b));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, c));
        let out = rewrite(&input, 1000).unwrap();
        let fr = frames(&out);
        assert!(fr.len() >= 3, "a 40 KB list takes several frames");
        assert_eq!(fr[0].0, TYPE_HEADERS);
        assert_eq!(fr[0].1, FLAG_PRIORITY | FLAG_END_STREAM);
        assert_eq!(&fr[0].3[..5], &[0x80, 0, 0, 0, 16]);
        assert!(fr.iter().all(|f| f.3.len() <= MAX_FRAME_BYTES && f.2 == 5));
        assert_eq!(fr.last().unwrap().1, FLAG_END_HEADERS);
        let mut want = h.clone();
        want[3].1 = b"localhost".to_vec();
        assert_eq!(decode_all(&fr), vec![want]);
    }

    #[test]
    fn broken_or_oversized_blocks_close_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82]));
        assert!(
            rewrite(&input, 100).is_err(),
            "CONTINUATION without HEADERS"
        );

        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, &[]));
        assert!(rewrite(&input, 100).is_err(), "DATA inside a header block");

        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0x7f],
        ));
        assert!(rewrite(&input, 100).is_err(), "index out of the table");

        // One 4 KiB table entry referenced over and over: tiny on the wire, huge decoded.
        let mut block = vec![0x40];
        encode_string(&mut block, b"x-a");
        encode_string(&mut block, &[b'v'; 4000]);
        block.extend(std::iter::repeat_n(0xbe, 200)); // indexed: dynamic entry 62
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let e = rewrite(&input, 100_000).unwrap_err();
        assert!(e.to_string().contains("256 KiB"), "{e}");
    }

    #[test]
    fn long_strings_use_multi_byte_lengths() {
        for n in [0usize, 1, 126, 127, 128, 255, 16_383, 16_384, 100_000] {
            let mut block = Vec::new();
            encode_literal(&mut block, b"x-n", &vec![b'z'; n]);
            let got = loona_hpack::Decoder::new().decode(&block).unwrap();
            assert_eq!(got, vec![(b"x-n".to_vec(), vec![b'z'; n])]);
        }
    }
}
