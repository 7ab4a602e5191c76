//! The UI-TARS computer-use prompt and the chat history around it.
//!
//! A prompt is: a system message, one user message with the agent instructions (output format,
//! action space, notes, the task), then the screenshots and the model's earlier responses
//! interleaved (`user: image`, `assistant: text`, ..., `user: current image`). At most
//! [`PromptConfig::limit_images`] screenshots are sent: the oldest are dropped, the assistant
//! text of those turns is kept (what OSWorld's UI-TARS agent does with its `history_n`).

use serde::{Deserialize, Serialize};

use crate::{AgentContext, ChatMessage, ContentPart, Role};

/// The system message every reference agent sends (OSWorld, the `ui-tars` examples).
///
/// ARPO's `gui_agent.py` sends the misspelt `"Your are a helpful assistant."`; set
/// [`PromptConfig::system`] to that string to reproduce its prompts byte for byte.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";

/// Which published instruction text to send. The texts are the references' own, verbatim;
/// `{language}` and `{instruction}` are filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptTemplate {
    /// ARPO's `uitars_system_prompt` (`verl/trainer/gui_agent.py`), used to train UI-TARS-1.5
    /// with absolute coordinates: `start_box='<|box_start|>(x1,y1)<|box_end|>'` points,
    /// `finished(content=...)`, no `call_user`.
    #[default]
    Arpo,
    /// OSWorld's UI-TARS agent prompt (`UITARS_USR_PROMPT_THOUGHT` with
    /// `UITARS_CALL_USR_ACTION_SPACE`, the UI-TARS-1.0 / Qwen2-VL relative-coordinate setup):
    /// box-token points, `finished()` and `call_user()`.
    OsworldCallUser,
    /// ByteDance's `COMPUTER_USE_DOUBAO` from the `ui-tars` package (UI-TARS-1.5 release):
    /// points written `point='<point>x1 y1</point>'`.
    ComputerUseDoubao,
}

const ARPO_TEMPLATE: &str = r#"You are a GUI agent. You are given a task and your action history, with screenshots. You need to perform the next action to complete the task.

## Output Format
```
Thought: ...
Action: ...
```

## Action Space

click(start_box='<|box_start|>(x1,y1)<|box_end|>')
left_double(start_box='<|box_start|>(x1,y1)<|box_end|>')
right_single(start_box='<|box_start|>(x1,y1)<|box_end|>')
drag(start_box='<|box_start|>(x1,y1)<|box_end|>', end_box='<|box_start|>(x3,y3)<|box_end|>')
hotkey(key='')
type(content='xxx') # Use escape characters \', \", and \n in content part to ensure we can parse the content in normal python string format. If you want to submit your input, use \n at the end of content. 
scroll(start_box='<|box_start|>(x1,y1)<|box_end|>', direction='down or up or right or left')
wait() #Sleep for 5s and take a screenshot to check for any changes.
finished(content='xxx') # Use escape characters \', \", and \n in content part to ensure we can parse the content in normal python string format.

## Note
- Use {language} in `Thought` and `Action` part.
- Write a small plan and finally summarize your next action (with its target element) in one sentence in `Thought` part.

## User Instruction
{instruction}
"#;

const OSWORLD_CALL_USER_TEMPLATE: &str = r#"You are a GUI agent. You are given a task and your action history, with screenshots. You need to perform the next action to complete the task. 

## Output Format
```
Thought: ...
Action: ...
```

## Action Space

click(start_box='<|box_start|>(x1,y1)<|box_end|>')
left_double(start_box='<|box_start|>(x1,y1)<|box_end|>')
right_single(start_box='<|box_start|>(x1,y1)<|box_end|>')
drag(start_box='<|box_start|>(x1,y1)<|box_end|>', end_box='<|box_start|>(x3,y3)<|box_end|>')
hotkey(key='')
type(content='') #If you want to submit your input, use "\n" at the end of `content`.
scroll(start_box='<|box_start|>(x1,y1)<|box_end|>', direction='down or up or right or left')
wait() #Sleep for 5s and take a screenshot to check for any changes.
finished()
call_user() # Submit the task and call the user when the task is unsolvable, or when you need the user's help.


## Note
- Use {language} in `Thought` part.
- Write a small plan and finally summarize your next action (with its target element) in one sentence in `Thought` part.

## User Instruction
{instruction}
"#;

const COMPUTER_USE_DOUBAO_TEMPLATE: &str = r#"You are a GUI agent. You are given a task and your action history, with screenshots. You need to perform the next action to complete the task.

## Output Format
```
Thought: ...
Action: ...
```

## Action Space

