//! LMCache's `lm://` wire protocol (`lmcache/v1/protocol.py`): fixed binary headers of native
//! (little-endian on x86) `i32`s, a space-padded 150-byte key, no reply to PUT, header plus body for GET.
//!
//! Request header, 186 bytes: `command, length, fmt, dtype, location, shape[4], key[150]`.
//! Response header, 36 bytes: `code, length, fmt, dtype, shape[4], location` (location is last here).

use crate::key::ChunkKey;
use kvhost_plugin_sdk::ChunkMeta;

/// Bytes of a request header.
pub const REQUEST_HEADER_LEN: usize = 186;
/// Bytes of a response header.
pub const RESPONSE_HEADER_LEN: usize = 36;
/// Bytes of the key field.
pub const MAX_KEY_LENGTH: usize = 150;

/// `ServerReturnCode.SUCCESS`.
pub const SUCCESS: i32 = 200;
/// `ServerReturnCode.FAIL`.
pub const FAIL: i32 = 400;

/// `ClientCommand`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Store `length` bytes that follow; no reply.
    Put,
    /// Reply with a header and the bytes, or FAIL.
    Get,
    /// Reply 200 if stored, else 400.
    Exist,
    /// Reply with the stored keys, newline-separated.
    List,
    /// Reply 200.
    Health,
}

impl Command {
    /// The command for a wire value.
    pub fn from_wire(v: i32) -> Option<Command> {
        Some(match v {
            1 => Command::Put,
            2 => Command::Get,
            3 => Command::Exist,
            4 => Command::List,
            5 => Command::Health,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn to_wire(self) -> i32 {
        match self {
            Command::Put => 1,
            Command::Get => 2,
            Command::Exist => 3,
            Command::List => 4,
            Command::Health => 5,
        }
    }

    /// Lower-case name, for metrics.
    pub fn name(self) -> &'static str {
        match self {
            Command::Put => "put",
            Command::Get => "get",
            Command::Exist => "exist",
            Command::List => "list",
            Command::Health => "health",
        }
    }
}

/// Why a request header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Unknown command value.
    #[error("unknown command {0}")]
    BadCommand(i32),
    /// Negative length.
    #[error("negative length {0}")]
    NegativeLength(i32),
    /// Length above the configured limit.
    #[error("length {length} exceeds the limit of {limit} bytes")]
    TooLong {
        /// Declared.
        length: i32,
        /// Limit.
        limit: u64,
    },
    /// A shape entry is negative.
    #[error("negative shape {0:?}")]
    BadShape([i32; 4]),
    /// The key is not UTF-8 or does not parse.
    #[error("bad key: {0}")]
    BadKey(String),
}

/// A decoded request header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// Body length (PUT).
    pub length: u64,
    /// `MemoryFormat`.
    pub fmt: i32,
    /// Wire dtype code.
    pub dtype: i32,
    /// Location code (ignored by the server).
    pub location: i32,
    /// Shape, padded with zeros.
    pub shape: [i32; 4],
    /// The key (parsed), for commands that take one.
    pub key: Option<ChunkKey>,
    /// The key text as sent (trimmed).
    pub key_text: String,
}

fn i32_at(buf: &[u8], i: usize) -> i32 {
    i32::from_le_bytes([buf[4 * i], buf[4 * i + 1], buf[4 * i + 2], buf[4 * i + 3]])
}

/// Decode and validate a request header. `max_length` bounds PUT bodies.
pub fn decode_request(
    buf: &[u8; REQUEST_HEADER_LEN],
    max_length: u64,
) -> Result<Request, ProtocolError> {
    let raw_command = i32_at(buf, 0);
    let command = Command::from_wire(raw_command).ok_or(ProtocolError::BadCommand(raw_command))?;
    let length = i32_at(buf, 1);
    if length < 0 {
        return Err(ProtocolError::NegativeLength(length));
    }
    if length as u64 > max_length {
        return Err(ProtocolError::TooLong {
            length,
            limit: max_length,
        });
    }
    let shape = [
        i32_at(buf, 5),
        i32_at(buf, 6),
        i32_at(buf, 7),
        i32_at(buf, 8),
    ];
    if shape.iter().any(|&d| d < 0) {
        return Err(ProtocolError::BadShape(shape));
    }
    let key_bytes = &buf[36..36 + MAX_KEY_LENGTH];
    let key_text = std::str::from_utf8(key_bytes)
        .map_err(|e| ProtocolError::BadKey(format!("not UTF-8: {e}")))?
        .trim_matches(|c: char| c == ' ' || c == '\0')
        .to_string();
    let key = match command {
        Command::Put | Command::Get | Command::Exist => {
            Some(ChunkKey::parse(&key_text).map_err(|e| ProtocolError::BadKey(e.to_string()))?)
        }
        Command::List | Command::Health => None,
    };
    Ok(Request {
        command,
        length: length as u64,
        fmt: i32_at(buf, 2),
        dtype: i32_at(buf, 3),
        location: i32_at(buf, 4),
        shape,
        key,
        key_text,
    })
}

