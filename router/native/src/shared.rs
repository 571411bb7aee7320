//! What the Python object and its native thread share: an event queue behind a mutex, and two
//! eventfds: `wake` tells Python's event loop that events wait, `ctl` tells the thread that Python
//! asked for something (forward, cancel, or that it drained the queue the thread waits on).

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

use crate::sys;

pub enum Event {
    Head {
        status: u16,
        headers: Vec<(Vec<u8>, Vec<u8>)>,
    },
    Data(Vec<u8>),
    End,
    Error {
        kind: &'static str,
        message: String,
    },
    /// `tail`: a held `[DONE]` event, not written (relay.rs says when it is reported).
    Forwarded {
        nbytes: u64,
        outcome: &'static str,
        tail: Vec<u8>,
    },
}

#[derive(Clone, Copy)]
pub struct Target {
    pub fd: RawFd,
    pub chunked: bool,
}

#[derive(Default)]
pub struct State {
    pub events: VecDeque<Event>,
    /// `wake` has been written since Python last drained: one write per batch, not per event.
    signalled: bool,
    /// Python's forward() request, and the body bytes it took back out of `events` for the thread.
    pub forward: Option<Target>,
    pub backlog: Vec<Vec<u8>>,
    pub cancelled: bool,
    /// Body bytes queued for Python and not yet polled; past QUEUE_LIMIT the thread stops reading
    /// the engine (TCP pushes back on it) until Python polls, as aiohttp's flow control would.
    pub queued: usize,
    /// The thread waits for Python to poll: poll() must signal `ctl`.
    pub waiting_room: bool,
    pub exited: bool,
    /// The engine socket while the thread uses it, so cancel() can shut it down; -1 when none.
    pub upstream: RawFd,
}

pub const QUEUE_LIMIT: usize = 1 << 20;

pub struct Shared {
    state: Mutex<State>,
    pub wake: RawFd,
    pub ctl: RawFd,
}

impl Shared {
    pub fn new() -> std::io::Result<Self> {
        let wake = sys::eventfd()?;
        let ctl = sys::eventfd().inspect_err(|_| sys::close(wake))?;
        let state = State { upstream: -1, ..State::default() };
        Ok(Shared { state: Mutex::new(state), wake, ctl })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // a panic elsewhere must not turn every later call into a second panic
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an event for Python, waking its loop once per batch.
    pub fn push(&self, st: &mut State, event: Event) {
        if let Event::Data(bytes) = &event {
            st.queued += bytes.len();
        }
        st.events.push_back(event);
        if !st.signalled {
            st.signalled = true;
            sys::signal(self.wake);
        }
    }

    /// Python's poll(): every queued event, in order.
    pub fn take_events(&self) -> Vec<Event> {
        let mut st = self.lock();
        st.signalled = false;
        sys::drain(self.wake);
        st.queued = 0;
        if std::mem::take(&mut st.waiting_room) {
            sys::signal(self.ctl);
        }
        st.events.drain(..).collect()
    }

    /// Python's forward(): from here on the thread owns the body: first `unsent` (bytes Python took
    /// from poll() but did not relay), then the queued data, then the rest.
    pub fn request_forward(&self, target: Target, unsent: Vec<Vec<u8>>) -> Result<(), &'static str> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.forward.is_some() {
            return Err("forward() was already called");
        }
        if st.exited || st.cancelled {
            return Err("the exchange has already ended");
        }
        st.backlog = unsent;
        let mut rest = VecDeque::new();
        for event in st.events.drain(..) {
            match event {
                Event::Data(bytes) => st.backlog.push(bytes),
                // the end is reported as the forward's outcome instead
                Event::End | Event::Error { .. } => {}
                other => rest.push_back(other),
            }
        }
        st.events = rest;
        st.queued = 0;
        st.forward = Some(target);
        drop(guard);
        sys::signal(self.ctl);
        Ok(())
    }

    pub fn cancel(&self) {
        let mut st = self.lock();
        if st.cancelled {
            return;
        }
        st.cancelled = true;
        if st.upstream >= 0 {
            sys::shutdown(st.upstream); // a blocked read or write returns at once
        }
        drop(st);
        sys::signal(self.ctl);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        sys::close(self.wake);
        sys::close(self.ctl);
    }
}
