//! A latency-injecting TCP forwarder for HTTP/1.1, to measure how many sequential round trips
//! a client makes (benchmarks) or to slow a dependency down (timeout tests).
//!
//! [`LatencyProxy`] listens on `127.0.0.1`, opens one upstream connection per client connection
//! and forwards bytes both ways. It is request-aware in the client-to-upstream direction only:
//! it reads each request head (request line and headers, up to the blank line), holds it until
//! `delay` has passed since the head's first byte arrived, then forwards the head and streams the
//! body framed by `Content-Length` or `Transfer-Encoding: chunked` (no body otherwise). So every
//! request on a keep-alive connection is delayed once, by `delay`, however the client writes it;
//! a request that waits for `100 Continue` still works because the head is forwarded before
//! the body is read. Responses are copied through untouched and at once. After a request that
//! asks for a protocol upgrade (`Upgrade`, `CONNECT`) the rest of the connection is copied raw.
//! Pipelined requests are delayed one after another (each by `delay` from when it was read).
//!
//! Every request is recorded ([`ProxiedRequest`]: method, target, arrival time), so a caller
//! can count round trips and see which ones overlapped.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};

use crate::server::BackgroundServer;

/// Largest request head (request line plus headers) the proxy accepts.
const MAX_HEAD: usize = 64 * 1024;

/// One request as it passed through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request target as sent, e.g. `/certificates/abc?x=1`.
    pub target: String,
    /// When the first byte of the request reached the proxy (before the delay).
    pub arrived: Instant,
}

/// A running proxy; dropping it closes its port and every connection through it.
pub struct LatencyProxy {
    server: BackgroundServer,
    upstream: SocketAddr,
    delay: Duration,
    log: Arc<Mutex<Vec<ProxiedRequest>>>,
}

impl fmt::Debug for LatencyProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyProxy")
            .field("addr", &self.addr())
            .field("upstream", &self.upstream)
            .field("delay", &self.delay)
            .field("requests", &self.count())
            .finish_non_exhaustive()
    }
}

impl LatencyProxy {
    /// Starts a proxy on a free loopback port that forwards to `upstream`, delaying each request by `delay`.
    pub fn start(upstream: SocketAddr, delay: Duration) -> Result<Self> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread_log = Arc::clone(&log);
        let server = BackgroundServer::spawn("latency-proxy", move |listener| {
            accept_loop(listener, upstream, delay, thread_log)
        })?;
        Ok(Self {
            server,
            upstream,
            delay,
            log,
        })
    }

    /// Starts a proxy in front of an `http://IP:PORT` base URL (as the servers in this crate give).
    pub fn for_url(upstream_url: &str, delay: Duration) -> Result<Self> {
        Self::start(crate::server::socket_addr_of(upstream_url)?, delay)
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Base URL of the proxy, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The delay added to every request.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// How many requests have passed through so far.
    pub fn count(&self) -> usize {
        self.log().len()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.log().clone()
    }

    /// The requests from the `from`-th on (e.g. `from` = a [`count`](Self::count) taken earlier).
    pub fn requests_since(&self, from: usize) -> Vec<ProxiedRequest> {
        self.log()
            .get(from..)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    }

    fn log(&self) -> MutexGuard<'_, Vec<ProxiedRequest>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    delay: Duration,
    log: Arc<Mutex<Vec<ProxiedRequest>>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            // A failed upstream connect closes the client connection: the client sees an error.
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_rd, mut client_wr) = client.into_split();
            let (mut server_rd, server_wr) = server.into_split();
            let requests = forward_requests(client_rd, server_wr, delay, &log);
            let responses = async {
                let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
                let _ = client_wr.shutdown().await;
            };
            // Each direction ends on its own EOF and passes the EOF on, so both finish.
            let _ = tokio::join!(requests, responses);
        });
    }
}

/// How a request's body is framed.
enum Body {
    None,
    Length(u64),
    Chunked,
    /// The connection switches protocol: copy everything that follows.
    Raw,
}

/// Reads requests from the client, delays each one and forwards it upstream.
async fn forward_requests<R, W>(
    client: R,
    mut upstream: W,
    delay: Duration,
    log: &Mutex<Vec<ProxiedRequest>>,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut client = BufReader::new(client);
    let result = async {
        loop {
            if client.fill_buf().await?.is_empty() {
                return Ok(()); // the client closed the connection between requests
            }
            let arrived = Instant::now();
            let head = read_head(&mut client).await?;
            let (request, body) = parse_head(&head, arrived)?;
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(request);
            tokio::time::sleep_until((arrived + delay).into()).await;
            upstream.write_all(&head).await?;
            match body {
                Body::None => {}
                Body::Length(n) => {
                    let copied = tokio::io::copy(&mut (&mut client).take(n), &mut upstream).await?;
                    if copied < n {
                        bail!("the client closed the connection inside a body");
                    }
                }
                Body::Chunked => forward_chunks(&mut client, &mut upstream).await?,
                Body::Raw => {
                    tokio::io::copy(&mut client, &mut upstream).await?;
                    return Ok(());
                }
            }
            upstream.flush().await?;
        }
    }
    .await;
    let _ = upstream.shutdown().await;
    result
}

