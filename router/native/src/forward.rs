//! One thread per process forwards every body once Python called forward(): an epoll loop over the
//! engines' sockets, the clients' sockets and each exchange's `ctl` eventfd. An exchange's own thread
//! used to go on forwarding, and paid a wake-up, a poll(2) set-up and two context switches for every
//! event; a vLLM decode step feeds a whole batch of streams at once, and here that wakes one thread
//! once (bench-results/router, "One forwarding thread").
//!
//! Nothing here blocks. A client that takes no more keeps its bytes as pending pieces, and its engine
//! socket is not read meanwhile (TCP pushes back on the engine, as the blocked thread did); the idle
//! timeout bounds both waits: for the engine (`timeout`) and for the client (`client_stalled`).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::body::{BodyReader, Buffers, Got};
use crate::relay::{engine_silent, forwarded, frame_into, release, Handover, Outcome};
use crate::shared::Shared;
use crate::sys;
use crate::worker::{Config, Rest, Upstream};

/// epoll tokens: the inbox's eventfd, else a stream's id shifted left by two, or'ed with which fd
const WAKE: u64 = u64::MAX;
const UPSTREAM: u64 = 0;
const CTL: u64 = 1;
const CLIENT: u64 = 2;

/// Body bytes framed for the client and not yet sent, and how many body bytes they carry.
struct Piece {
    bytes: Vec<u8>,
    body: u64,
}

/// What waits to go to the client, and the client's side of the exchange.
struct Outbox {
    hand: Handover,
    pieces: VecDeque<Piece>,
    /// bytes of the front piece already sent
    at: usize,
    idle: Duration,
    /// the engine's idle time runs out here, or the client's while pieces wait
    deadline: Instant,
}

/// One forwarded exchange.
struct Live {
    sh: Arc<Shared>,
    upstream: Upstream,
    reader: BodyReader,
    out: Outbox,
    /// the body ended (or failed) with this outcome, and the connection may serve again; the pieces
    /// still go out first
    end: Option<(Outcome, bool)>,
    /// the engine socket is in the epoll set (it is not while pieces wait)
    reading: bool,
    /// the client socket is watched for room (EPOLLOUT)
    writing: bool,
}

struct Inbox {
    new: Mutex<Vec<Live>>,
    wake: RawFd,
}

static INBOX: OnceLock<Option<Arc<Inbox>>> = OnceLock::new();

/// The forwarding thread's inbox, the thread started on first use; None when it cannot start (then
/// each exchange's thread goes on forwarding its own body, as before).
fn inbox() -> Option<&'static Arc<Inbox>> {
    INBOX.get_or_init(spawn).as_ref()
}

/// `KVSTACK_RELAY_FORWARDING_THREAD=0` keeps each body on its exchange's own thread (the tests of
/// that path, and comparisons of the two).
const SWITCH: &str = "KVSTACK_RELAY_FORWARDING_THREAD";

fn spawn() -> Option<Arc<Inbox>> {
    if std::env::var_os(SWITCH).is_some_and(|v| v == "0") {
        return None;
    }
    // SAFETY: plain system call with a constant flag.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return None;
    }
    let Ok(wake) = sys::eventfd() else {
        sys::close(epfd);
        return None;
    };
    let inbox = Arc::new(Inbox { new: Mutex::new(Vec::new()), wake });
    let theirs = Arc::clone(&inbox);
    let started = std::thread::Builder::new()
        .name("kvstack-forward".into())
        .stack_size(256 * 1024)
        .spawn(move || Forwarder::new(epfd, theirs).run());
    if started.is_err() {
        sys::close(epfd);
        sys::close(wake);
        return None;
    }
    Some(inbox)
}

/// Whether the forwarding thread takes bodies over.
pub fn available() -> bool {
    inbox().is_some()
}

