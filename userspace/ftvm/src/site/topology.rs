//! The network of a one-machine site: namespaces for host A, host B, the witness and a client, a
//! business LAN (a bridge in its own namespace), the A-Link (a veth pair between the two hosts) and
//! a management network (a bridge in the witness's namespace, a port to each host), which is how
//! the hosts reach the witness: never over the A-Link, whose failure the witness must outlive.
//!
//! ```text
//!  <site>-client           <site>-lan                 <site>-a                       <site>-b
//!   eth0 10.77.0.100 ─── c0 ┐                ┌ a0 ─── biz0 ─ br0 ─ ftvm0 (guest TAP)
//!                           ├─ br0 (bridge) ─┤                       alink0 10.99.0.1 ─── alink0 10.99.0.2
//!                           │                └ b0 ─── biz0 ─ br0 ─ ftvm0                      (B)
//!                                                     mgmt0 10.88.0.1 ─┐       ┌─ mgmt0 10.88.0.2 (B)
//!                                   <site>-witness    mgmt 10.88.0.10 ─ wit-a ─┴─ wit-b
//! ```
//! Each host bridges its business port (`biz0`) with the guest's TAP, as a real server would bridge
//! a NIC. The guest is 10.77.0.2/24 on the business LAN.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Business LAN address of the guest.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Prefix length of the business LAN.
pub const LAN_PREFIX: u8 = 24;
/// Business LAN address of the client namespace.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// A-Link addresses of host A and host B.
pub const ALINK_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2)];
/// Management addresses of host A and host B.
pub const MGMT_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 88, 0, 1), Ipv4Addr::new(10, 88, 0, 2)];
/// The witness's management address.
pub const WITNESS_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 10);
/// The witness's port.
pub const WITNESS_PORT: u16 = 7800;
/// The management network's prefix length.
pub const MGMT_PREFIX: u8 = 24;
/// The witness side's port to each host, in the witness namespace.
pub const MGMT_PORTS: [&str; 2] = ["wit-a", "wit-b"];
/// Name of the guest TAP inside a host namespace.
pub const GUEST_TAP: &str = "ftvm0";

/// The namespaces of one site.
#[derive(Clone, Debug)]
pub struct SiteNames {
    pub lan: String,
    pub client: String,
    pub hosts: [String; 2],
    pub witness: String,
}

impl SiteNames {
    pub fn new(site: &str) -> Self {
        Self {
            lan: format!("{site}-lan"),
            client: format!("{site}-client"),
            hosts: [format!("{site}-a"), format!("{site}-b")],
            witness: format!("{site}-witness"),
        }
    }

    pub fn all(&self) -> [&str; 5] {
        [&self.lan, &self.client, &self.hosts[0], &self.hosts[1], &self.witness]
    }
}

/// Runs `ip <args>`; the error names the command and what ip said.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full)
}

/// True if the named namespace exists.
pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Builds the whole network. On error the caller tears down what was made ([`teardown`]).
pub fn build(names: &SiteNames) -> Result<()> {
    for ns in names.all() {
        if netns_exists(ns) {
            bail!("network namespace {ns} already exists (a site of that name is up: `ftvm site down` first)");
        }
    }
    for ns in names.all() {
        ip(&["netns", "add", ns])?;
        ip_in(ns, &["link", "set", "lo", "up"])?;
    }
    // The business LAN.
    ip_in(&names.lan, &["link", "add", "br0", "type", "bridge"])?;
    ip_in(&names.lan, &["link", "set", "br0", "up"])?;
    let lan_ports = [("a0", names.hosts[0].as_str()), ("b0", names.hosts[1].as_str())];
    for (port, host) in lan_ports {
        ip_in(&names.lan, &["link", "add", port, "type", "veth", "peer", "name", "biz0", "netns", host])?;
        ip_in(&names.lan, &["link", "set", port, "master", "br0", "up"])?;
        // The host bridges its business port with the guest TAP (added when the VM starts).
        ip_in(host, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(host, &["link", "set", "biz0", "master", "br0", "up"])?;
        ip_in(host, &["link", "set", "br0", "up"])?;
        ip_in(host, &["tuntap", "add", "dev", GUEST_TAP, "mode", "tap", "vnet_hdr"])?;
        ip_in(host, &["link", "set", GUEST_TAP, "master", "br0", "up"])?;
    }
    ip_in(&names.lan, &["link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", &names.client])?;
    ip_in(&names.lan, &["link", "set", "c0", "master", "br0", "up"])?;
    let client_cidr = format!("{CLIENT_IP}/{LAN_PREFIX}");
    ip_in(&names.client, &["addr", "add", &client_cidr, "dev", "eth0"])?;
    ip_in(&names.client, &["link", "set", "eth0", "up"])?;
    // The A-Link.
    ip_in(&names.hosts[0], &["link", "add", "alink0", "type", "veth", "peer", "name", "alink0", "netns", &names.hosts[1]])?;
    for (host, addr) in names.hosts.iter().zip(ALINK_IPS) {
        ip_in(host, &["addr", "add", &format!("{addr}/30"), "dev", "alink0"])?;
        ip_in(host, &["link", "set", "alink0", "up"])?;
    }
    // The management network.
    ip_in(&names.witness, &["link", "add", "mgmt", "type", "bridge"])?;
    ip_in(&names.witness, &["addr", "add", &format!("{WITNESS_IP}/{MGMT_PREFIX}"), "dev", "mgmt"])?;
    ip_in(&names.witness, &["link", "set", "mgmt", "up"])?;
    for ((host, addr), port) in names.hosts.iter().zip(MGMT_IPS).zip(MGMT_PORTS) {
        ip_in(&names.witness, &["link", "add", port, "type", "veth", "peer", "name", "mgmt0", "netns", host])?;
        ip_in(&names.witness, &["link", "set", port, "master", "mgmt", "up"])?;
        ip_in(host, &["addr", "add", &format!("{addr}/{MGMT_PREFIX}"), "dev", "mgmt0"])?;
        ip_in(host, &["link", "set", "mgmt0", "up"])?;
    }
    Ok(())
}

/// Takes every port of a host down (business, A-Link, management), as if the host lost power.
pub fn isolate_host(host_ns: &str) -> Result<()> {
    for port in ["biz0", "alink0", "mgmt0"] {
        ip_in(host_ns, &["link", "set", port, "down"])?;
    }
    Ok(())
}

/// Puts a host's cables back: business port, A-Link and management port up (see [`isolate_host`]).
pub fn reconnect_host(host_ns: &str) -> Result<()> {
    for port in ["biz0", "alink0", "mgmt0"] {
        ip_in(host_ns, &["link", "set", port, "up"])?;
    }
    Ok(())
}

/// Deletes every namespace of the site that exists (their links go with them). Carries on past
/// errors so that one stuck piece does not leave the rest behind; reports the first.
pub fn teardown(names: &SiteNames) -> Result<()> {
    let mut first_error = None;
    for ns in names.all() {
        if netns_exists(ns) {
            if let Err(e) = ip(&["netns", "del", ns]) {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