click(point='<point>x1 y1</point>')
left_double(point='<point>x1 y1</point>')
right_single(point='<point>x1 y1</point>')
drag(start_point='<point>x1 y1</point>', end_point='<point>x2 y2</point>')
hotkey(key='ctrl c') # Split keys with a space and use lowercase. Also, do not use more than 3 keys in one hotkey action.
type(content='xxx') # Use escape characters \', \", and \n in content part to ensure we can parse the content in normal python string format. If you want to submit your input, use \n at the end of content. 
scroll(point='<point>x1 y1</point>', direction='down or up or right or left') # Show more information on the `direction` side.
wait() #Sleep for 5s and take a screenshot to check for any changes.
finished(content='xxx') # Use escape characters \', \", and \n in content part to ensure we can parse the content in normal python string format.


## Note
- Use {language} in `Thought` part.
- Write a small plan and finally summarize your next action (with its target element) in one sentence in `Thought` part.

## User Instruction
{instruction}
"#;

impl PromptTemplate {
    /// The template text with its `{language}` and `{instruction}` placeholders.
    pub fn template(self) -> &'static str {
        match self {
            Self::Arpo => ARPO_TEMPLATE,
            Self::OsworldCallUser => OSWORLD_CALL_USER_TEMPLATE,
            Self::ComputerUseDoubao => COMPUTER_USE_DOUBAO_TEMPLATE,
        }
    }

    /// The instruction text for one task. The language goes in first, so an instruction
    /// that happens to contain `{language}` is left as written.
    pub fn render(self, language: &str, instruction: &str) -> String {
        // Split around the instruction placeholder so that nothing inside the
        // user's instruction is ever substituted.
        let template = self.template();
        let (head, tail) = template
            .split_once("{instruction}")
            .unwrap_or((template, ""));
        let mut out = head.replace("{language}", language);
        out.push_str(instruction);
        out.push_str(tail);
        out
    }
}

/// How a prompt is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptConfig {
    pub template: PromptTemplate,
    /// The language the thought is asked in (`Use English in ...`).
    pub language: String,
    /// The most screenshots one prompt carries, current one included (OSWorld's `history_n`
    /// is 5; the seed's VMware config uses `limit_images: 10`). 0 is read as 1: the current
    /// screen is always sent.
    pub limit_images: usize,
    /// The system message.
    pub system: String,
    /// Write earlier responses back with `<|box_start|>`/`<|box_end|>` around their points, as
    /// ARPO does (`add_box_token`): decoded model text has those special tokens stripped, and
    /// the model was trained to see them in its history. Only touches `start_box='(x,y)'` and
    /// `end_box='(x,y)'` points.
    pub history_box_tokens: bool,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            template: PromptTemplate::Arpo,
            language: "English".to_owned(),
            limit_images: 5,
            system: DEFAULT_SYSTEM_PROMPT.to_owned(),
            history_box_tokens: true,
        }
    }
}

/// The chat messages for one agent step.
///
/// `context.screenshots` has one more entry than `context.responses` (the current screen);
/// other shapes are accepted and interleaved in order (screenshot `i`, then response `i`).
///
/// ```
/// use arpo_core::{AgentContext, Role, Screenshot};
/// use arpo_core::protocol::{build_messages, PromptConfig};
///
/// let shot = || Screenshot::new(vec![0x89, b'P', b'N', b'G'], 1920, 1080);
/// let context = AgentContext {
///     instruction: "Open the terminal".into(),
///     screenshots: vec![shot(), shot(), shot()],
///     responses: vec![
///         "Thought: a\nAction: click(start_box='(10,20)')".into(),
///         "Thought: b\nAction: wait()".into(),
///     ],
/// };
/// let config = PromptConfig { limit_images: 2, ..PromptConfig::default() };
/// let messages = build_messages(&context, &config);
/// // system, instructions, [image 0 dropped] assistant 0, image 1, assistant 1, image 2
/// let roles: Vec<Role> = messages.iter().map(|m| m.role).collect();
/// assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::User, Role::Assistant, Role::User]);
/// assert_eq!(messages.iter().map(|m| m.images().count()).sum::<usize>(), 2);
/// ```
pub fn build_messages(context: &AgentContext, config: &PromptConfig) -> Vec<ChatMessage> {
    let mut messages = Vec::with_capacity(3 + 2 * context.responses.len());
    messages.push(ChatMessage::text(Role::System, config.system.clone()));
    messages.push(ChatMessage::text(
        Role::User,
        config
            .template
            .render(&config.language, &context.instruction),
    ));
    let limit = config.limit_images.max(1);
    let n_shots = context.screenshots.len();
    let first_kept = n_shots.saturating_sub(limit);
    let turns = n_shots.max(context.responses.len());
    for i in 0..turns {
        if let Some(shot) = context.screenshots.get(i).filter(|_| i >= first_kept) {
            messages.push(ChatMessage {
                role: Role::User,
                content: vec![ContentPart::Image {
                    image: shot.clone(),
                }],
            });
        }
        if let Some(response) = context.responses.get(i) {
            let text = if config.history_box_tokens {
                add_box_tokens(response)
            } else {
                response.clone()
            };
            messages.push(ChatMessage::text(Role::Assistant, text));
        }
    }
    messages
}