/// Hands a forwarding exchange to the forwarding thread (after `available()` said it runs).
pub fn start(sh: Arc<Shared>, cfg: &Config, rest: Rest, hand: Handover) {
    let Some(inbox) = inbox() else { return };
    let out = Outbox {
        hand,
        pieces: VecDeque::new(),
        at: 0,
        idle: cfg.idle_timeout,
        deadline: sys::deadline(cfg.idle_timeout),
    };
    let live = Live {
        sh,
        upstream: rest.upstream,
        reader: rest.reader,
        out,
        end: None,
        reading: false,
        writing: false,
    };
    inbox.new.lock().unwrap_or_else(|e| e.into_inner()).push(live);
    sys::signal(inbox.wake);
}

struct Forwarder {
    epfd: RawFd,
    inbox: Arc<Inbox>,
    lives: HashMap<u64, Live>,
    next_id: u64,
    bufs: Buffers,
}

impl Forwarder {
    fn new(epfd: RawFd, inbox: Arc<Inbox>) -> Self {
        Forwarder { epfd, inbox, lives: HashMap::new(), next_id: 0, bufs: Buffers::new() }
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: a valid epoll fd and event struct; a failed DEL (fd already gone) changes nothing.
        unsafe { libc::epoll_ctl(self.epfd, op, fd, &mut ev) };
    }

