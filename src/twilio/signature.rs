//! `X-Twilio-Signature`: HMAC-SHA1, keyed with the auth token, over the full
//! URL the provider called followed by every POST parameter sorted by name
//! (name then value, no separators), base64-encoded. The JSON variant signs
//! the URL alone, which carries `bodySHA256` = hex SHA-256 of the body.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a signature was refused; the label of `ese_bridge_signature_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No `X-Twilio-Signature` header.
    Missing,
    /// No auth token configured (TWILIO_AUTH_TOKEN).
    NoToken,
    /// No token produces this signature.
    Mismatch,
    /// JSON variant: `bodySHA256` missing or not the body's hash.
    BodyHash,
}

impl Failure {
    pub fn label(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::NoToken => "no_token",
            Failure::Mismatch => "mismatch",
            Failure::BodyHash => "body_hash",
        }
    }
}

/// The signature the provider computes for `url` and form `params` with `token`.
pub fn sign(token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    // By name (byte order, as the provider's libraries do), then by value so
    // repeated names are stable too.
    sorted.sort();
    let mut mac = match Hmac::<Sha1>::new_from_slice(token.as_bytes()) {
        Ok(m) => m,
        // HMAC accepts keys of any length; this arm cannot be taken.
        Err(_) => return String::new(),
    };
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Checks `provided` against every configured token (current first, then the
/// previous one during rotation) in constant time.
pub fn verify(
    tokens: &[String],
    url: &str,
    params: &[(String, String)],
    provided: Option<&str>,
) -> Result<(), Failure> {
    if tokens.is_empty() {
        return Err(Failure::NoToken);
    }
    let provided = provided.ok_or(Failure::Missing)?;
    let mut ok = subtle::Choice::from(0);
    for token in tokens {
        let expected = sign(token, url, params);
        ok |= expected.as_bytes().ct_eq(provided.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(Failure::Mismatch)
    }
}

/// Hex SHA-256 of a body, as `bodySHA256` carries it.
pub fn body_sha256(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Form parameters from pairs of literals, for tests.
#[cfg(test)]
pub(crate) fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector the provider's own helper libraries test against.
    #[test]
    fn provider_library_vector() {
        let params = p(&[
            ("To", "+18005551212"),
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
        ]);
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(sign("12345", url, &params), "RSOYDt4T1cUTdK1PDd93/VVr8B8=");
        assert!(
            verify(
                &["12345".into()],
                url,
                &params,
                Some("RSOYDt4T1cUTdK1PDd93/VVr8B8=")
            )
            .is_ok()
        );
    }

    #[test]
    fn rotation_accepts_either_token_and_nothing_else() {
        let params = p(&[("MessageSid", "SM1"), ("MessageStatus", "sent")]);
        let url = "https://hooks.example.com/webhooks/twilio/status";
        let old = sign("old", url, &params);
        let tokens = vec!["new".to_string(), "old".to_string()];
        assert!(verify(&tokens, url, &params, Some(&old)).is_ok());
        assert_eq!(
            verify(&["new".into()], url, &params, Some(&old)),
            Err(Failure::Mismatch)
        );
        assert_eq!(verify(&tokens, url, &params, None), Err(Failure::Missing));
        assert_eq!(verify(&[], url, &params, Some(&old)), Err(Failure::NoToken));
    }
}
