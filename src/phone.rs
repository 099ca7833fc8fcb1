//! Phone numbers to E.164 with `rlibphonenumber`, a port of Google's
//! libphonenumber (C++), so the verdict is libphonenumber's: parse with the
//! default region (national numbers, the region's international dialling
//! prefix such as `00` or `011`), `is_valid_number`, format as E.164 (an
//! extension is dropped). `tests/vectors/phone/vectors.tsv` holds
//! libphonenumber's verdict for every example number; the `vectors` tests
//! below run every row.

use std::panic::{AssertUnwindSafe, catch_unwind};

use rlibphonenumber::{PHONE_NUMBER_UTIL, PhoneNumberFormat, Region};

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
/// Parsing runs a handful of regexes and allocates (a few µs a number), and the
/// same numbers come back again and again (every status callback of a message
/// names its recipient, every inbound message its sender), so results are kept
/// in a bounded cache shared by the clones. The parser itself is a process-wide
/// static (`PHONE_NUMBER_UTIL`): its metadata is decoded once, and each
/// metadata regex is compiled once, the first time a number needs it.
#[derive(Clone)]
pub struct Normalizer {
    default_region: Region,
    cache: std::sync::Arc<quick_cache::sync::Cache<String, Result<String, PhoneError>>>,
}

/// Numbers kept by [`Normalizer`]'s cache (S3-FIFO: numbers seen once go first).
const CACHED_NUMBERS: usize = 50_000;

/// Whether `code` is a region [`Normalizer::new`] can use as default region
/// (any other code falls back to US; config validation refuses one).
pub fn is_supported_region(code: &str) -> bool {
    supported_region(code).is_some()
}

use crate::config::phone_region as supported_region;

/// Text that makes `rlibphonenumber` 2.2.15 panic: a `;phone-context=` before
/// the first `tel:` slices the input backwards
/// (`PhoneNumberUtil::build_national_number_for_parsing`).
fn breaks_rfc3966_slicing(text: &str) -> bool {
    text.find(";phone-context=")
        .zip(text.find("tel:"))
        .is_some_and(|(context, tel)| tel > context)
}

/// libphonenumber's verdict on `text` dialled in `region`: E.164 or why not.
fn verdict(input: &str, text: &str, region: Option<Region>) -> Result<String, PhoneError> {
    let unparseable = |reason: String| PhoneError::Unparseable {
        input: input.to_string(),
        reason,
    };
    if breaks_rfc3966_slicing(text) {
        return Err(unparseable("malformed RFC 3966 phone-context".to_string()));
    }
    // A parser bug on hostile input refuses that input instead of taking the
    // stage down (nothing shared is left half-updated: parsing only reads the
    // metadata, and its lazily compiled regexes are set once, whole).
    catch_unwind(AssertUnwindSafe(|| {
        let number = PHONE_NUMBER_UTIL
            .parse(text, region)
            .map_err(|e| unparseable(e.to_string()))?;
        if !PHONE_NUMBER_UTIL.is_valid_number(&number) {
            return Err(PhoneError::Invalid {
                input: input.to_string(),
            });
        }
        Ok(PHONE_NUMBER_UTIL
            .format(&number, PhoneNumberFormat::E164)
            .into_owned())
    }))
    .unwrap_or_else(|_| Err(unparseable("the parser failed on it".to_string())))
}

