//! A small blocking HTTP client for the operator commands (`status`, `drain`, `up`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(timeout)).build().into()
}

/// `GET http://{addr}{path}`, returning the body of a 2xx answer.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let url = format!("http://{addr}{path}");
    let mut resp = agent(timeout).get(&url).call().with_context(|| format!("GET {url}"))?;
    resp.body_mut().read_to_string().with_context(|| format!("reading {url}"))
}

/// `GET` and parse JSON.
pub fn get_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<T> {
    let body = get(addr, path, timeout)?;
    serde_json::from_str(&body).with_context(|| format!("bad JSON from http://{addr}{path}"))
}

/// The environment variable the CLI reads the admin token from (sent with every POST).
pub const ADMIN_TOKEN_ENV: &str = "BOTCLAW_ADMIN_TOKEN";

/// `POST http://{addr}{path}` with no body (and `$BOTCLAW_ADMIN_TOKEN` as a bearer token,
/// if set), returning the body of a 2xx answer.
pub fn post(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let url = format!("http://{addr}{path}");
    let mut req = agent(timeout).post(&url);
    if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV) {
        req = req.header("Authorization", &format!("Bearer {token}"));
    }
    let mut resp = req.send_empty().with_context(|| format!("POST {url}"))?;
    resp.body_mut().read_to_string().with_context(|| format!("reading {url}"))
}
