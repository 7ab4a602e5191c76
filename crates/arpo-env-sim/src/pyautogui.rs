//! A parser for the pyautogui programs an OSWorld host sends to `/execute`.
//!
//! The program is parsed, never executed. Accepted: `import pyautogui`, `import time`,
//! assignments to `pyautogui.FAILSAFE` / `pyautogui.PAUSE`, the pyautogui calls an agent uses
//! (`click`, `doubleClick`, `rightClick`, `moveTo`, `dragTo`, `scroll`, `hotkey`, `press`,
//! `keyDown`, `keyUp`, `write`, `typewrite`) and `time.sleep`. Arguments are Python literals:
//! strings (every prefix-free, `r`, `u` and `b` form, single, double and triple quotes, all escape
//! sequences except `\N{...}`), ints, floats, `True`/`False`/`None`, and lists or tuples of those.
//! Anything else is an error that says why.

use crate::SimError;

/// A mouse button.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MouseButton {
    Left,
    Right,
    Middle,
}

/// One accepted call of a program.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum PyAutoGuiCall {
    /// `click(x, y, clicks=1, button='left')`; a missing coordinate means "where the pointer is".
    Click {
        x: Option<f64>,
        y: Option<f64>,
        clicks: u32,
        button: MouseButton,
    },
    /// `doubleClick(x, y, button='left')`.
    DoubleClick {
        x: Option<f64>,
        y: Option<f64>,
        button: MouseButton,
    },
    /// `rightClick(x, y)`.
    RightClick { x: Option<f64>, y: Option<f64> },
    /// `moveTo(x, y)`.
    MoveTo { x: Option<f64>, y: Option<f64> },
    /// `dragTo(x, y, button='left')`: press where the pointer is, release at (x, y).
    DragTo {
        x: Option<f64>,
        y: Option<f64>,
        button: MouseButton,
    },
    /// `scroll(clicks, x, y)`: positive scrolls up.
    Scroll {
        clicks: i64,
        x: Option<f64>,
        y: Option<f64>,
    },
    /// `hotkey('ctrl', 'c')`.
    Hotkey { keys: Vec<String> },
    /// `press('enter', presses=1)` (also `press([...])` and `write([...])`).
    Press { keys: Vec<String>, presses: u32 },
    /// `keyDown('shift')`.
    KeyDown { key: String },
    /// `keyUp('shift')`.
    KeyUp { key: String },
    /// `write('text')` / `typewrite('text')`.
    Write { text: String },
    /// `time.sleep(seconds)`.
    Sleep { seconds: f64 },
}

/// Parses a whole program (statements separated by `;` or new lines).
pub fn parse_program(source: &str) -> Result<Vec<PyAutoGuiCall>, SimError> {
    let tokens = lex(source)?;
    Parser {
        tokens,
        pos: 0,
        end: source.len(),
    }
    .program()
}

// ---------------------------------------------------------------- values

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    None,
    Seq(Vec<Value>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a bool",
            Value::None => "None",
            Value::Seq(_) => "a list",
        }
    }
}

// ---------------------------------------------------------------- lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Str(String),
    Int(i64),
    Float(f64),
    Punct(char),
    /// A statement end: `;` or a new line outside brackets.
    End,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    offset: usize,
}

fn err(offset: usize, reason: impl Into<String>) -> SimError {
    SimError::Program {
        offset,
        reason: reason.into(),
    }
}

