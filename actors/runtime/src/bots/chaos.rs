use std::time::Duration;

use crate::bot::{BotError, TurnContext, TurnInput, TypedBot};

#[derive(Debug)]
pub struct Chaos;

/// Longest stall `sleep <ms>` accepts.
const SLEEP_MS_MAX: u64 = 60_000;

impl TypedBot for Chaos {
    /// Turns acknowledged so far: lets tests see that a failed turn left state untouched.
    type State = u64;

    async fn turn<'a>(
        &'a self,
        _cx: &'a mut TurnContext,
        acked: &'a mut u64,
        input: TurnInput<'a>,
    ) -> Result<Vec<String>, BotError> {
        let text = input.text.trim();
        if text == "panic" {
            *acked += 1000;
            panic!("chaos bot asked to panic in conversation {}", input.conv);
        }
        if text == "error" {
            *acked += 1000;
            return Err(BotError::new("chaos bot asked to fail"));
        }
        if let Some(ms) = text.strip_prefix("sleep ").and_then(|n| n.trim().parse::<u64>().ok()) {
            tokio::time::sleep(Duration::from_millis(ms.min(SLEEP_MS_MAX))).await;
        }
        *acked += 1;
        Ok(vec![format!("ok #{acked}: {text}")])
    }
}