/// Wraps the plain points of `start_box='(x,y)'` and `end_box='(x,y)'` (integer coordinates)
/// in `<|box_start|>`/`<|box_end|>`, the form a Qwen2-VL tokenizer writes them in; everything
/// else is left as it is. Text that already has the tokens is unchanged.
///
/// ```
/// use arpo_core::protocol::add_box_tokens;
/// assert_eq!(
///     add_box_tokens("Thought: go\nAction: drag(start_box='(1,2)', end_box='(3, 4)')"),
///     "Thought: go\nAction: drag(start_box='<|box_start|>(1,2)<|box_end|>', end_box='<|box_start|>(3, 4)<|box_end|>')"
/// );
/// ```
pub fn add_box_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    let mut rest = text;
    loop {
        let next = ["start_box='", "end_box='"]
            .iter()
            .filter_map(|key| rest.find(key).map(|at| (at, key.len())))
            .min();
        let Some((at, key_len)) = next else {
            out.push_str(rest);
            return out;
        };
        let value_start = at + key_len;
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        if let Some(len) = plain_point_len(rest) {
            out.push_str("<|box_start|>");
            out.push_str(&rest[..len]);
            out.push_str("<|box_end|>");
            rest = &rest[len..];
        }
    }
}

/// The length of `(digits,ws*digits)` at the start of `s` when it is directly followed by `'`.
fn plain_point_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() != Some(&b'(') {
        return None;
    }
    i += 1;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) || b.get(i) != Some(&b',') {
        return None;
    }
    i += 1;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    if !digits(&mut i) || b.get(i) != Some(&b')') || b.get(i + 1) != Some(&b'\'') {
        return None;
    }
    Some(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Screenshot;

    fn shot(tag: u8) -> Screenshot {
        Screenshot::new(vec![tag], 4, 4)
    }

    fn context(n_responses: usize) -> AgentContext {
        AgentContext {
            instruction: "Do {language} it".into(),
            screenshots: (0..=n_responses).map(|i| shot(i as u8)).collect(),
            responses: (0..n_responses).map(|i| format!("r{i}")).collect(),
        }
    }

    #[test]
    fn first_step_is_system_instructions_and_one_image() {
        let m = build_messages(&context(0), &PromptConfig::default());
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            ChatMessage::text(Role::System, "You are a helpful assistant.")
        );
        let ContentPart::Text { text } = &m[1].content[0] else {
            panic!("instructions are text")
        };
        assert!(text.ends_with("## User Instruction\nDo {language} it\n"));
        assert!(text.contains("- Use English in `Thought` and `Action` part.\n"));
        assert_eq!(m[2].images().next(), Some(&shot(0)));
    }

    #[test]
    fn limit_drops_oldest_images_and_keeps_all_text() {
        // 7 screenshots, 6 responses, limit 3: images 4, 5, 6 are kept.
        let config = PromptConfig {
            limit_images: 3,
            ..PromptConfig::default()
        };
        let m = build_messages(&context(6), &config);
        let images: Vec<u8> = m
            .iter()
            .flat_map(|m| m.images())
            .map(|s| s.bytes[0])
            .collect();
        assert_eq!(images, [4, 5, 6]);
        let texts: Vec<&str> = m
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .filter_map(|m| match &m.content[0] {
                ContentPart::Text { text } => Some(text.as_str()),
                ContentPart::Image { .. } => None,
            })
            .collect();
        assert_eq!(texts, ["r0", "r1", "r2", "r3", "r4", "r5"]);
        // 2 + 6 assistant + 3 images = 11 messages; the last is the current screen.
        assert_eq!(m.len(), 11);
        assert_eq!(m[10].images().next(), Some(&shot(6)));
        // sys, instructions, r0..r3 without images, then image 4 right before response 4.
        assert_eq!(m[5], ChatMessage::text(Role::Assistant, "r3"));
        assert_eq!(m[6].images().next(), Some(&shot(4)));
        assert_eq!(m[7], ChatMessage::text(Role::Assistant, "r4"));
    }

    #[test]
    fn zero_limit_still_sends_the_current_screen() {
        let config = PromptConfig {
            limit_images: 0,
            ..PromptConfig::default()
        };
        let m = build_messages(&context(2), &config);
        let images: Vec<u8> = m
            .iter()
            .flat_map(|m| m.images())
            .map(|s| s.bytes[0])
            .collect();
        assert_eq!(images, [2]);
    }

    #[test]
    fn box_tokens_only_around_plain_integer_points() {
        assert_eq!(
            add_box_tokens("Action: click(start_box='(12,34)')"),
            "Action: click(start_box='<|box_start|>(12,34)<|box_end|>')"
        );
        for unchanged in [
            "Action: click(start_box='<|box_start|>(12,34)<|box_end|>')",
            "Action: click(start_box='(1.5,2)')",
            "Action: click(start_box='(1,2,3,4)')",
            "Action: click(point='<point>1 2</point>')",
            "Action: type(content='start_box=')",
        ] {
            assert_eq!(add_box_tokens(unchanged), unchanged);
        }
    }
}
