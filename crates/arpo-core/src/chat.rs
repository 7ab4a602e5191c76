//! Chat messages: what a prompt is before a tokenizer or an HTTP client sees it.
//!
//! The protocol builds `ChatMessage`s; the local model renders them with its chat template, the
//! remote policy turns them into OpenAI `messages`. Both see the same content.

use serde::{Deserialize, Serialize};

use crate::Screenshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One part of a message's content: text or an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    Image { image: Screenshot },
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Vec<ContentPart>,
}

impl ChatMessage {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: vec![ContentPart::Text { text: text.into() }],
        }
    }

    /// The images of the message, in order.
    pub fn images(&self) -> impl Iterator<Item = &Screenshot> {
        self.content.iter().filter_map(|p| match p {
            ContentPart::Image { image } => Some(image),
            ContentPart::Text { .. } => None,
        })
    }
}
