//! The body's way out: queued for Python as "data" events until forward(), then written by this
//! thread to the client socket, and the exchange's last word ("end", "error" or "forwarded").
//!
//! While forwarding an SSE body, the `[DONE]` event that ends it is held back, not written: a client
//! that closes as soon as it reads `[DONE]` (the openai SDK's stream iterator stops there) could
//! otherwise close before the server writes the stream's end, and a whole answer would be counted
//! as the client's 499. Python writes it with the end, in one write (`Event::Forwarded`'s tail).

use std::borrow::Cow;
use std::io::ErrorKind;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::shared::{Event, Shared, Target, QUEUE_LIMIT};
use crate::sys;

pub enum Outcome {
    End,
    Error(&'static str, String),
    Cancelled,
    ClientGone,
    ClientStalled,
}

/// A failure of the engine side (`read`, `timeout`, `too_large`, `connect`), with what the client is told.
pub fn err(kind: &'static str, message: impl Into<String>) -> Outcome {
    Outcome::Error(kind, message.into())
}

/// The engine sent nothing for the idle timeout (either thread's wait for it).
pub fn engine_silent(idle: Duration) -> Outcome {
    err("timeout", format!("no data from the engine for {} s", idle.as_secs_f64()))
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::End => "end",
            Outcome::Error(kind, _) => kind,
            Outcome::Cancelled => "cancelled",
            Outcome::ClientGone => "client_gone",
            Outcome::ClientStalled => "client_stalled",
        }
    }
}

/// The event that ends an OpenAI stream as engines write it: `data:`, an optional space, `[DONE]`
/// and a blank line, with LF or CRLF line ends (router/protocol.py's `split_done` knows the same).
const DONE_EVENTS: [&[u8]; 4] =
    [b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n", b"data:[DONE]\n\n", b"data:[DONE]\r\n\r\n"];

/// Where a `[DONE]` event that ends `buf` starts, when it starts a line.
fn done_event_at(buf: &[u8]) -> Option<usize> {
    DONE_EVENTS.iter().find_map(|event| {
        let at = buf.len().checked_sub(event.len())?;
        (buf.ends_with(event) && (at == 0 || buf[at - 1] == b'\n')).then_some(at)
    })
}

/// What of `bytes` to write now: a `[DONE]` event that ends them is held back in `done`, and one
/// held before goes first (body after a `[DONE]` is rare, and nothing is reordered or lost).
pub fn release<'b>(done: &mut Vec<u8>, bytes: &'b [u8]) -> Cow<'b, [u8]> {
    let held = std::mem::take(done);
    let joined: Cow<[u8]> =
        if held.is_empty() { Cow::Borrowed(bytes) } else { Cow::Owned([held.as_slice(), bytes].concat()) };
    let at = done_event_at(&joined).unwrap_or(joined.len());
    *done = joined[at..].to_vec();
    match joined {
        Cow::Borrowed(all) => Cow::Borrowed(&all[..at]),
        Cow::Owned(mut all) => {
            all.truncate(at);
            Cow::Owned(all)
        }
    }
}

/// Appends `bytes` to `out` as the client gets them: one HTTP chunk when `chunked`. Nothing for no
/// bytes: an empty chunk would end the client's body.
pub fn frame_into(out: &mut Vec<u8>, chunked: bool, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if chunked {
        out.extend_from_slice(format!("{:x}\r\n", bytes.len()).as_bytes());
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(bytes);
    }
}

/// A forwarding exchange's writing state, handed from its thread to the forwarding thread.
pub struct Handover {
    pub target: Target,
    pub nbytes: u64,
    pub hold_done: bool,
    pub done: Vec<u8>,
}