fn lex(src: &str) -> Result<Vec<Token>, SimError> {
    let chars: Vec<(usize, char)> = src.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut depth = 0usize;
    while i < chars.len() {
        let (off, c) = chars[i];
        match c {
            ' ' | '\t' | '\r' | '\x0c' => i += 1,
            '\\' if chars.get(i + 1).map(|c| c.1) == Some('\n') => i += 2,
            '\n' => {
                if depth == 0 {
                    out.push(Token {
                        tok: Tok::End,
                        offset: off,
                    });
                }
                i += 1;
            }
            ';' => {
                out.push(Token {
                    tok: Tok::End,
                    offset: off,
                });
                i += 1;
            }
            '#' => {
                while i < chars.len() && chars[i].1 != '\n' {
                    i += 1;
                }
            }
            '(' | '[' => {
                depth += 1;
                out.push(Token {
                    tok: Tok::Punct(c),
                    offset: off,
                });
                i += 1;
            }
            ')' | ']' => {
                depth = depth.saturating_sub(1);
                out.push(Token {
                    tok: Tok::Punct(c),
                    offset: off,
                });
                i += 1;
            }
            ',' | '=' | '.' | '-' | '+' if !(c == '.' && next_is_digit(&chars, i)) => {
                out.push(Token {
                    tok: Tok::Punct(c),
                    offset: off,
                });
                i += 1;
            }
            '\'' | '"' => {
                let (s, next) = lex_string(&chars, i, false)?;
                out.push(Token {
                    tok: Tok::Str(s),
                    offset: off,
                });
                i = next;
            }
            c if c.is_ascii_digit() || c == '.' => {
                let (tok, next) = lex_number(&chars, i)?;
                out.push(Token { tok, offset: off });
                i = next;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].1.is_alphanumeric() || chars[i].1 == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().map(|c| c.1).collect();
                let quote = chars.get(i).map(|c| c.1);
                if matches!(quote, Some('\'') | Some('"')) && word.len() <= 2 {
                    let lower = word.to_ascii_lowercase();
                    let raw = match lower.as_str() {
                        "r" | "rb" | "br" => true,
                        "u" | "b" => false,
                        _ => {
                            return Err(err(
                                off,
                                format!(
                                    "string prefix {word:?} is not accepted (f-strings and the like are code)"
                                ),
                            ));
                        }
                    };
                    let (s, next) = lex_string(&chars, i, raw)?;
                    out.push(Token {
                        tok: Tok::Str(s),
                        offset: off,
                    });
                    i = next;
                } else {
                    out.push(Token {
                        tok: Tok::Name(word),
                        offset: off,
                    });
                }
            }
            other => {
                return Err(err(off, format!("unexpected character {other:?}")));
            }
        }
    }
    Ok(out)
}

fn next_is_digit(chars: &[(usize, char)], i: usize) -> bool {
    chars.get(i + 1).is_some_and(|c| c.1.is_ascii_digit())
}

fn lex_number(chars: &[(usize, char)], start: usize) -> Result<(Tok, usize), SimError> {
    let off = chars[start].0;
    let mut i = start;
    let mut text = String::new();
    let radix = if chars[i].1 == '0' {
        match chars.get(i + 1).map(|c| c.1.to_ascii_lowercase()) {
            Some('x') => 16,
            Some('o') => 8,
            Some('b') => 2,
            _ => 10,
        }
    } else {
        10
    };
    if radix != 10 {
        i += 2;
        while i < chars.len() && (chars[i].1.is_ascii_alphanumeric() || chars[i].1 == '_') {
            if chars[i].1 != '_' {
                text.push(chars[i].1);
            }
            i += 1;
        }
        let v = i64::from_str_radix(&text, radix)
            .map_err(|e| err(off, format!("bad integer literal: {e}")))?;
        return Ok((Tok::Int(v), i));
    }
    let mut is_float = false;
    while i < chars.len() {
        let c = chars[i].1;
        if c.is_ascii_digit() {
            text.push(c);
        } else if c == '_' {
        } else if c == '.' && !is_float {
            is_float = true;
            text.push(c);
        } else if (c == 'e' || c == 'E')
            && chars
                .get(i + 1)
                .is_some_and(|n| n.1.is_ascii_digit() || n.1 == '-' || n.1 == '+')
        {
            is_float = true;
            text.push('e');
            i += 1;
            text.push(chars[i].1);
        } else {
            break;
        }
        i += 1;
    }
    if chars
        .get(i)
        .is_some_and(|c| c.1.is_alphabetic() || c.1 == '_')
    {
        return Err(err(
            off,
            "a number runs into a name (complex numbers are not accepted)",
        ));
    }
    if is_float {
        let v: f64 = text
            .parse()
            .map_err(|e| err(off, format!("bad float literal {text:?}: {e}")))?;
        Ok((Tok::Float(v), i))
    } else {
        let v: i64 = text
            .parse()
            .map_err(|e| err(off, format!("bad integer literal {text:?}: {e}")))?;
        Ok((Tok::Int(v), i))
    }
}

