//! Request and response types of the chat protocol (version 1).
//!
//! ```text
//! {"op":"hello","token":"...","client":"name"}          -> {"op":"welcome","node":"...","protocol":1}
//! {"op":"say","conv":"c-42","id":"m-1","text":"hi","bot":"shop","user":"u-7"}
//!                                                        -> {"op":"reply","conv":"c-42","id":"m-1","messages":[...],"turn":3,"node":"..."}
//! {"op":"history","conv":"c-42","limit":20,"before":9}   -> {"op":"history","conv":"c-42","turns":[...],"more":true,"node":"..."}
//! {"op":"topology"}                                      -> {"op":"topology","nodes":[{"name":...,"client_addr":...}]}
//! {"op":"ping"}                                          -> {"op":"pong","node":"..."}
//! errors: {"op":"error","id":...,"conv":...,"code":"...","message":"...","retry_after_ms":...}
//! ```

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest conversation id, message id, bot or user name accepted (none may hold control
/// characters either: they reach logs, metrics and other nodes).
pub const ID_BYTES_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
    },
    Say {
        conv: String,
        id: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bot: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// The last `limit` kept turns (numbered below `before`, when given), oldest first; an
    /// answer holds at most the node's `history_bytes_max` bytes of turns and says `more`
    /// when older kept turns remain (ask again with `before` = its first turn).
    History {
        conv: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
    },
    Topology,
    Ping,
}

/// One turn in a `history` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryTurn {
    pub turn: u64,
    pub id: String,
    pub text: String,
    pub messages: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// One live node in a `topology` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyNode {
    pub name: String,
    pub client_addr: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    TooLarge,
    Busy,
    Unavailable,
    Timeout,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Busy => "busy",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }

    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::TooLarge,
        ErrorCode::Busy,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::Internal,
    ];

    /// Whether resending the same request (same id) later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Busy | ErrorCode::Unavailable | ErrorCode::Timeout)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Response {
    Welcome {
        node: String,
        protocol: u32,
    },
    Reply {
        conv: String,
        id: String,
        messages: Vec<String>,
        turn: u64,
        node: String,
    },
    History {
        conv: String,
        turns: Vec<HistoryTurn>,
        /// Older kept turns were left out of this page.
        #[serde(default)]
        more: bool,
        node: String,
    },
    Topology {
        nodes: Vec<TopologyNode>,
    },
    Pong {
        node: String,
    },
    Error {
        #[serde(default)]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conv: Option<String>,
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error {
            id: None,
            conv: None,
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// Serializes to one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("responses always serialize");
        out.push(b'\n');
        out
    }
}

impl Request {
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("requests always serialize");
        out.push(b'\n');
        out
    }
}

/// Why a request line was refused, with what the error reply should carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
    /// The request's `id` and `conv`, when they could be read.
    pub id: Option<String>,
    pub conv: Option<String>,
}

impl RequestError {
    pub fn into_response(self) -> Response {
        Response::Error {
            id: self.id,
            conv: self.conv,
            code: self.code,
            message: self.message,
            retry_after_ms: None,
        }
    }
}

fn bad(message: String, id: Option<String>, conv: Option<String>) -> RequestError {
    RequestError { code: ErrorCode::BadRequest, message, id, conv }
}

fn check_id(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("field `{field}` must not be empty"));
    }
    if value.len() > ID_BYTES_MAX {
        return Err(format!("field `{field}` is longer than {ID_BYTES_MAX} bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("field `{field}` holds control characters"));
    }
    Ok(())
}

/// Every field any request may carry. Parsing into this flat struct (strings borrowed
/// where they have no escapes) and then checking the `op` avoids serde's buffering of
/// internally tagged enums, which costs an allocation per field per request.
#[derive(Deserialize)]
struct FlatRequest<'a> {
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    conv: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    bot: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client: Option<Cow<'a, str>>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    before: Option<u64>,
}

const OPS: &str = "hello, say, history, topology, ping";

