//! The native thread of one exchange: connect (or reuse a pooled connection), send the request,
//! read the head, then the body, handing it to Python as events or writing it to the client socket.

use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::forward;
use crate::http::{self, Decoder, Head};
use crate::pool;
use crate::relay::{Fwd, Outcome};
use crate::shared::{Event, Shared};
use crate::sys;

pub struct Config {
    pub host: String,
    pub port: u16,
    pub request: Vec<u8>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_bytes: u64,
    /// The longest SSE event (bytes up to its blank line) the body may hold; 0: no bound. The
    /// router's Python relay bounds events, not streams (SSEFramer), and so does this. > 0 also
    /// holds back the body's `[DONE]` event while forwarding (relay.rs); 0 relays bytes untouched.
    pub max_event: u64,
    pub pool_idle: Duration,
}

/// Passes on whole SSE events only (up to a blank line, ``\n\n``) and holds a partial one, at most
/// ``max`` bytes, until its end arrives, as the Python relay's SSEFramer does: an error event that
/// follows a break-off then starts on a line of its own, never glued to half an event.
pub struct Framer {
    held: Vec<u8>,
    pub max: u64,
}

impl Framer {
    /// Appends to ``out`` the events ``data`` completes; Err when the held part passes ``max``.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
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
        if self.held.len() as u64 > self.max { Err(()) } else { Ok(()) }
    }
}

/// What is held of an unfinished event, given up at a clean end (as SSEFramer.flush does).
pub fn rest(framer: &mut Option<Framer>) -> Vec<u8> {
    framer.as_mut().map(|f| std::mem::take(&mut f.held)).unwrap_or_default()
}

/// A clean end: what is held of an unfinished event goes too.
fn flush(framer: &mut Option<Framer>, fwd: &mut Fwd) -> Outcome {
    match fwd.deliver(&rest(framer)) {
        Ok(()) => Outcome::End,
        Err(outcome) => outcome,
    }
}

const READ_BUF: usize = 64 * 1024;

fn err(kind: &'static str, message: impl Into<String>) -> Outcome {
    Outcome::Error(kind, message.into())
}

/// A forwarding exchange's body as the forwarding thread goes on with it (forward.rs).
pub struct Rest {
    pub stream: TcpStream,
    pub dec: Decoder,
    pub framer: Option<Framer>,
    pub total: u64,
    pub keep_alive: bool,
}

enum Step {
    Ended(Outcome),
    Forwarding(Rest),
}

pub fn run(sh: Arc<Shared>, cfg: Config) {
    let mut fwd = Fwd::new(&sh, cfg.idle_timeout, cfg.max_event > 0);
    match exchange(&sh, &cfg, &mut fwd) {
        Step::Ended(outcome) => fwd.finish(outcome),
        Step::Forwarding(rest) => {
            // always Some: body() hands the body over only while forwarding
            if let Some(hand) = fwd.hand_over() {
                forward::start(Arc::clone(&sh), &cfg, rest, hand);
            }
        }
    }
}

fn exchange(sh: &Shared, cfg: &Config, fwd: &mut Fwd) -> Step {
    let (stream, head, leftover) = match open(sh, cfg) {
        Ok(opened) => opened,
        Err(outcome) => return Step::Ended(outcome),
    };
    let (keep_alive, framing) = (head.keep_alive, head.framing);
    {
        let mut st = sh.lock();
        sh.push(&mut st, Event::Head { status: head.status, headers: head.headers });
    }
    let (outcome, reusable) = match body(sh, cfg, fwd, &stream, Decoder::new(framing), &leftover) {
        Body::Ended(outcome, reusable) => (outcome, reusable),
        Body::Forwarding(dec, framer, total) => {
            return Step::Forwarding(Rest { stream, dec, framer, total, keep_alive })
        }
    };
    let cancelled = {
        let mut st = sh.lock();
        st.upstream = -1;
        st.cancelled // cancel() may have shut the socket down already: never pool it
    };
    if reusable && keep_alive && !cancelled {
        pool::put(&cfg.host, cfg.port, stream, cfg.pool_idle);
    }
    Step::Ended(match outcome {
        // cancel() shuts the socket down before it signals: the read that failed is its doing
        Outcome::Error(..) if cancelled => Outcome::Cancelled,
        outcome => outcome,
    })
}

/// Forgets the engine socket for cancel(), before it is closed or pooled.
fn detach(sh: &Shared) {
    sh.lock().upstream = -1;
}

