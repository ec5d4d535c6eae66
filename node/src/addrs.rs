//! Addresses on real machines: names resolved (seeds again and again), what a node
//! advertises when it binds a wildcard address, the per-data-directory incarnation and the
//! members a node remembers from its last run.
//!
//! The decisions are small pure functions ([`choose_advertised`], [`next_incarnation`]);
//! the rest is the IO around them.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{bail, Context, Result};
use botclaw_config::{HostPort, NodeConfig};

/// Every address `hp` stands for (all A/AAAA records of a name: a headless Service's pods).
pub async fn resolve(hp: &HostPort) -> std::io::Result<Vec<SocketAddr>> {
    if let Some(addr) = hp.socket_addr() {
        return Ok(vec![addr]);
    }
    let mut addrs: Vec<SocketAddr> =
        tokio::net::lookup_host((hp.host.as_str(), hp.port)).await?.collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// The first of `addrs` of the family wanted (IPv4 or not), else the first.
fn prefer(addrs: &[SocketAddr], v4: bool) -> Option<SocketAddr> {
    addrs.iter().find(|a| a.is_ipv4() == v4).or(addrs.first()).copied()
}

/// A command-line address: `ip:port` or `host:port`, resolved at once (IPv4 preferred).
pub fn socket_addr_arg(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let hp: HostPort = text.parse()?;
    if let Some(addr) = hp.socket_addr() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = (hp.host.as_str(), hp.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {hp}: {e}"))?
        .collect();
    prefer(&addrs, true).ok_or_else(|| format!("{hp} has no address"))
}

/// The addresses of every seed that resolves, and the ones that did not with why.
pub async fn resolve_all(seeds: &[HostPort]) -> (Vec<SocketAddr>, Vec<(HostPort, String)>) {
    let (mut addrs, mut failed) = (Vec::new(), Vec::new());
    for seed in seeds {
        match resolve(seed).await {
            Ok(found) if found.is_empty() => failed.push((seed.clone(), "no address".into())),
            Ok(found) => addrs.extend(found),
            Err(e) => failed.push((seed.clone(), e.to_string())),
        }
    }
    addrs.sort();
    addrs.dedup();
    (addrs, failed)
}

/// What this node announces for its four ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertised {
    pub client: SocketAddr,
    pub cluster: SocketAddr,
    pub gossip: SocketAddr,
    pub admin: SocketAddr,
}

/// How the advertised host was chosen, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSource {
    /// `advertise_host` (resolved if a name).
    Configured(String),
    /// The source address this host uses toward a seed.
    TowardSeed(SocketAddr),
    /// An address of this machine's hostname.
    Hostname(String),
}

/// The advertised address of one port: its override, else `host` at the bound port, else
/// the bind address if it is specific. `None` when the bind address is a wildcard and
/// nothing says which address peers should use.
pub fn choose_advertised(
    bound: SocketAddr,
    port_override: Option<SocketAddr>,
    host: Option<IpAddr>,
) -> Option<SocketAddr> {
    if let Some(addr) = port_override {
        return Some(addr);
    }
    if let Some(ip) = host {
        return Some(SocketAddr::new(ip, bound.port()));
    }
    (!bound.ip().is_unspecified()).then_some(bound)
}

/// Refuses to advertise a loopback address to seeds on other hosts: they could never
/// reach it back.
pub fn check_reachable(advertised: &Advertised, seeds: &[SocketAddr]) -> Result<()> {
    let remote = seeds.iter().find(|s| !s.ip().is_loopback());
    if let (true, Some(seed)) = (advertised.gossip.ip().is_loopback(), remote) {
        bail!(
            "this node would advertise {} (loopback) but seed {seed} is on another host, which \
             could never reach it: bind a reachable address or set advertise_host",
            advertised.gossip
        );
    }
    Ok(())
}

/// Resolves one `host:port` to a single address, preferring one of `family_of`'s family.
async fn resolve_one(hp: &HostPort, family_of: SocketAddr) -> Result<SocketAddr> {
    let addrs = resolve(hp).await.with_context(|| format!("cannot resolve {hp}"))?;
    prefer(&addrs, family_of.is_ipv4()).with_context(|| format!("{hp} has no address"))
}

