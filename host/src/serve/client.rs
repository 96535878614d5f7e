//! A minimal blocking `lm://` client, speaking exactly what LMCache's `LMCServerConnector` sends. Used by
//! the tests and the serve benchmark; handy for scripts too.

use super::protocol::{self, Command, Response, RESPONSE_HEADER_LEN};
use kvhost_plugin_sdk::ChunkMeta;
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};

/// One connection to an `lm://` server.
#[derive(Debug)]
pub struct LmClient {
    stream: TcpStream,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

impl LmClient {
    /// Connect.
    pub fn connect(addr: impl ToSocketAddrs) -> io::Result<LmClient> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(LmClient { stream })
    }

    /// A client on a socket already connected (say, after writing part of a request by hand).
    pub fn from_stream(stream: TcpStream) -> LmClient {
        LmClient { stream }
    }

    /// The underlying socket (for tests that misbehave on purpose).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    fn send(
        &mut self,
        command: Command,
        len: usize,
        meta: &ChunkMeta,
        key: &str,
        body: &[u8],
    ) -> io::Result<()> {
        let header =
            protocol::encode_request(command, len as u32, meta.fmt, meta.dtype, meta.shape, key)
                .ok_or_else(|| invalid("key longer than 150 bytes"))?;
        let mut bufs = [IoSlice::new(&header), IoSlice::new(body)];
        let mut bufs: &mut [IoSlice<'_>] = &mut bufs;
        while !bufs.is_empty() {
            let n = self.stream.write_vectored(bufs)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    fn response(&mut self) -> io::Result<Response> {
        let mut h = [0u8; RESPONSE_HEADER_LEN];
        self.stream.read_exact(&mut h)?;
        Ok(Response::decode(&h))
    }

    /// PUT (the server sends no reply).
    pub fn put(&mut self, key: &str, data: &[u8], meta: &ChunkMeta) -> io::Result<()> {
        self.send(Command::Put, data.len(), meta, key, data)
    }

    /// GET: the response header and the bytes on a hit, `None` on a miss.
    pub fn get(&mut self, key: &str) -> io::Result<Option<(Response, Vec<u8>)>> {
        let mut body = Vec::new();
        Ok(self.get_into(key, &mut body)?.map(|r| (r, body)))
    }

    /// GET into `buf` (reused across calls): the response on a hit, `None` on a miss.
    pub fn get_into(&mut self, key: &str, buf: &mut Vec<u8>) -> io::Result<Option<Response>> {
        self.send(
            Command::Get,
            0,
            &ChunkMeta {
                fmt: 1,
                ..ChunkMeta::default()
            },
            key,
            &[],
        )?;
        let r = self.response()?;
        if r.code != protocol::SUCCESS {
            return Ok(None);
        }
        buf.resize(r.length as usize, 0);
        self.stream.read_exact(buf)?;
        Ok(Some(r))
    }

    /// EXIST.
    pub fn exists(&mut self, key: &str) -> io::Result<bool> {
        self.send(
            Command::Exist,
            0,
            &ChunkMeta {
                fmt: 1,
                ..ChunkMeta::default()
            },
            key,
            &[],
        )?;
        Ok(self.response()?.code == protocol::SUCCESS)
    }

    /// HEALTH.
    pub fn health(&mut self) -> io::Result<bool> {
        self.send(Command::Health, 0, &ChunkMeta::default(), "", &[])?;
        Ok(self.response()?.code == protocol::SUCCESS)
    }

    /// LIST: the keys the server's hot cache holds.
    pub fn list(&mut self) -> io::Result<Vec<String>> {
        self.send(Command::List, 0, &ChunkMeta::default(), "", &[])?;
        let r = self.response()?;
        let mut body = vec![0u8; r.length as usize];
        self.stream.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body)
            .split('\n')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect())
    }
}
