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

/// `POST http://{addr}{path}` with no body, returning the body of a 2xx answer.
pub fn post(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let url = format!("http://{addr}{path}");
    let mut resp = agent(timeout).post(&url).send_empty().with_context(|| format!("POST {url}"))?;
    resp.body_mut().read_to_string().with_context(|| format!("reading {url}"))
}
