//! A small synchronous rtnetlink client for a pod's netns: the policy-routing rules and routes that
//! transparent inbound adds, and the pod's addresses (a dump, then a subscription to changes).
//!
//! A netlink socket talks to the netns it was created in, so every `Rtnl` and `AddrEvents` is made
//! on the pod's netns worker thread; after that the socket can be used from any thread.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Multicast groups of address changes (RTNLGRP_IPV4_IFADDR = 5, RTNLGRP_IPV6_IFADDR = 9).
const GROUP_IPV4_IFADDR: u32 = 5;
const GROUP_IPV6_IFADDR: u32 = 9;

/// One policy-routing rule: packets carrying `mark` (under `mask`) use `table`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkRule {
    /// IPv4 or IPv6 (`true`).
    pub ipv6: bool,
    /// Firewall mark value.
    pub mark: u32,
    /// Bits of the mark that are compared.
    pub mask: u32,
    /// Routing table.
    pub table: u32,
    /// Rule priority (lower first).
    pub priority: u32,
}

/// A request/response rtnetlink socket in the netns it was created in.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    /// Opens a socket in the calling thread's netns.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }

    /// Adds `rule`; one that already exists counts as added.
    pub fn add_rule(&mut self, rule: &MarkRule) -> io::Result<()> {
        let msg = RouteNetlinkMessage::NewRule(rule_message(rule));
        ignore(self.request(msg, NLM_F_CREATE | NLM_F_EXCL), libc::EEXIST)
    }

    /// Deletes `rule`; one that is already gone counts as deleted.
    pub fn del_rule(&mut self, rule: &MarkRule) -> io::Result<()> {
        ignore(self.request(RouteNetlinkMessage::DelRule(rule_message(rule)), 0), libc::ENOENT)
    }

    /// Adds `local default dev lo table TABLE` for one family: every destination is delivered
    /// locally for packets routed by that table.
    pub fn add_local_default(&mut self, ipv6: bool, table: u32) -> io::Result<()> {
        let msg = RouteNetlinkMessage::NewRoute(local_default(ipv6, table));
        ignore(self.request(msg, NLM_F_CREATE | NLM_F_EXCL), libc::EEXIST)
    }

    /// Deletes the route [`Rtnl::add_local_default`] added.
    pub fn del_local_default(&mut self, ipv6: bool, table: u32) -> io::Result<()> {
        let msg = RouteNetlinkMessage::DelRoute(local_default(ipv6, table));
        ignore(self.request(msg, 0), libc::ENOENT)
    }

    /// Adds `ip/prefix` to interface `index` (host scope on loopback); an existing one counts.
    pub fn add_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> io::Result<()> {
        let msg = RouteNetlinkMessage::NewAddress(address_message(index, ip, prefix));
        ignore(self.request(msg, NLM_F_CREATE | NLM_F_EXCL), libc::EEXIST)
    }

    /// Removes `ip/prefix` from interface `index`; an absent one counts as removed.
    pub fn del_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> io::Result<()> {
        let msg = RouteNetlinkMessage::DelAddress(address_message(index, ip, prefix));
        ignore(self.request(msg, 0), libc::EADDRNOTAVAIL)
    }

    /// Every address of the netns, with its interface index.
    pub fn addresses(&mut self) -> io::Result<Vec<(u32, IpAddr)>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let msg = RouteNetlinkMessage::GetAddress(AddressMessage::default());
        self.send(header, msg)?;
        let mut out = Vec::new();
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            for msg in parse(&buf)? {
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) => {
                        out.extend(address_of(&a).map(|ip| (a.header.index, ip)));
                    }
                    _ => {}
                }
            }
        }
    }

    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        self.send(header, msg)?;
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            for msg in parse(&buf)? {
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                if let NetlinkPayload::Error(e) = msg.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(e.to_io()),
                    };
                }
            }
        }
    }

    fn send(&self, header: NetlinkHeader, msg: RouteNetlinkMessage) -> io::Result<()> {
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map(|_| ())
    }
}

