//! Conversions between the kernel's address layout and std's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ferry_common::{AF_INET, AF_INET6, PodAddr, SockAddr};

/// Converts a kernel address to a std socket address; `None` for an unknown family.
pub fn sock_addr_to_std(a: &SockAddr) -> Option<SocketAddr> {
    match a.family {
        AF_INET => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(u32::from_be(a.ip[0]))), a.port)),
        AF_INET6 => Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(words_to_octets(a.ip))), a.port)),
        _ => None,
    }
}

/// Converts a std socket address to the kernel's layout. A v4-mapped IPv6 address becomes IPv4,
/// as the kernel programs record it.
pub fn sock_addr_from_std(a: SocketAddr) -> SockAddr {
    let (ip, family) = ip_words(a.ip());
    SockAddr { ip, port: a.port(), family }
}

/// The sk_lookup table key for one of a pod's addresses.
pub fn pod_addr(ip: IpAddr) -> PodAddr {
    let (ip, family) = ip_words(ip);
    PodAddr { ip, family: u32::from(family) }
}

fn ip_words(ip: IpAddr) -> ([u32; 4], u16) {
    match ip {
        IpAddr::V4(v4) => ([u32::from(v4).to_be(), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => ([u32::from(v4).to_be(), 0, 0, 0], AF_INET),
            None => (octets_to_words(v6.octets()), AF_INET6),
        },
    }
}

/// Network-order words as the kernel stores them: each word's bytes are the address bytes in order.
fn octets_to_words(o: [u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (i, chunk) in o.chunks_exact(4).enumerate() {
        w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    w
}

fn words_to_octets(w: [u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_round_trips_in_kernel_layout() {
        let a: SocketAddr = "10.233.1.2:8080".parse().unwrap();
        let k = sock_addr_from_std(a);
        // The first octet is the lowest-addressed byte of the word, as in the kernel.
        assert_eq!(k.ip[0].to_ne_bytes(), [10, 233, 1, 2]);
        assert_eq!(k.family, AF_INET);
        assert_eq!(sock_addr_to_std(&k), Some(a));
    }

    #[test]
    fn ipv6_round_trips_and_v4_mapped_becomes_v4() {
        let a: SocketAddr = "[fd00:233:1::2]:80".parse().unwrap();
        assert_eq!(sock_addr_to_std(&sock_addr_from_std(a)), Some(a));
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        let k = sock_addr_from_std(mapped);
        assert_eq!(k.family, AF_INET);
        assert_eq!(sock_addr_to_std(&k), Some("10.0.0.1:80".parse().unwrap()));
    }

    #[test]
    fn unknown_family_is_rejected() {
        let k = SockAddr { family: 99, ..Default::default() };
        assert_eq!(sock_addr_to_std(&k), None);
    }
}
