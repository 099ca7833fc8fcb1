//! Phone numbers to E.164 with the `phonenumber` libphonenumber port.

use phonenumber::{Mode, country};

pub use crate::model::Channel;

/// Why a number was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PhoneError {
    #[error("phone number is empty")]
    Empty,
    #[error("phone number {input:?} does not parse: {reason}")]
    Unparseable { input: String, reason: String },
    #[error("phone number {input:?} is not a valid number")]
    Invalid { input: String },
}

/// Normalizes phone numbers written in any common way; cheap to clone.
///
/// Parsing is regex-heavy (~5 µs a number), and the same numbers come back
/// again and again (every status callback of a message names its recipient,
/// every inbound message its sender), so results are kept in a bounded cache
/// shared by the clones.
#[derive(Clone)]
pub struct Normalizer {
    default_region: country::Id,
    cache: std::sync::Arc<quick_cache::sync::Cache<String, Result<String, PhoneError>>>,
}

/// Numbers kept by [`Normalizer`]'s cache (S3-FIFO: numbers seen once go first).
const CACHED_NUMBERS: usize = 50_000;

impl Normalizer {
    /// `default_region` is an ISO 3166 alpha-2 code used for numbers without a
    /// country code; an unknown code falls back to US (config validation refuses one).
    pub fn new(default_region: &str) -> Self {
        let default_region = default_region
            .to_ascii_uppercase()
            .parse()
            .unwrap_or(country::Id::US);
        Self {
            default_region,
            cache: std::sync::Arc::new(quick_cache::sync::Cache::new(CACHED_NUMBERS)),
        }
    }

    /// `" (415) 555-0100 "` → `+14155550100`.
    pub fn e164(&self, input: &str) -> Result<String, PhoneError> {
        if let Some(known) = self.cache.get(input) {
            return known;
        }
        let result = self.parse(input);
        self.cache.insert(input.to_string(), result.clone());
        result
    }

    fn parse(&self, input: &str) -> Result<String, PhoneError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(PhoneError::Empty);
        }
        // "00" international prefix, common outside North America.
        let owned;
        let text = if let Some(rest) = trimmed.strip_prefix("00") {
            owned = format!("+{rest}");
            owned.as_str()
        } else {
            trimmed
        };
        let number = phonenumber::parse(Some(self.default_region), text).map_err(|e| {
            PhoneError::Unparseable {
                input: input.to_string(),
                reason: e.to_string(),
            }
        })?;
        if !number.is_valid() {
            return Err(PhoneError::Invalid {
                input: input.to_string(),
            });
        }
        Ok(number.format().mode(Mode::E164).to_string())
    }

    /// Splits a provider address (`whatsapp:+14155550100`, `+14155550100`) into
    /// channel and E.164 number.
    pub fn address(&self, input: &str) -> Result<(Channel, String), PhoneError> {
        let t = input.trim();
        match t.split_once(':') {
            Some((prefix, rest)) if prefix.eq_ignore_ascii_case("whatsapp") => {
                Ok((Channel::Whatsapp, self.e164(rest)?))
            }
            _ => Ok((Channel::Sms, self.e164(t)?)),
        }
    }

    /// The ISO region of an E.164 number, used for time zones.
    pub fn region(&self, e164: &str) -> Option<String> {
        phonenumber::parse(None, e164)
            .ok()
            .and_then(|n| n.country().id())
            .map(|id| id.as_ref().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_common_forms() {
        let n = Normalizer::new("US");
        for input in [
            "+1 415 555 2671",
            "(415) 555-2671",
            "415.555.2671",
            "1-415-555-2671",
            " +14155552671 ",
        ] {
            assert_eq!(n.e164(input).unwrap(), "+14155552671", "{input}");
        }
        assert_eq!(n.e164("0044 20 7946 0958").unwrap(), "+442079460958");
        let fr = Normalizer::new("fr");
        assert_eq!(fr.e164("06 12 34 56 78").unwrap(), "+33612345678");
    }

    #[test]
    fn refuses_garbage() {
        let n = Normalizer::new("US");
        assert_eq!(n.e164("  "), Err(PhoneError::Empty));
        assert!(n.e164("not a number").is_err());
        assert!(n.e164("+1 555").is_err());
        assert!(n.e164("+999 123456789").is_err());
    }

    #[test]
    fn whatsapp_addresses() {
        let n = Normalizer::new("US");
        assert_eq!(
            n.address("whatsapp:+14155552671").unwrap(),
            (Channel::Whatsapp, "+14155552671".to_string())
        );
        assert_eq!(
            n.address("+14155552671").unwrap(),
            (Channel::Sms, "+14155552671".to_string())
        );
        assert_eq!(n.region("+33612345678").as_deref(), Some("FR"));
    }
}
