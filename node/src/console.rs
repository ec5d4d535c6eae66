//! The web console, served by every node's admin port at `/console`: the members, their
//! load, latency and errors, the shard distribution and the placement controller, updated
//! live over server-sent events; a conversation lookup; drain and flag controls (behind
//! the admin token when one is set).
//!
//! The page, its script and its style are embedded in the binary (no build step, no CDN:
//! it works without network access). `/console/events` sends one event a second with this
//! node's status and, for every member up, its own status and the metric lines the page
//! charts, read from the member's admin port (`console_fetch_timeout`); a member that does
//! not answer is shown as such.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::admin::{current_status, metrics_text, AdminState, Status};

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const STYLE_CSS: &str = include_str!("console/console.css");

/// How long the console waits for another member's status and metrics.
const FETCH_TIMEOUT: Duration = Duration::from_millis(800);
/// How often the events go out.
const EVENT_PERIOD: Duration = Duration::from_secs(1);
/// Metric families the page reads (the rest of `/metrics` is not sent).
const CHARTED: [&str; 5] = [
    "botclaw_turn_latency_seconds_bucket",
    "botclaw_errors_total",
    "botclaw_held_now",
    "botclaw_work_inflight_bytes",
    "botclaw_forwards_total",
];
/// The page refuses to render more than this many bytes of metric lines per member.
const CHARTED_BYTES_MAX: usize = 64 * 1024;
/// Consoles open at once on this node (each reads every member once a second); more are
/// answered 503.
const STREAMS_MAX: usize = 16;
static STREAMS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(STREAMS_MAX);

/// Only scripts, styles and connections of this origin: the console loads nothing else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'; form-action 'none'";

pub fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/console", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console/app.js", get(|| async { asset("text/javascript", APP_JS) }))
        .route("/console/console.css", get(|| async { asset("text/css", STYLE_CSS) }))
        .route("/console/events", get(events))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// One member as the console shows it.
#[derive(Debug, Serialize)]
struct NodeView {
    name: String,
    /// Its status answered (`None`: it did not, within the timeout).
    status: Option<Status>,
    /// Its charted metric lines (OpenMetrics text).
    metrics: String,
    /// What its rebalancer would move now.
    preview: Option<crate::admin::RebalancePreview>,
}

#[derive(Debug, Serialize)]
struct Snapshot {
    /// This node's view: members, controller, placement.
    status: Status,
    nodes: Vec<NodeView>,
}

fn charted(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines().filter(|l| CHARTED.iter().any(|c| l.starts_with(c))) {
        if out.len() + line.len() >= CHARTED_BYTES_MAX {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A member's status and charted metrics, read from its admin port.
async fn fetch_member(admin: std::net::SocketAddr) -> NodeView {
    let got = tokio::task::spawn_blocking(move || {
        let status = crate::http::get_json::<Status>(admin, "/status", FETCH_TIMEOUT).ok();
        let metrics = crate::http::get(admin, "/metrics", FETCH_TIMEOUT).unwrap_or_default();
        let preview = crate::http::get_json(admin, "/rebalance/dry-run", FETCH_TIMEOUT).ok();
        NodeView { name: String::new(), status, metrics: charted(&metrics), preview }
    })
    .await;
    got.unwrap_or(NodeView {
        name: String::new(),
        status: None,
        metrics: String::new(),
        preview: None,
    })
}

async fn snapshot(s: &AdminState) -> Snapshot {
    let status = current_status(s).await;
    let mut fetches = Vec::new();
    for m in status.members.iter().filter(|m| !m.is_self && m.state == "up") {
        let Ok(admin) = m.admin_addr.parse() else { continue };
        let name = m.name.clone();
        fetches.push(async move { NodeView { name, ..fetch_member(admin).await } });
    }
    let mut nodes = futures::future::join_all(fetches).await;
    let own = metrics_text(s).await.map(|t| charted(&t)).unwrap_or_default();
    let preview = Some(s.preview.lock().expect("preview lock").clone());
    nodes.push(NodeView {
        name: status.node.clone(),
        status: Some(status.clone()),
        metrics: own,
        preview,
    });
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Snapshot { status, nodes }
}

/// `GET /console/events`: a snapshot at once, then one a second, while fewer than
/// [`STREAMS_MAX`] consoles are open here.
async fn events(State(s): State<Arc<AdminState>>) -> Response {
    let Ok(permit) = STREAMS.try_acquire() else {
        let why = format!("{STREAMS_MAX} consoles are open on this node; try another node\n");
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    };
    // The permit lives as long as the stream (the browser's connection).
    let stream = futures::stream::unfold((s, true, permit), |(s, first, permit)| async move {
        if !first {
            tokio::time::sleep(EVENT_PERIOD).await;
        }
        let snap = snapshot(&s).await;
        let event = Event::default().event("snapshot").json_data(&snap);
        Some((event, (s, false, permit)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[derive(Deserialize)]
pub struct DrainQuery {
    node: String,
}

/// `POST /console/drain?node=NAME`: drains a member through its own admin port, with the
/// caller's credential (this route is behind the same guard as `/drain`).
pub async fn drain(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(q): Query<DrainQuery>,
) -> Response {
    let status = current_status(&s).await;
    let Some(member) = status.members.iter().find(|m| m.name == q.node) else {
        return (StatusCode::NOT_FOUND, format!("no member {:?}\n", q.node)).into_response();
    };
    let Ok(admin) = member.admin_addr.parse::<std::net::SocketAddr>() else {
        return (StatusCode::BAD_GATEWAY, "its admin address does not parse\n").into_response();
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let sent = tokio::task::spawn_blocking(move || {
        crate::http::post_with_token(admin, "/drain", FETCH_TIMEOUT * 5, token.as_deref())
    })
    .await;
    match sent {
        Ok(Ok(body)) => (StatusCode::ACCEPTED, body).into_response(),
        Ok(Err(e)) => (StatusCode::BAD_GATEWAY, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
