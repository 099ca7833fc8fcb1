//! Realistic provider webhooks. Signatures were computed outside this code
//! base (HMAC-SHA1 with Python's standard library) and written out here, so a
//! bug in the engine's signing code cannot make them agree with it.

pub const TOKEN: &str = "test-auth-token-123";
pub const PUBLIC_URL: &str = "https://hooks.example.com";

pub struct Fixture {
    pub name: &'static str,
    pub path: &'static str,
    pub params: &'static [(&'static str, &'static str)],
    pub signature: &'static str,
}

impl Fixture {
    pub fn by_name(name: &str) -> &'static Fixture {
        FIXTURES
            .iter()
            .find(|f| f.name == name)
            .expect("fixture exists")
    }

    pub fn form(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.params.iter())
            .finish()
    }
}

/// Signed with token `test-auth-token-123` over `https://hooks.example.com` + path, computed outside this code base.
pub const FIXTURES: &[Fixture] = &[
    Fixture {
        name: "sms_queued",
        path: "/webhooks/twilio/status",
        params: &[
            ("ApiVersion", "2010-04-01"),
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("SmsSid", "SM00000000000000000000000000000001"),
            ("SmsStatus", "queued"),
            ("MessageStatus", "queued"),
            ("MessageSid", "SM00000000000000000000000000000001"),
            ("From", "+14155550123"),
            ("To", "+14155552671"),
        ],
        signature: "GwDYoE1qN5OTHQKK4IHSBsfoHBA=",
    },
    Fixture {
        name: "sms_sent",
        path: "/webhooks/twilio/status",
        params: &[
            ("ApiVersion", "2010-04-01"),
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("SmsSid", "SM00000000000000000000000000000001"),
            ("SmsStatus", "sent"),
            ("MessageStatus", "sent"),
            ("MessageSid", "SM00000000000000000000000000000001"),
            ("From", "+14155550123"),
            ("To", "+14155552671"),
        ],
        signature: "FXR273kAvui9G6/exIjeXai2OTA=",
    },
    Fixture {
        name: "sms_delivered",
        path: "/webhooks/twilio/status",
        params: &[
            ("ApiVersion", "2010-04-01"),
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("SmsSid", "SM00000000000000000000000000000001"),
            ("SmsStatus", "delivered"),
            ("MessageStatus", "delivered"),
            ("MessageSid", "SM00000000000000000000000000000001"),
            ("From", "+14155550123"),
            ("To", "+14155552671"),
            ("RawDlrDoneDate", "2611251203"),
        ],
        signature: "c/XzSDe6Xpa4i/8/z0DExtB6G+4=",
    },
    Fixture {
        name: "sms_undelivered",
        path: "/webhooks/twilio/status",
        params: &[
            ("ApiVersion", "2010-04-01"),
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("SmsSid", "SM00000000000000000000000000000002"),
            ("SmsStatus", "undelivered"),
            ("MessageStatus", "undelivered"),
            ("MessageSid", "SM00000000000000000000000000000002"),
            ("From", "+14155550123"),
            ("To", "+14155552671"),
            ("ErrorCode", "30003"),
        ],
        signature: "swNWkbXLQDGIGYHgoVm/hyTKCuo=",
    },
    Fixture {
        name: "sms_failed",
        path: "/webhooks/twilio/status",
        params: &[
            ("ApiVersion", "2010-04-01"),
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("SmsSid", "SM00000000000000000000000000000003"),
            ("SmsStatus", "failed"),
            ("MessageStatus", "failed"),
            ("MessageSid", "SM00000000000000000000000000000003"),
            ("From", "+14155550123"),
            ("To", "+14155552671"),
            ("ErrorCode", "30008"),
        ],
        signature: "2EcKIh1QBNuChP0ysq39XDRUF+Y=",
    },
    Fixture {
        name: "wa_read",
        path: "/webhooks/twilio/status",
        params: &[
            ("ChannelPrefix", "whatsapp"),
            ("ApiVersion", "2010-04-01"),
            ("MessageStatus", "read"),
            ("SmsSid", "SM00000000000000000000000000000004"),
            ("SmsStatus", "read"),
            ("ChannelInstallSid", "XE0123456789abcdef0123456789abcdef"),
            ("To", "whatsapp:+14155552671"),
            ("From", "whatsapp:+14155550123"),
            ("MessageSid", "SM00000000000000000000000000000004"),
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("EventType", "READ"),
            ("ChannelToAddress", "+1415555XXXX"),
        ],
        signature: "RYFpchT/84/t71N+x7LAU+ZTnuY=",
    },
    Fixture {
        name: "sms_inbound",
        path: "/webhooks/twilio/inbound",
        params: &[
            ("ToCountry", "US"),
            ("ToState", "CA"),
            ("SmsMessageSid", "SM00000000000000000000000000000010"),
            ("NumMedia", "0"),
            ("ToCity", ""),
            ("FromZip", "94105"),
            ("SmsSid", "SM00000000000000000000000000000010"),
            ("FromState", "CA"),
            ("SmsStatus", "received"),
            ("FromCity", "SAN FRANCISCO"),
            ("Body", "Hello there"),
            ("FromCountry", "US"),
            ("To", "+14155550123"),
            ("ToZip", ""),
            ("NumSegments", "1"),
            ("MessageSid", "SM00000000000000000000000000000010"),
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("From", "+14155552671"),
            ("ApiVersion", "2010-04-01"),
        ],
        signature: "E/UXnbUVDjB4iXWFko0XxL/M2P4=",
    },
    Fixture {
        name: "wa_inbound",
        path: "/webhooks/twilio/inbound",
        params: &[
            ("SmsMessageSid", "MM00000000000000000000000000000011"),
            ("NumMedia", "1"),
            ("ProfileName", "Ada"),
            ("MessageType", "image"),
            ("SmsSid", "MM00000000000000000000000000000011"),
            ("WaId", "447911123456"),
            ("SmsStatus", "received"),
            ("Body", "look"),
            ("To", "whatsapp:+14155550123"),
            ("MediaContentType0", "image/jpeg"),
            (
                "MediaUrl0",
                "https://api.twilio.com/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages/MM00000000000000000000000000000011/Media/ME0123456789abcdef0123456789abcdef",
            ),
            ("NumSegments", "1"),
            ("ReferralNumMedia", "0"),
            ("MessageSid", "MM00000000000000000000000000000011"),
            ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
            ("From", "whatsapp:+447911123456"),
            ("ApiVersion", "2010-04-01"),
        ],
        signature: "c8Es1YAahOfXRFnWReioPEYusrg=",
    },
];
/// `sms_sent` plus a parameter the engine does not know, signed including it.
pub const SENT_WITH_UNKNOWN_PARAM_SIGNATURE: &str = "qhMOWMNmAhUWgooQxzkB31Z/WVA=";
/// `sms_sent` signed for another URL.
pub const SENT_SIGNED_FOR_OTHER_URL: &str = "ByGt3+NhGszNgTKtYM+DCo3XEBg=";
/// `sms_sent` signed with another token.
pub const SENT_SIGNED_WITH_OTHER_TOKEN: &str = "LyO1Iw3plAK7nJslVF8R5CjaIxs=";
/// The JSON variant: body, and the signature over the URL carrying its hash.
pub const JSON_BODY: &str = r#"{"MessageSid":"SM00000000000000000000000000000020","MessageStatus":"delivered","To":"+14155552671","AccountSid":"AC0123456789abcdef0123456789abcdef"}"#;
pub const JSON_BODY_SHA256: &str =
    "4c25c0f05e024769d69509e5b51bf6232d7147904fd617d9eb953140335a73d2";
pub const JSON_SIGNATURE: &str = "4F9TpgS4cfDYbpKsq+LWDZq8ZB0=";