impl Normalizer {
    /// `default_region` is an ISO 3166 alpha-2 code used for numbers without a
    /// country code; an unknown code falls back to US (config validation refuses one).
    pub fn new(default_region: &str) -> Self {
        // Also loads the parser's metadata now rather than on the first number.
        let default_region = supported_region(default_region).unwrap_or(Region::US);
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
        // libphonenumber strips the default region's own international prefix
        // (`00` from GB or FR, `011` from US or CA).
        let result = verdict(input, trimmed, Some(self.default_region));
        // `00` is the international prefix of most of the world, and people
        // abroad write it whatever our default region: a number libphonenumber
        // refuses (under US, `0044 20 7946 0958` is an invalid US number) is
        // read as `+44 20 7946 0958`. A number it accepts keeps its verdict.
        if result.is_err()
            && let Some(rest) = trimmed.strip_prefix("00")
            && let Ok(e164) = verdict(input, &format!("+{rest}"), Some(self.default_region))
        {
            return Ok(e164);
        }
        result
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

    /// The ISO region of an E.164 number, used for time zones; `None` for a
    /// number of a non-geographic entity (`+800`, `+882`, ...: libphonenumber's
    /// `"001"`, no ISO region) and for a number that does not parse.
    pub fn region(&self, e164: &str) -> Option<String> {
        if breaks_rfc3966_slicing(e164) {
            return None;
        }
        catch_unwind(AssertUnwindSafe(|| {
            let number = PHONE_NUMBER_UTIL.parse(e164, None).ok()?;
            match PHONE_NUMBER_UTIL.get_region_for_number(&number)? {
                Region::World => None,
                region => Some(region.as_region_str().to_string()),
            }
        }))
        .ok()
        .flatten()
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
    fn international_prefixes() {
        // The default region's own prefix, as libphonenumber reads it.
        let us = Normalizer::new("US");
        assert_eq!(us.e164("011 44 20 7946 0958").unwrap(), "+442079460958");
        let gb = Normalizer::new("GB");
        assert_eq!(gb.e164("00 1 415 555 2671").unwrap(), "+14155552671");
        assert_eq!(gb.e164("020 7946 0958").unwrap(), "+442079460958");
        // `00` under a region whose prefix it is not.
        assert_eq!(us.e164("001 415 555 2671").unwrap(), "+14155552671");
        assert!(us.e164("00").is_err());
        assert!(us.e164("00 999 123456789").is_err());
    }

    #[test]
    fn drops_extensions() {
        let n = Normalizer::new("US");
        for input in [
            "+1 415 555 2671 ext. 123",
            "+1 415 555 2671 x123",
            "+14155552671;ext=123",
        ] {
            assert_eq!(n.e164(input).unwrap(), "+14155552671", "{input}");
        }
    }

    #[test]
    fn refuses_garbage() {
        let n = Normalizer::new("US");
        assert_eq!(n.e164("  "), Err(PhoneError::Empty));
        assert!(n.e164("not a number").is_err());
        assert!(n.e164("+1 555").is_err());
        assert!(n.e164("+999 123456789").is_err());
        // Would slice backwards inside the parser.
        assert!(n.e164("1;phone-context=example.com;tel:2").is_err());
        assert!(n.e164("+1;phone-context=+14155552671;tel:").is_err());
        assert_eq!(n.region("1;phone-context=example.com;tel:2"), None);
    }

    #[test]
    fn default_regions() {
        assert!(is_supported_region("US"));
        assert!(is_supported_region("gb"));
        for code in ["", "X", "XX", "ZZ", "001", "USA", "u1"] {
            assert!(!is_supported_region(code), "{code:?}");
        }
        // Unknown codes fall back to US.
        let n = Normalizer::new("XX");
        assert_eq!(n.e164("(415) 555-2671").unwrap(), "+14155552671");
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
        assert_eq!(n.region("+14155552671").as_deref(), Some("US"));
        assert_eq!(n.region("+80012345678"), None);
        assert_eq!(n.region("not a number"), None);
    }
}
/// Every row of `tests/vectors/phone/vectors.tsv`: libphonenumber's verdict
/// (Python `phonenumbers`, see `generate.py` beside the file for what each
/// kind of row is) against the engine's.
#[cfg(test)]
mod vectors {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    const VECTORS: &str = include_str!("../tests/vectors/phone/vectors.tsv");
    const HEADER: &str = "input\tdefault_region\texpected\tkind\tregion\tnumber_type\tsource";
    const KINDS: [&str; 7] = [
        "example",
        "national",
        "intl-prefix",
        "whatsapp",
        "noise",
        "invalid",
        "regression",
    ];
    /// Mismatches listed in a failure (all are counted).
    const SHOWN: usize = 50;

    struct Row {
        line: usize,
        input: &'static str,
        default_region: &'static str,
        /// E.164, or empty: must be refused.
        expected: &'static str,
        kind: &'static str,
        /// libphonenumber's region of `expected` ("001": non-geographic).
        region: &'static str,
        source: &'static str,
    }

    fn rows() -> Vec<Row> {
        let mut lines = VECTORS.lines().enumerate();
        let (_, header) = lines.next().expect("vectors.tsv is empty");
        assert_eq!(header, HEADER, "vectors.tsv header");
        let rows: Vec<Row> = lines
            .map(|(i, line)| {
                let f: Vec<&'static str> = line.split('\t').collect();
                assert_eq!(f.len(), 7, "vectors.tsv line {}: {line:?}", i + 1);
                assert!(
                    KINDS.contains(&f[3]),
                    "vectors.tsv line {}: kind {:?}",
                    i + 1,
                    f[3]
                );
                Row {
                    line: i + 1,
                    input: f[0],
                    default_region: f[1],
                    expected: f[2],
                    kind: f[3],
                    region: f[4],
                    source: f[6],
                }
            })
            .collect();
        for kind in KINDS {
            assert!(
                rows.iter().any(|r| r.kind == kind),
                "no {kind} row in vectors.tsv"
            );
        }
        rows
    }

    /// Fails listing the first mismatches and the count per kind.
    fn report(what: &str, total: BTreeMap<&str, usize>, mismatches: Vec<(&str, String)>) {
        if mismatches.is_empty() {
            return;
        }
        let mut bad: BTreeMap<&str, usize> = BTreeMap::new();
        for (kind, _) in &mismatches {
            *bad.entry(*kind).or_default() += 1;
        }
        let rows: usize = total.values().sum();
        let mut msg = format!(
            "{what}: {} of {rows} vectors disagree with libphonenumber\n",
            mismatches.len()
        );
        for (kind, n) in &total {
            msg += &format!("  {kind:12} {:5} of {n:5}\n", bad.get(kind).unwrap_or(&0));
        }
        for (_, line) in mismatches.iter().take(SHOWN) {
            msg += line;
            msg += "\n";
        }
        if mismatches.len() > SHOWN {
            msg += &format!("... and {} more\n", mismatches.len() - SHOWN);
        }
        panic!("{msg}");
    }

    #[test]
    fn every_vector_normalizes_as_libphonenumber_does() {
        let mut normalizers: HashMap<&str, Normalizer> = HashMap::new();
        let mut total: BTreeMap<&str, usize> = BTreeMap::new();
        let mut mismatches = Vec::new();
        for row in rows() {
            *total.entry(row.kind).or_default() += 1;
            let n = normalizers
                .entry(row.default_region)
                .or_insert_with(|| Normalizer::new(row.default_region));
            // An unsupported default region would silently become US.
            let supported = is_supported_region(row.default_region);
            let channel = if row.kind == "whatsapp" {
                Channel::Whatsapp
            } else {
                Channel::Sms
            };
            let got = n.address(row.input);
            let agrees = supported
                && match (&got, row.expected) {
                    (Err(_), "") => true,
                    (Ok((c, e164)), expected) => *c == channel && e164 == expected,
                    (Err(_), _) => false,
                };
            if !agrees {
                let want = if row.expected.is_empty() {
                    "refused".to_string()
                } else {
                    format!("{channel:?} {}", row.expected)
                };
                let got = match &got {
                    _ if !supported => "default region not supported".to_string(),
                    Ok((c, e164)) => format!("{c:?} {e164}"),
                    Err(e) => format!("refused: {e}"),
                };
                mismatches.push((
                    row.kind,
                    format!(
                        "  line {} {} {:?} from {}: want {want}, got {got} ({})",
                        row.line, row.kind, row.input, row.default_region, row.source
                    ),
                ));
            }
        }
        report("Normalizer::address", total, mismatches);
    }

    #[test]
    fn every_accepted_vector_has_libphonenumbers_region() {
        let n = Normalizer::new("US");
        let mut total: BTreeMap<&str, usize> = BTreeMap::new();
        let mut mismatches = Vec::new();
        for row in rows().into_iter().filter(|r| !r.expected.is_empty()) {
            *total.entry(row.kind).or_default() += 1;
            // "001" (a non-geographic entity) is no ISO region.
            let want = (row.region != "001").then_some(row.region);
            let got = n.region(row.expected);
            if got.as_deref() != want {
                mismatches.push((
                    row.kind,
                    format!(
                        "  line {} {}: want {want:?}, got {got:?} ({})",
                        row.line, row.expected, row.source
                    ),
                ));
            }
        }
        report("Normalizer::region", total, mismatches);
    }
}
