//! HTTP/1.1 response framing: the head, and the body's length rules (RFC 9112 section 6.3).

/// The most a response head may take; a larger one is an error, never buffered without bound.
pub const MAX_HEAD: usize = 64 * 1024;

pub struct Head {
    pub status: u16,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The connection may serve another request after this response (HTTP/1.1, no `close`).
    pub keep_alive: bool,
    pub framing: Framing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The end of the head in `buf`, counting its blank line, or None while incomplete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses a complete head (through its blank line). `bodiless`: the request was HEAD.
pub fn parse_head(raw: &[u8], bodiless: bool) -> Result<Head, String> {
    let text = &raw[..raw.len().saturating_sub(4)];
    let mut lines = text.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().ok_or("empty response head")?;
    let mut parts = status_line.splitn(3, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return Err(format!("not an HTTP/1.x response: {:?}", String::from_utf8_lossy(version))),
    };
    let code = parts.next().unwrap_or_default();
    let status: u16 = std::str::from_utf8(code)
        .ok()
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status code {:?}", String::from_utf8_lossy(code)))?;
    let mut headers = Vec::new();
    let (mut close, mut chunked, mut length) = (false, false, None::<u64>);
    for line in lines {
        let colon = line.iter().position(|&b| b == b':').ok_or("a header line without a colon")?;
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"connection") {
            close |= has_token(value, "close");
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // chunked must be the last coding; anything else leaves the length to the close
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            if !chunked {
                length = None;
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
            match (n, length) {
                (None, _) => return Err("bad Content-Length".into()),
                (Some(a), Some(b)) if a != b => return Err("conflicting Content-Length".into()),
                (Some(a), _) => length = Some(a),
            }
        }
        headers.push((name.to_vec(), value.to_vec()));
    }
    let framing = if bodiless || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::UntilClose
    };
    // HTTP/1.0 keep-alive is opt-in and rare from engines: never pool it
    let keep_alive = http11 && !close && framing != Framing::UntilClose;
    Ok(Head { status, headers, keep_alive, framing })
}

/// Decodes a body as it arrives: appends its bytes to `out`, strips chunked framing.
pub struct Decoder {
    state: State,
    line: Vec<u8>,
}

enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    UntilClose,
    Done,
}

/// Chunk-size lines and trailers are short; a long one is a broken or hostile peer.
const MAX_LINE: usize = 8 * 1024;

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Decoder { state, line: Vec::new() }
    }

    pub fn done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the end of the connection is the end of this body.
    pub fn ends_at_close(&self) -> bool {
        matches!(self.state, State::UntilClose | State::Done)
    }

    /// Consumes `input`; returns how many bytes of it were past the body's end (0 when none).
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        while !input.is_empty() {
            match &mut self.state {
                State::Done => return Ok(input.len()),
                State::UntilClose => {
                    out.extend_from_slice(input);
                    return Ok(0);
                }
                State::Length(left) | State::ChunkData(left) => {
                    let take = (*left).min(input.len() as u64) as usize;
                    out.extend_from_slice(&input[..take]);
                    *left -= take as u64;
                    input = &input[take..];
                    if *left == 0 {
                        self.state = match self.state {
                            State::Length(_) => State::Done,
                            _ => State::ChunkDataEnd,
                        };
                    }
                }
                State::ChunkSize | State::ChunkDataEnd | State::Trailers => {
                    let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(input);
                        if self.line.len() > MAX_LINE {
                            return Err("a chunk line is too long".into());
                        }
                        return Ok(0);
                    };
                    self.line.extend_from_slice(&input[..nl]);
                    input = &input[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = self.next_after_line(line)?;
                }
            }
        }
        Ok(0)
    }

    fn next_after_line(&self, line: &[u8]) -> Result<State, String> {
        Ok(match self.state {
            State::ChunkSize => {
                // a chunk extension (";name=value") is allowed and ignored
                let hex = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                let size = std::str::from_utf8(hex)
                    .ok()
                    .filter(|h| !h.is_empty() && h.len() <= 15)
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad chunk size {:?}", String::from_utf8_lossy(line)))?;
                if size == 0 {
                    State::Trailers
                } else {
                    State::ChunkData(size)
                }
            }
            State::ChunkDataEnd if line.is_empty() => State::ChunkSize,
            State::ChunkDataEnd => return Err("a chunk does not end with CRLF".into()),
            State::Trailers if line.is_empty() => State::Done,
            State::Trailers => State::Trailers,
            _ => unreachable!("only line states read lines"),
        })
    }
}