pub struct Fwd<'a> {
    sh: &'a Shared,
    target: Option<Target>,
    nbytes: u64,
    idle: Duration,
    frame: Vec<u8>,
    /// Hold back a `[DONE]` event: only where the body comes in whole SSE events (the worker's
    /// framing, max_event > 0), so one is always whole at the end of a write, never split over two.
    hold_done: bool,
    /// The `[DONE]` event that ended the bytes written so far, not written yet: more body writes it
    /// first (nothing reordered, nothing lost); the body's end hands it to Python (see finish).
    done: Vec<u8>,
}

impl<'a> Fwd<'a> {
    pub fn new(sh: &'a Shared, idle: Duration, hold_done: bool) -> Self {
        Fwd { sh, target: None, nbytes: 0, idle, frame: Vec::new(), hold_done, done: Vec::new() }
    }

    /// The client socket while forwarding, else -1 (which poll(2) skips).
    pub fn client_fd(&self) -> RawFd {
        self.target.map_or(-1, |t| t.fd)
    }

    /// After a ctl signal: stop when cancelled; start writing when Python asked to forward.
    pub fn check(&mut self) -> Result<(), Outcome> {
        let backlog = {
            let mut st = self.sh.lock();
            if st.cancelled {
                return Err(Outcome::Cancelled);
            }
            match (self.target, st.forward) {
                (None, Some(target)) => {
                    self.target = Some(target);
                    std::mem::take(&mut st.backlog)
                }
                _ => return Ok(()),
            }
        };
        backlog.iter().try_for_each(|bytes| self.write(bytes))
    }