/// Lexes a string literal whose opening quote is at `start`.
fn lex_string(
    chars: &[(usize, char)],
    start: usize,
    raw: bool,
) -> Result<(String, usize), SimError> {
    let off = chars[start].0;
    let q = chars[start].1;
    let triple = chars.get(start + 1).map(|c| c.1) == Some(q)
        && chars.get(start + 2).map(|c| c.1) == Some(q);
    let mut i = start + if triple { 3 } else { 1 };
    let mut out = String::new();
    loop {
        let Some(&(coff, c)) = chars.get(i) else {
            return Err(err(off, "unterminated string literal"));
        };
        if c == q {
            if !triple {
                return Ok((out, i + 1));
            }
            if chars.get(i + 1).map(|c| c.1) == Some(q) && chars.get(i + 2).map(|c| c.1) == Some(q)
            {
                return Ok((out, i + 3));
            }
            out.push(c);
            i += 1;
            continue;
        }
        if c == '\n' && !triple {
            return Err(err(coff, "new line inside a single-quoted string literal"));
        }
        if c != '\\' {
            out.push(c);
            i += 1;
            continue;
        }
        let Some(&(_, e)) = chars.get(i + 1) else {
            return Err(err(off, "unterminated string literal"));
        };
        if raw {
            // A raw string keeps the backslash; it still cannot end on an escaped quote.
            out.push('\\');
            out.push(e);
            i += 2;
            continue;
        }
        i += 2;
        match e {
            '\n' => {}
            '\\' => out.push('\\'),
            '\'' => out.push('\''),
            '"' => out.push('"'),
            'a' => out.push('\x07'),
            'b' => out.push('\x08'),
            'f' => out.push('\x0c'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'v' => out.push('\x0b'),
            '0'..='7' => {
                let mut v = e.to_digit(8).unwrap_or(0);
                let mut n = 1;
                while n < 3 {
                    match chars.get(i).and_then(|c| c.1.to_digit(8)) {
                        Some(d) => {
                            v = v * 8 + d;
                            i += 1;
                            n += 1;
                        }
                        None => break,
                    }
                }
                out.push(char::from_u32(v).ok_or_else(|| err(coff, "bad octal escape"))?);
            }
            'x' | 'u' | 'U' => {
                let len = match e {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let digits: String = chars
                    .get(i..i + len)
                    .ok_or_else(|| err(coff, format!("truncated \\{e} escape")))?
                    .iter()
                    .map(|c| c.1)
                    .collect();
                let v = u32::from_str_radix(&digits, 16)
                    .map_err(|_| err(coff, format!("bad \\{e} escape {digits:?}")))?;
                out.push(
                    char::from_u32(v)
                        .ok_or_else(|| err(coff, format!("\\{e}{digits} is not a character")))?,
                );
                i += len;
            }
            'N' => {
                return Err(err(
                    coff,
                    "\\N{...} named escapes are not supported: write the character or a \\u escape",
                ));
            }
            other => {
                // Python keeps unknown escapes verbatim.
                out.push('\\');
                out.push(other);
            }
        }
    }
}

// ---------------------------------------------------------------- parser

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    end: usize,
}

const IGNORED_KWARGS: &[&str] = &["interval", "duration", "tween", "logScreenshot", "_pause"];

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|t| &t.tok)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |t| t.offset)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.pos).map(|t| t.tok.clone());
        self.pos += 1;
        t
    }

    fn expect_punct(&mut self, p: char) -> Result<(), SimError> {
        let off = self.offset();
        match self.next() {
            Some(Tok::Punct(c)) if c == p => Ok(()),
            other => Err(err(
                off,
                format!("expected {p:?}, found {}", describe(&other)),
            )),
        }
    }

    fn name(&mut self) -> Result<String, SimError> {
        let off = self.offset();
        match self.next() {
            Some(Tok::Name(n)) => Ok(n),
            other => Err(err(
                off,
                format!("expected a name, found {}", describe(&other)),
            )),
        }
    }

    fn program(mut self) -> Result<Vec<PyAutoGuiCall>, SimError> {
        let mut calls = Vec::new();
        loop {
            while self.peek() == Some(&Tok::End) {
                self.pos += 1;
            }
            if self.peek().is_none() {
                return Ok(calls);
            }
            if let Some(call) = self.statement()? {
                calls.push(call);
            }
            let off = self.offset();
            match self.next() {
                None | Some(Tok::End) => {}
                other => {
                    return Err(err(
                        off,
                        format!(
                            "expected the end of the statement, found {}",
                            describe(&other)
                        ),
                    ));
                }
            }
        }
    }

    fn statement(&mut self) -> Result<Option<PyAutoGuiCall>, SimError> {
        let off = self.offset();
        let first = self.name()?;
        if first == "import" {
            loop {
                let m_off = self.offset();
                let module = self.name()?;
                if module != "pyautogui" && module != "time" {
                    return Err(err(
                        m_off,
                        format!("import of {module:?}: only pyautogui and time may be imported"),
                    ));
                }
                if self.peek() == Some(&Tok::Punct(',')) {
                    self.pos += 1;
                } else {
                    return Ok(None);
                }
            }
        }
        if first != "pyautogui" && first != "time" {
            return Err(err(
                off,
                format!(
                    "{first:?} is not allowed: only pyautogui calls and time.sleep are accepted"
                ),
            ));
        }
        self.expect_punct('.')?;
        let attr_off = self.offset();
        let attr = self.name()?;
        if first == "pyautogui" && (attr == "FAILSAFE" || attr == "PAUSE") {
            self.expect_punct('=')?;
            let v_off = self.offset();
            let v = self.value()?;
            return match (attr.as_str(), &v) {
                ("FAILSAFE", Value::Bool(_)) | ("PAUSE", Value::Int(_) | Value::Float(_)) => {
                    Ok(None)
                }
                _ => Err(err(
                    v_off,
                    format!("pyautogui.{attr} cannot be set to {}", v.kind()),
                )),
            };
        }
        self.expect_punct('(')?;
        let (args, kwargs) = self.arguments()?;
        let call = Call {
            name: format!("{first}.{attr}"),
            offset: attr_off,
            args,
            kwargs,
        };
        call.build().map(Some)
    }

    #[allow(clippy::type_complexity)] // positional and keyword arguments, as Python has them
    fn arguments(&mut self) -> Result<(Vec<Value>, Vec<(String, Value)>), SimError> {
        let mut args = Vec::new();
        let mut kwargs: Vec<(String, Value)> = Vec::new();
        loop {
            if self.peek() == Some(&Tok::Punct(')')) {
                self.pos += 1;
                return Ok((args, kwargs));
            }
            let off = self.offset();
            if let (
                Some(Tok::Name(n)),
                Some(Token {
                    tok: Tok::Punct('='),
                    ..
                }),
            ) = (self.peek().cloned(), self.tokens.get(self.pos + 1))
            {
                self.pos += 2;
                let v = self.value()?;
                if kwargs.iter().any(|(k, _)| *k == n) {
                    return Err(err(off, format!("keyword argument {n:?} repeated")));
                }
                kwargs.push((n, v));
            } else {
                if !kwargs.is_empty() {
                    return Err(err(off, "positional argument follows keyword argument"));
                }
                args.push(self.value()?);
            }
            match self.peek() {
                Some(Tok::Punct(',')) => self.pos += 1,
                Some(Tok::Punct(')')) => {}
                other => {
                    let d = describe(&other.cloned());
                    return Err(err(
                        self.offset(),
                        format!("expected ',' or ')', found {d}"),
                    ));
                }
            }
        }
    }

    fn value(&mut self) -> Result<Value, SimError> {
        let off = self.offset();
        match self.next() {
            Some(Tok::Str(s)) => {
                let mut s = s;
                // Adjacent literals concatenate.
                while let Some(Tok::Str(more)) = self.peek() {
                    s.push_str(more);
                    self.pos += 1;
                }
                Ok(Value::Str(s))
            }
            Some(Tok::Int(v)) => Ok(Value::Int(v)),
            Some(Tok::Float(v)) => Ok(Value::Float(v)),
            Some(Tok::Punct(sign @ ('-' | '+'))) => match self.value()? {
                Value::Int(v) => Ok(Value::Int(if sign == '-' { -v } else { v })),
                Value::Float(v) => Ok(Value::Float(if sign == '-' { -v } else { v })),
                other => Err(err(
                    off,
                    format!("unary {sign} applied to {}", other.kind()),
                )),
            },
            Some(Tok::Name(n)) => match n.as_str() {
                "True" => Ok(Value::Bool(true)),
                "False" => Ok(Value::Bool(false)),
                "None" => Ok(Value::None),
                _ => Err(err(
                    off,
                    format!("name {n:?} in an argument: only literals are accepted"),
                )),
            },
            Some(Tok::Punct(open @ ('(' | '['))) => {
                let close = if open == '(' { ')' } else { ']' };
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(&Tok::Punct(close)) {
                        self.pos += 1;
                        return Ok(Value::Seq(items));
                    }
                    items.push(self.value()?);
                    match self.peek() {
                        Some(Tok::Punct(',')) => self.pos += 1,
                        Some(Tok::Punct(c)) if *c == close => {}
                        other => {
                            let d = describe(&other.cloned());
                            return Err(err(
                                self.offset(),
                                format!("expected ',' or {close:?}, found {d}"),
                            ));
                        }
                    }
                }
            }
            other => Err(err(
                off,
                format!("expected a literal, found {}", describe(&other)),
            )),
        }
    }
}

