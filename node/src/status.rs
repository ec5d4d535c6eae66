//! `botclaw status`: the member table as one node sees it.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

use crate::admin::Status;
use crate::routing::CONVERSATIONS_ROLE;

pub fn fetch(admin: SocketAddr) -> Result<Status> {
    crate::http::get_json(admin, "/status", Duration::from_secs(3))
}

fn uptime(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Renders the status as an aligned table.
pub fn render(status: &Status) -> String {
    let mut rows = vec![[
        "NAME",
        "STATE",
        "ROLES",
        "CLIENT",
        "CLUSTER",
        "GOSSIP",
        "ADMIN",
        "INCARNATION",
        "UPTIME",
        "LINK",
        "TURNS/S",
        "ACTIVE",
    ]
    .map(String::from)];
    for m in &status.members {
        let name = if m.is_self { format!("{} *", m.name) } else { m.name.clone() };
        let link = if m.is_self {
            "-"
        } else if m.linked {
            "yes"
        } else {
            "no"
        };
        let incarnation = if m.bump > 0 {
            format!("{}.{}", m.incarnation, m.bump)
        } else {
            m.incarnation.to_string()
        };
        rows.push([
            name,
            m.state.clone(),
            m.roles.join(","),
            m.client_addr.clone(),
            m.cluster_addr.clone(),
            m.gossip_addr.clone(),
            m.admin_addr.clone(),
            incarnation,
            if m.state == "down" { "-".into() } else { uptime(m.uptime_s) },
            link.into(),
            m.load.as_ref().map_or("-".into(), |l| format!("{:.0}", l.turns_per_s)),
            m.load.as_ref().map_or("-".into(), |l| l.active.to_string()),
        ]);
    }
    let mut widths = [0usize; 12];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let up = status.members.iter().filter(|m| m.state == "up").count();
    let _ = writeln!(
        out,
        "node {} (pid {}, {}), {} of {} members up\n",
        status.node,
        status.pid,
        if status.joined { "joined" } else { "not joined" },
        up,
        status.members.len()
    );
    for row in rows {
        let line: Vec<String> =
            row.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(out, "\n{}", render_controller(&status.controller));
    let roles = per_role(status);
    if !roles.is_empty() {
        let _ = writeln!(out);
        for (role, l) in roles {
            let _ = if role == CONVERSATIONS_ROLE {
                writeln!(
                    out,
                    "role {role}: {} up, {:.0} turns/s, {} active conversations",
                    l.up, l.turns_per_s, l.active
                )
            } else {
                writeln!(out, "role {role}: {} up, {:.0} requests/s served", l.up, l.served_per_s)
            };
        }
    }
    out
}

/// One line on the placement controller: leader, map version, moves, shards at risk.
pub fn render_controller(c: &crate::controller::ControllerStatus) -> String {
    format!(
        "controller: leader {} (term {}), voters {}{}, map version {}, {} moves in flight, \
         {} shards under R, {} unavailable{}, {} unassigned{}{}",
        c.leader.as_deref().unwrap_or("unknown"),
        c.term,
        if c.voters.is_empty() { "-".to_string() } else { c.voters.join(",") },
        match (c.is_leader, c.role.as_str()) {
            (true, _) => format!(" ({} observers fetch from this leader)", c.observers),
            (false, "") => String::new(),
            (false, role) => format!(" (this node: {role})"),
        },
        c.map_version,
        c.moves_in_flight,
        c.shards_under_replicated,
        c.shards_unavailable,
        if c.unavailable.is_empty() {
            String::new()
        } else {
            let listed: Vec<String> = c.unavailable.iter().map(u32::to_string).collect();
            format!(
                " (shards {}{})",
                listed.join(","),
                if c.shards_unavailable > listed.len() { ",..." } else { "" }
            )
        },
        c.shards_unassigned,
        if c.owned.is_empty() {
            String::new()
        } else {
            let owned: Vec<String> = c.owned.iter().map(|(n, k)| format!("{n} {k}")).collect();
            format!("; shards owned: {}", owned.join(", "))
        },
        if c.members_unregistered == 0 {
            String::new()
        } else {
            format!(
                "; MAP FULL ({} names): {} nodes up own nothing",
                c.map_members, c.members_unregistered
            )
        },
    )
}

/// `botclaw placement --conv ID`: where a conversation lives and why.
pub fn placement(admin: SocketAddr, conv: &str) -> Result<String> {
    let path = format!("/placement?conv={}", urlencode(conv));
    let v: serde_json::Value = crate::http::get_json(admin, &path, Duration::from_secs(5))?;
    let list = |k: &str| -> String {
        let names: Vec<&str> = v[k]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if names.is_empty() {
            "-".into()
        } else {
            names.join(",")
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "conversation {conv}: shard {} ({})",
        v["shard"],
        v["state"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "  owner {}, in sync {}, learners {}, shard epoch {}",
        v["owner"].as_str().unwrap_or("-"),
        list("isr"),
        list("learners"),
        v["epoch"]
    );
    let _ = writeln!(
        out,
        "  map version {}, controller leader {}",
        v["map_version"],
        v["leader"].as_str().unwrap_or("unknown")
    );
    let _ = writeln!(
        out,
        "  ring position 0x{} ({:.2}% around the ring), conversation hash 0x{}",
        v["ring_position"].as_str().unwrap_or("?"),
        100.0 * v["ring_fraction"].as_f64().unwrap_or(0.0),
        v["conv_hash"].as_str().unwrap_or("?")
    );
    let _ = writeln!(out, "  ring wants {}", list("desired"));
    if let Some(to) = v["rebalancer_move"]["to"].as_str() {
        let _ = writeln!(out, "  the rebalancer moved this shard to {to} (load)");
    }
    let _ = writeln!(out, "  why: {}", v["why"].as_str().unwrap_or(""));
    let recent = &v["recent_turns"];
    let line = match (recent["node"].as_str(), recent["live"].as_bool()) {
        (Some(node), Some(true)) => {
            let turns: Vec<String> = recent["turns"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    let ms = t["micros"].as_f64().unwrap_or(0.0) / 1000.0;
                    format!("#{} {ms:.1} ms", t["turn"])
                })
                .collect();
            format!("recent turns on {node}: {}", turns.join(", "))
        }
        (Some(node), _) => format!("recent turns: none live on {node} (the conversation is idle)"),
        _ => "recent turns: the owner could not be asked".to_string(),
    };
    let _ = writeln!(out, "  {line}");
    Ok(out)
}

/// `botclaw shard force --shard N --to NAME`.
pub fn force(admin: SocketAddr, shard: u32, to: &str) -> Result<String> {
    let path = format!("/shard/force?shard={shard}&to={}", urlencode(to));
    crate::http::post(admin, &path, Duration::from_secs(5))
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The load of one role, summed over its up members.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RoleLoad {
    pub up: usize,
    /// Conversation turns (the `conversations` role).
    pub turns_per_s: f64,
    pub active: u64,
    /// Module requests served (module roles).
    pub served_per_s: f64,
}

/// Up members and their load per role.
pub fn per_role(status: &Status) -> std::collections::BTreeMap<String, RoleLoad> {
    let mut roles: std::collections::BTreeMap<String, RoleLoad> = Default::default();
    for m in status.members.iter().filter(|m| m.state == "up") {
        for role in &m.roles {
            let entry = roles.entry(role.clone()).or_default();
            entry.up += 1;
            let Some(load) = &m.load else { continue };
            if role == CONVERSATIONS_ROLE {
                entry.turns_per_s += f64::from(load.turns_per_s);
                entry.active += u64::from(load.active);
            }
            let served = load.modules.iter().filter(|(r, _)| r == role).map(|(_, n)| *n);
            entry.served_per_s += served.map(f64::from).sum::<f64>();
        }
    }
    roles
}

/// `botclaw drain`: asks the node at `admin` to drain, then waits until its admin port stops
/// answering (the node left and exited). Returns how long that took.
pub fn drain(admin: SocketAddr, wait: Duration) -> Result<Duration> {
    let started = std::time::Instant::now();
    let timeout = Duration::from_secs(5);
    crate::http::post(admin, "/drain", timeout)?;
    while started.elapsed() < wait {
        if crate::http::get(admin, "/health/live", timeout).is_err() {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{admin} still answers after {wait:?}")
}

/// Every up member's rebalance dry run, read through the admin port of each (the member
/// list from `admin`); a member that does not answer is left out with a note.
pub fn rebalance_dry_run(admin: SocketAddr) -> Result<Vec<crate::admin::RebalancePreview>> {
    let status = fetch(admin)?;
    let mut previews = Vec::new();
    for m in status.members.iter().filter(|m| m.state == "up") {
        let addr: SocketAddr = if m.is_self {
            admin
        } else {
            match m.admin_addr.parse() {
                Ok(a) => a,
                Err(_) => continue,
            }
        };
        match crate::http::get_json(addr, "/rebalance/dry-run", Duration::from_secs(5)) {
            Ok(p) => previews.push(p),
            Err(e) => previews.push(crate::admin::RebalancePreview {
                node: m.name.clone(),
                why: format!("did not answer: {e:#}"),
                ..Default::default()
            }),
        }
    }
    Ok(previews)
}

pub fn render_dry_run(previews: &[crate::admin::RebalancePreview]) -> String {
    let mut out = String::new();
    let imbalance = previews.iter().map(|p| p.imbalance).fold(0.0, f64::max);
    out.push_str(&format!("cluster load imbalance {imbalance:.2} (max / average; 1.00 is even)\n"));
    for p in previews {
        out.push_str(&format!("{:<16} {:>5.2}x  {}\n", p.node, p.load_ratio, p.why));
        for m in &p.moves {
            out.push_str(&format!(
                "{:<16}        would move shard {} ({:.1} turns/s) to {}\n",
                "", m.shard, m.turns_per_s, m.to
            ));
        }
    }
    if previews.iter().all(|p| p.moves.is_empty()) {
        out.push_str("nothing would move now\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::ControllerStatus;

    #[test]
    fn the_controller_line_names_this_node_s_role_and_the_leader_s_observers() {
        let voters = vec!["n0".to_string(), "n1".to_string(), "n2".to_string()];
        let leader = ControllerStatus {
            leader: Some("n0".into()),
            is_leader: true,
            observers: 7,
            role: "voter".into(),
            voters: voters.clone(),
            ..ControllerStatus::default()
        };
        let line = render_controller(&leader);
        assert!(line.contains("voters n0,n1,n2 (7 observers fetch from this leader)"), "{line}");
        let observer = ControllerStatus {
            leader: Some("n0".into()),
            role: "observer".into(),
            voters,
            ..leader
        };
        let line = render_controller(&ControllerStatus { is_leader: false, ..observer });
        assert!(line.contains("voters n0,n1,n2 (this node: observer)"), "{line}");
        assert!(!line.contains("MAP FULL"), "{line}");
    }

    #[test]
    fn the_controller_line_says_when_the_map_is_full_and_nodes_own_nothing() {
        let c = ControllerStatus {
            is_leader: true,
            map_members: 16_384,
            members_unregistered: 3,
            ..ControllerStatus::default()
        };
        let line = render_controller(&c);
        assert!(line.ends_with("; MAP FULL (16384 names): 3 nodes up own nothing"), "{line}");
    }
}
