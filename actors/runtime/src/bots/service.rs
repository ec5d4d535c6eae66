//! A bot that runs as an HTTP service, in any language (`[[bots]] kind = "http"`).
//!
//! For each turn the conversation's owner POSTs one JSON object (payload version 1, schema in
//! `cluster-config/examples/services/bot-turn-v1.schema.json`):
//! `{"version":1,"bot","conv","turn","id","user","text","state","flags"}` and expects
//! `{"messages":[...],"state":...}` back. `state` is opaque JSON the service returns and
//! botclaw keeps durable and replicated with the conversation (`null` on the first turn), so
//! the service can be stateless. A turn whose call failed applies nothing; a client's retry
//! with the same `id` may reach the service again, and the conversation applies one answer:
//! `id` is the idempotency key.
//!
//! A service may answer `{"calls":[{"module","key","request"}]}` instead: botclaw makes
//! those module calls (through its module services and their cache, see
//! `crate::modules::ModuleServices`) and POSTs the turn again with `"results"`, one per
//! call in order (`{"module","key","answer"}` or `{"module","key","error"}`), for at most
//! `module_rounds_max` rounds of at most [`MODULE_CALLS_PER_ROUND_MAX`] calls.
//!
//! The calls are made by a [`ServicePool`] (balancing, limits, retries, breakers).

use std::sync::Arc;

use botclaw_config::ServiceConfig;
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::bot::{Bot, BotError, TurnContext, TurnInput};
use crate::services::{ServiceMetrics, ServicePool};

/// The payload version this node sends.
pub const PAYLOAD_VERSION: u32 = 1;

/// Module calls one round may ask for.
pub const MODULE_CALLS_PER_ROUND_MAX: usize = 16;

#[derive(Serialize)]
struct TurnRequest<'a> {
    version: u32,
    bot: &'a str,
    conv: &'a str,
    turn: u64,
    id: &'a str,
    user: Option<&'a str>,
    text: &'a str,
    state: Option<&'a RawValue>,
    flags: &'a [&'a str],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    results: &'a [CallResult],
}

#[derive(Deserialize)]
struct TurnAnswer {
    #[serde(default)]
    messages: Vec<String>,
    #[serde(default)]
    state: Option<Box<RawValue>>,
    #[serde(default)]
    calls: Vec<ModuleCall>,
}

#[derive(Deserialize)]
struct ModuleCall {
    module: String,
    key: String,
    #[serde(default)]
    request: Option<Box<RawValue>>,
}

#[derive(Serialize)]
struct CallResult {
    module: String,
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub struct ServiceBot {
    pool: Arc<ServicePool>,
}

impl ServiceBot {
    pub fn new(cfg: &ServiceConfig, metrics: ServiceMetrics) -> Result<ServiceBot, String> {
        Ok(ServiceBot { pool: ServicePool::new("bot", cfg, metrics)? })
    }

    fn name(&self) -> &str {
        self.pool.name()
    }

    /// One round: the turn (with the results of the last round's module calls) to the
    /// service, its answer parsed.
    async fn round(
        &self,
        raw_state: Option<&RawValue>,
        input: &TurnInput<'_>,
        results: &[CallResult],
    ) -> Result<TurnAnswer, BotError> {
        let request = TurnRequest {
            version: PAYLOAD_VERSION,
            bot: self.name(),
            conv: input.conv,
            turn: input.turn,
            id: input.id,
            user: input.user,
            text: input.text,
            state: raw_state,
            flags: input.flags,
            results,
        };
        let body = Bytes::from(serde_json::to_vec(&request).expect("a turn request encodes"));
        let answer = self.pool.post(body).await?;
        let parsed = serde_json::from_slice::<TurnAnswer>(&answer.body);
        self.pool.accepted(parsed.is_ok());
        parsed.map_err(|e| {
            BotError::new(format!(
                "bot service {}: the answer is not {{\"messages\":[...],\"state\":...}}: {e}",
                self.name()
            ))
        })
    }

    async fn call(
        &self,
        cx: &mut TurnContext,
        state: &mut Vec<u8>,
        input: TurnInput<'_>,
    ) -> Result<Vec<String>, BotError> {
        let raw_state = if state.is_empty() {
            None
        } else {
            let text = std::str::from_utf8(state)
                .map_err(|_| BotError::new("stored bot state is not JSON text"))?;
            Some(
                serde_json::from_str::<&RawValue>(text)
                    .map_err(|e| BotError::new(format!("stored bot state is not JSON: {e}")))?,
            )
        };
        let rounds_max = self.pool.config().module_rounds_max;
        let mut results = Vec::new();
        // Every round but the last may ask for module calls; the last must answer.
        for _ in 0..rounds_max {
            let answer = self.round(raw_state, &input, &results).await?;
            if answer.calls.is_empty() {
                return Ok(keep(state, answer));
            }
            if answer.calls.len() > MODULE_CALLS_PER_ROUND_MAX {
                return Err(BotError::new(format!(
                    "bot service {}: {} module calls in one round, at most {MODULE_CALLS_PER_ROUND_MAX}",
                    self.name(),
                    answer.calls.len()
                )));
            }
            results = self.module_calls(cx, answer.calls).await;
        }
        let answer = self.round(raw_state, &input, &results).await?;
        if !answer.calls.is_empty() {
            return Err(BotError::new(format!(
                "bot service {}: asked for module calls after {rounds_max} rounds (module_rounds_max)",
                self.name()
            )));
        }
        Ok(keep(state, answer))
    }

    /// Makes one round's module calls at once; a failed call is a result with its error
    /// (the bot decides what to say), not a failed turn.
    async fn module_calls(&self, cx: &TurnContext, calls: Vec<ModuleCall>) -> Vec<CallResult> {
        let backends = cx.backends();
        let pending = calls.into_iter().map(|call| async move {
            let request = call.request.as_deref();
            let outcome = backends.module(&call.module, &call.key, request).await;
            let (answer, error) = match outcome {
                Ok(text) => match RawValue::from_string(text.to_string()) {
                    Ok(raw) => (Some(raw), None),
                    Err(e) => (None, Some(format!("module answer is not JSON: {e}"))),
                },
                Err(e) => (None, Some(e.message)),
            };
            CallResult { module: call.module, key: call.key, answer, error }
        });
        futures::future::join_all(pending).await
    }
}

/// The state a final answer leaves (`null` or none: empty), and its messages.
fn keep(state: &mut Vec<u8>, answer: TurnAnswer) -> Vec<String> {
    *state = answer.state.map(|s| s.get().as_bytes().to_vec()).unwrap_or_default();
    if state.as_slice() == b"null" {
        state.clear();
    }
    answer.messages
}

impl Bot for ServiceBot {
    fn turn<'a>(
        &'a self,
        cx: &'a mut TurnContext,
        state: &'a mut Vec<u8>,
        input: TurnInput<'a>,
    ) -> BoxFuture<'a, Result<Vec<String>, BotError>> {
        Box::pin(self.call(cx, state, input))
    }
}