fn describe(t: &Option<Tok>) -> String {
    match t {
        None => "the end of the program".into(),
        Some(Tok::Name(n)) => format!("name {n:?}"),
        Some(Tok::Str(_)) => "a string".into(),
        Some(Tok::Int(_)) | Some(Tok::Float(_)) => "a number".into(),
        Some(Tok::Punct(c)) => format!("{c:?}"),
        Some(Tok::End) => "the end of the statement".into(),
    }
}

/// A call with its arguments, before it is checked against the function's signature.
struct Call {
    name: String,
    offset: usize,
    args: Vec<Value>,
    kwargs: Vec<(String, Value)>,
}

impl Call {
    fn err(&self, reason: impl std::fmt::Display) -> SimError {
        err(self.offset, format!("{}: {reason}", self.name))
    }

    /// Binds positional and keyword arguments to `params`; unknown keywords are errors,
    /// the ignored timing keywords are dropped.
    fn bind(&self, params: &[&str]) -> Result<Vec<Option<Value>>, SimError> {
        if self.args.len() > params.len() {
            return Err(self.err(format!(
                "takes at most {} positional arguments, got {}",
                params.len(),
                self.args.len()
            )));
        }
        let mut bound: Vec<Option<Value>> = params.iter().map(|_| None).collect();
        for (slot, v) in bound.iter_mut().zip(&self.args) {
            *slot = Some(v.clone());
        }
        for (k, v) in &self.kwargs {
            if let Some(i) = params.iter().position(|p| p == k) {
                if bound[i].is_some() {
                    return Err(self.err(format!("argument {k:?} given twice")));
                }
                bound[i] = Some(v.clone());
            } else if !IGNORED_KWARGS.contains(&k.as_str()) {
                return Err(self.err(format!("unexpected keyword argument {k:?}")));
            }
        }
        Ok(bound)
    }

