//! Message templates: literal text with `{name}` placeholders, plus the SMS
//! length of a rendered message.
//!
//! Syntax: a placeholder is `{` + name + `}` where the name matches
//! `[A-Za-z_][A-Za-z0-9_]*`. `{{` is a literal `{` and `}}` a literal `}`.
//! Syntax errors carry the 0-based position in `body.chars()` (not bytes) of
//! the offending character, so an editor can point at it.

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Literal text, with `{{` / `}}` already turned into single braces.
    Text(String),
    /// A placeholder: the variable name without braces.
    Var(String),
}

/// A parsed template; adjacent text is merged into one [`Part::Text`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<Part>,
}

/// Why a template body was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template syntax error at character {position}: {message}")]
pub struct SyntaxError {
    /// 0-based index into `body.chars()`.
    pub position: usize,
    pub message: String,
}

fn syntax_error(position: usize, message: impl Into<String>) -> SyntaxError {
    SyntaxError {
        position,
        message: message.into(),
    }
}

/// The longest template body, in characters: the provider's limit for one
/// message (Twilio: 1,600). It also bounds the variables (≤ 533).
pub const MAX_BODY_CHARS: usize = 1600;

/// Whether `name` is a placeholder name: a letter or `_`, then letters,
/// digits or `_`.
pub fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses a template body such as `"Hi {first_name}, 20% off {{today}}"`.
pub fn parse(body: &str) -> Result<Template, SyntaxError> {
    let chars: Vec<char> = body.chars().collect();
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '{' if next == Some('{') => {
                text.push('{');
                i += 2;
            }
            '}' if next == Some('}') => {
                text.push('}');
                i += 2;
            }
            '}' => {
                return Err(syntax_error(
                    i,
                    "unmatched `}`; write `}}` for a literal brace",
                ));
            }
            '{' => {
                let (name, close) = placeholder(&chars, i)?;
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(Part::Var(name));
                i = close + 1;
            }
            _ => {
                text.push(c);
                i += 1;
            }
        }
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(Template { parts })
}

/// Reads the placeholder whose `{` is at `open`; returns its name and the
/// index of the closing `}`.
fn placeholder(chars: &[char], open: usize) -> Result<(String, usize), SyntaxError> {
    let mut name = String::new();
    let mut j = open + 1;
    loop {
        match chars.get(j).copied() {
            None => {
                return Err(syntax_error(
                    open,
                    "`{` is never closed; write `{{` for a literal brace",
                ));
            }
            Some('}') => break,
            Some(c) => {
                let valid = if name.is_empty() {
                    c.is_ascii_alphabetic() || c == '_'
                } else {
                    c.is_ascii_alphanumeric() || c == '_'
                };
                if !valid {
                    return Err(syntax_error(
                        j,
                        format!(
                            "invalid character {c:?} in placeholder name \
                             (names are a letter or `_`, then letters, digits or `_`)"
                        ),
                    ));
                }
                name.push(c);
            }
        }
        j += 1;
    }
    if name.is_empty() {
        return Err(syntax_error(
            open,
            "empty placeholder `{}`; write `{{}}` for literal braces",
        ));
    }
    Ok((name, j))
}

impl Template {
    /// Distinct variable names in order of first appearance.
    pub fn variables(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let mut names: Vec<String> = Vec::new();
        for part in &self.parts {
            if let Part::Var(name) = part
                && seen.insert(name.as_str())
            {
                names.push(name.clone());
            }
        }
        names
    }

    /// Renders with `lookup`; Err(name) names the first variable `lookup` has no value for.
    pub fn render(&self, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Var(name) => match lookup(name) {
                    Some(value) => out.push_str(&value),
                    None => return Err(name.clone()),
                },
            }
        }
        Ok(out)
    }
}

/// The text of a JSON attribute value for rendering: strings as they are, numbers and booleans
/// via to_string; null, arrays and objects → None (treated as missing).
pub fn attribute_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Null | serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
            None
        }
    }
}

/// The SMS alphabet a text needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Encoding {
    /// The 7-bit GSM 03.38 default alphabet (with its extension table).
    #[serde(rename = "GSM-7")]
    Gsm7,
    /// UTF-16, used as soon as one character is outside GSM-7.
    #[serde(rename = "UCS-2")]
    Ucs2,
}

/// How long a text is as an SMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Length {
    /// `text.chars().count()`.
    pub characters: usize,
    /// Number of SMS parts the carrier bills; 0 for empty text.
    pub segments: usize,
    pub encoding: Encoding,
}

