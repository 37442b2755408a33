//! The PROXY protocol header a load balancer puts before a connection's own bytes (v2, and
//! v1 as HAProxy's `send-proxy` writes it), read from trusted addresses only, so that the
//! client's real address is what mailgate logs, limits and forwards.

use std::io;
use std::net::{IpAddr, SocketAddr};

use ppp::{HeaderResult, PartialResult, v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{Instant, timeout_at};

/// Longest header accepted. A v2 header with addresses is 28 (IPv4) or 52 (IPv6) bytes and
/// cloud load balancers add TLVs of a few dozen; v1 is at most 107 bytes.
pub const MAX_HEADER: usize = 1024;

/// The load balancers a listener takes PROXY headers from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    /// From the configuration's `accept_proxy` (validated at load): networks or single addresses.
    pub fn new(entries: &[String]) -> Self {
        Self(
            entries
                .iter()
                .filter_map(|entry| {
                    entry
                        .parse::<ipnet::IpNet>()
                        .ok()
                        .or_else(|| entry.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
                })
                .collect(),
        )
    }

    pub fn trusts(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        self.0.iter().any(|network| network.contains(&address))
    }
}

/// What a header said.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// The client and the address it connected to; `None` for the load balancer's own
    /// connections (v2 `LOCAL`, v1 `UNKNOWN`), which keep the socket's addresses.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Bytes read past the header: the start of the client's own stream.
    pub rest: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY header in time")]
    Timeout,
    #[error("connection closed before the PROXY header ended")]
    Closed,
    #[error("not a PROXY protocol header")]
    Invalid,
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

impl HeaderError {
    /// The `result` label of `mailgate_proxy_headers_total`.
    pub fn label(&self) -> &'static str {
        match self {
            HeaderError::Timeout => "timeout",
            HeaderError::Closed | HeaderError::Io(_) => "closed",
            HeaderError::Invalid | HeaderError::TooLong => "invalid",
        }
    }
}

/// Every `result` label of `mailgate_proxy_headers_total`.
pub const RESULTS: [&str; 5] = ["ok", "local", "invalid", "timeout", "closed"];

/// Reads the header that must open the stream, giving up at `deadline`.
///
/// # Errors
/// No complete, valid header of at most [`MAX_HEADER`] bytes arrived in time.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Instant,
) -> Result<Header, HeaderError> {
    let mut buffer = Vec::with_capacity(256);
    loop {
        if let Some(parsed) = parse(&buffer)? {
            return Ok(parsed);
        }
        if buffer.len() >= MAX_HEADER {
            return Err(HeaderError::TooLong);
        }
        let mut chunk = [0u8; 256];
        let wanted = chunk.len().min(MAX_HEADER - buffer.len());
        let n = timeout_at(deadline, stream.read(&mut chunk[..wanted]))
            .await
            .map_err(|_| HeaderError::Timeout)??;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// `Ok(None)` while the header is incomplete.
fn parse(buffer: &[u8]) -> Result<Option<Header>, HeaderError> {
    if buffer.is_empty() {
        return Ok(None);
    }
    let result = HeaderResult::parse(buffer);
    if result.is_incomplete() {
        return Ok(None);
    }
    let (length, addresses) = match result {
        HeaderResult::V2(Ok(header)) => (header.len(), v2_addresses(&header)),
        HeaderResult::V1(Ok(header)) => (header.header.len(), v1_addresses(&header.addresses)),
        HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => return Err(HeaderError::Invalid),
    };
    Ok(Some(Header {
        addresses,
        rest: buffer[length..].to_vec(),
    }))
}

fn v2_addresses(header: &v2::Header<'_>) -> Option<(SocketAddr, SocketAddr)> {
    if header.command == v2::Command::Local {
        return None;
    }
    match header.addresses {
        v2::Addresses::IPv4(ip) => Some((
            SocketAddr::from((ip.source_address, ip.source_port)),
            SocketAddr::from((ip.destination_address, ip.destination_port)),
        )),
        v2::Addresses::IPv6(ip) => Some((
            SocketAddr::from((ip.source_address, ip.source_port)),
            SocketAddr::from((ip.destination_address, ip.destination_port)),
        )),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

fn v1_addresses(addresses: &v1::Addresses) -> Option<(SocketAddr, SocketAddr)> {
    match addresses {
        v1::Addresses::Tcp4(ip) => Some((
            SocketAddr::from((ip.source_address, ip.source_port)),
            SocketAddr::from((ip.destination_address, ip.destination_port)),
        )),
        v1::Addresses::Tcp6(ip) => Some((
            SocketAddr::from((ip.source_address, ip.source_port)),
            SocketAddr::from((ip.destination_address, ip.destination_port)),
        )),
        v1::Addresses::Unknown => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    fn v2_proxy(client: &str, local: &str) -> Vec<u8> {
        let addresses = v2::Addresses::from((
            client.parse::<SocketAddr>().unwrap(),
            local.parse::<SocketAddr>().unwrap(),
        ));
        v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            addresses,
        )
        .build()
        .unwrap()
    }

    async fn read_from(bytes: &[u8]) -> Result<Header, HeaderError> {
        let (mut near, mut far) = tokio::io::duplex(4096);
        near.write_all(bytes).await.unwrap();
        drop(near);
        read_header(&mut far, Instant::now() + Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn v2_gives_the_client_and_keeps_what_follows() {
        let mut bytes = v2_proxy("198.51.100.7:40000", "192.0.2.1:993");
        bytes.extend_from_slice(b"a LOGIN");
        let header = read_from(&bytes).await.unwrap();
        assert_eq!(
            header.addresses,
            Some((
                "198.51.100.7:40000".parse().unwrap(),
                "192.0.2.1:993".parse().unwrap()
            ))
        );
        assert_eq!(header.rest, b"a LOGIN");
        let v6 = v2_proxy("[2001:db8::7]:40000", "[2001:db8::1]:143");
        let header = read_from(&v6).await.unwrap();
        assert_eq!(header.addresses.unwrap().0.ip().to_string(), "2001:db8::7");
    }

    #[tokio::test]
    async fn v1_and_local_headers() {
        let header = read_from(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\nEHLO x\r\n")
            .await
            .unwrap();
        assert_eq!(
            header.addresses.unwrap().0,
            "198.51.100.7:40000".parse().unwrap()
        );
        assert_eq!(header.rest, b"EHLO x\r\n");
        let local = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Stream,
            v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(read_from(&local).await.unwrap().addresses, None);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for bytes in [
            &b"a LOGIN alice secret\r\n"[..],
            b"PROXY TCP4 999.1.1.1 192.0.2.1 1 2\r\n",
            &[0x0d; 2000],
        ] {
            assert!(
                matches!(read_from(bytes).await, Err(HeaderError::Invalid)),
                "{:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
            );
        }
        assert!(matches!(
            read_from(b"PROXY TCP4 198.51.100.7").await,
            Err(HeaderError::Closed)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_balancer_times_out() {
        let (_near, mut far) = tokio::io::duplex(64);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            read_header(&mut far, deadline).await,
            Err(HeaderError::Timeout)
        ));
    }

    #[test]
    fn trusted_networks_and_mapped_addresses() {
        let trusted = TrustedProxies::new(&["10.0.0.0/8".into(), "2001:db8::1".into()]);
        assert!(trusted.trusts("10.1.2.3".parse().unwrap()));
        assert!(trusted.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(trusted.trusts("2001:db8::1".parse().unwrap()));
        assert!(!trusted.trusts("2001:db8::2".parse().unwrap()));
        assert!(!trusted.trusts("192.0.2.1".parse().unwrap()));
    }
}
