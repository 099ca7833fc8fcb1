//! What an inbound message means for consent, read the way people write:
//! full-width letters, quotes and emoji around the word, zero-width
//! characters, "opt-out" for "opt out", "please stop texting me".
//!
//! A message is first normalised: Unicode NFKC, format characters (zero-width
//! spaces and joiners, BOM, direction marks) dropped, case folded, hyphens and
//! runs of spaces made one space, punctuation, symbols and emoji stripped at
//! both ends. Then:
//! - the whole of it is a keyword → that intent (opt-out first: on a message
//!   that is both, stopping wins);
//! - a keyword plus only filler words ("please stop", "stop texting me",
//!   "opt me out", "unsubscribe me") → that intent;
//! - an opt-out keyword among other words ("Can I cancel my order?",
//!   "I'll stop by tomorrow") → unclear: kept, perhaps answered with a
//!   clarification, never acted on.

use unicode_general_category::{GeneralCategory, get_general_category};
use unicode_normalization::UnicodeNormalization;

use crate::config::ConsentConfig;

/// What an inbound message means for consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// The keyword matched, as normalised.
    OptOut(String),
    OptIn(String),
    Help(String),
    /// An operator rule matched: reply with this text.
    Rule(String, String),
    /// Mentions an opt-out keyword among other words: not a revocation on
    /// its face.
    Unclear(String),
    /// An ordinary message.
    None,
}

/// `text` as keywords are matched against: NFKC, format characters
/// dropped, lower case, hyphens and whitespace runs as one space,
/// punctuation, symbols and emoji trimmed at both ends.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.nfkc() {
        if get_general_category(c) == GeneralCategory::Format {
            continue;
        }
        if c.is_whitespace() || is_hyphen(c) {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        out.extend(c.to_lowercase());
    }
    out.trim_matches(|c: char| !c.is_alphanumeric()).to_string()
}

fn is_hyphen(c: char) -> bool {
    matches!(
        c,
        '-' | '_' | '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE58}' | '\u{FE63}' | '\u{FF0D}'
    )
}

/// The words of a normalised message: letters and digits, everything else a separator.
fn words(normalised: &str) -> Vec<&str> {
    normalised
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect()
}

/// A configured keyword list, normalised once.
#[derive(Debug, Clone, Default)]
pub struct Keywords {
    opt_out: Vec<String>,
    opt_in: Vec<String>,
    help: Vec<String>,
    filler: Vec<String>,
    rules: Vec<(String, String)>,
    max_words: usize,
}

impl Keywords {
    pub fn new(cfg: &ConsentConfig) -> Self {
        let list = |l: &[String]| -> Vec<String> {
            l.iter()
                .map(|k| words(&normalise(k)).join(" "))
                .filter(|k| !k.is_empty())
                .collect()
        };
        Self {
            opt_out: list(&cfg.opt_out_keywords),
            opt_in: list(&cfg.opt_in_keywords),
            help: list(&cfg.help_keywords),
            filler: list(&cfg.filler_words),
            rules: cfg
                .rules
                .iter()
                .map(|r| (words(&normalise(&r.keyword)).join(" "), r.reply.clone()))
                .collect(),
            max_words: cfg.max_plain_words,
        }
    }

    /// What `body` means.
    pub fn classify(&self, body: &str) -> Intent {
        let text = normalise(body);
        let all = words(&text);
        if all.is_empty() {
            return Intent::None;
        }
        let whole = all.join(" ");
        // The whole message, then the message without its filler words
        // (when it is short: a long one is no plain revocation).
        let bare: Vec<&str> = all
            .iter()
            .copied()
            .filter(|w| !self.filler.iter().any(|f| f == w))
            .collect();
        let bare = bare.join(" ");
        for candidate in [whole.as_str(), bare.as_str()] {
            if candidate.is_empty() || (candidate == bare && all.len() > self.max_words) {
                continue;
            }
            if let Some(k) = find(&self.opt_out, candidate) {
                return Intent::OptOut(k);
            }
            if let Some(k) = find(&self.opt_in, candidate) {
                return Intent::OptIn(k);
            }
            if let Some(k) = find(&self.help, candidate) {
                return Intent::Help(k);
            }
        }
        if let Some((k, reply)) = self.rules.iter().find(|(k, _)| *k == whole) {
            return Intent::Rule(k.to_uppercase(), reply.clone());
        }
        if let Some(k) = self
            .opt_out
            .iter()
            .find(|k| contains_words(&all, &words(k)))
        {
            return Intent::Unclear(k.to_uppercase());
        }
        Intent::None
    }
}