/// The GSM 03.38 basic character set (ESC, 0x1B, is not a user character).
const GSM_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅå\
                         Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ\
                         \x20!\"#¤%&'()*+,-./\
                         0123456789:;<=>?\
                         ¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§\
                         ¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The GSM 03.38 extension table: each costs two septets (ESC + char).
const GSM_EXTENSION: &str = "\x0C^{}\\[~]|€";

/// Septets `c` costs in GSM-7, or None when GSM-7 cannot encode it.
fn gsm_septets(c: char) -> Option<usize> {
    if GSM_BASIC.contains(c) {
        Some(1)
    } else if GSM_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Parts needed for `units`: one part holds `single`, concatenated parts
/// hold `per_part` each (the rest is the concatenation header).
fn segments(units: usize, single: usize, per_part: usize) -> usize {
    if units == 0 {
        0
    } else if units <= single {
        1
    } else {
        units.div_ceil(per_part)
    }
}

/// SMS length of `text`: GSM-7 when every char is in the GSM 03.38 basic set or its extension
/// table (extension chars `^ { } \ [ ~ ] | €` and form feed count 2 septets); otherwise UCS-2
/// counted in UTF-16 code units. Segments: GSM-7 ≤160 septets → 1, else ceil(septets/153);
/// UCS-2 ≤70 units → 1, else ceil(units/67). Empty text → 0 segments. `characters` = chars().count().
pub fn length(text: &str) -> Length {
    let characters = text.chars().count();
    let septets: Option<usize> = text.chars().map(gsm_septets).sum();
    match septets {
        Some(septets) => Length {
            characters,
            segments: segments(septets, 160, 153),
            encoding: Encoding::Gsm7,
        },
        None => Length {
            characters,
            segments: segments(text.encode_utf16().count(), 70, 67),
            encoding: Encoding::Ucs2,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn err_at(body: &str) -> usize {
        match parse(body) {
            Ok(t) => panic!("{body:?} parsed as {t:?}"),
            Err(e) => e.position,
        }
    }

    #[test]
    fn parses_text_and_variables() {
        let t = parse("Hi {first_name}, code {code}. Bye {first_name}").expect("valid");
        assert_eq!(
            t.parts,
            vec![
                Part::Text("Hi ".into()),
                Part::Var("first_name".into()),
                Part::Text(", code ".into()),
                Part::Var("code".into()),
                Part::Text(". Bye ".into()),
                Part::Var("first_name".into()),
            ]
        );
        assert_eq!(
            t.variables(),
            vec!["first_name".to_string(), "code".to_string()]
        );
        assert!(parse("").expect("valid").parts.is_empty());
        assert_eq!(
            parse("{_a1}{B}").expect("valid").variables(),
            vec!["_a1".to_string(), "B".to_string()]
        );
    }

    #[test]
    fn escapes_are_literal_braces() {
        let t = parse("{{x}} and }}{{ {y}").expect("valid");
        assert_eq!(
            t.parts,
            vec![Part::Text("{x} and }{ ".into()), Part::Var("y".into())]
        );
        assert_eq!(t.variables(), vec!["y".to_string()]);
        let t = parse("{{{name}}}").expect("valid");
        assert_eq!(
            t.parts,
            vec![
                Part::Text("{".into()),
                Part::Var("name".into()),
                Part::Text("}".into()),
            ]
        );
    }

    #[test]
    fn unclosed_brace_points_at_the_brace() {
        assert_eq!(err_at("Hello {name"), 6);
        assert_eq!(err_at("{"), 0);
        // Positions count characters, not bytes.
        assert_eq!(err_at("héllo 😀 {x"), 8);
    }

    #[test]
    fn empty_placeholder_points_at_the_brace() {
        assert_eq!(err_at("ab{}"), 2);
    }

    #[test]
    fn invalid_character_points_at_the_character() {
        assert_eq!(err_at("Hi {first name}"), 9);
        assert_eq!(err_at("{1abc}"), 1);
        assert_eq!(err_at("{a-b}"), 2);
        assert_eq!(err_at("é{ñ}"), 2);
        assert_eq!(err_at("{a{b}}"), 2);
    }

    #[test]
    fn lone_closing_brace_points_at_it() {
        assert_eq!(err_at("a}b"), 1);
        assert_eq!(err_at("{x}}"), 3);
        let e = parse("ab}").expect_err("lone brace");
        assert_eq!(
            e.to_string(),
            format!("template syntax error at character 2: {}", e.message)
        );
    }

    #[test]
    fn renders_and_reports_the_first_missing_variable() {
        let t = parse("Hi {name}, {code} / {other} {{ok}}").expect("valid");
        let mut values = HashMap::new();
        values.insert("name", "Ana".to_string());
        values.insert("code", "X1".to_string());
        values.insert("other", "o".to_string());
        assert_eq!(
            t.render(|k| values.get(k).cloned()),
            Ok("Hi Ana, X1 / o {ok}".to_string())
        );
        values.remove("code");
        values.remove("other");
        assert_eq!(
            t.render(|k| values.get(k).cloned()),
            Err("code".to_string())
        );
    }

    #[test]
    fn attribute_text_of_json_values() {
        use serde_json::json;
        assert_eq!(attribute_text(&json!("a b")), Some("a b".into()));
        assert_eq!(attribute_text(&json!(42)), Some("42".into()));
        assert_eq!(attribute_text(&json!(1.5)), Some("1.5".into()));
        assert_eq!(attribute_text(&json!(true)), Some("true".into()));
        assert_eq!(attribute_text(&json!(null)), None);
        assert_eq!(attribute_text(&json!([1])), None);
        assert_eq!(attribute_text(&json!({"a": 1})), None);
    }

    #[test]
    fn gsm_basic_set_is_complete() {
        let chars: Vec<char> = GSM_BASIC.chars().collect();
        assert_eq!(chars.len(), 127);
        let mut sorted = chars.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 127, "duplicates in GSM_BASIC");
        assert!(!GSM_BASIC.contains('\x1B'));
        assert_eq!(GSM_EXTENSION.chars().count(), 10);
    }

    #[test]
    fn gsm_single_segment_limit() {
        let l = length(&"a".repeat(160));
        assert_eq!(
            l,
            Length {
                characters: 160,
                segments: 1,
                encoding: Encoding::Gsm7
            }
        );
        let l = length(&"a".repeat(161));
        assert_eq!((l.characters, l.segments), (161, 2));
        assert_eq!(
            length("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà").encoding,
            Encoding::Gsm7
        );
    }

    #[test]
    fn gsm_multipart_boundary() {
        assert_eq!(length(&"a".repeat(306)).segments, 2);
        assert_eq!(length(&"a".repeat(307)).segments, 3);
    }

    #[test]
    fn extension_chars_count_two_septets() {
        let l = length(&"€".repeat(80));
        assert_eq!(
            l,
            Length {
                characters: 80,
                segments: 1,
                encoding: Encoding::Gsm7
            }
        );
        assert_eq!(length(&"€".repeat(81)).segments, 2);
        assert_eq!(length(&format!("{}{{", "a".repeat(159))).segments, 2);
        assert_eq!(length(&format!("{}^", "a".repeat(158))).segments, 1);
        assert_eq!(length("^{}\\[~]|€\x0C").encoding, Encoding::Gsm7);
    }

    #[test]
    fn ucs2_counts_utf16_units() {
        let l = length("Hi 😀");
        assert_eq!(
            l,
            Length {
                characters: 4,
                segments: 1,
                encoding: Encoding::Ucs2
            }
        );
        // 35 emoji = 70 UTF-16 units; 36 = 72.
        assert_eq!(length(&"😀".repeat(35)).segments, 1);
        assert_eq!(length(&"😀".repeat(36)).segments, 2);
        assert_eq!(length(&"😀".repeat(36)).characters, 36);
    }

    #[test]
    fn ucs2_single_segment_limit() {
        assert_eq!(length(&"ж".repeat(70)).segments, 1);
        assert_eq!(length(&"ж".repeat(71)).segments, 2);
        assert_eq!(length(&"ж".repeat(134)).segments, 2);
        assert_eq!(length(&"ж".repeat(135)).segments, 3);
        // One non-GSM char switches the whole text to UCS-2.
        let l = length(&format!("{}ж", "a".repeat(70)));
        assert_eq!((l.encoding, l.segments), (Encoding::Ucs2, 2));
    }

    #[test]
    fn empty_text_has_no_segments() {
        assert_eq!(
            length(""),
            Length {
                characters: 0,
                segments: 0,
                encoding: Encoding::Gsm7
            }
        );
    }

    #[test]
    fn encoding_serializes_with_dashes() {
        assert_eq!(
            serde_json::to_value(Encoding::Gsm7).expect("serializes"),
            serde_json::json!("GSM-7")
        );
        assert_eq!(
            serde_json::to_value(Encoding::Ucs2).expect("serializes"),
            serde_json::json!("UCS-2")
        );
    }
}
