//! Telling the upstream who the client is (`upstream.forward_client`): the client's addresses
//! as the kernel reported them, the PROXY protocol v2 header that carries them, and what became
//! of a forwarding. The IMAP `ID` and SMTP `XCLIENT` lines are built by their protocol backends.
//!
//! Nothing the client sent reaches the upstream this way: only socket addresses.

use std::io;
use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Version};

use crate::config::ForwardClient;

/// Both ends of a client's connection to mailgate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// Where the client connected from.
    pub client: SocketAddr,
    /// The address of mailgate the client connected to.
    pub local: SocketAddr,
}

impl Origin {
    /// `None` unless both addresses are known (in-memory streams have none): then nothing is
    /// forwarded. IPv4 clients of a dual-stack listener appear as IPv4-mapped IPv6 addresses;
    /// they are forwarded as plain IPv4, which is what the upstream would have seen itself.
    pub fn new(client: Option<SocketAddr>, local: Option<SocketAddr>) -> Option<Self> {
        Some(Self {
            client: canonical(client?),
            local: canonical(local?),
        })
    }
}

fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

fn ipv6(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), address.port()),
        IpAddr::V6(_) => address,
    }
}

/// A PROXY protocol v2 header (PROXY command, TCP) from the client to the address it reached.
///
/// # Errors
/// Only if the header could not be built, which the fixed address sizes rule out.
pub fn proxy_v2_header(origin: &Origin) -> io::Result<Vec<u8>> {
    // One header has one address family; a client that reached mailgate over another family
    // (through a load balancer's header) is written with both addresses as IPv6.
    let addresses = if origin.client.is_ipv4() == origin.local.is_ipv4() {
        (origin.client, origin.local)
    } else {
        (ipv6(origin.client), ipv6(origin.local))
    };
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses).build()
}

/// The PROXY protocol v2 LOCAL header: a connection mailgate opens on its own behalf (the SMTP
/// extension probe, `test-login`), which the upstream takes at its socket addresses.
///
/// # Errors
/// As for [`proxy_v2_header`].
pub fn proxy_v2_local() -> io::Result<Vec<u8>> {
    Builder::with_addresses(
        Version::Two | Command::Local,
        Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
}

/// What became of one forwarding (`mailgate_forward_client_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Sent, and accepted as far as the protocol tells.
    Sent,
    /// The upstream does not offer the command (IMAP `ID`, SMTP `XCLIENT`), usually because it
    /// does not trust mailgate's address; the login goes on without it.
    NotOffered,
    /// The upstream answered the command with an error; the login goes on without it.
    Refused,
}

impl Forwarded {
    pub fn label(self) -> &'static str {
        match self {
            Forwarded::Sent => "sent",
            Forwarded::NotOffered => "not_offered",
            Forwarded::Refused => "refused",
        }
    }

    /// The outcomes a mode can have, for exporting each series from the start.
    pub fn possible(mode: ForwardClient) -> &'static [Forwarded] {
        match mode {
            ForwardClient::None => &[],
            // A header cannot be refused: an upstream that does not want it closes the connection.
            ForwardClient::ProxyV2 => &[Forwarded::Sent],
            ForwardClient::Id | ForwardClient::Xclient => {
                &[Forwarded::Sent, Forwarded::NotOffered, Forwarded::Refused]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The v2 signature (proxy-protocol.txt 2.2).
    const SIGNATURE: &[u8] = b"\r\n\r\n\x00\r\nQUIT\n";

    fn origin(client: &str, local: &str) -> Origin {
        Origin::new(client.parse().ok(), local.parse().ok()).unwrap()
    }

    fn with_signature(rest: &[u8]) -> Vec<u8> {
        [SIGNATURE, rest].concat()
    }

    #[test]
    fn ipv4_header() {
        let header = proxy_v2_header(&origin("127.0.0.2:50000", "127.0.0.1:143")).unwrap();
        #[rustfmt::skip]
        let expected = with_signature(&[
            0x21, 0x11, 0, 12, // v2 PROXY, TCP over IPv4, 12 address bytes
            127, 0, 0, 2, 127, 0, 0, 1, // source, destination
            0xc3, 0x50, 0, 143, // ports 50000, 143
        ]);
        assert_eq!(header, expected);
    }

    #[test]
    fn ipv6_header() {
        let header = proxy_v2_header(&origin("[2001:db8::7]:1025", "[::1]:587")).unwrap();
        let mut expected = with_signature(&[0x21, 0x21, 0, 36]);
        expected.extend([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        expected.extend([0; 15]);
        expected.extend([1, 0x04, 0x01, 0x02, 0x4b]);
        assert_eq!(header, expected);
    }

    #[test]
    fn mixed_families_go_as_ipv6_and_mapped_clients_as_ipv4() {
        let header = proxy_v2_header(&origin("192.0.2.1:1", "[::1]:993")).unwrap();
        assert_eq!(&header[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &header[16..32],
            &"::ffff:192.0.2.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        let mapped = origin("[::ffff:127.0.0.2]:5", "[::ffff:127.0.0.1]:143");
        assert_eq!(mapped, origin("127.0.0.2:5", "127.0.0.1:143"));
    }

    #[test]
    fn local_header_has_no_addresses() {
        assert_eq!(
            proxy_v2_local().unwrap(),
            with_signature(&[0x20, 0x00, 0, 0])
        );
    }

    #[test]
    fn nothing_without_both_addresses() {
        let address = "127.0.0.1:1".parse().ok();
        assert_eq!(Origin::new(address, None), None);
        assert_eq!(Origin::new(None, address), None);
    }
}