/// Whether this failure on a reused connection means the engine had closed it while idle.
fn stale(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof)
}

fn connect(cfg: &Config) -> Result<TcpStream, Outcome> {
    let why = |e: String| err("connect", format!("cannot connect to {}:{}: {e}", cfg.host, cfg.port));
    let addrs = (cfg.host.as_str(), cfg.port).to_socket_addrs().map_err(|e| why(e.to_string()))?;
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, cfg.connect_timeout) {
            Ok(stream) => {
                let ok = stream.set_nodelay(true).and_then(|()| stream.set_nonblocking(true));
                return ok.map(|()| stream).map_err(|e| why(e.to_string()));
            }
            Err(e) if e.kind() == ErrorKind::TimedOut => last = "timed out".into(),
            Err(e) => last = e.to_string(),
        }
    }
    Err(why(last))
}

/// A connection with the request sent and the response head read; the bytes read past the head.
fn open(sh: &Shared, cfg: &Config) -> Result<(TcpStream, Head, Vec<u8>), Outcome> {
    let mut pooled = pool::take(&cfg.host, cfg.port, cfg.pool_idle);
    loop {
        let reused = pooled.is_some();
        let stream = match pooled.take() {
            Some(stream) => stream,
            None => connect(cfg)?,
        };
        {
            let mut st = sh.lock();
            if st.cancelled {
                return Err(Outcome::Cancelled);
            }
            st.upstream = stream.as_raw_fd();
        }
        match request_and_head(sh, cfg, stream.as_raw_fd()) {
            Ok((head, leftover)) => return Ok((stream, head, leftover)),
            Err(Failure::Io(e)) if reused && stale(&e) => detach(sh), // once, on a fresh connection
            Err(failure) => {
                detach(sh);
                return Err(match failure {
                    Failure::Io(e) => err("connect", format!("{}:{}: {e}", cfg.host, cfg.port)),
                    Failure::Outcome(outcome) => outcome,
                });
            }
        }
    }
}

enum Failure {
    /// Nothing of the response came: the request may be retried.
    Io(std::io::Error),
    Outcome(Outcome),
}

/// Waits for `fd` to be ready for `events`, or for Python's ctl signal (checked for cancel).
fn wait(sh: &Shared, fd: RawFd, events: libc::c_short, timeout_ms: i32) -> Result<bool, Failure> {
    let mut fds = [sys::pollfd(fd, events), sys::pollfd(sh.ctl, libc::POLLIN)];
    let n = sys::poll(&mut fds, timeout_ms).map_err(Failure::Io)?;
    if fds[1].revents != 0 {
        sys::drain(sh.ctl);
        if sh.lock().cancelled {
            return Err(Failure::Outcome(Outcome::Cancelled));
        }
    }
    Ok(n > 0 && fds[0].revents != 0)
}

fn request_and_head(sh: &Shared, cfg: &Config, fd: RawFd) -> Result<(Head, Vec<u8>), Failure> {
    let (mut sent, mut deadline) = (0, sys::deadline(cfg.idle_timeout));
    while sent < cfg.request.len() {
        match sys::send(fd, &cfg.request[sent..]) {
            Ok(n) => (sent, deadline) = (sent + n, sys::deadline(cfg.idle_timeout)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(Failure::Outcome(err("timeout", "the engine does not take the request")));
                }
                wait(sh, fd, libc::POLLOUT, sys::millis_until(deadline))?;
            }
            Err(e) => return Err(Failure::Io(e)),
        }
    }
    let bodiless = cfg.request.starts_with(b"HEAD ");
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut scan = 0;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // no time limit here: the caller bounds the wait for the head (first byte timeout) and cancels
        if !wait(sh, fd, libc::POLLIN, -1)? {
            continue;
        }
        let n = match sys::recv(fd, &mut chunk) {
            Ok(0) if buf.is_empty() => return Err(Failure::Io(ErrorKind::UnexpectedEof.into())),
            Ok(0) => return Err(Failure::Outcome(err("read", "the engine closed the connection mid-head"))),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) if buf.is_empty() => return Err(Failure::Io(e)),
            Err(e) => return Err(Failure::Outcome(err("read", e.to_string()))),
        };
        buf.extend_from_slice(&chunk[..n]);
        // scan only the new bytes (and the 3 before them) for the blank line
        while let Some(end) = http::head_end(&buf[scan..]).map(|e| e + scan) {
            if end > http::MAX_HEAD {
                break; // too large, found complete in one read: reported below
            }
            let head = http::parse_head(&buf[..end], bodiless)
                .map_err(|e| Failure::Outcome(err("read", format!("a bad response head: {e}"))))?;
            let rest = buf.split_off(end);
            if !(100..200).contains(&head.status) || head.status == 101 {
                return Ok((head, rest));
            }
            buf = rest; // an interim response (100 Continue): the real one follows
            scan = 0;
        }
        scan = buf.len().saturating_sub(3);
        if buf.len() > http::MAX_HEAD {
            return Err(Failure::Outcome(err("too_large", "the engine's response head is over 64 KiB")));
        }
    }
}

