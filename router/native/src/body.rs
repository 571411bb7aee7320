//! An engine's body as the client gets it: read from the engine socket, decoded (chunked framing
//! removed), bounded (`max_bytes` in all, `max_event` per SSE event) and cut at whole SSE events.
//! The exchange's thread reads with it before forward() (worker.rs), the forwarding thread after
//! (forward.rs): one reader, so both say the same things at the same bytes.

use std::io::ErrorKind;
use std::os::fd::RawFd;

use crate::http::Decoder;
use crate::relay::{err, Outcome};
use crate::sys;

const READ_BUF: usize = 64 * 1024;

/// Passes on whole SSE events only (up to a blank line, ``\n\n``) and holds a partial one, at most
/// ``max`` bytes, until its end arrives, as the Python relay's SSEFramer does: an error event that
/// follows a break-off then starts on a line of its own, never glued to half an event.
struct Framer {
    held: Vec<u8>,
    max: u64,
}

impl Framer {
    /// Appends to ``out`` the events ``data`` completes; Err when the held part passes ``max``.
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
        let joined = self.held.last() == Some(&b'\n') && data.first() == Some(&b'\n');
        let cut = data.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
        match cut.or(if joined { Some(1) } else { None }) {
            Some(at) => {
                out.append(&mut self.held);
                out.extend_from_slice(&data[..at]);
                self.held.extend_from_slice(&data[at..]);
            }
            None => self.held.extend_from_slice(data),
        }
        if self.held.len() as u64 > self.max {
            Err(())
        } else {
            Ok(())
        }
    }
}

/// What one read or feed gave: bytes for the client (perhaps none), and whether the body ended.
pub enum Got<'a> {
    More(&'a [u8]),
    /// The body's last bytes (what the framer held of an unfinished event too), and whether the
    /// connection may serve another request (not after bytes past the body, nor at a close).
    End(&'a [u8], bool),
    /// Nothing to read now (a non-blocking socket).
    Nothing,
}

/// A thread's buffers for its readers: the read, the decoded bytes and the framed ones. One set per
/// thread, shared by every stream it reads (the forwarding thread holds a thousand streams; a set
/// each would be 64 KB or more a stream, kept for the stream's life).
pub struct Buffers {
    read: Vec<u8>,
    decoded: Vec<u8>,
    framed: Vec<u8>,
}

impl Buffers {
    pub fn new() -> Self {
        Buffers {
            read: vec![0u8; READ_BUF],
            decoded: Vec::with_capacity(READ_BUF),
            framed: Vec::with_capacity(READ_BUF),
        }
    }
}

/// One stream's reading state: the decoder, the framer (and its partial event), the bytes so far.
pub struct BodyReader {
    dec: Decoder,
    framer: Option<Framer>,
    total: u64,
    max_bytes: u64,
}

impl BodyReader {
    /// `max_event` 0: bytes pass untouched, not cut at events.
    pub fn new(dec: Decoder, max_bytes: u64, max_event: u64) -> Self {
        BodyReader {
            dec,
            framer: (max_event > 0).then(|| Framer { held: Vec::new(), max: max_event }),
            total: 0,
            max_bytes,
        }
    }

    /// Whether the body is complete (a body of no bytes is, before any read).
    pub fn done(&self) -> bool {
        self.dec.done()
    }

    /// One read of the engine's socket, as `feed` gives it.
    pub fn read<'b>(&mut self, fd: RawFd, bufs: &'b mut Buffers) -> Result<Got<'b>, Outcome> {
        let n = match sys::recv(fd, &mut bufs.read) {
            Ok(0) if self.dec.ends_at_close() => {
                bufs.framed.clear();
                self.take_held(&mut bufs.framed);
                return Ok(Got::End(&bufs.framed, false));
            }
            Ok(0) => return Err(err("read", "the engine closed the connection mid-body")),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(Got::Nothing),
            Err(e) => return Err(err("read", e.to_string())),
        };
        let Buffers { read, decoded, framed } = bufs;
        let ended = self.decode(&read[..n], decoded, framed)?;
        Ok(self.got(ended, framed))
    }

    /// Bytes of the body read with the head.
    pub fn feed<'b>(&mut self, input: &[u8], bufs: &'b mut Buffers) -> Result<Got<'b>, Outcome> {
        let ended = self.decode(input, &mut bufs.decoded, &mut bufs.framed)?;
        Ok(self.got(ended, &mut bufs.framed))
    }

    /// Decodes, bounds and frames `input` into `framed`; whether the body ended, and how.
    fn decode(
        &mut self,
        input: &[u8],
        decoded: &mut Vec<u8>,
        framed: &mut Vec<u8>,
    ) -> Result<Option<bool>, Outcome> {
        decoded.clear();
        let extra =
            self.dec.feed(input, decoded).map_err(|e| err("read", format!("a bad chunked body: {e}")))?;
        self.total += decoded.len() as u64;
        if self.total > self.max_bytes {
            return Err(err("too_large", format!("the response is over {} bytes", self.max_bytes)));
        }
        framed.clear();
        match self.framer.as_mut() {
            None => std::mem::swap(framed, decoded),
            Some(f) => {
                if f.feed(decoded, framed).is_err() {
                    let message = format!("an event of the engine's stream is larger than {} bytes", f.max);
                    return Err(err("too_large", message));
                }
            }
        }
        Ok(if extra > 0 {
            Some(false) // bytes past the body: never reuse such a connection
        } else if self.dec.done() {
            Some(true)
        } else {
            None
        })
    }

    fn got<'b>(&mut self, ended: Option<bool>, framed: &'b mut Vec<u8>) -> Got<'b> {
        match ended {
            None => Got::More(framed),
            Some(reusable) => {
                self.take_held(framed);
                Got::End(framed, reusable)
            }
        }
    }

    /// At a clean end, what the framer holds of an unfinished event goes too (as SSEFramer.flush).
    fn take_held(&mut self, framed: &mut Vec<u8>) {
        if let Some(f) = self.framer.as_mut() {
            framed.append(&mut f.held);
        }
    }
}