    fn number(&self, v: &Option<Value>, what: &str) -> Result<Option<f64>, SimError> {
        match v {
            None | Some(Value::None) => Ok(None),
            Some(Value::Int(i)) => Ok(Some(*i as f64)),
            Some(Value::Float(f)) if f.is_finite() => Ok(Some(*f)),
            Some(other) => Err(self.err(format!("{what} must be a number, got {}", other.kind()))),
        }
    }

    /// `(x, y)` from two arguments, or from a tuple in the first.
    fn point(
        &self,
        x: &Option<Value>,
        y: &Option<Value>,
    ) -> Result<(Option<f64>, Option<f64>), SimError> {
        if let Some(Value::Seq(items)) = x {
            if items.len() != 2 || y.as_ref().is_some_and(|v| *v != Value::None) {
                return Err(self.err("a point must be (x, y)"));
            }
            let px = self.number(&Some(items[0].clone()), "x")?;
            let py = self.number(&Some(items[1].clone()), "y")?;
            return Ok((px, py));
        }
        Ok((self.number(x, "x")?, self.number(y, "y")?))
    }

    fn button(&self, v: &Option<Value>) -> Result<MouseButton, SimError> {
        match v {
            None => Ok(MouseButton::Left),
            Some(Value::Str(s)) => match s.as_str() {
                "left" | "primary" => Ok(MouseButton::Left),
                "right" | "secondary" => Ok(MouseButton::Right),
                "middle" => Ok(MouseButton::Middle),
                _ => Err(self.err(format!("unknown button {s:?}"))),
            },
            Some(other) => Err(self.err(format!("button must be a string, got {}", other.kind()))),
        }
    }

