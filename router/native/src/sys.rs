//! Thin, checked wrappers over the few system calls the relay needs.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

pub fn eventfd() -> io::Result<RawFd> {
    // SAFETY: plain system call with constant flags.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

pub fn signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64; a full counter (EAGAIN) still leaves it readable.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

pub fn drain(fd: RawFd) {
    let mut n: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; EAGAIN (not signalled) is fine.
    unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
}

pub fn close(fd: RawFd) {
    // SAFETY: the caller owns fd and closes it once.
    unsafe { libc::close(fd) };
}

pub fn shutdown(fd: RawFd) {
    // SAFETY: shutdown only wakes blocked readers and writers; the fd stays open.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Milliseconds to wait until `deadline` for poll(2): never negative, rounded up.
pub fn millis_until(deadline: Instant) -> i32 {
    let left = deadline.saturating_duration_since(Instant::now());
    (left.as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
}

pub fn deadline(after: Duration) -> Instant {
    Instant::now().checked_add(after).unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365))
}

/// poll(2) over `fds`, retried on EINTR; returns how many are ready (0: the time ran out).
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: fds is a valid slice of pollfd for the call's duration.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

pub fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

/// One non-blocking send that never raises SIGPIPE; Ok(0) never means "gone" (that is an error).
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for its length; the flags keep the call non-blocking and signal-free.
        let n = unsafe {
            libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One non-blocking receive; Ok(0) is the peer's end of stream.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