/// The keyword of `list` that `text` is, as stored (upper case).
fn find(list: &[String], text: &str) -> Option<String> {
    list.iter().find(|k| *k == text).map(|k| k.to_uppercase())
}

/// Whether `needle` occurs in `haystack` as consecutive words.
fn contains_words(haystack: &[&str], needle: &[&str]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keywords() -> Keywords {
        let settings = crate::config::Settings::load(None).expect("default settings");
        Keywords::new(&settings.consent)
    }

    #[test]
    fn every_way_people_write_stop_opts_out() {
        let k = keywords();
        for body in [
            "ＳＴＯＰ",
            "STOP！",
            "\"STOP\"",
            "stop\u{200B}",
            "\u{FEFF}Stop",
            "opt out",
            "opt-out",
            "Opt   Out.",
            "STOP ALL",
            "stopall",
            "quit 🛑",
            "*END*",
            "revoke…",
            "cancel。",
            "Unsubscribe",
            "please stop",
            "stop texting me",
            "unsubscribe me",
            "opt me out",
            "remove me",
            "STOP PLEASE",
        ] {
            assert!(
                matches!(k.classify(body), Intent::OptOut(_)),
                "{body:?} → {:?}",
                k.classify(body)
            );
        }
        assert_eq!(k.classify("ｓｔａｒｔ!"), Intent::OptIn("START".into()));
        assert_eq!(k.classify(" Help? "), Intent::Help("HELP".into()));
    }

    #[test]
    fn ordinary_messages_never_opt_out() {
        let k = keywords();
        let corpus = include_str!("../../../tests/vectors/consent/ordinary.txt");
        for line in corpus
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let intent = k.classify(line);
            assert!(
                !matches!(intent, Intent::OptOut(_) | Intent::OptIn(_)),
                "{line:?} → {intent:?}"
            );
        }
        assert!(matches!(
            k.classify("Can I cancel my order?"),
            Intent::Unclear(_)
        ));
        assert_eq!(k.classify("hello there"), Intent::None);
    }

    /// A character that people or phones put around a word.
    fn noise() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "", " ", "  ", "!", "！", ".", "。", "…", "\"", "'", "*", "🛑", "🙏", "\u{200B}",
            "\u{200D}", "\u{FEFF}", "\u{200E}", "?", "(", ")", "~",
        ])
        .prop_map(str::to_string)
    }

    /// `word` in random case, some letters full-width, zero-width characters inside.
    fn disguise(word: &str, seed: &[u8]) -> String {
        let mut out = String::new();
        for (i, c) in word.chars().enumerate() {
            let s = seed.get(i % seed.len().max(1)).copied().unwrap_or(0);
            let c = if s & 1 == 0 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            if s & 2 != 0 && c.is_ascii_alphabetic() {
                // Full-width form of an ASCII letter.
                out.push(char::from_u32(c as u32 - 0x21 + 0xFF01).unwrap_or(c));
            } else {
                out.push(c);
            }
            if s & 4 != 0 {
                out.push('\u{200B}');
            }
        }
        out
    }

    proptest! {
        #[test]
        fn any_opt_out_keyword_however_wrapped_opts_out(
            index in 0usize..11,
            seed in prop::collection::vec(any::<u8>(), 1..16),
            before in prop::collection::vec(noise(), 0..3),
            after in prop::collection::vec(noise(), 0..3),
        ) {
            let settings = crate::config::Settings::load(None).expect("default settings");
            let list = &settings.consent.opt_out_keywords;
            let word = &list[index % list.len()];
            let body = format!("{}{}{}", before.concat(), disguise(word, &seed), after.concat());
            let k = Keywords::new(&settings.consent);
            prop_assert!(matches!(k.classify(&body), Intent::OptOut(_)), "{body:?} → {:?}", k.classify(&body));
        }
    }
}
