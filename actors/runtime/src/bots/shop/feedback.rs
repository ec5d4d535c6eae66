//! Feedback: ask for a rating from 1 to 5 and keep it.

use super::{ShopState, Step};

pub fn start(state: &mut ShopState) -> String {
    state.step = Step::AwaitingRating;
    "How would you rate us, from 1 to 5?".into()
}

pub fn on_rating(state: &mut ShopState, lower: &str) -> String {
    match lower.trim().parse::<u8>() {
        Ok(r @ 1..=5) => {
            state.rating = Some(r);
            state.step = Step::Idle;
            format!("Thank you for rating us {r}/5!")
        }
        _ => "Please give a number from 1 to 5.".into(),
    }
}
