//! The process-wide pool of idle keep-alive connections, per (host, port).

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Key = (String, u16);

type Idle = HashMap<Key, Vec<(TcpStream, Instant)>>;

static POOL: Mutex<Option<Idle>> = Mutex::new(None);

/// Idle connections kept per engine at most: beyond that a finished one is closed.
const MAX_IDLE_PER_KEY: usize = 1024;

/// Whether an idle connection still looks usable: no EOF, error or stray bytes pending.
fn looks_alive(stream: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a valid buffer on a socket this pool owns.
    let n = unsafe {
        libc::recv(stream.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

/// The most recently used live connection, dropping (closing) the expired and dead ones on the way.
pub fn take(host: &str, port: u16, max_idle: Duration) -> Option<TcpStream> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let list = guard.as_mut()?.get_mut(&(host.to_owned(), port))?;
    let now = Instant::now();
    list.retain(|(_, since)| now.duration_since(*since) < max_idle);
    while let Some((stream, _)) = list.pop() {
        if looks_alive(&stream) {
            return Some(stream);
        }
    }
    None
}

pub fn put(host: &str, port: u16, stream: TcpStream, max_idle: Duration) {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let list = guard.get_or_insert_with(HashMap::new).entry((host.to_owned(), port)).or_default();
    let now = Instant::now();
    list.retain(|(_, since)| now.duration_since(*since) < max_idle); // expired ones close here too
    if list.len() < MAX_IDLE_PER_KEY {
        list.push((stream, Instant::now()));
    }
}

/// Closes every idle connection (tests count file descriptors).
pub fn clear() {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    *guard = None;
}
