use crate::bot::{BotError, TurnContext, TurnInput, TypedBot};

#[derive(Debug)]
pub struct Echo;

impl TypedBot for Echo {
    type State = ();

    async fn turn<'a>(
        &'a self,
        _cx: &'a mut TurnContext,
        _state: &'a mut (),
        input: TurnInput<'a>,
    ) -> Result<Vec<String>, BotError> {
        Ok(vec![input.text.to_string()])
    }
}
