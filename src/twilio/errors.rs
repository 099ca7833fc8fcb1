//! One table of the provider's error codes: what each means for a message,
//! the HTTP status its API answers with, and its message. The sender
//! classifies answers with it; the simulator answers with it.

/// What an error means for the message it came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Try again later (through the retry topics).
    Transient,
    /// This message will never go: FAILED with the code.
    Permanent,
    /// The recipient unsubscribed at the carrier (21610): FAILED, and the
    /// person is opted out.
    OptedOut,
    /// The person cannot be reached on this channel (not a WhatsApp user,
    /// 63003/63024): FAILED, and the number is marked unreachable there.
    NotOnChannel,
    /// Not a message outcome: the account or request is wrong (auth, not found).
    Request,
}

/// One error code.
#[derive(Debug, Clone, Copy)]
pub struct Code {
    pub code: i32,
    pub class: Class,
    /// The HTTP status of the API's answer, for API errors; 0 for codes that
    /// only come back in status callbacks (delivery errors).
    pub http_status: u16,
    pub message: &'static str,
}

const fn c(code: i32, class: Class, http_status: u16, message: &'static str) -> Code {
    Code {
        code,
        class,
        http_status,
        message,
    }
}

use Class::*;

/// Every code the engine knows.
pub const CODES: &[Code] = &[
    c(20003, Request, 401, "Authenticate"),
    c(20404, Request, 404, "The requested resource was not found"),
    c(20429, Transient, 429, "Too Many Requests"),
    c(
        20500,
        Transient,
        500,
        "An internal server error has occurred",
    ),
    c(20503, Transient, 503, "Service Unavailable"),
    c(
        21211,
        Permanent,
        400,
        "The 'To' number is not a valid phone number.",
    ),
    c(
        21408,
        Permanent,
        400,
        "Permission to send an SMS has not been enabled for the region indicated by the 'To' number",
    ),
    c(21602, Permanent, 400, "Message body is required."),
    c(21603, Permanent, 400, "A 'From' phone number is required."),
    c(21604, Permanent, 400, "A 'To' phone number is required."),
    c(21609, Permanent, 400, "Invalid StatusCallback url"),
    c(
        21610,
        OptedOut,
        400,
        "Attempt to send to unsubscribed recipient",
    ),
    c(
        21614,
        Permanent,
        400,
        "'To' number is not a valid mobile number",
    ),
    c(30001, Transient, 0, "Queue overflow"),
    c(30002, Permanent, 0, "Account suspended"),
    c(30003, Transient, 0, "Unreachable destination handset"),
    c(30004, Permanent, 0, "Message blocked"),
    c(30005, Permanent, 0, "Unknown destination handset"),
    c(30006, Permanent, 0, "Landline or unreachable carrier"),
    c(30007, Permanent, 0, "Carrier violation"),
    c(30008, Transient, 0, "Unknown error"),
    c(21655, Permanent, 400, "The ContentSid is Invalid"),
    c(
        21656,
        Permanent,
        400,
        "The ContentVariables Parameter is invalid",
    ),
    // WhatsApp.
    c(63001, Request, 0, "Channel authentication failed"),
    c(63003, NotOnChannel, 0, "Channel could not find To address"),
    c(63005, Permanent, 0, "Channel did not accept given content"),
    c(
        63007,
        Request,
        400,
        "Twilio could not find a Channel with the specified From address",
    ),
    c(
        63016,
        Permanent,
        0,
        "Failed to send freeform message because you are outside the allowed window.",
    ),
    c(63018, Transient, 0, "Rate limit exceeded for Channel"),
    c(63024, NotOnChannel, 0, "Invalid message recipient"),
    c(
        63032,
        Permanent,
        0,
        "We cannot send this message to this user because of a WhatsApp limitation",
    ),
    c(
        63049,
        Transient,
        0,
        "Meta chose not to deliver this WhatsApp marketing message",
    ),
];

/// The codes that say a person cannot be reached on the channel.
pub fn not_on_channel() -> Vec<i32> {
    CODES
        .iter()
        .filter(|c| c.class == NotOnChannel)
        .map(|c| c.code)
        .collect()
}

/// The entry for `code`, if the engine knows it.
pub fn lookup(code: i32) -> Option<&'static Code> {
    CODES.iter().find(|c| c.code == code)
}

/// The class of an API answer: a known code decides; else 5xx and 429 are
/// transient and the rest of 4xx permanent.
pub fn class_of(code: Option<i32>, http_status: u16) -> Class {
    match code.and_then(lookup) {
        Some(Code { class: Request, .. }) if http_status >= 500 || http_status == 429 => Transient,
        Some(Code { class: Request, .. }) => Permanent,
        Some(known) => known.class,
        None if http_status >= 500 || http_status == 429 => Transient,
        None => Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_design_classes_hold() {
        for code in [20429, 30001, 30003, 30008] {
            assert_eq!(class_of(Some(code), 400), Transient, "{code}");
        }
        for code in [21211, 21614, 30004, 30005, 30006, 30007] {
            assert_eq!(class_of(Some(code), 400), Permanent, "{code}");
        }
        assert_eq!(class_of(Some(21610), 400), OptedOut);
        assert_eq!(class_of(Some(63003), 400), NotOnChannel);
        assert_eq!(class_of(Some(63016), 400), Permanent);
        assert_eq!(class_of(Some(63018), 400), Transient);
        assert_eq!(class_of(None, 503), Transient);
        assert_eq!(class_of(None, 429), Transient);
        assert_eq!(class_of(Some(99999), 400), Permanent);
        let mut codes: Vec<i32> = CODES.iter().map(|c| c.code).collect();
        codes.dedup();
        assert_eq!(codes.len(), CODES.len(), "one row per code, in order");
    }
}
