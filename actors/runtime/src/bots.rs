//! The built-in bots:
//! - `echo`: answers with the message itself;
//! - `shop`: customer service with three modules: product inquiries (catalog lookups),
//!   returns (multi-turn: order number, then confirmation) and feedback (a rating);
//! - `weather`: answers "weather in <city>" from the weather backend, cached per
//!   conversation;
//! - `chaos`: a diagnostic bot for testing supervision: `panic` panics, `error` fails the
//!   turn, `sleep <ms>` stalls, anything else is acknowledged. Only where fault injection
//!   is on (`[fault] injection`): any client could otherwise stall or crash turns.

pub mod chaos;
pub mod echo;
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

#[cfg(test)]
mod tests;
