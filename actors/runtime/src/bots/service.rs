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
//! Calls are balanced over the instances (fewer outstanding of two drawn), bounded per node
//! and per instance, retried on another instance after a refused connection or a 5xx within
//! the turn's deadline, and each instance has a circuit breaker (see
//! `botclaw_core::services`). A slow or hanging service fails the turn with `timeout`, a
//! down one (or one whose breakers are all open, or a full node) with `unavailable`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use botclaw_config::BotServiceConfig;
use botclaw_core::services::{pick, Breaker};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::bot::{Bot, BotError, TurnContext, TurnInput};

/// The payload version this node sends.
pub const PAYLOAD_VERSION: u32 = 1;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub bot: String,
    /// `ok`, `error` (4xx, 5xx, a bad answer), `refused` (connection), `timeout`,
    /// `breaker_open`, `busy` (the node's bound).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BotLabel {
    pub bot: String,
}

/// Calls to bot services, and breakers opened, by bot.
#[derive(Debug, Default, Clone)]
pub struct ServiceMetrics {
    pub calls: Family<CallLabel, Counter>,
    pub breaker_opened: Family<BotLabel, Counter>,
}

impl ServiceMetrics {
    fn call(&self, bot: &str, outcome: &str) {
        let label = CallLabel { bot: bot.to_string(), outcome: outcome.to_string() };
        self.calls.get_or_create(&label).inc();
    }
}

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
    flags: &'a [String],
}

#[derive(Deserialize)]
struct TurnAnswer {
    messages: Vec<String>,
    #[serde(default)]
    state: Option<Box<RawValue>>,
}

struct Instance {
    url: hyper::Uri,
    outstanding: AtomicUsize,
    breaker: Mutex<Breaker>,
}

pub struct ServiceBot {
    name: String,
    cfg: BotServiceConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    instances: Vec<Instance>,
    inflight: AtomicUsize,
    /// The clock breakers read (milliseconds since the bot was made).
    epoch: Instant,
    metrics: ServiceMetrics,
}

/// Why one attempt failed.
enum Attempt {
    /// Worth another instance: a refused connection, a 5xx.
    Retry(String),
    /// The service answered, but not with a turn (4xx, bad JSON): not retried.
    Fail(String),
}