    /// Hands decoded body bytes on: to Python, or to the client once forwarding.
    pub fn deliver(&mut self, bytes: &[u8]) -> Result<(), Outcome> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.target.is_none() {
            let mut st = self.sh.lock();
            if st.forward.is_none() {
                self.sh.push(&mut st, Event::Data(bytes.to_vec()));
                drop(st);
                return self.wait_for_room();
            }
            drop(st);
            self.check()?;
        }
        self.write(bytes)
    }

    /// While Python holds more than QUEUE_LIMIT unpolled bytes, waits (not reading the engine) until
    /// it polls, forwards or cancels. Time spent here is not the engine's idle time.
    fn wait_for_room(&mut self) -> Result<(), Outcome> {
        loop {
            {
                let mut st = self.sh.lock();
                if st.cancelled {
                    return Err(Outcome::Cancelled);
                }
                if st.queued <= QUEUE_LIMIT || st.forward.is_some() {
                    break;
                }
                st.waiting_room = true;
            }
            let mut fds = [sys::pollfd(self.sh.ctl, libc::POLLIN)];
            let _ = sys::poll(&mut fds, -1);
            sys::drain(self.sh.ctl);
        }
        self.check() // a forward() that ended the wait starts here
    }

    /// Writes body bytes to the client, but for a `[DONE]` event that ends them, which is held.
    fn write(&mut self, bytes: &[u8]) -> Result<(), Outcome> {
        if !self.hold_done || self.target.is_none() {
            return self.write_chunk(bytes);
        }
        let now = release(&mut self.done, bytes);
        self.write_chunk(&now)
    }

    /// Writes one piece of body to the client, framed as a chunk when asked, waiting while its
    /// socket is full, for at most the idle timeout without progress.
    fn write_chunk(&mut self, bytes: &[u8]) -> Result<(), Outcome> {
        let Some(target) = self.target else { return Ok(()) };
        self.frame.clear();
        frame_into(&mut self.frame, target.chunked, bytes);
        let buf = &self.frame;
        let mut sent = 0;
        let mut deadline = sys::deadline(self.idle);
        while sent < buf.len() {
            match sys::send(target.fd, &buf[sent..]) {
                Ok(n) => {
                    sent += n;
                    deadline = sys::deadline(self.idle);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let mut fds =
                        [sys::pollfd(target.fd, libc::POLLOUT), sys::pollfd(self.sh.ctl, libc::POLLIN)];
                    match sys::poll(&mut fds, sys::millis_until(deadline)) {
                        Ok(0) => return Err(Outcome::ClientStalled),
                        Ok(_) => {}
                        Err(_) => return Err(Outcome::ClientGone),
                    }
                    if fds[1].revents != 0 {
                        sys::drain(self.sh.ctl);
                        if self.sh.lock().cancelled {
                            return Err(Outcome::Cancelled);
                        }
                    }
                }
                Err(_) => return Err(Outcome::ClientGone),
            }
        }
        self.nbytes += bytes.len() as u64;
        Ok(())
    }

    /// Whether the thread writes to the client now (forward() was taken up).
    pub fn forwarding(&self) -> bool {
        self.target.is_some()
    }

    /// What the forwarding thread goes on with: the client, the body bytes written so far, and the
    /// held `[DONE]`. Only while forwarding; this `Fwd` is spent (its exchange no longer finishes here).
    pub fn hand_over(self) -> Option<Handover> {
        let target = self.target?;
        Some(Handover { target, nbytes: self.nbytes, hold_done: self.hold_done, done: self.done })
    }

    /// The exchange's last word. Without forward() the thread then waits for forward() or cancel():
    /// Python may still hold body bytes it polled, and forward them after the engine's end.
    pub fn finish(mut self, mut outcome: Outcome) {
        let mut reported = false;
        loop {
            if self.target.is_some() {
                forwarded(self.sh, self.nbytes, &outcome, &mut self.done);
                break;
            }
            let mut st = self.sh.lock();
            if st.cancelled || matches!(outcome, Outcome::Cancelled) {
                if st.forward.is_some() {
                    // forward() came with the cancel, before this thread took the socket: Python
                    // awaits the forward's last word all the same (without it, forever)
                    close_client(&mut st);
                    let event =
                        Event::Forwarded { nbytes: 0, outcome: Outcome::Cancelled.name(), tail: Vec::new() };
                    self.sh.push(&mut st, event);
                }
                break;
            }
            if st.forward.is_some() {
                drop(st);
                if let Err(late) = self.check() {
                    outcome = late;
                }
                continue;
            }
            if !reported {
                reported = true;
                let event = match &outcome {
                    Outcome::Error(kind, message) => Event::Error { kind, message: message.clone() },
                    _ => Event::End,
                };
                self.sh.push(&mut st, event);
            }
            drop(st);
            let mut fds = [sys::pollfd(self.sh.ctl, libc::POLLIN)];
            let _ = sys::poll(&mut fds, -1);
            sys::drain(self.sh.ctl);
        }
        let mut st = self.sh.lock();
        st.exited = true;
        close_client(&mut st);
    }
}

/// A forward's last word: the client's descriptor closed, then `forwarded` with the body bytes
/// written and the held `[DONE]` event for Python to write. At the body's end Python writes it and
/// the stream's end in one write. After the engine failed (read, timeout, too_large) Python writes it
/// before its error event: the client gets what the Python relay would have sent (it holds `[DONE]`
/// the same way). A client gone or stalled has nothing more written to it, and a cancel means the
/// socket is no longer this forward's: then it is dropped.
pub fn forwarded(sh: &Shared, nbytes: u64, outcome: &Outcome, done: &mut Vec<u8>) {
    let tail = match outcome {
        Outcome::End | Outcome::Error(..) => std::mem::take(done),
        Outcome::Cancelled | Outcome::ClientGone | Outcome::ClientStalled => Vec::new(),
    };
    let mut st = sh.lock();
    close_client(&mut st); // before the event: Python may act on the socket at once
    sh.push(&mut st, Event::Forwarded { nbytes, outcome: outcome.name(), tail });
    st.exited = true;
}

/// Closes this thread's duplicate of the client socket (forward() dups it: the server may close its
/// own descriptor meanwhile, and a number reused by another connection must never be written to).
pub fn close_client(st: &mut crate::shared::State) {
    if let Some(target) = st.forward.take() {
        sys::close(target.fd);
    }
}
