//! kvstack.router._relay: one native OS thread per engine exchange. Python builds the request and
//! reads the head through events; once the stream is under way it hands the client socket over
//! (forward), and the rest of the body is relayed with no Python per event: by the one forwarding
//! thread of the process (forward.rs), or by the exchange's own thread where that cannot start. The
//! threads never touch Python objects: they talk to Python only through a queue and an eventfd (see
//! shared.rs).

mod body;
mod forward;
mod http;
mod pool;
mod relay;
mod shared;
mod sys;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use shared::{Event, Shared, Target};

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| PyValueError::new_err(format!("bad {name}: {value}")))
}

#[pyclass(module = "kvstack.router._relay", frozen)]
struct Exchange {
    shared: Arc<Shared>,
}

#[pymethods]
impl Exchange {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (host, port, request, connect_timeout_s, idle_timeout_s, max_bytes, pool_idle_s, max_event=0))]
    fn new(
        host: String,
        port: u16,
        request: &[u8],
        connect_timeout_s: f64,
        idle_timeout_s: f64,
        max_bytes: u64,
        pool_idle_s: f64,
        max_event: u64,
    ) -> PyResult<Self> {
        let cfg = worker::Config {
            host,
            port,
            request: request.to_vec(),
            connect_timeout: seconds("connect_timeout_s", connect_timeout_s)?,
            idle_timeout: seconds("idle_timeout_s", idle_timeout_s)?,
            max_bytes,
            max_event,
            pool_idle: seconds("pool_idle_s", pool_idle_s)?,
        };
        if cfg.connect_timeout.is_zero() || cfg.idle_timeout.is_zero() {
            return Err(PyValueError::new_err("timeouts must be positive"));
        }
        let shared = Arc::new(Shared::new().map_err(|e| PyOSError::new_err(e.to_string()))?);
        let theirs = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("kvstack-relay".into())
            .stack_size(256 * 1024) // buffers live on the heap
            .spawn(move || worker::run(theirs, cfg))
            .map_err(|e| PyOSError::new_err(format!("cannot start the relay thread: {e}")))?;
        Ok(Exchange { shared })
    }

    /// An eventfd that is readable whenever poll() has something new.
    fn wake_fd(&self) -> i32 {
        self.shared.wake
    }

    /// Every new event, in order.
    fn poll<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for event in self.shared.take_events() {
            let item = match event {
                Event::Head { status, headers } => {
                    let pairs = PyList::empty(py);
                    for (name, value) in headers {
                        pairs.append((PyBytes::new(py, &name), PyBytes::new(py, &value)))?;
                    }
                    ("head", status, pairs).into_pyobject(py)?
                }
                Event::Data(bytes) => ("data", PyBytes::new(py, &bytes)).into_pyobject(py)?,
                Event::End => PyTuple::new(py, ["end"])?,
                Event::Error { kind, message } => ("error", kind, message).into_pyobject(py)?,
                Event::Forwarded { nbytes, outcome, tail } => {
                    ("forwarded", nbytes, outcome, PyBytes::new(py, &tail)).into_pyobject(py)?
                }
            };
            list.append(item)?;
        }
        Ok(list)
    }

    /// From now on the thread writes the body to the client socket `fd` (never closing it):
    /// first `unsent`, body bytes Python polled but did not relay, then everything after.
    #[pyo3(signature = (fd, chunked, unsent = Vec::new()))]
    fn forward(&self, fd: i32, chunked: bool, unsent: Vec<Vec<u8>>) -> PyResult<()> {
        if fd < 0 {
            return Err(PyValueError::new_err("bad file descriptor"));
        }
        // The thread writes through its own descriptor of the socket, closed when it is done: the
        // server may close `fd` meanwhile (a client gone), and its number be reused elsewhere.
        // SAFETY: F_DUPFD_CLOEXEC only reads fd; an invalid one fails with EBADF.
        let own = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if own < 0 {
            return Err(PyOSError::new_err(std::io::Error::last_os_error().to_string()));
        }
        self.shared.request_forward(Target { fd: own, chunked }, unsent).map_err(|e| {
            sys::close(own);
            PyRuntimeError::new_err(e)
        })
    }

    /// Aborts the exchange; idempotent. The connection is not pooled.
    fn cancel(&self) {
        self.shared.cancel();
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.shared.cancel();
    }
}

/// Closes the pool's idle connections (for tests that count file descriptors).
#[pyfunction]
fn clear_pool() {
    pool::clear();
}

/// Starts the thread that forwards every body after forward() (on first use otherwise); whether it
/// runs. It lives as long as the process, with its two descriptors (tests count descriptors).
#[pyfunction]
fn forwarding_thread() -> bool {
    forward::available()
}

#[pymodule]
fn _relay(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Exchange>()?;
    m.add_function(wrap_pyfunction!(clear_pool, m)?)?;
    m.add_function(wrap_pyfunction!(forwarding_thread, m)?)?;
    Ok(())
}