/// Encode a request header (for clients and tests). Fails if the key is longer than 150 bytes.
pub fn encode_request(
    command: Command,
    length: u32,
    fmt: i32,
    dtype: i32,
    shape: [i32; 4],
    key: &str,
) -> Option<[u8; REQUEST_HEADER_LEN]> {
    if key.len() > MAX_KEY_LENGTH {
        return None;
    }
    let mut buf = [b' '; REQUEST_HEADER_LEN];
    let ints = [
        command.to_wire(),
        length as i32,
        fmt,
        dtype,
        0,
        shape[0],
        shape[1],
        shape[2],
        shape[3],
    ];
    for (i, v) in ints.iter().enumerate() {
        buf[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    buf[36..36 + key.len()].copy_from_slice(key.as_bytes());
    Some(buf)
}

/// A response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// `SUCCESS` or `FAIL`.
    pub code: i32,
    /// Body length.
    pub length: u64,
    /// `MemoryFormat`.
    pub fmt: i32,
    /// Wire dtype code.
    pub dtype: i32,
    /// Shape.
    pub shape: [i32; 4],
    /// Location code.
    pub location: i32,
}

impl Response {
    /// A bare status reply.
    pub fn status(code: i32) -> Response {
        Response {
            code,
            length: 0,
            fmt: 0,
            dtype: 0,
            shape: [0; 4],
            location: 0,
        }
    }

    /// The reply to a GET miss, as LMCache's server sends it.
    pub fn miss() -> Response {
        Response {
            code: FAIL,
            length: 0,
            fmt: 1,
            dtype: 2,
            shape: [0; 4],
            location: 0,
        }
    }

    /// The reply to a GET hit.
    pub fn hit(meta: &ChunkMeta, length: u64) -> Response {
        Response {
            code: SUCCESS,
            length,
            fmt: meta.fmt,
            dtype: meta.dtype,
            shape: meta.shape,
            location: 0,
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let ints = [
            self.code,
            self.length as i32,
            self.fmt,
            self.dtype,
            self.shape[0],
            self.shape[1],
            self.shape[2],
            self.shape[3],
            self.location,
        ];
        let mut buf = [0u8; RESPONSE_HEADER_LEN];
        for (i, v) in ints.iter().enumerate() {
            buf[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        buf
    }

    /// Decode (for clients and tests).
    pub fn decode(buf: &[u8; RESPONSE_HEADER_LEN]) -> Response {
        Response {
            code: i32_at(buf, 0),
            length: i32_at(buf, 1).max(0) as u64,
            fmt: i32_at(buf, 2),
            dtype: i32_at(buf, 3),
            shape: [
                i32_at(buf, 4),
                i32_at(buf, 5),
                i32_at(buf, 6),
                i32_at(buf, 7),
            ],
            location: i32_at(buf, 8),
        }
    }
}

/// Chunk metadata from a PUT header: trailing zero dimensions are padding.
pub fn meta_from(req: &Request) -> ChunkMeta {
    let ndim = req.shape.iter().rposition(|&d| d != 0).map_or(0, |i| i + 1) as u32;
    ChunkMeta {
        length: req.length,
        fmt: req.fmt,
        dtype: req.dtype,
        ndim,
        shape: req.shape,
        reserved: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "meta-llama/Llama-3.1-8B@1@0@-1f3a@bfloat16";

    #[test]
    fn request_round_trip() {
        let buf = encode_request(Command::Put, 4096, 1, 3, [2, 32, 256, 1024], KEY).unwrap();
        assert_eq!(buf.len(), 186);
        let r = decode_request(&buf, 1 << 30).unwrap();
        assert_eq!(r.command, Command::Put);
        assert_eq!(
            (r.length, r.fmt, r.dtype, r.shape),
            (4096, 1, 3, [2, 32, 256, 1024])
        );
        assert_eq!(r.key.unwrap().as_str(), KEY);
        assert_eq!(meta_from(&decode_request(&buf, 1 << 30).unwrap()).ndim, 4);
    }

    #[test]
    fn response_layout_puts_location_last() {
        let r = Response {
            code: 200,
            length: 7,
            fmt: 1,
            dtype: 3,
            shape: [1, 2, 3, 4],
            location: 9,
        };
        let b = r.encode();
        assert_eq!(i32_at(&b, 0), 200);
        assert_eq!(i32_at(&b, 8), 9);
        assert_eq!(Response::decode(&b), r);
    }

    #[test]
    fn bad_headers_are_refused_with_a_reason() {
        let mut buf = encode_request(Command::Get, 0, 1, 2, [0; 4], KEY).unwrap();
        buf[0..4].copy_from_slice(&77i32.to_le_bytes());
        assert_eq!(
            decode_request(&buf, 100),
            Err(ProtocolError::BadCommand(77))
        );
        let mut buf = encode_request(Command::Put, 0, 1, 2, [0; 4], KEY).unwrap();
        buf[4..8].copy_from_slice(&(-5i32).to_le_bytes());
        assert_eq!(
            decode_request(&buf, 100),
            Err(ProtocolError::NegativeLength(-5))
        );
        let buf = encode_request(Command::Put, 101, 1, 2, [0; 4], KEY).unwrap();
        assert!(matches!(
            decode_request(&buf, 100),
            Err(ProtocolError::TooLong { .. })
        ));
        let buf = encode_request(Command::Get, 0, 1, 2, [0; 4], "not-a-key").unwrap();
        assert!(matches!(
            decode_request(&buf, 100),
            Err(ProtocolError::BadKey(_))
        ));
        assert!(encode_request(Command::Get, 0, 1, 2, [0; 4], &"x".repeat(151)).is_none());
        let buf = encode_request(Command::Health, 0, 0, 0, [0; 4], "").unwrap();
        assert_eq!(decode_request(&buf, 100).unwrap().command, Command::Health);
    }
}
