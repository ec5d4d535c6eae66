//! Request and response types of the chat protocol (version 1).
//!
//! ```text
//! {"op":"hello","token":"...","client":"name"}          -> {"op":"welcome","node":"...","protocol":1}
//! {"op":"say","conv":"c-42","id":"m-1","text":"hi","bot":"shop","user":"u-7"}
//!                                                        -> {"op":"reply","conv":"c-42","id":"m-1","messages":[...],"turn":3,"node":"..."}
//! {"op":"history","conv":"c-42","limit":20}              -> {"op":"history","conv":"c-42","turns":[...],"node":"..."}
//! {"op":"topology"}                                      -> {"op":"topology","nodes":[{"name":...,"client_addr":...}]}
//! {"op":"ping"}                                          -> {"op":"pong","node":"..."}
//! errors: {"op":"error","id":...,"conv":...,"code":"...","message":"...","retry_after_ms":...}
//! ```

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest conversation id, message id, bot or user name accepted.
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
    History {
        conv: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
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
    Ok(())
}

/// Parses and validates one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(line)
        .map_err(|e| bad(format!("request is not valid UTF-8: {e}"), None, None))?;
    let request: Request = serde_json::from_str(text).map_err(|e| {
        // Best effort to echo the id and conv of a malformed request, so a pipelining
        // client can tell which request failed.
        let loose: Option<serde_json::Value> = serde_json::from_str(text).ok();
        let field = |name: &str| {
            loose.as_ref().and_then(|v| v.get(name)).and_then(|v| v.as_str()).map(String::from)
        };
        bad(format!("invalid request: {e}"), field("id"), field("conv"))
    })?;
    let checked = match &request {
        Request::Say { conv, id, bot, user, .. } => check_id("conv", conv)
            .and_then(|_| check_id("id", id))
            .and_then(|_| bot.as_deref().map_or(Ok(()), |b| check_id("bot", b)))
            .and_then(|_| user.as_deref().map_or(Ok(()), |u| check_id("user", u)))
            .map_err(|m| bad(m, Some(id.clone()), Some(conv.clone()))),
        Request::History { conv, .. } => {
            check_id("conv", conv).map_err(|m| bad(m, None, Some(conv.clone())))
        }
        _ => Ok(()),
    };
    checked.map(|_| request)
}

#[cfg(test)]
mod tests;
