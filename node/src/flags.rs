//! `botclaw flags`: the cluster's feature flags from the command line, through any node's
//! admin port (`GET /flags`, `POST /flags/set`, `POST /flags/delete`). A change is proposed
//! to the placement controller, applied through its log on every node, and the command
//! waits until the node it asked shows it.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use botclaw_core::flags::{Flag, FULL_BP};
use botclaw_core::shardmap::ShardMap;
use serde::{Deserialize, Serialize};

/// One flag as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlagStatus {
    pub name: String,
    pub enabled: bool,
    /// Share of conversations it is on for, in percent (two decimals).
    pub percent: f64,
    pub bot: Option<String>,
}

/// `GET /flags`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlagsStatus {
    /// The version of the map they were read from.
    pub map_version: u64,
    pub flags: Vec<FlagStatus>,
}

impl FlagsStatus {
    pub fn of(map: &ShardMap) -> FlagsStatus {
        let flags = map
            .flags()
            .iter()
            .map(|(name, f)| FlagStatus {
                name: name.to_string(),
                enabled: f.enabled,
                percent: f64::from(f.rollout_bp) / 100.0,
                bot: f.bot.clone(),
            })
            .collect();
        FlagsStatus { map_version: map.version, flags }
    }

    pub fn get(&self, name: &str) -> Option<&FlagStatus> {
        self.flags.iter().find(|f| f.name == name)
    }
}

/// A rollout in percent (0 to 100, two decimals kept) as basis points.
pub fn rollout_bp(percent: f64) -> Result<u32, String> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(format!("percent {percent}: between 0 and 100"));
    }
    Ok(((percent * 100.0).round() as u32).min(FULL_BP))
}

#[derive(Debug, clap::Subcommand)]
pub enum FlagsCommand {
    /// List the cluster's flags.
    List {
        /// Admin address of any node.
        #[arg(long, default_value = "127.0.0.1:7003", value_parser = crate::addrs::socket_addr_arg)]
        admin: SocketAddr,
        #[arg(long)]
        json: bool,
    },
    /// Create or change a flag: on for PERCENT of conversations (of bot BOT only, if given).
    Set {
        name: String,
        /// Share of conversations, 0 to 100 (default: the flag's current share, else 100).
        #[arg(long)]
        percent: Option<f64>,
        /// Only conversations of this bot.
        #[arg(long)]
        bot: Option<String>,
        /// Turn the flag off for everyone (its share is kept for when it is turned on).
        #[arg(long, conflicts_with = "on")]
        off: bool,
        /// Turn the flag on again (at its share).
        #[arg(long)]
        on: bool,
        #[arg(long, default_value = "127.0.0.1:7003", value_parser = crate::addrs::socket_addr_arg)]
        admin: SocketAddr,
    },
    /// Remove a flag (it is then off for everyone).
    Delete {
        name: String,
        #[arg(long, default_value = "127.0.0.1:7003", value_parser = crate::addrs::socket_addr_arg)]
        admin: SocketAddr,
    },
}

const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command waits for its change to show.
const APPLY_WAIT: Duration = Duration::from_secs(10);

pub fn fetch(admin: SocketAddr) -> Result<FlagsStatus> {
    crate::http::get_json(admin, "/flags", TIMEOUT)
}

pub fn render(status: &FlagsStatus) -> String {
    let mut out = format!("{:<32} {:<4} {:>8}  bot\n", "flag", "on", "percent");
    for f in &status.flags {
        let on = if f.enabled { "on" } else { "off" };
        let bot = f.bot.as_deref().unwrap_or("(every bot)");
        let _ = writeln!(out, "{:<32} {:<4} {:>7.2}%  {bot}", f.name, on, f.percent);
    }
    if status.flags.is_empty() {
        out.push_str("(no flags)\n");
    }
    out
}

/// Runs one `botclaw flags` command; what to print.
pub fn run(cmd: FlagsCommand) -> Result<String> {
    match cmd {
        FlagsCommand::List { admin, json } => {
            let status = fetch(admin)?;
            Ok(if json {
                serde_json::to_string_pretty(&status).expect("flags serialize") + "\n"
            } else {
                render(&status)
            })
        }
        FlagsCommand::Set { name, percent, bot, off, on, admin } => {
            let current = fetch(admin)?;
            let was = current.get(&name);
            let percent = percent.or(was.map(|f| f.percent)).unwrap_or(100.0);
            let enabled = if off { false } else { on || was.is_none_or(|f| f.enabled) };
            let bot = bot.or_else(|| was.and_then(|f| f.bot.clone()));
            let flag =
                Flag { enabled, rollout_bp: rollout_bp(percent).map_err(anyhow::Error::msg)?, bot };
            let mut path = format!(
                "/flags/set?name={}&percent={}&enabled={}",
                crate::status::urlencode(&name),
                f64::from(flag.rollout_bp) / 100.0,
                flag.enabled
            );
            if let Some(bot) = &flag.bot {
                let _ = write!(path, "&bot={}", crate::status::urlencode(bot));
            }
            crate::http::post(admin, &path, TIMEOUT)?;
            let shown = FlagStatus {
                name: name.clone(),
                enabled: flag.enabled,
                percent: f64::from(flag.rollout_bp) / 100.0,
                bot: flag.bot.clone(),
            };
            let took = wait_until(admin, |s| s.get(&name) == Some(&shown))?;
            Ok(format!(
                "flag {name}: {} for {:.2}% of {} conversations (applied in {} ms)\n",
                if flag.enabled { "on" } else { "off" },
                shown.percent,
                flag.bot.as_deref().map(|b| format!("{b}'s")).unwrap_or_else(|| "all".into()),
                took.as_millis()
            ))
        }
        FlagsCommand::Delete { name, admin } => {
            let path = format!("/flags/delete?name={}", crate::status::urlencode(&name));
            crate::http::post(admin, &path, TIMEOUT)?;
            let took = wait_until(admin, |s| s.get(&name).is_none())?;
            Ok(format!("flag {name}: removed (applied in {} ms)\n", took.as_millis()))
        }
    }
}

/// Polls the node's flags until `done`; how long it took.
fn wait_until(admin: SocketAddr, done: impl Fn(&FlagsStatus) -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if done(&fetch(admin)?) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > APPLY_WAIT {
            bail!(
                "proposed, but not applied within {} s: is the placement controller up (botclaw status)?",
                APPLY_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percents_become_basis_points() {
        assert_eq!(rollout_bp(30.0), Ok(3000));
        assert_eq!(rollout_bp(12.345), Ok(1235));
        assert_eq!(rollout_bp(100.0), Ok(FULL_BP));
        for bad in [-1.0, 100.5, f64::NAN, f64::INFINITY] {
            assert!(rollout_bp(bad).is_err(), "{bad}");
        }
    }
}
