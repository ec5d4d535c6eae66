//! The customer-service bot. `shop.rs` only routes a message to a module; each module
//! (`catalog`, `returns`, `feedback`) owns its part of the dialogue.

pub mod catalog;
pub mod feedback;
pub mod returns;

use serde::{Deserialize, Serialize};

use crate::bot::{BotError, TurnContext, TurnInput, TypedBot};

#[derive(Debug)]
pub struct Shop;

/// Where a multi-turn dialogue stands.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    #[default]
    Idle,
    AwaitingOrderNumber,
    ConfirmingReturn {
        order: String,
    },
    AwaitingRating,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ShopState {
    pub step: Step,
    /// Orders whose return was confirmed.
    pub returns: Vec<String>,
    pub rating: Option<u8>,
}

/// The feature flag of the returns flow's instant refund (`botclaw flags set
/// shop.instant-refund --percent P --bot shop`): confirmed returns are refunded at once
/// instead of when the parcel arrives.
pub const INSTANT_REFUND_FLAG: &str = "shop.instant-refund";

pub const HELP: &str =
    "I can help with products (\"price of the keyboard\"), returns (\"return an order\") and feedback (\"leave feedback\").";

impl TypedBot for Shop {
    type State = ShopState;

    async fn turn<'a>(
        &'a self,
        cx: &'a mut TurnContext,
        state: &'a mut ShopState,
        input: TurnInput<'a>,
    ) -> Result<Vec<String>, BotError> {
        let text = input.text.trim();
        let lower = text.to_lowercase();
        let reply = match state.step.clone() {
            Step::AwaitingOrderNumber => returns::on_order_number(state, text),
            Step::ConfirmingReturn { order } => {
                let instant_refund = input.flag(INSTANT_REFUND_FLAG);
                returns::on_confirmation(state, &order, &lower, instant_refund)
            }
            Step::AwaitingRating => feedback::on_rating(state, &lower),
            Step::Idle if lower.contains("return") => returns::start(state),
            Step::Idle if lower.contains("feedback") || lower.contains("rate") => {
                feedback::start(state)
            }
            Step::Idle => match catalog::inquire(cx, &lower).await? {
                Some(answer) => answer,
                None => HELP.to_string(),
            },
        };
        Ok(vec![reply])
    }
}