enum Body {
    /// The outcome, and whether the connection may serve another request.
    Ended(Outcome, bool),
    /// Forwarding began: the forwarding thread reads on from here.
    Forwarding(Decoder, Option<Framer>, u64),
}

/// Reads the body to its end, or until forwarding begins and the forwarding thread can take it.
fn body(
    sh: &Shared,
    cfg: &Config,
    fwd: &mut Fwd,
    stream: &TcpStream,
    mut dec: Decoder,
    leftover: &[u8],
) -> Body {
    let fd = stream.as_raw_fd();
    let mut total: u64 = 0;
    let mut framer = (cfg.max_event > 0).then(|| Framer { held: Vec::new(), max: cfg.max_event });
    let mut framed = Vec::with_capacity(READ_BUF);
    let mut out = Vec::with_capacity(READ_BUF);
    let mut buf = vec![0u8; READ_BUF];
    let mut input: &[u8] = leftover;
    let mut deadline = sys::deadline(cfg.idle_timeout);
    loop {
        if !input.is_empty() {
            out.clear();
            let extra = match dec.feed(input, &mut out) {
                Ok(extra) => extra,
                Err(e) => return Body::Ended(err("read", format!("a bad chunked body: {e}")), false),
            };
            total += out.len() as u64;
            if total > cfg.max_bytes {
                return Body::Ended(
                    err("too_large", format!("the response is over {} bytes", cfg.max_bytes)),
                    false,
                );
            }
            let ready = match framer.as_mut() {
                None => &out,
                Some(f) => {
                    framed.clear();
                    if f.feed(&out, &mut framed).is_err() {
                        let message =
                            format!("an event of the engine's stream is larger than {} bytes", f.max);
                        return Body::Ended(err("too_large", message), false);
                    }
                    &framed
                }
            };
            if let Err(outcome) = fwd.deliver(ready) {
                return Body::Ended(outcome, false);
            }
            if extra > 0 {
                return Body::Ended(flush(&mut framer, fwd), false); // bytes past the body: never reuse such a connection
            }
            // only time spent waiting for the engine is idle, not time spent relaying (a slow client)
            deadline = sys::deadline(cfg.idle_timeout);
        }
        if dec.done() {
            return Body::Ended(flush(&mut framer, fwd), true);
        }
        if fwd.forwarding() && forward::available() {
            return Body::Forwarding(dec, framer, total);
        }
        let client = fwd.client_fd();
        let mut fds = [
            sys::pollfd(fd, libc::POLLIN),
            sys::pollfd(sh.ctl, libc::POLLIN),
            // while forwarding, a client that hangs up ends the exchange without waiting for the engine
            sys::pollfd(client, libc::POLLRDHUP),
        ];
        match sys::poll(&mut fds, sys::millis_until(deadline)) {
            Ok(0) => {
                let idle = cfg.idle_timeout.as_secs_f64();
                return Body::Ended(err("timeout", format!("no data from the engine for {idle} s")), false);
            }
            Ok(_) => {}
            Err(e) => return Body::Ended(err("read", e.to_string()), false),
        }
        if fds[1].revents != 0 {
            sys::drain(sh.ctl);
            if let Err(outcome) = fwd.check() {
                return Body::Ended(outcome, false);
            }
        }
        if client >= 0 && fds[2].revents != 0 {
            return Body::Ended(Outcome::ClientGone, false);
        }
        input = &[];
        if fds[0].revents == 0 {
            continue;
        }
        match sys::recv(fd, &mut buf) {
            Ok(0) if dec.ends_at_close() => return Body::Ended(flush(&mut framer, fwd), false),
            Ok(0) => return Body::Ended(err("read", "the engine closed the connection mid-body"), false),
            Ok(n) => input = &buf[..n],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Body::Ended(err("read", e.to_string()), false),
        }
    }
}
