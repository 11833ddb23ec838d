//! The generator's WebSocket client: the handshake and the frames a relay sends, nothing else.
//!
//! The generator stands in for thousands of browsers on other machines, but here it shares two
//! cores with the relay and Postgres, so every microsecond it spends per frame is taken from
//! them. With tokio-tungstenite the generator spent about 2.4 µs of CPU per W2 frame, much of it
//! in the library's per-message work (a `Message` allocated per frame, its read buffer
//! zero-filled before every read). This client reads into one reused buffer and hands out each
//! text frame as a `&str` into it.
//!
//! It speaks just what the relay uses: unfragmented text frames (tungstenite never fragments
//! what it sends), close frames, and pings, which it answers. Frames it sends are masked, as
//! RFC 6455 requires of clients.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the relay sent.
pub enum Incoming<'a> {
    Text(&'a str),
    /// A close frame, with its code if it had one.
    Close(Option<u16>),
}

pub struct Ws {
    stream: TcpStream,
    /// Bytes read and not yet handed out are `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The frame handed out last, consumed at the next `recv`.
    consumed: usize,
}

/// Room for the first reads; grows for a larger frame (W3 holds 20,000 of these).
const INITIAL_BUFFER: usize = 4 * 1024;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

impl Ws {
    /// The HTTP upgrade of `path` on a connected stream.
    pub async fn handshake(
        mut stream: TcpStream,
        relay: SocketAddr,
        path: &str,
    ) -> anyhow::Result<Ws> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {relay}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut ws = Ws {
            stream,
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            consumed: 0,
        };
        let head_end = loop {
            if let Some(i) = ws.buf[..ws.end].windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if ws.fill().await? == 0 {
                bail!("connection closed during the handshake");
            }
        };
        let head = String::from_utf8_lossy(&ws.buf[..head_end]);
        if !head.starts_with("HTTP/1.1 101") {
            bail!(
                "upgrade refused: {}",
                head.lines().next().unwrap_or_default()
            );
        }
        // Frames the relay sent right after its answer are already in the buffer.
        ws.start = head_end;
        Ok(ws)
    }

    /// Reads more bytes after `end`, making room first; returns how many (0: closed).
    async fn fill(&mut self) -> anyhow::Result<usize> {
        if self.start > 0 && self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// The next text or close frame (pings are answered, other frames skipped).
    pub async fn recv(&mut self) -> anyhow::Result<Incoming<'_>> {
        self.start += std::mem::take(&mut self.consumed);
        loop {
            if let Some((opcode, payload, len)) = self.parse() {
                match opcode {
                    0x1 => {
                        self.consumed = len;
                        let text = std::str::from_utf8(&self.buf[payload..self.start + len])
                            .context("a text frame that is not UTF-8")?;
                        return Ok(Incoming::Text(text));
                    }
                    0x8 => {
                        let body = &self.buf[payload..self.start + len];
                        let code =
                            (body.len() >= 2).then(|| u16::from_be_bytes([body[0], body[1]]));
                        self.start += len;
                        return Ok(Incoming::Close(code));
                    }
                    0x9 => {
                        let ping = self.buf[payload..self.start + len].to_vec();
                        self.start += len;
                        self.send_frame(0xA, &ping).await?;
                    }
                    _ => self.start += len,
                }
                continue;
            }
            if self.fill().await? == 0 {
                bail!("connection ended");
            }
        }
    }

    /// The frame at `start` if it is complete: its opcode, where its payload starts, and its
    /// whole length.
    fn parse(&self) -> Option<(u8, usize, usize)> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return None;
        }
        let (len, header) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        // The relay never masks (servers must not), so there is no key to skip.
        (b.len() >= header + len).then_some((b[0] & 0x0f, self.start + header, header + len))
    }

    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.send_frame(0x1, text.as_bytes()).await
    }

    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&MASK);
        frame.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
        self.stream.write_all(&frame).await?;
        Ok(())
    }
}