impl ServiceBot {
    pub fn new(cfg: &BotServiceConfig, metrics: ServiceMetrics) -> Result<ServiceBot, String> {
        let instances = cfg
            .urls
            .iter()
            .map(|u| {
                let url: hyper::Uri =
                    u.parse().map_err(|e| format!("bot {}: {u:?}: {e}", cfg.name))?;
                Ok(Instance {
                    url,
                    outstanding: AtomicUsize::new(0),
                    breaker: Mutex::new(Breaker::new(cfg.breaker_failures, cfg.breaker_open_ms)),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(cfg.instance_concurrency_max)
            .build(connector);
        Ok(ServiceBot {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            client,
            instances,
            inflight: AtomicUsize::new(0),
            epoch: Instant::now(),
            metrics,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// An instance that may take a call now (its breaker allows it, it has room), marked
    /// as having one more outstanding; `None` if every breaker is open or every instance full.
    fn choose(&self, avoid: Option<usize>) -> Option<usize> {
        let now = self.now_ms();
        let outstanding: Vec<usize> =
            self.instances.iter().map(|i| i.outstanding.load(Ordering::Acquire)).collect();
        let usable: Vec<bool> = self
            .instances
            .iter()
            .enumerate()
            .map(|(ix, i)| {
                let room = outstanding[ix] < self.cfg.instance_concurrency_max;
                let other = avoid != Some(ix) || self.instances.len() == 1;
                room && other && i.breaker.lock().expect("breaker lock").would_allow(now)
            })
            .collect();
        let (a, b) = (rand::random::<u32>() as usize, rand::random::<u32>() as usize);
        let ix = pick(&outstanding, &usable, a, b)?;
        // The trial of a breaker whose open time is up is taken here (one caller gets it).
        if !self.instances[ix].breaker.lock().expect("breaker lock").allow(now) {
            return None;
        }
        self.instances[ix].outstanding.fetch_add(1, Ordering::AcqRel);
        Some(ix)
    }

    fn settle(&self, ix: usize, ok: bool) {
        let instance = &self.instances[ix];
        instance.outstanding.fetch_sub(1, Ordering::AcqRel);
        let mut breaker = instance.breaker.lock().expect("breaker lock");
        if ok {
            breaker.success();
        } else if breaker.failure(self.now_ms()) {
            let label = BotLabel { bot: self.name.clone() };
            self.metrics.breaker_opened.get_or_create(&label).inc();
            tracing::warn!(bot = %self.name, url = %instance.url, "bot service instance failing: its breaker opened");
        }
    }

    async fn attempt(&self, ix: usize, body: Bytes) -> Result<TurnAnswer, Attempt> {
        let request = hyper::Request::post(self.instances[ix].url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| Attempt::Fail(e.to_string()))?;
        let response = self.client.request(request).await.map_err(|e| {
            self.metrics.call(&self.name, "refused");
            Attempt::Retry(format!("calling {}: {e}", self.instances[ix].url))
        })?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), self.cfg.answer_bytes_max)
            .collect()
            .await
            .map_err(|e| {
                self.metrics.call(&self.name, "error");
                Attempt::Fail(format!(
                    "reading the answer (at most {} bytes): {e}",
                    self.cfg.answer_bytes_max
                ))
            })?
            .to_bytes();
        if !status.is_success() {
            self.metrics.call(&self.name, "error");
            let said = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            let why = format!("{} answered {status}: {said}", self.instances[ix].url);
            return Err(if status.is_server_error() {
                Attempt::Retry(why)
            } else {
                Attempt::Fail(why)
            });
        }
        serde_json::from_slice::<TurnAnswer>(&bytes).map_err(|e| {
            self.metrics.call(&self.name, "error");
            Attempt::Fail(format!("the answer is not {{\"messages\":[...],\"state\":...}}: {e}"))
        })
    }

    async fn call(
        &self,
        state: &mut Vec<u8>,
        input: TurnInput<'_>,
    ) -> Result<Vec<String>, BotError> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.timeout_ms);
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
        let request = TurnRequest {
            version: PAYLOAD_VERSION,
            bot: &self.name,
            conv: input.conv,
            turn: input.turn,
            id: input.id,
            user: input.user,
            text: input.text,
            state: raw_state,
            flags: input.flags,
        };
        let body = Bytes::from(serde_json::to_vec(&request).expect("a turn request encodes"));
        let mut last = None;
        for _ in 0..self.cfg.attempts_max {
            let Some(ix) = self.choose(last.as_ref().map(|(ix, _)| *ix)) else {
                self.metrics.call(&self.name, "breaker_open");
                let why = last
                    .map(|(_, why): (usize, String)| format!(" (last: {why})"))
                    .unwrap_or_default();
                return Err(BotError::unavailable(format!(
                    "bot service {}: no instance takes calls now: breakers open or instances full{why}",
                    self.name
                )));
            };
            let outcome =
                tokio::time::timeout_at(deadline.into(), self.attempt(ix, body.clone())).await;
            match outcome {
                Ok(Ok(answer)) => {
                    self.settle(ix, true);
                    self.metrics.call(&self.name, "ok");
                    *state = answer.state.map(|s| s.get().as_bytes().to_vec()).unwrap_or_default();
                    if state.as_slice() == b"null" {
                        state.clear();
                    }
                    return Ok(answer.messages);
                }
                Ok(Err(Attempt::Retry(why))) => {
                    self.settle(ix, false);
                    last = Some((ix, why));
                }
                Ok(Err(Attempt::Fail(why))) => {
                    // The instance is up (it answered): not a breaker failure.
                    self.settle(ix, true);
                    return Err(BotError::new(format!("bot service {}: {why}", self.name)));
                }
                Err(_) => {
                    self.settle(ix, false);
                    self.metrics.call(&self.name, "timeout");
                    return Err(BotError::timeout(format!(
                        "bot service {} did not answer within {} ms",
                        self.name, self.cfg.timeout_ms
                    )));
                }
            }
        }
        let why = last.map(|(_, w)| w).unwrap_or_default();
        Err(BotError::unavailable(format!("bot service {}: {why}", self.name)))
    }
}

/// Gives back the node-wide place of a call however it ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bot for ServiceBot {
    fn turn<'a>(
        &'a self,
        _cx: &'a mut TurnContext,
        state: &'a mut Vec<u8>,
        input: TurnInput<'a>,
    ) -> BoxFuture<'a, Result<Vec<String>, BotError>> {
        Box::pin(async move {
            let max = self.cfg.concurrency_max;
            let taken = self
                .inflight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
            if taken.is_err() {
                self.metrics.call(&self.name, "busy");
                return Err(BotError::unavailable(format!(
                    "bot service {}: {max} calls in flight from this node (concurrency_max)",
                    self.name
                )));
            }
            let _place = InFlight(&self.inflight);
            self.call(state, input).await
        })
    }
}