/// Reads one request head, including the blank line that ends it (empty lines before the
/// request line, which RFC 9112 lets a server ignore, are kept and forwarded).
async fn read_head<R: AsyncBufRead + Unpin>(client: &mut R) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut started = false;
    loop {
        let before = head.len();
        let n = client.read_until(b'\n', &mut head).await?;
        if n == 0 {
            bail!("the client closed the connection inside a request head");
        }
        if head.len() > MAX_HEAD {
            bail!("request head longer than {MAX_HEAD} bytes");
        }
        let line = &head[before..];
        let blank = line == b"\r\n" || line == b"\n";
        if !started {
            started = !blank;
        } else if blank {
            return Ok(head);
        }
    }
}

/// The request line and the body framing of a head.
fn parse_head(head: &[u8], arrived: Instant) -> Result<(ProxiedRequest, Body)> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.lines().map(str::trim).skip_while(|l| l.is_empty());
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_ascii_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut length = None;
    let mut chunked = false;
    let mut upgrade = method.eq_ignore_ascii_case("CONNECT");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<u64>()
                    .with_context(|| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    let body = if upgrade {
        Body::Raw
    } else if chunked {
        Body::Chunked
    } else {
        match length {
            Some(0) | None => Body::None,
            Some(n) => Body::Length(n),
        }
    };
    Ok((
        ProxiedRequest {
            method,
            target,
            arrived,
        },
        body,
    ))
}

/// Streams a chunked body, trailers included, as it arrives.
async fn forward_chunks<R, W>(client: &mut R, upstream: &mut W) -> Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut size_line = Vec::new();
        if client.read_until(b'\n', &mut size_line).await? == 0 {
            bail!("the client closed the connection inside a chunked body");
        }
        upstream.write_all(&size_line).await?;
        let size_text = String::from_utf8_lossy(&size_line);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        if size == 0 {
            // Trailer fields, then the blank line that ends the body.
            loop {
                let mut line = Vec::new();
                if client.read_until(b'\n', &mut line).await? == 0 {
                    bail!("the client closed the connection inside chunked trailers");
                }
                upstream.write_all(&line).await?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }
        // The chunk data and its CRLF.
        let want = size + 2;
        let copied = tokio::io::copy(&mut (&mut *client).take(want), upstream).await?;
        if copied < want {
            bail!("the client closed the connection inside a chunk");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader as StdBufReader, Read, Write};

    /// An upstream that answers every request with its method, target and body, keeping the
    /// connection open (HTTP/1.1 keep-alive).
    fn echo_upstream() -> crate::server::BackgroundServer {
        let router = axum::Router::new().fallback(
            |method: axum::http::Method, uri: axum::http::Uri, body: axum::body::Bytes| async move {
                format!("{method} {uri} {}", String::from_utf8_lossy(&body))
            },
        );
        crate::server::BackgroundServer::start("echo", router).unwrap()
    }

    /// Reads one response with a Content-Length body from a keep-alive connection.
    fn read_response(reader: &mut StdBufReader<std::net::TcpStream>) -> String {
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        String::from_utf8(body).unwrap()
    }

    #[test]
    fn delays_every_request_on_a_keep_alive_connection_and_counts_them() {
        let upstream = echo_upstream();
        let delay = Duration::from_millis(60);
        let proxy = LatencyProxy::for_url(&format!("http://{}", upstream.addr()), delay).unwrap();
        let stream = std::net::TcpStream::connect(proxy.addr()).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = StdBufReader::new(stream);

        let requests: [(&[u8], &str); 3] = [
            (b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n", "GET /a?x=1 "),
            (
                b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
                "POST /b hello",
            ),
            (
                b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
                "PUT /c abcde",
            ),
        ];
        for (request, want) in requests {
            let started = Instant::now();
            // Written in two pieces: the delay applies to the request, not to each write.
            let (first, rest) = request.split_at(request.len() / 2);
            writer.write_all(first).unwrap();
            writer.flush().unwrap();
            std::thread::sleep(Duration::from_millis(5));
            writer.write_all(rest).unwrap();
            assert_eq!(read_response(&mut reader), want);
            let took = started.elapsed();
            assert!(took >= delay, "{took:?}");
            assert!(took < delay * 3, "{took:?}");
        }
        let seen = proxy.requests();
        assert_eq!(proxy.count(), 3);
        assert_eq!(
            seen.iter()
                .map(|r| format!("{} {}", r.method, r.target))
                .collect::<Vec<_>>(),
            ["GET /a?x=1", "POST /b", "PUT /c"]
        );
        assert_eq!(proxy.requests_since(2).len(), 1);
        assert!(seen[1].arrived >= seen[0].arrived + delay);

        let addr = proxy.addr();
        drop(proxy);
        assert!(crate::proc::port_is_closed(addr), "{addr} still open");
    }

    #[test]
    fn concurrent_requests_are_delayed_side_by_side() {
        let upstream = echo_upstream();
        let delay = Duration::from_millis(80);
        let proxy = LatencyProxy::start(upstream.addr(), delay).unwrap();
        let url = format!("{}/x", proxy.url());
        let started = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || crate::http::HttpRequest::get(&url).send().unwrap())
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap().text(), "GET /x ");
        }
        let took = started.elapsed();
        assert!(took >= delay && took < delay * 2, "{took:?}");
        assert_eq!(proxy.count(), 4);
    }
}
