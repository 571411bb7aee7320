//! The native thread of one exchange: connect (or reuse a pooled connection), send the request,
//! read the head, then the body, handing it to Python as events or writing it to the client socket.

use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::body::{BodyReader, Buffers, Got};
use crate::forward;
use crate::http::{self, Decoder, Head};
use crate::pool;
use crate::relay::{engine_silent, err, Fwd, Outcome};
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

/// The engine's connection, kept to the body's end.
pub struct Upstream {
    pub stream: TcpStream,
    pub keep_alive: bool,
    host: String,
    port: u16,
    pool_idle: Duration,
}

impl Upstream {
    /// After the body: pooled when it ended cleanly (`reusable`) on a keep-alive connection, else
    /// closed. The outcome comes back, but a failed read after cancel() is the cancel's doing.
    pub fn release(self, sh: &Shared, outcome: Outcome, reusable: bool) -> Outcome {
        let cancelled = {
            let mut st = sh.lock();
            st.upstream = -1;
            st.cancelled // cancel() may have shut the socket down already: never pool it
        };
        if reusable && self.keep_alive && !cancelled {
            pool::put(&self.host, self.port, self.stream, self.pool_idle);
        }
        match outcome {
            // cancel() shuts the socket down before it signals: the read that failed is its doing
            Outcome::Error(..) if cancelled => Outcome::Cancelled,
            outcome => outcome,
        }
    }
}

/// A forwarding exchange's body as the forwarding thread goes on with it (forward.rs).
pub struct Rest {
    pub upstream: Upstream,
    pub reader: BodyReader,
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
    let upstream = Upstream {
        stream,
        keep_alive: head.keep_alive,
        host: cfg.host.clone(),
        port: cfg.port,
        pool_idle: cfg.pool_idle,
    };
    let reader = BodyReader::new(Decoder::new(head.framing), cfg.max_bytes, cfg.max_event);
    {
        let mut st = sh.lock();
        sh.push(&mut st, Event::Head { status: head.status, headers: head.headers });
    }
    match body(sh, cfg, fwd, upstream.stream.as_raw_fd(), reader, &leftover) {
        Body::Ended(outcome, reusable) => Step::Ended(upstream.release(sh, outcome, reusable)),
        Body::Forwarding(reader) => Step::Forwarding(Rest { upstream, reader }),
    }
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
    Forwarding(BodyReader),
}

/// Reads the body to its end, or until forwarding begins and the forwarding thread can take it.
fn body(
    sh: &Shared,
    cfg: &Config,
    fwd: &mut Fwd,
    fd: RawFd,
    mut reader: BodyReader,
    leftover: &[u8],
) -> Body {
    let mut deadline = sys::deadline(cfg.idle_timeout);
    let mut bufs = Buffers::new();
    let mut first = Some(leftover);
    loop {
        let got = match first.take() {
            Some(bytes) if !bytes.is_empty() => reader.feed(bytes, &mut bufs),
            Some(_) if reader.done() => Ok(Got::End(&[], true)), // a body of no bytes
            Some(_) => Ok(Got::Nothing),
            None => match wait_for_engine(sh, fwd, fd, deadline, cfg.idle_timeout) {
                Ok(true) => reader.read(fd, &mut bufs),
                Ok(false) => Ok(Got::Nothing),
                Err(outcome) => Err(outcome),
            },
        };
        match got {
            Err(outcome) => return Body::Ended(outcome, false),
            Ok(Got::End(bytes, reusable)) => {
                // the engine's connection serves again even when the client is gone
                return Body::Ended(fwd.deliver(bytes).err().unwrap_or(Outcome::End), reusable);
            }
            Ok(Got::More(bytes)) => {
                if let Err(outcome) = fwd.deliver(bytes) {
                    return Body::Ended(outcome, false);
                }
                // only time spent waiting for the engine is idle, not time spent relaying (a slow client)
                deadline = sys::deadline(cfg.idle_timeout);
            }
            Ok(Got::Nothing) => {}
        }
        if fwd.forwarding() && forward::available() {
            return Body::Forwarding(reader);
        }
    }
}

/// Waits for the engine's bytes until `deadline`: Ok(false) for a wake-up with none (a ctl signal
/// that was no cancel); Err for a cancel, a client that hung up while forwarding, or the timeout.
fn wait_for_engine(
    sh: &Shared,
    fwd: &mut Fwd,
    fd: RawFd,
    deadline: std::time::Instant,
    idle: Duration,
) -> Result<bool, Outcome> {
    let client = fwd.client_fd();
    let mut fds = [
        sys::pollfd(fd, libc::POLLIN),
        sys::pollfd(sh.ctl, libc::POLLIN),
        // while forwarding, a client that hangs up ends the exchange without waiting for the engine
        sys::pollfd(client, libc::POLLRDHUP),
    ];
    match sys::poll(&mut fds, sys::millis_until(deadline)) {
        Ok(0) => return Err(engine_silent(idle)),
        Ok(_) => {}
        Err(e) => return Err(err("read", e.to_string())),
    }
    if fds[1].revents != 0 {
        sys::drain(sh.ctl);
        fwd.check()?;
    }
    if client >= 0 && fds[2].revents != 0 {
        return Err(Outcome::ClientGone);
    }
    Ok(fds[0].revents != 0)
}