    fn run(mut self) {
        self.ctl(libc::EPOLL_CTL_ADD, self.inbox.wake, libc::EPOLLIN as u32, WAKE);
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let timeout = self.lives.values().map(|l| l.out.deadline).min().map_or(-1, sys::millis_until);
            // SAFETY: events is a valid buffer of its length for the call's duration.
            let n = unsafe { libc::epoll_wait(self.epfd, events.as_mut_ptr(), events.len() as i32, timeout) };
            for ev in events.iter().take(n.max(0) as usize) {
                let (token, flags) = (ev.u64, ev.events);
                if token == WAKE {
                    sys::drain(self.inbox.wake);
                    self.adopt();
                } else {
                    self.on_event(token >> 2, token & 3, flags);
                }
            }
            let now = Instant::now();
            let expired: Vec<u64> =
                self.lives.iter().filter(|(_, l)| l.out.deadline <= now).map(|(&id, _)| id).collect();
            for id in expired {
                let Some(live) = self.lives.get(&id) else { continue };
                let outcome = if !live.out.pieces.is_empty() {
                    Outcome::ClientStalled
                } else {
                    engine_silent(live.out.idle)
                };
                self.finish(id, outcome, false);
            }
        }
    }

    fn adopt(&mut self) {
        let new = std::mem::take(&mut *self.inbox.new.lock().unwrap_or_else(|e| e.into_inner()));
        for live in new {
            let id = self.next_id;
            self.next_id += 1;
            self.ctl(libc::EPOLL_CTL_ADD, live.sh.ctl, libc::EPOLLIN as u32, id << 2 | CTL);
            self.ctl(libc::EPOLL_CTL_ADD, live.out.hand.target.fd, libc::EPOLLRDHUP as u32, id << 2 | CLIENT);
            let cancelled = live.sh.lock().cancelled; // a cancel the exchange's thread drained
            self.lives.insert(id, live);
            if cancelled {
                self.finish(id, Outcome::Cancelled, false);
            } else {
                self.settle(id);
            }
        }
    }

    fn on_event(&mut self, id: u64, what: u64, flags: u32) {
        let Some(live) = self.lives.get_mut(&id) else { return }; // finished earlier in this batch
        match what {
            UPSTREAM => self.read(id),
            CTL => {
                sys::drain(live.sh.ctl);
                if live.sh.lock().cancelled {
                    return self.finish(id, Outcome::Cancelled, false);
                }
            }
            CLIENT if flags & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 => {
                return self.finish(id, Outcome::ClientGone, false);
            }
            _ => {}
        }
        self.settle(id);
    }

    /// One read of the engine's socket, decoded, framed and queued for the client.
    fn read(&mut self, id: u64) {
        let Some(live) = self.lives.get_mut(&id) else { return };
        match live.reader.read(live.upstream.stream.as_raw_fd(), &mut self.bufs) {
            Err(outcome) => live.end = Some((outcome, false)), // what was queued still goes first
            Ok(Got::Nothing) => {}
            Ok(Got::More(bytes)) => {
                live.out.queue(bytes);
                live.out.deadline = sys::deadline(live.out.idle); // only time spent waiting for the engine is idle
            }
            Ok(Got::End(bytes, reusable)) => {
                live.out.queue(bytes);
                live.end = Some((Outcome::End, reusable));
            }
        }
    }

    /// Sends what waits, then watches what the stream waits for next, or finishes it.
    fn settle(&mut self, id: u64) {
        let Some(live) = self.lives.get_mut(&id) else { return };
        if let Err(outcome) = live.out.send() {
            return self.finish(id, outcome, false);
        }
        if live.out.pieces.is_empty() {
            if let Some((outcome, reusable)) = live.end.take() {
                return self.finish(id, outcome, reusable);
            }
        }
        let (read, write) = (live.out.pieces.is_empty(), !live.out.pieces.is_empty());
        let (upstream, client, was) =
            (live.upstream.stream.as_raw_fd(), live.out.hand.target.fd, (live.reading, live.writing));
        live.reading = read;
        live.writing = write;
        if read != was.0 {
            let op = if read { libc::EPOLL_CTL_ADD } else { libc::EPOLL_CTL_DEL };
            self.ctl(op, upstream, libc::EPOLLIN as u32, id << 2 | UPSTREAM);
        }
        if write != was.1 {
            let out = if write { libc::EPOLLOUT as u32 } else { 0 };
            self.ctl(libc::EPOLL_CTL_MOD, client, libc::EPOLLRDHUP as u32 | out, id << 2 | CLIENT);
        }
    }

    /// The exchange's last word, as the exchange's own thread gives it (relay.rs `Fwd::finish`): the
    /// engine connection pooled or closed, the client's descriptor closed, then `forwarded`.
    fn finish(&mut self, id: u64, outcome: Outcome, reusable: bool) {
        let Some(mut live) = self.lives.remove(&id) else { return };
        // out of the epoll set first: the pool and the server keep descriptors of the same sockets
        if live.reading {
            self.ctl(libc::EPOLL_CTL_DEL, live.upstream.stream.as_raw_fd(), 0, 0);
        }
        self.ctl(libc::EPOLL_CTL_DEL, live.sh.ctl, 0, 0);
        self.ctl(libc::EPOLL_CTL_DEL, live.out.hand.target.fd, 0, 0);
        let outcome = live.upstream.release(&live.sh, outcome, reusable);
        forwarded(&live.sh, live.out.hand.nbytes, &outcome, &mut live.out.hand.done);
    }
}

impl Outbox {
    fn queue(&mut self, bytes: &[u8]) {
        let now =
            if self.hand.hold_done { release(&mut self.hand.done, bytes) } else { Cow::Borrowed(bytes) };
        let mut framed = Vec::new();
        frame_into(&mut framed, self.hand.target.chunked, &now);
        if !framed.is_empty() {
            if self.pieces.is_empty() {
                self.deadline = sys::deadline(self.idle); // the client's time to take it starts now
            }
            self.pieces.push_back(Piece { bytes: framed, body: now.len() as u64 });
        }
    }

    /// Sends pieces until the client's socket is full; each byte sent restarts the client's time.
    fn send(&mut self) -> Result<(), Outcome> {
        while let Some(piece) = self.pieces.front() {
            match sys::send(self.hand.target.fd, &piece.bytes[self.at..]) {
                Ok(n) => {
                    self.at += n;
                    self.deadline = sys::deadline(self.idle);
                    if self.at == piece.bytes.len() {
                        self.hand.nbytes += piece.body;
                        self.at = 0;
                        self.pieces.pop_front();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(Outcome::ClientGone),
            }
        }
        Ok(())
    }
}
