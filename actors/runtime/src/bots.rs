//! The built-in bots:
//! - `echo`: answers with the message itself;
//! - `shop`: customer service with three modules: product inquiries (catalog lookups),
//!   returns (multi-turn: order number, then confirmation) and feedback (a rating);
//! - `weather`: answers "weather in <city>" from the weather backend, cached per
//!   conversation;
//! - `chaos`: a diagnostic bot for testing supervision: `panic` panics, `error` fails the
//!   turn, `sleep <ms>` stalls, anything else is acknowledged. Only where fault injection
//!   is on (`[fault] injection`): any client could otherwise stall or crash turns.
//!
//! Bots declared in `[[bots]]` run as HTTP services ([`service`]).

pub mod chaos;
pub mod echo;
pub mod service;
pub mod shop;
pub mod weather;

use crate::bot::BotRegistry;

/// Every built-in bot, by name; `chaos` only with `diagnostic` (fault injection on).
pub fn builtin(diagnostic: bool) -> BotRegistry {
    let mut r = BotRegistry::default();
    r.add_typed("echo", echo::Echo)
        .add_typed("shop", shop::Shop)
        .add_typed("weather", weather::Weather);
    if diagnostic {
        r.add_typed("chaos", chaos::Chaos);
    }
    r
}

/// The built-in bots and the service bots of `services`; an error names a service bot
/// whose name is a built-in bot's, or whose URL does not parse.
pub fn with_services(
    diagnostic: bool,
    services: &[botclaw_config::ServiceConfig],
    metrics: &crate::services::ServiceMetrics,
) -> Result<BotRegistry, String> {
    let mut r = builtin(diagnostic);
    for cfg in services {
        if r.get(&cfg.name).is_some() || cfg.name == "chaos" {
            return Err(format!("bot {}: a built-in bot has that name", cfg.name));
        }
        r.add(&cfg.name, service::ServiceBot::new(cfg, metrics.clone())?);
    }
    Ok(r)
}

#[cfg(test)]
mod tests;