    fn count(&self, v: &Option<Value>, what: &str, default: u32) -> Result<u32, SimError> {
        match v {
            None => Ok(default),
            Some(Value::Int(i)) if (0..=100).contains(i) => Ok(*i as u32),
            Some(other) => {
                Err(self.err(format!("{what} must be an int in 0..=100, got {other:?}")))
            }
        }
    }

    fn key(&self, v: &Value) -> Result<String, SimError> {
        match v {
            Value::Str(s) => Ok(s.clone()),
            other => Err(self.err(format!("a key must be a string, got {}", other.kind()))),
        }
    }

    fn keys(&self, v: &Option<Value>) -> Result<Vec<String>, SimError> {
        match v {
            Some(Value::Seq(items)) => items.iter().map(|k| self.key(k)).collect(),
            Some(v) => Ok(vec![self.key(v)?]),
            None => Err(self.err("missing the key argument")),
        }
    }

    fn build(&self) -> Result<PyAutoGuiCall, SimError> {
        let name = self.name.strip_prefix("pyautogui.").unwrap_or(&self.name);
        Ok(match name {
            "click" | "leftClick" => {
                let b = self.bind(&["x", "y", "clicks", "interval", "button"])?;
                let (x, y) = self.point(&b[0], &b[1])?;
                PyAutoGuiCall::Click {
                    x,
                    y,
                    clicks: self.count(&b[2], "clicks", 1)?,
                    button: self.button(&b[4])?,
                }
            }
            "doubleClick" => {
                let b = self.bind(&["x", "y", "interval", "button"])?;
                let (x, y) = self.point(&b[0], &b[1])?;
                PyAutoGuiCall::DoubleClick {
                    x,
                    y,
                    button: self.button(&b[3])?,
                }
            }
            "rightClick" => {
                let b = self.bind(&["x", "y"])?;
                let (x, y) = self.point(&b[0], &b[1])?;
                PyAutoGuiCall::RightClick { x, y }
            }
            "moveTo" => {
                let b = self.bind(&["x", "y"])?;
                let (x, y) = self.point(&b[0], &b[1])?;
                PyAutoGuiCall::MoveTo { x, y }
            }
            "dragTo" => {
                let b = self.bind(&["x", "y", "duration", "tween", "button"])?;
                let (x, y) = self.point(&b[0], &b[1])?;
                PyAutoGuiCall::DragTo {
                    x,
                    y,
                    button: self.button(&b[4])?,
                }
            }
            "scroll" => {
                let b = self.bind(&["clicks", "x", "y"])?;
                let clicks = match &b[0] {
                    Some(Value::Int(i)) => *i,
                    Some(Value::Float(f)) if f.is_finite() => *f as i64,
                    other => {
                        return Err(self.err(format!("clicks must be a number, got {other:?}")));
                    }
                };
                let (x, y) = self.point(&b[1], &b[2])?;
                PyAutoGuiCall::Scroll { clicks, x, y }
            }
            "hotkey" => {
                if let Some((k, _)) = self
                    .kwargs
                    .iter()
                    .find(|(k, _)| !IGNORED_KWARGS.contains(&k.as_str()))
                {
                    return Err(self.err(format!("unexpected keyword argument {k:?}")));
                }
                let mut keys = Vec::new();
                for a in &self.args {
                    match a {
                        Value::Seq(items) => {
                            for k in items {
                                keys.push(self.key(k)?);
                            }
                        }
                        v => keys.push(self.key(v)?),
                    }
                }
                if keys.is_empty() {
                    return Err(self.err("needs at least one key"));
                }
                PyAutoGuiCall::Hotkey { keys }
            }
            "press" => {
                let b = self.bind(&["keys", "presses", "interval"])?;
                PyAutoGuiCall::Press {
                    keys: self.keys(&b[0])?,
                    presses: self.count(&b[1], "presses", 1)?,
                }
            }
            "keyDown" | "keyUp" => {
                let b = self.bind(&["key"])?;
                let key = match &b[0] {
                    Some(v) => self.key(v)?,
                    None => return Err(self.err("missing the key argument")),
                };
                if name == "keyDown" {
                    PyAutoGuiCall::KeyDown { key }
                } else {
                    PyAutoGuiCall::KeyUp { key }
                }
            }
            "write" | "typewrite" => {
                let b = self.bind(&["message", "interval"])?;
                match &b[0] {
                    Some(Value::Str(s)) => PyAutoGuiCall::Write { text: s.clone() },
                    Some(Value::Seq(_)) => PyAutoGuiCall::Press {
                        keys: self.keys(&b[0])?,
                        presses: 1,
                    },
                    other => {
                        return Err(self.err(format!("message must be a string, got {other:?}")));
                    }
                }
            }
            "time.sleep" => {
                let b = self.bind(&["secs"])?;
                match self.number(&b[0], "secs")? {
                    Some(s) if s >= 0.0 => PyAutoGuiCall::Sleep { seconds: s },
                    _ => return Err(self.err("needs a non-negative number of seconds")),
                }
            }
            other => {
                return Err(self.err(format!(
                    "{other} is not supported: accepted are click, doubleClick, rightClick, moveTo, dragTo, scroll, hotkey, press, keyDown, keyUp, write, typewrite and time.sleep"
                )));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(src: &str) -> PyAutoGuiCall {
        let calls = parse_program(src).expect("program parses");
        assert_eq!(calls.len(), 1, "{calls:?}");
        calls.into_iter().next().expect("one call")
    }

    fn write_text(src: &str) -> String {
        match one(src) {
            PyAutoGuiCall::Write { text } => text,
            other => panic!("expected write, got {other:?}"),
        }
    }

    #[test]
    fn osworld_prefix_and_a_click() {
        let calls = parse_program(
            "import pyautogui; import time; pyautogui.FAILSAFE = False; pyautogui.click(12, 34.5, button='left')",
        )
        .expect("parses");
        assert_eq!(
            calls,
            vec![PyAutoGuiCall::Click {
                x: Some(12.0),
                y: Some(34.5),
                clicks: 1,
                button: MouseButton::Left
            }]
        );
    }

    #[test]
    fn every_accepted_call() {
        let src = "pyautogui.doubleClick(1, 2)\npyautogui.rightClick(x=3, y=4)\n\
                   pyautogui.moveTo((5, 6))\npyautogui.dragTo(7, 8, duration=1.0)\n\
                   pyautogui.scroll(-5, x=9, y=10)\npyautogui.hotkey('ctrl', 'a')\n\
                   pyautogui.press('enter', presses=2)\npyautogui.keyDown('shift')\n\
                   pyautogui.keyUp('shift')\npyautogui.typewrite('hi', interval=0.1)\n\
                   time.sleep(0.5)\npyautogui.click(button='right')";
        let calls = parse_program(src).expect("parses");
        use PyAutoGuiCall as C;
        assert_eq!(
            calls,
            vec![
                C::DoubleClick {
                    x: Some(1.0),
                    y: Some(2.0),
                    button: MouseButton::Left
                },
                C::RightClick {
                    x: Some(3.0),
                    y: Some(4.0)
                },
                C::MoveTo {
                    x: Some(5.0),
                    y: Some(6.0)
                },
                C::DragTo {
                    x: Some(7.0),
                    y: Some(8.0),
                    button: MouseButton::Left
                },
                C::Scroll {
                    clicks: -5,
                    x: Some(9.0),
                    y: Some(10.0)
                },
                C::Hotkey {
                    keys: vec!["ctrl".into(), "a".into()]
                },
                C::Press {
                    keys: vec!["enter".into()],
                    presses: 2
                },
                C::KeyDown {
                    key: "shift".into()
                },
                C::KeyUp {
                    key: "shift".into()
                },
                C::Write { text: "hi".into() },
                C::Sleep { seconds: 0.5 },
                C::Click {
                    x: None,
                    y: None,
                    clicks: 1,
                    button: MouseButton::Right
                },
            ]
        );
    }

    #[test]
    fn string_escapes_follow_python() {
        // Expected values written out by hand from the Python language reference.
        assert_eq!(write_text(r#"pyautogui.write('a\'b\"c\\d')"#), "a'b\"c\\d");
        assert_eq!(write_text(r#"pyautogui.write("t\tn\nr\r")"#), "t\tn\nr\r");
        assert_eq!(
            write_text(r#"pyautogui.write('\x41\u00e9\U0001F600')"#),
            "Aé😀"
        );
        assert_eq!(write_text(r#"pyautogui.write('\101\0\7')"#), "A\0\x07");
        assert_eq!(
            write_text(r#"pyautogui.write('\a\b\f\v')"#),
            "\x07\x08\x0c\x0b"
        );
        assert_eq!(write_text(r#"pyautogui.write('\q')"#), "\\q");
        assert_eq!(write_text(r#"pyautogui.write(r'\n\'')"#), "\\n\\'");
        assert_eq!(write_text(r#"pyautogui.write(u'x' "y" 'z')"#), "xyz");
        assert_eq!(write_text("pyautogui.write('''a'b\nc''')"), "a'b\nc");
        assert_eq!(write_text("pyautogui.write(\"a\\\nb\")"), "ab");
        assert_eq!(
            write_text(r##"pyautogui.write("#;not a comment")"##),
            "#;not a comment"
        );
    }

    #[test]
    fn numbers() {
        let call = one("pyautogui.click(0x10, 1_000, clicks=2)");
        assert_eq!(
            call,
            PyAutoGuiCall::Click {
                x: Some(16.0),
                y: Some(1000.0),
                clicks: 2,
                button: MouseButton::Left
            }
        );
        assert_eq!(one("time.sleep(.5)"), PyAutoGuiCall::Sleep { seconds: 0.5 });
        assert_eq!(
            one("time.sleep(1e-1)"),
            PyAutoGuiCall::Sleep { seconds: 0.1 }
        );
        assert_eq!(
            one("pyautogui.scroll(+3)"),
            PyAutoGuiCall::Scroll {
                clicks: 3,
                x: None,
                y: None
            }
        );
    }

    #[test]
    fn write_of_a_list_presses_keys() {
        assert_eq!(
            one("pyautogui.write(['a', 'enter'])"),
            PyAutoGuiCall::Press {
                keys: vec!["a".into(), "enter".into()],
                presses: 1
            }
        );
    }

    #[test]
    fn comments_and_blank_statements_are_skipped() {
        let calls = parse_program("# hi\n;;pyautogui.press('a') # trailing\n\n").expect("parses");
        assert_eq!(calls.len(), 1);
    }

    fn rejected(src: &str, needle: &str) {
        match parse_program(src) {
            Err(SimError::Program { reason, .. }) => {
                assert!(
                    reason.contains(needle),
                    "{reason:?} should mention {needle:?}"
                )
            }
            other => panic!("{src:?} should be rejected, got {other:?}"),
        }
    }

    #[test]
    fn everything_else_is_rejected_with_a_reason() {
        rejected("import os", "only pyautogui and time");
        rejected("os.system('rm -rf /')", "not allowed");
        rejected("pyautogui.screenshot()", "not supported");
        rejected("pyautogui.click(x)", "only literals");
        rejected("pyautogui.click(1+2, 3)", "expected ','");
        rejected("pyautogui.write(f'{x}')", "f-strings");
        rejected("pyautogui.write('abc)", "unterminated");
        rejected("pyautogui.write('\\N{BULLET}')", "named escapes");
        rejected("pyautogui.click(1, 2, foo=3)", "unexpected keyword");
        rejected("pyautogui.click(x=1, 2)", "positional argument follows");
        rejected(
            "pyautogui.click(1, 2) pyautogui.click(3, 4)",
            "end of the statement",
        );
        rejected("pyautogui.FAILSAFE = 'no'", "cannot be set");
        rejected("__import__('os')", "not allowed");
        rejected("pyautogui.click(1, 2", "expected");
        rejected("pyautogui.hotkey()", "at least one key");
        rejected("x = 1", "not allowed");
    }
}
