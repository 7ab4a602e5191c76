//! Token bytes to answer text: incremental UTF-8, special tokens left out, stop strings.

use crate::engine::TokenPiece;

/// The result of one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pushed {
    /// Text that is now final and may be sent.
    pub delta: String,
    /// A stop string completed: the answer ends before it.
    pub stop_hit: bool,
}

/// Builds an answer's text token by token.
///
/// A token may end inside a UTF-8 character (byte-level BPE): its bytes wait for the rest.
/// Text that could be the start of a stop string is held back until it is known not to be.
#[derive(Debug, Clone)]
pub(crate) struct TextAssembler {
    stops: Vec<String>,
    pending: Vec<u8>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl TextAssembler {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: Vec::new(),
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    pub fn push(&mut self, piece: &TokenPiece) -> Pushed {
        if self.stopped || piece.special {
            return Pushed {
                delta: String::new(),
                stop_hit: false,
            };
        }
        self.pending.extend_from_slice(&piece.bytes);
        self.decode_pending(false);
        if let Some(at) = self.first_stop() {
            self.text.truncate(at);
            self.stopped = true;
            let delta = self.text[self.emitted.min(self.text.len())..].to_string();
            self.emitted = self.text.len();
            return Pushed {
                delta,
                stop_hit: true,
            };
        }
        let safe = self.text.len() - self.held_back();
        let delta = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        Pushed {
            delta,
            stop_hit: false,
        }
    }

    /// The end of the answer: whatever was held back.
    pub fn finish(&mut self) -> String {
        if !self.stopped {
            self.decode_pending(true);
        }
        let delta = self.text[self.emitted.min(self.text.len())..].to_string();
        self.emitted = self.text.len();
        delta
    }

    fn decode_pending(&mut self, flush: bool) {
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.text.push_str(s);
                    self.pending.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix was just checked to be UTF-8.
                    self.text
                        .push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            self.pending.drain(..valid);
                            if flush {
                                self.text.push(char::REPLACEMENT_CHARACTER);
                                self.pending.clear();
                            }
                            return;
                        }
                    }
                }
            }
        }
    }

    fn first_stop(&self) -> Option<usize> {
        self.stops.iter().filter_map(|s| self.text.find(s)).min()
    }

    /// Bytes at the end of the text that are a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            for (end, _) in stop.char_indices().skip(1) {
                if end > longest && self.text.ends_with(&stop[..end]) {
                    longest = end;
                }
            }
        }
        longest.min(self.text.len() - self.emitted.min(self.text.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(s: &[u8]) -> TokenPiece {
        TokenPiece {
            bytes: s.to_vec(),
            special: false,
        }
    }

    #[test]
    fn split_utf8_character_waits_for_its_second_byte() {
        // "é" is C3 A9.
        let mut t = TextAssembler::new(vec![]);
        assert_eq!(t.push(&piece(&[b'a', 0xC3])).delta, "a");
        assert_eq!(t.push(&piece(&[0xA9, b'b'])).delta, "éb");
        assert_eq!(t.finish(), "");
    }

    #[test]
    fn special_tokens_add_no_text() {
        let mut t = TextAssembler::new(vec![]);
        t.push(&piece(b"ok"));
        let special = TokenPiece {
            bytes: b"<|im_end|>".to_vec(),
            special: true,
        };
        assert_eq!(t.push(&special).delta, "");
        assert_eq!(t.finish(), "");
    }

    #[test]
    fn stop_string_across_tokens_cuts_the_answer_before_it() {
        let mut t = TextAssembler::new(vec!["\nAction".into()]);
        assert_eq!(t.push(&piece(b"Thought: x")).delta, "Thought: x");
        // "\nAc" may begin the stop string: held back.
        assert_eq!(t.push(&piece(b"\nAc")).delta, "");
        let p = t.push(&piece(b"tion: click"));
        assert!(p.stop_hit);
        assert_eq!(p.delta, "");
        assert_eq!(t.finish(), "");
    }

    #[test]
    fn held_back_text_is_released_when_the_stop_string_does_not_follow() {
        let mut t = TextAssembler::new(vec!["STOP".into()]);
        assert_eq!(t.push(&piece(b"a ST")).delta, "a ");
        assert_eq!(t.push(&piece(b"ay")).delta, "STay");
        assert_eq!(t.push(&piece(b" S")).delta, " ");
        assert_eq!(t.finish(), "S");
    }

    #[test]
    fn truncated_character_at_the_end_becomes_a_replacement_character() {
        let mut t = TextAssembler::new(vec![]);
        assert_eq!(t.push(&piece(&[b'x', 0xE2, 0x82])).delta, "x");
        assert_eq!(t.finish(), "\u{FFFD}");
    }

    #[test]
    fn invalid_byte_becomes_a_replacement_character() {
        let mut t = TextAssembler::new(vec![]);
        assert_eq!(t.push(&piece(&[0xFF, b'z'])).delta, "\u{FFFD}z");
    }
}