/// Parses and validates one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(line)
        .map_err(|e| bad(format!("request is not valid UTF-8: {e}"), None, None))?;
    let raw: FlatRequest<'_> = serde_json::from_str(text).map_err(|e| {
        // Best effort to echo the id and conv of a malformed request, so a pipelining
        // client can tell which request failed.
        let loose: Option<serde_json::Value> = serde_json::from_str(text).ok();
        let field = |name: &str| {
            loose.as_ref().and_then(|v| v.get(name)).and_then(|v| v.as_str()).map(String::from)
        };
        bad(format!("invalid request: {e}"), field("id"), field("conv"))
    })?;
    let own = |v: Option<Cow<'_, str>>| v.map(Cow::into_owned);
    let (id, conv) = (own(raw.id), own(raw.conv));
    let missing = |field: &str, id: Option<String>, conv: Option<String>| {
        Err(bad(format!("invalid request: missing field `{field}`"), id, conv))
    };
    let Some(op) = raw.op else { return missing("op", id, conv) };
    match &*op {
        "say" => {
            let Some(c) = conv else { return missing("conv", id, None) };
            let Some(i) = id else { return missing("id", None, Some(c)) };
            let Some(text) = raw.text else { return missing("text", Some(i), Some(c)) };
            let (bot, user) = (own(raw.bot), own(raw.user));
            let checked = check_id("conv", &c)
                .and_then(|_| check_id("id", &i))
                .and_then(|_| bot.as_deref().map_or(Ok(()), |b| check_id("bot", b)))
                .and_then(|_| user.as_deref().map_or(Ok(()), |u| check_id("user", u)));
            match checked {
                Ok(()) => Ok(Request::Say { conv: c, id: i, text: text.into_owned(), bot, user }),
                Err(m) => Err(bad(m, Some(i), Some(c))),
            }
        }
        "history" => {
            let Some(c) = conv else { return missing("conv", id, None) };
            match check_id("conv", &c) {
                Ok(()) => Ok(Request::History { conv: c, limit: raw.limit, before: raw.before }),
                Err(m) => Err(bad(m, None, Some(c))),
            }
        }
        "hello" => Ok(Request::Hello { token: own(raw.token), client: own(raw.client) }),
        "topology" => Ok(Request::Topology),
        "ping" => Ok(Request::Ping),
        other => Err(bad(format!("unknown op `{other}`, expected one of {OPS}"), id, conv)),
    }
}

/// Every field any response may carry (see [`FlatRequest`] for why).
#[derive(Deserialize)]
struct FlatResponse {
    op: String,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    protocol: Option<u32>,
    #[serde(default)]
    conv: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    messages: Option<Vec<String>>,
    #[serde(default)]
    turn: Option<u64>,
    #[serde(default)]
    turns: Option<Vec<HistoryTurn>>,
    #[serde(default)]
    more: Option<bool>,
    #[serde(default)]
    nodes: Option<Vec<TopologyNode>>,
    #[serde(default)]
    code: Option<ErrorCode>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// Parses one response line (for clients).
pub fn parse_response(line: &[u8]) -> Result<Response, String> {
    let r: FlatResponse =
        serde_json::from_slice(line).map_err(|e| format!("invalid response: {e}"))?;
    let need = |what: &str| format!("response `{}` lacks `{what}`", r.op);
    Ok(match r.op.as_str() {
        "welcome" => Response::Welcome {
            node: r.node.ok_or_else(|| need("node"))?,
            protocol: r.protocol.ok_or_else(|| need("protocol"))?,
        },
        "reply" => Response::Reply {
            conv: r.conv.ok_or_else(|| need("conv"))?,
            id: r.id.ok_or_else(|| need("id"))?,
            messages: r.messages.ok_or_else(|| need("messages"))?,
            turn: r.turn.ok_or_else(|| need("turn"))?,
            node: r.node.ok_or_else(|| need("node"))?,
        },
        "history" => Response::History {
            conv: r.conv.ok_or_else(|| need("conv"))?,
            turns: r.turns.ok_or_else(|| need("turns"))?,
            more: r.more.unwrap_or(false),
            node: r.node.ok_or_else(|| need("node"))?,
        },
        "topology" => Response::Topology { nodes: r.nodes.ok_or_else(|| need("nodes"))? },
        "pong" => Response::Pong { node: r.node.ok_or_else(|| need("node"))? },
        "error" => Response::Error {
            id: r.id,
            conv: r.conv,
            code: r.code.ok_or_else(|| need("code"))?,
            message: r.message.unwrap_or_default(),
            retry_after_ms: r.retry_after_ms,
        },
        other => return Err(format!("unknown response op `{other}`")),
    })
}

#[cfg(test)]
mod tests;
