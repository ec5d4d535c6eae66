//! A small blocking HTTP client for the operator commands (`status`, `drain`, `up`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

/// The body of a 2xx answer; otherwise an error with the status and what the node said.
fn body(mut resp: ureq::http::Response<ureq::Body>, what: &str) -> Result<String> {
    let status = resp.status();
    let text = resp.body_mut().read_to_string().with_context(|| format!("reading {what}"))?;
    if !status.is_success() {
        anyhow::bail!("{what}: {status}: {}", text.trim());
    }
    Ok(text)
}

/// `GET http://{addr}{path}`, returning the body of a 2xx answer.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let url = format!("http://{addr}{path}");
    let resp = agent(timeout).get(&url).call().with_context(|| format!("GET {url}"))?;
    body(resp, &format!("GET {url}"))
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
    post_with_token(addr, path, timeout, std::env::var(ADMIN_TOKEN_ENV).ok().as_deref())
}

/// `POST http://{addr}{path}` with no body and `token` as a bearer token, if any.
pub fn post_with_token(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    token: Option<&str>,
) -> Result<String> {
    let url = format!("http://{addr}{path}");
    let mut req = agent(timeout).post(&url);
    if let Some(token) = token {
        req = req.header("Authorization", &format!("Bearer {token}"));
    }
    let resp = req.send_empty().with_context(|| format!("POST {url}"))?;
    body(resp, &format!("POST {url}"))
}