/// A change to the netns's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrEvent {
    /// An address was added (interface index, address).
    Added(u32, IpAddr),
    /// An address was removed.
    Removed(u32, IpAddr),
    /// The kernel dropped notifications (ENOBUFS): the listener must dump again.
    Overrun,
}

/// A non-blocking subscription to the netns's address changes.
pub struct AddrEvents {
    socket: Socket,
}

impl AddrEvents {
    /// Subscribes, in the calling thread's netns, to IPv4 and IPv6 address changes.
    pub fn subscribe() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.add_membership(GROUP_IPV4_IFADDR)?;
        socket.add_membership(GROUP_IPV6_IFADDR)?;
        socket.set_non_blocking(true)?;
        Ok(Self { socket })
    }

    /// Reads what is queued; `WouldBlock` once nothing is.
    pub fn read(&self) -> io::Result<Vec<AddrEvent>> {
        let mut buf = vec![0u8; 64 << 10];
        let n = match self.socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(vec![AddrEvent::Overrun]),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for msg in parse(&buf[..n])? {
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) => {
                    out.extend(address_of(&a).map(|ip| AddrEvent::Added(a.header.index, ip)));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(a)) => {
                    out.extend(address_of(&a).map(|ip| AddrEvent::Removed(a.header.index, ip)));
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

impl AsRawFd for AddrEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl AsFd for AddrEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by `self.socket` and lives as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) }
    }
}

fn address_message(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    msg.attributes = vec![AddressAttribute::Local(ip), AddressAttribute::Address(ip)];
    msg
}

fn rule_message(rule: &MarkRule) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = if rule.ipv6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
    msg.header.action = RuleAction::ToTable;
    msg.attributes = vec![
        RuleAttribute::Priority(rule.priority),
        RuleAttribute::FwMark(rule.mark),
        RuleAttribute::FwMask(rule.mask),
        RuleAttribute::Table(rule.table),
    ];
    msg
}

fn local_default(ipv6: bool, table: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = if ipv6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
    msg.header.destination_prefix_length = 0;
    msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
    msg.header.protocol = RouteProtocol::Static;
    msg.header.scope = RouteScope::Host;
    msg.header.kind = RouteType::Local;
    // ifindex 1 is the loopback device in every netns.
    msg.attributes = vec![RouteAttribute::Table(table), RouteAttribute::Oif(1)];
    msg
}

/// The address an address message is about: IFA_LOCAL where present (point-to-point links put the
/// peer in IFA_ADDRESS), else IFA_ADDRESS.
fn address_of(msg: &AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

/// Splits a datagram into its netlink messages.
fn parse(mut buf: &[u8]) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            Ok(msg) => out.push(msg),
            // A message type this crate does not know is not ours to act on.
            Err(e) => tracing::debug!(error = %e, "skipping an unparsable netlink message"),
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        buf = &buf[step.min(buf.len())..];
    }
    Ok(out)
}

/// Maps the errno that means "already done" to success.
fn ignore(result: io::Result<()>, errno: i32) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(errno) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_datagram_is_an_error_not_a_panic() {
        assert!(parse(&[40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse(&[]).unwrap().is_empty());
    }

    #[test]
    fn rules_and_routes_carry_their_table_as_an_attribute() {
        let rule = MarkRule { ipv6: true, mark: 0x10, mask: 0xf0, table: 4000, priority: 100 };
        let msg = rule_message(&rule);
        assert_eq!(msg.header.family, AddressFamily::Inet6);
        assert!(msg.attributes.contains(&RuleAttribute::Table(4000)));
        assert!(msg.attributes.contains(&RuleAttribute::FwMask(0xf0)));
        let route = local_default(false, 4000);
        assert_eq!(route.header.kind, RouteType::Local);
        assert!(route.attributes.contains(&RouteAttribute::Table(4000)));
    }

    /// The agent's own netns has a loopback address: the dump finds it (needs no privilege).
    #[test]
    fn dumping_addresses_finds_loopback() {
        let addrs = Rtnl::open().and_then(|mut r| r.addresses()).expect("address dump");
        assert!(addrs.iter().any(|(index, ip)| *index == 1 && ip.is_loopback()), "{addrs:?}");
    }
}
