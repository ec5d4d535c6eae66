//! Returns: ask for the order number, then confirm (refunded at once behind a flag).

use super::{ShopState, Step};

pub fn start(state: &mut ShopState) -> String {
    state.step = Step::AwaitingOrderNumber;
    "Sure. What is your order number?".into()
}

pub fn on_order_number(state: &mut ShopState, text: &str) -> String {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 3 {
        return "An order number has at least 3 digits. What is your order number?".into();
    }
    let reply = format!("Return order #{digits}? Please answer yes or no.");
    state.step = Step::ConfirmingReturn { order: digits };
    reply
}

/// With `instant_refund` (the `shop.instant-refund` flag) a confirmed return is refunded
/// at once.
pub fn on_confirmation(
    state: &mut ShopState,
    order: &str,
    lower: &str,
    instant_refund: bool,
) -> String {
    if lower.starts_with('y') {
        state.returns.push(order.to_string());
        state.step = Step::Idle;
        if instant_refund {
            format!("Return of order #{order} confirmed. Your refund is issued now; send the parcel when you can.")
        } else {
            format!("Return of order #{order} confirmed. A shipping label is on its way.")
        }
    } else if lower.starts_with('n') {
        state.step = Step::Idle;
        format!("Return of order #{order} cancelled.")
    } else {
        format!("Please answer yes or no: return order #{order}?")
    }
}
