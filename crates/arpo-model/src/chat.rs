//! The tokenizer and the model directory's own chat template (rendered with minijinja), so a
//! prompt is formatted exactly as transformers' `apply_chat_template` + processor would.

use std::ops::Range;
use std::path::Path;

use arpo_core::{ChatMessage, ContentPart};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result, read_json};

/// The image placeholder the template writes once per image; expanded to one per image token.
pub const IMAGE_PAD: &str = "<|image_pad|>";
/// End of a chat turn.
pub const IM_END: &str = "<|im_end|>";

/// A chat turned into tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedChat {
    pub ids: Vec<u32>,
    /// `true` for the tokens of assistant messages (their content and closing `<|im_end|>`):
    /// the tokens a policy-gradient loss is taken over.
    pub assistant_mask: Vec<bool>,
    /// Token index ranges of each image's `<|image_pad|>` run, in order.
    pub image_spans: Vec<Range<usize>>,
}

/// The tokenizer and chat template of a Qwen2-VL checkpoint.
#[derive(Debug)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    env: minijinja::Environment<'static>,
    pub image_pad_id: u32,
    pub im_end_id: u32,
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

/// The chat template of a model directory: `chat_template.jinja`, `chat_template.json`, or the
/// `chat_template` field of `tokenizer_config.json` (a string, or a list of named templates of
/// which `default` is taken).
pub fn find_chat_template(dir: &Path) -> Result<String> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja).map_err(|source| ModelError::Io {
            path: jinja,
            source,
        });
    }
    for file in ["chat_template.json", "tokenizer_config.json"] {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        let v: Value = read_json(&path)?;
        match v.get("chat_template") {
            Some(Value::String(s)) => return Ok(s.clone()),
            Some(Value::Array(list)) => {
                let pick = list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first());
                if let Some(s) = pick.and_then(|t| t.get("template")).and_then(Value::as_str) {
                    return Ok(s.to_string());
                }
            }
            _ => {}
        }
    }
    Err(ModelError::Template(format!(
        "no chat template in {} (looked for chat_template.jinja, chat_template.json, tokenizer_config.json)",
        dir.display()
    )))
}

/// The JSON form of messages the Qwen2-VL templates expect (`{"type": "image"}` parts).
pub fn messages_json(messages: &[ChatMessage]) -> Value {
    Value::Array(
        messages
            .iter()
            .map(|m| {
                let content: Vec<Value> = m
                    .content
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text { text } => json!({"type": "text", "text": text}),
                        ContentPart::Image { .. } => json!({"type": "image"}),
                    })
                    .collect();
                json!({"role": m.role.as_str(), "content": content})
            })
            .collect(),
    )
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and the chat template of a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Self::new(tokenizer, find_chat_template(dir)?)
    }

    pub fn new(tokenizer: Tokenizer, template: String) -> Result<Self> {
        let id = |tok: &str| {
            tokenizer.token_to_id(tok).ok_or_else(|| {
                ModelError::Tokenizer(format!(
                    "the tokenizer has no {tok} token: not a Qwen2-VL tokenizer"
                ))
            })
        };
        let image_pad_id = id(IMAGE_PAD)?;
        let im_end_id = id(IM_END)?;
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", template)
            .map_err(|e| ModelError::Template(format!("the chat template does not parse: {e}")))?;
        Ok(Self {
            tokenizer,
            env,
            image_pad_id,
            im_end_id,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Renders messages with the template (one `<|image_pad|>` per image).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_json(&messages_json(messages), add_generation_prompt)
    }

    fn render_json(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            add_vision_id => false,
        })
        .map_err(|e| ModelError::Template(format!("rendering the chat template failed: {e}")))
    }

    /// Replaces the k-th `<|image_pad|>` by `image_tokens[k]` copies.
    fn expand(text: &str, image_tokens: &[usize]) -> Result<String> {
        let parts: Vec<&str> = text.split(IMAGE_PAD).collect();
        if parts.len() - 1 > image_tokens.len() {
            return Err(ModelError::Input(format!(
                "the prompt has {} images but only {} image sizes were given",
                parts.len() - 1,
                image_tokens.len()
            )));
        }
        let mut out = String::with_capacity(text.len());
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                out.push_str(&IMAGE_PAD.repeat(image_tokens[i - 1]));
            }
            out.push_str(p);
        }
        Ok(out)
    }

    /// Tokenizes a chat: the template's text with each image expanded to its token count
    /// (`image_tokens[k]` for the k-th image, from `grid_thw`), plus the assistant-token mask.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        image_tokens: &[usize],
        add_generation_prompt: bool,
    ) -> Result<TokenizedChat> {
        let n_images: usize = messages.iter().map(|m| m.images().count()).sum();
        if n_images != image_tokens.len() {
            return Err(ModelError::Input(format!(
                "the messages hold {n_images} images but {} image sizes were given",
                image_tokens.len()
            )));
        }
        let full = Self::expand(&self.render(messages, add_generation_prompt)?, image_tokens)?;
        // Byte spans of assistant turns: the text between the prefix that ends with the
        // generation prompt and the prefix that ends with the turn (minus its newline).
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != arpo_core::Role::Assistant {
                continue;
            }
            let start = Self::expand(&self.render(&messages[..i], true)?, image_tokens)?;
            let end = Self::expand(&self.render(&messages[..=i], false)?, image_tokens)?;
            if !full.starts_with(&start) || !full.starts_with(&end) {
                return Err(ModelError::Template(
                    "the chat template does not render prefixes of a chat as prefixes: cannot locate assistant turns".into(),
                ));
            }
            let end_len = end.trim_end_matches('\n').len();
            spans.push(start.len()..end_len);
        }
        let enc = self
            .tokenizer
            .encode(full.as_str(), false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        let assistant_mask = enc
            .get_offsets()
            .iter()
            .map(|&(s, _)| spans.iter().any(|r| r.contains(&s)))
            .collect();
        let mut image_spans = Vec::new();
        let mut i = 0;
        while i < ids.len() {
            if ids[i] == self.image_pad_id {
                let s = i;
                while i < ids.len() && ids[i] == self.image_pad_id {
                    i += 1;
                }
                image_spans.push(s..i);
            } else {
                i += 1;
            }
        }
        Ok(TokenizedChat {
            ids,
            assistant_mask,
            image_spans,
        })
    }

    /// Plain text to ids (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Ids to text, special tokens dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }
}