/// The address this machine sends from toward `seed` (no packet is sent).
fn source_toward(seed: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr =
        if seed.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(seed).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified() && !ip.is_loopback()).then_some(ip)
}

/// This machine's hostname.
pub fn hostname() -> Option<String> {
    let name = gethostname::gethostname().to_string_lossy().trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// The host to advertise when a port binds a wildcard address and `advertise_host` is not
/// set: the source address toward the first seed on another host, else a non-loopback
/// address of the hostname.
async fn derive_host(seeds: &[SocketAddr]) -> Option<(IpAddr, HostSource)> {
    for seed in seeds.iter().filter(|s| !s.ip().is_loopback()) {
        if let Some(ip) = source_toward(*seed) {
            return Some((ip, HostSource::TowardSeed(*seed)));
        }
    }
    let name = hostname()?;
    let addrs = tokio::net::lookup_host((name.as_str(), 0)).await.ok()?;
    let mut ips: Vec<IpAddr> =
        addrs.map(|a| a.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified()).collect();
    ips.sort_by_key(|ip| !ip.is_ipv4());
    ips.first().map(|ip| (*ip, HostSource::Hostname(name)))
}

/// What this node advertises, with how its host was chosen (if it had to be).
pub async fn advertised(
    cfg: &NodeConfig,
    seeds: &[SocketAddr],
) -> Result<(Advertised, Option<HostSource>)> {
    let a = &cfg.advertise;
    let binds = [cfg.client_addr, cfg.cluster_addr, cfg.gossip_addr, cfg.admin_addr];
    let overrides = [&a.client, &a.cluster, &a.gossip, &a.admin];
    let wildcard = binds.iter().zip(overrides).any(|(b, o)| o.is_none() && b.ip().is_unspecified());
    let (host, source) = if let Some(host) = &a.host {
        let hp = HostPort { host: host.clone(), port: cfg.gossip_addr.port() };
        let ip = resolve_one(&hp, cfg.gossip_addr).await.context("advertise_host")?.ip();
        (Some(ip), Some(HostSource::Configured(host.clone())))
    } else if wildcard {
        let Some((ip, how)) = derive_host(seeds).await else {
            bail!(
                "a port binds a wildcard address (0.0.0.0 or ::) and no address to advertise \
                 could be derived (no seed on another host, no address for this host's name): \
                 set advertise_host (BOTCLAW_ADVERTISE_HOST) to the address peers reach this \
                 node at"
            )
        };
        (Some(ip), Some(how))
    } else {
        (None, None)
    };
    let names = [
        "advertise_client_addr",
        "advertise_cluster_addr",
        "advertise_gossip_addr",
        "advertise_admin_addr",
    ];
    let mut out = [cfg.client_addr; 4];
    for (i, ((bind, o), field)) in binds.iter().zip(overrides).zip(names).enumerate() {
        let port_override = match o {
            Some(hp) => Some(resolve_one(hp, *bind).await.context(field)?),
            None => None,
        };
        out[i] = choose_advertised(*bind, port_override, host)
            .expect("a host was found for every wildcard bind above");
    }
    let [client, cluster, gossip, admin] = out;
    Ok((Advertised { client, cluster, gossip, admin }, source))
}

/// The next incarnation: later than every earlier one of this data directory even if the
/// clock stepped back, and than the clock (so it also beats an identity from a lost data
/// directory, started at an earlier time).
pub fn next_incarnation(previous: Option<u64>, now_ms: u64) -> u64 {
    previous.map_or(now_ms, |p| now_ms.max(p.saturating_add(1)))
}

/// Reads, raises and stores this data directory's incarnation (file `incarnation`).
pub fn take_incarnation(dir: &Path, now_ms: u64) -> Result<u64> {
    let path = dir.join("incarnation");
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text.trim().parse::<u64>().with_context(|| {
            format!("{} does not hold a number: remove it to start afresh", path.display())
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let next = next_incarnation(previous, now_ms);
    write_atomically(&path, format!("{next}\n").as_bytes())?;
    Ok(next)
}

/// Members' gossip addresses remembered from the last run (file `peers`): a restarted node
/// joins through them even if its command names no seed.
pub fn remembered_peers(dir: &Path) -> Vec<SocketAddr> {
    let text = std::fs::read_to_string(dir.join("peers")).unwrap_or_default();
    text.lines().filter_map(|l| l.trim().parse().ok()).take(PEERS_REMEMBERED_MAX).collect()
}

/// Members remembered at most (the file is rewritten as members come and go).
pub const PEERS_REMEMBERED_MAX: usize = 64;

pub fn remember_peers(dir: &Path, peers: &[SocketAddr]) -> Result<()> {
    let text: String = peers.iter().take(PEERS_REMEMBERED_MAX).map(|p| format!("{p}\n")).collect();
    write_atomically(&dir.join("peers"), text.as_bytes())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).ok();
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_wildcard_bind_needs_a_host_and_overrides_win() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(choose_advertised(sa("0.0.0.0:7000"), None, None), None);
        assert_eq!(
            choose_advertised(sa("0.0.0.0:7000"), None, Some(ip)),
            Some(sa("10.0.0.7:7000"))
        );
        assert_eq!(choose_advertised(sa("10.0.0.2:7000"), None, None), Some(sa("10.0.0.2:7000")));
        assert_eq!(
            choose_advertised(sa("0.0.0.0:7000"), Some(sa("192.0.2.1:30000")), Some(ip)),
            Some(sa("192.0.2.1:30000"))
        );
        assert_eq!(choose_advertised(sa("[::]:7000"), None, None), None);
    }

    #[test]
    fn loopback_is_not_advertised_to_remote_seeds() {
        let local = Advertised {
            client: sa("127.0.0.1:7000"),
            cluster: sa("127.0.0.1:7001"),
            gossip: sa("127.0.0.1:7002"),
            admin: sa("127.0.0.1:7003"),
        };
        assert!(check_reachable(&local, &[sa("127.0.0.1:7012")]).is_ok());
        let err = check_reachable(&local, &[sa("127.0.0.1:7012"), sa("10.0.0.2:7002")]);
        assert!(err.unwrap_err().to_string().contains("10.0.0.2:7002"));
    }

    #[test]
    fn incarnations_rise_even_when_the_clock_steps_back() {
        assert_eq!(next_incarnation(None, 1_000), 1_000);
        assert_eq!(next_incarnation(Some(5_000), 1_000), 5_001, "clock stepped back");
        assert_eq!(next_incarnation(Some(5_000), 9_000), 9_000);
        let dir = tempfile::tempdir().unwrap();
        let a = take_incarnation(dir.path(), 2_000).unwrap();
        let b = take_incarnation(dir.path(), 1_000).unwrap();
        assert!(b > a, "{b} after {a}");
        std::fs::write(dir.path().join("incarnation"), "junk").unwrap();
        assert!(take_incarnation(dir.path(), 1).unwrap_err().to_string().contains("number"));
    }

    #[test]
    fn peers_are_remembered_up_to_a_limit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(remembered_peers(dir.path()).is_empty());
        let many: Vec<SocketAddr> =
            (0..100).map(|i| SocketAddr::from(([10, 0, 0, 1], 7000 + i))).collect();
        remember_peers(dir.path(), &many).unwrap();
        assert_eq!(remembered_peers(dir.path()), many[..PEERS_REMEMBERED_MAX]);
    }

    #[tokio::test]
    async fn names_resolve_to_every_address() {
        let hp: HostPort = "localhost:7002".parse().unwrap();
        let addrs = resolve(&hp).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 7002), "{addrs:?}");
        let (found, failed) = resolve_all(&[hp, "no-such-host.invalid:1".parse().unwrap()]).await;
        assert!(!found.is_empty());
        assert_eq!(failed.len(), 1, "{failed:?}");
    }
}
