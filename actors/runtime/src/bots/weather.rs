use serde::{Deserialize, Serialize};

use crate::bot::{BotError, TurnContext, TurnInput, TypedBot};

#[derive(Debug)]
pub struct Weather;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WeatherState {
    /// The last city asked about, so "and tomorrow?"-style follow-ups could use it.
    pub last_city: Option<String>,
}

/// The city in "weather in <city>" (the phrase in any ASCII case), cleaned of trailing
/// punctuation. Searched in the text itself: an index into a lowercased copy is not an
/// index into the text once lowercasing changed a character's length ("İ").
pub fn city_of(text: &str) -> Option<String> {
    const PHRASE: &str = "weather in ";
    let at =
        text.char_indices().map(|(i, _)| i).find(|&i| {
            text.get(i..i + PHRASE.len()).is_some_and(|s| s.eq_ignore_ascii_case(PHRASE))
        })? + PHRASE.len();
    let city = text[at..].trim().trim_end_matches(['?', '!', '.']).trim();
    (!city.is_empty()).then(|| city.to_string())
}

impl TypedBot for Weather {
    type State = WeatherState;

    async fn turn<'a>(
        &'a self,
        cx: &'a mut TurnContext,
        state: &'a mut WeatherState,
        input: TurnInput<'a>,
    ) -> Result<Vec<String>, BotError> {
        let Some(city) = city_of(input.text) else {
            return Ok(vec!["Ask me: weather in <city>".into()]);
        };
        let key = format!("weather:{}", city.to_lowercase());
        let backends = cx.backends();
        let answer = if backends.is_service(crate::backends::WEATHER_MODULE) {
            // A weather service: its answers are cached node-wide for as long as it says.
            let f = backends.weather(&city).await?;
            format!("{}: {} and {}°C", f.city, f.condition, f.celsius)
        } else {
            // This conversation's cache, then the node's (one backend call per city
            // however many conversations ask at once), then the backend.
            match cx.cached(&key) {
                Some(hit) => hit,
                None => {
                    let backends = cx.backends();
                    let fetch = async {
                        let f = backends.weather(&city).await?;
                        Ok::<_, BotError>(format!(
                            "{}: {} and {}°C",
                            f.city, f.condition, f.celsius
                        ))
                    };
                    let answer = backends
                        .shared()
                        .get_or_fetch(&key, fetch)
                        .await
                        .map_err(|e| (*e).clone())?
                        .to_string();
                    cx.cache(&key, answer.clone());
                    answer
                }
            }
        };
        state.last_city = Some(city);
        Ok(vec![answer])
    }
}
