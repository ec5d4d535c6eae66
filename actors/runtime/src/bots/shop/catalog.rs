//! Product inquiries: answers from the catalog backend, cached per conversation.

use crate::bot::{BotError, TurnContext};

/// Answers a product question, or `None` if the message names no known product.
pub async fn inquire(cx: &mut TurnContext, lower: &str) -> Result<Option<String>, BotError> {
    let key = format!("catalog:{lower}");
    // A catalog service's answers are cached node-wide for as long as it says: not here.
    let service = cx.backends().is_service(crate::backends::CATALOG_MODULE);
    if let Some(hit) = cx.cached(&key).filter(|_| !service) {
        return Ok((!hit.is_empty()).then_some(hit));
    }
    let products = cx.backends().catalog_search(lower).await?;
    let answer = products
        .iter()
        .map(|p| {
            let stock = if p.stock == 0 {
                "out of stock".to_string()
            } else {
                format!("{} in stock", p.stock)
            };
            format!(
                "{} ({}): ${}.{:02}, {stock}",
                p.name,
                p.sku,
                p.price_cents / 100,
                p.price_cents % 100
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    // Misses are cached too (as ""), so repeated chatter does not hit the backend.
    if !service {
        cx.cache(&key, answer.clone());
    }
    Ok((!answer.is_empty()).then_some(answer))
}
