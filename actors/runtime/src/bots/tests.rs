use std::sync::Arc;
use std::time::Duration;

use botclaw_config::BackendConfig;

use super::*;
use crate::backends::Backends;
use crate::bot::{TurnContext, TurnInput};
use crate::metrics::{BackendLabel, ConversationMetrics};

struct Harness {
    bots: BotRegistry,
    cx: TurnContext,
    state: Vec<u8>,
    turn: u64,
    metrics: ConversationMetrics,
    /// Flags on for the conversation.
    flags: Vec<&'static str>,
}

impl Harness {
    fn new() -> Self {
        let metrics = ConversationMetrics::default();
        let cfg =
            BackendConfig { catalog_latency_ms: 0, weather_latency_ms: 0, ..Default::default() };
        let backends = Backends::new(&cfg, metrics.clone());
        let cx = TurnContext::new(backends, metrics.clone(), 16, Duration::from_secs(900));
        Harness { bots: builtin(true), cx, state: Vec::new(), turn: 0, metrics, flags: Vec::new() }
    }

    async fn say(&mut self, bot: &str, text: &str) -> String {
        self.turn += 1;
        let flags = self.flags.clone();
        let input =
            TurnInput { conv: "c", id: "i", text, user: None, turn: self.turn, flags: &flags };
        let bot: Arc<dyn crate::bot::Bot> = self.bots.get(bot).unwrap();
        let mut out = bot.turn(&mut self.cx, &mut self.state, input).await.unwrap();
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    fn backend_calls(&self, backend: &str) -> u64 {
        self.metrics.backend_calls.get_or_create(&BackendLabel { backend: backend.into() }).get()
    }
}

#[tokio::test]
async fn echo_echoes() {
    let mut h = Harness::new();
    assert_eq!(h.say("echo", "hello").await, "hello");
}

#[tokio::test]
async fn shop_return_dialogue() {
    let mut h = Harness::new();
    assert!(h.say("shop", "I want to return my order").await.contains("order number"));
    assert!(h.say("shop", "it is 12").await.contains("at least 3 digits"));
    assert!(h.say("shop", "#4711").await.contains("Return order #4711?"));
    assert!(h.say("shop", "maybe").await.contains("yes or no"));
    assert!(h.say("shop", "yes").await.contains("#4711 confirmed"));
    let state: shop::ShopState = postcard::from_bytes(&h.state).unwrap();
    assert_eq!(state.returns, vec!["4711"]);
    assert_eq!(state.step, shop::Step::Idle);
}

#[tokio::test]
async fn shop_refunds_at_once_behind_its_flag() {
    let mut h = Harness::new();
    for flag in [false, true] {
        h.flags = if flag { vec![shop::INSTANT_REFUND_FLAG] } else { Vec::new() };
        h.say("shop", "return please").await;
        h.say("shop", "#123").await;
        let confirmed = h.say("shop", "yes").await;
        assert_eq!(confirmed.contains("refund is issued now"), flag, "{confirmed}");
        assert_eq!(confirmed.contains("shipping label"), !flag, "{confirmed}");
    }
}

#[tokio::test]
async fn shop_feedback_and_catalog_with_cache() {
    let mut h = Harness::new();
    assert!(h.say("shop", "I'd like to leave feedback").await.contains("1 to 5"));
    assert!(h.say("shop", "9").await.contains("from 1 to 5"));
    assert!(h.say("shop", "4").await.contains("4/5"));
    let answer = h.say("shop", "price of the monitor?").await;
    assert!(answer.contains("MN-03") && answer.contains("$189.00"), "{answer}");
    assert_eq!(h.say("shop", "price of the monitor?").await, answer);
    assert_eq!(h.backend_calls("catalog"), 1, "second inquiry served from the cache");
    assert_eq!(h.say("shop", "hello").await, shop::HELP);
}

#[tokio::test]
async fn weather_parses_city_and_caches() {
    let mut h = Harness::new();
    let a = h.say("weather", "What's the weather in Lisbon?").await;
    assert!(a.starts_with("Lisbon: "), "{a}");
    assert_eq!(h.say("weather", "weather in lisbon").await.split(':').nth(1), a.split(':').nth(1));
    assert_eq!(h.backend_calls("weather"), 1);
    assert!(h.say("weather", "hi").await.contains("weather in <city>"));
    assert_eq!(weather::city_of("weather in  New York!"), Some("New York".into()));
}

#[test]
fn weather_finds_the_city_in_text_whose_lowercase_is_longer() {
    // "İ" is 2 bytes and lowercases to 3: an index found in a lowercased copy pointed
    // inside a character of the text and the bot panicked.
    assert_eq!(weather::city_of("İİİ WEATHER IN Kraków?"), Some("Kraków".into()));
    assert_eq!(weather::city_of("İİİİİİ weather in"), None);
    assert_eq!(weather::city_of("ẞ weather ın Paris"), None);
    // Any text: no panic.
    for text in ["İweather in x", "weather in İ", "🌧 weather in 🌧", "\u{0130}\u{0130}weather in"]
    {
        let _ = weather::city_of(text);
    }
}

#[tokio::test]
async fn chaos_fails_on_request() {
    let mut h = Harness::new();
    assert_eq!(h.say("chaos", "x").await, "ok #1: x");
    let bot = h.bots.get("chaos").unwrap();
    let input = TurnInput { conv: "c", id: "e", text: "error", user: None, turn: 2, flags: &[] };
    assert!(bot.turn(&mut h.cx, &mut h.state, input).await.is_err());
}
