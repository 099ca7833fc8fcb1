//! Segment filters: the JSON stored in `segments.filter`, validated on write
//! ([`parse`]) and compiled to a parameterised SQL boolean expression over a
//! jsonb attributes column ([`compile`]).
//!
//! A filter is a tree of nodes:
//! - leaf: `{"attribute": "plan", "operator": "equals", "value": "gold"}`
//! - compound: `{"operator": "AND" | "OR" | "NOT", "conditions": [ ... ]}`
//!   (compound names are case-insensitive; NOT takes exactly one condition).
//! - channel: `{"channel": "WHATSAPP" | "SMS", "operator": "window_open" |
//!   "reachable"}` or `{"channel": …, "operator": "last_inbound_after" |
//!   "last_inbound_before", "value": date}`: the person on that channel
//!   (`user_channels`): wrote within the last 24 hours (WhatsApp's window),
//!   is not marked unreachable there, last wrote after / before a time.
//!
//! Attribute names and values are user data of any content: they only ever
//! travel as bind parameters, never inside the SQL text.
//!
//! [`parse`] (in `parse.rs`) validates the JSON into a [`Node`] tree;
//! [`compile`] (in `compile.rs`) turns a tree into SQL.

mod compile;
mod parse;

pub use compile::{Compiled, SqlParam, compile, store_estimate};
pub use parse::{MAX_CONDITIONS, parse};

use serde_json::Value;

/// Why a filter was refused: `pointer` is an RFC 6901 JSON pointer to the
/// bad node or member (`""` is the whole filter, `/conditions/1/value` …).
#[derive(Debug, Clone, PartialEq)]
pub struct FilterError {
    pub pointer: String,
    pub message: String,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The root pointer is "", which reads badly in a sentence.
        let shown = if self.pointer.is_empty() {
            "/"
        } else {
            self.pointer.as_str()
        };
        write!(f, "filter {shown}: {}", self.message)
    }
}

impl std::error::Error for FilterError {}

/// A validated filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `value` is `Value::Null` for exists / not_exists.
    Leaf {
        attribute: String,
        op: Op,
        value: Value,
    },
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    /// `value` is `Value::Null` for window_open / reachable.
    Channel {
        channel: crate::model::Channel,
        op: ChannelOp,
        value: Value,
    },
    /// `value` is `Value::Null` for exists / not_exists.
    Figure {
        figure: Figure,
        op: Op,
        value: Value,
    },
}

/// A person's interaction figure, kept on `users` by the consent and
/// receipts stages: `{"figure": "messages_received", "operator": "gte",
/// "value": 3}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    /// Messages received from them.
    MessagesReceived,
    /// When they last wrote.
    LastMessageReceived,
    /// When a message to them was last delivered.
    LastMessageDelivered,
}

impl Figure {
    pub const ALL: [Figure; 3] = [
        Figure::MessagesReceived,
        Figure::LastMessageReceived,
        Figure::LastMessageDelivered,
    ];

    /// Its name in a filter, and its column on `users`.
    pub fn name(self) -> &'static str {
        match self {
            Figure::MessagesReceived => "messages_received",
            Figure::LastMessageReceived => "last_message_received",
            Figure::LastMessageDelivered => "last_message_delivered",
        }
    }

    /// The operators it takes: comparisons for a count, before/after and
    /// exists/not_exists for a time.
    pub fn ops(self) -> &'static [Op] {
        match self {
            Figure::MessagesReceived => {
                &[Op::Equals, Op::NotEquals, Op::Gt, Op::Gte, Op::Lt, Op::Lte]
            }
            _ => &[Op::Before, Op::After, Op::Exists, Op::NotExists],
        }
    }
}

/// What a channel condition asks of the person on that channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOp {
    /// Wrote there within the last 24 hours (WhatsApp's customer-service window).
    WindowOpen,
    /// Not marked unreachable there by the provider.
    Reachable,
    LastInboundAfter,
    LastInboundBefore,
}

impl ChannelOp {
    pub const ALL: [ChannelOp; 4] = [
        ChannelOp::WindowOpen,
        ChannelOp::Reachable,
        ChannelOp::LastInboundAfter,
        ChannelOp::LastInboundBefore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ChannelOp::WindowOpen => "window_open",
            ChannelOp::Reachable => "reachable",
            ChannelOp::LastInboundAfter => "last_inbound_after",
            ChannelOp::LastInboundBefore => "last_inbound_before",
        }
    }

    /// Whether it compares with a time (`value`).
    pub fn takes_time(self) -> bool {
        matches!(
            self,
            ChannelOp::LastInboundAfter | ChannelOp::LastInboundBefore
        )
    }
}

/// Leaf operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Equals,
    NotEquals,
    In,
    NotIn,
    Contains,
    StartsWith,
    Gt,
    Gte,
    Lt,
    Lte,
    Before,
    After,
    Exists,
    NotExists,
}

impl Op {
    /// Every operator, in documentation order.
    pub const ALL: [Op; 14] = [
        Op::Equals,
        Op::NotEquals,
        Op::In,
        Op::NotIn,
        Op::Contains,
        Op::StartsWith,
        Op::Gt,
        Op::Gte,
        Op::Lt,
        Op::Lte,
        Op::Before,
        Op::After,
        Op::Exists,
        Op::NotExists,
    ];

    /// The name used in filter JSON, e.g. `not_equals`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Equals => "equals",
            Op::NotEquals => "not_equals",
            Op::In => "in",
            Op::NotIn => "not_in",
            Op::Contains => "contains",
            Op::StartsWith => "starts_with",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Before => "before",
            Op::After => "after",
            Op::Exists => "exists",
            Op::NotExists => "not_exists",
        }
    }

    /// The operator called `name` (exact, lower case).
    pub fn from_name(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pointer_of(filter: Value, max_depth: usize) -> String {
        match parse(&filter, max_depth) {
            Ok(node) => panic!("{filter} parsed as {node:?}"),
            Err(e) => e.pointer,
        }
    }

    fn leaf(attribute: &str, operator: &str, value: Value) -> Value {
        json!({"attribute": attribute, "operator": operator, "value": value})
    }

    #[test]
    fn parses_a_nested_tree() {
        let filter = json!({
            "operator": "and",
            "conditions": [
                {"attribute": "plan", "operator": "equals", "value": "gold"},
                {"operator": "Or", "conditions": [
                    {"attribute": "age", "operator": "gte", "value": 18},
                    {"operator": "NOT", "conditions": [
                        {"attribute": "vip", "operator": "exists"}
                    ]}
                ]}
            ]
        });
        let node = parse(&filter, 4).expect("valid");
        assert_eq!(
            node,
            Node::And(vec![
                Node::Leaf {
                    attribute: "plan".into(),
                    op: Op::Equals,
                    value: json!("gold")
                },
                Node::Or(vec![
                    Node::Leaf {
                        attribute: "age".into(),
                        op: Op::Gte,
                        value: json!(18)
                    },
                    Node::Not(Box::new(Node::Leaf {
                        attribute: "vip".into(),
                        op: Op::Exists,
                        value: Value::Null
                    })),
                ]),
            ])
        );
    }

    #[test]
    fn every_operator_name_round_trips() {
        for op in Op::ALL {
            assert_eq!(Op::from_name(op.name()), Some(op));
        }
        assert_eq!(Op::from_name("EQUALS"), None);
    }

    #[test]
    fn node_must_be_an_object() {
        assert_eq!(pointer_of(json!(5), 3), "");
        assert_eq!(
            pointer_of(
                json!({"operator": "OR", "conditions": [leaf("a", "exists", Value::Null), "x"]}),
                3
            ),
            "/conditions/1"
        );
    }

    #[test]
    fn operator_errors() {
        assert_eq!(pointer_of(json!({"attribute": "a"}), 3), "");
        assert_eq!(
            pointer_of(json!({"attribute": "a", "operator": 1}), 3),
            "/operator"
        );
        assert_eq!(pointer_of(leaf("a", "equal", json!(1)), 3), "/operator");
    }

    #[test]
    fn unknown_keys_point_at_the_key() {
        let filter = json!({"operator": "AND", "conditions": [
            {"attribute": "a", "operator": "equals", "value": 1, "colour": "red"}
        ]});
        assert_eq!(pointer_of(filter, 3), "/conditions/0/colour");
        let filter = json!({"operator": "AND", "conditions": [leaf("a", "exists", Value::Null)], "value": 1});
        assert_eq!(pointer_of(filter, 3), "/value");
    }

    #[test]
    fn pointer_escapes_slash_and_tilde() {
        let filter = json!({"attribute": "a", "operator": "exists", "a/b~c": 1});
        assert_eq!(pointer_of(filter, 3), "/a~1b~0c");
    }

    #[test]
    fn attribute_must_be_a_non_empty_string() {
        assert_eq!(pointer_of(json!({"operator": "exists"}), 3), "");
        assert_eq!(pointer_of(leaf("", "equals", json!(1)), 3), "/attribute");
        assert_eq!(
            pointer_of(json!({"attribute": 7, "operator": "equals", "value": 1}), 3),
            "/attribute"
        );
    }

    #[test]
    fn hostile_attribute_names_are_legal_data() {
        for name in [
            "'); DROP TABLE users; --".to_string(),
            "\"quoted\" $1 ::text".to_string(),
            "名前 🎉".to_string(),
            "x".repeat(100_000),
        ] {
            let node = parse(&leaf(&name, "equals", json!("v")), 1).expect("legal");
            assert_eq!(
                node,
                Node::Leaf {
                    attribute: name,
                    op: Op::Equals,
                    value: json!("v")
                }
            );
        }
    }

    #[test]
    fn value_rules() {
        let at = |op: &str, value: Value| pointer_of(leaf("a", op, value), 3);
        let ok = |op: &str, value: Value| parse(&leaf("a", op, value), 3).is_ok();

        for op in ["equals", "not_equals", "contains"] {
            assert!(ok(op, json!("s")) && ok(op, json!(1.5)) && ok(op, json!(false)));
            assert_eq!(at(op, json!(null)), "/value");
            assert_eq!(at(op, json!([1])), "/value");
            assert_eq!(at(op, json!({"a": 1})), "/value");
            assert_eq!(pointer_of(json!({"attribute": "a", "operator": op}), 3), "");
        }

        for op in ["in", "not_in"] {
            assert!(ok(op, json!(["a", 1, true])));
            assert_eq!(at(op, json!([])), "/value");
            assert_eq!(at(op, json!("a")), "/value");
            assert_eq!(at(op, json!(["a", 1, {"x": 1}])), "/value/2");
            assert_eq!(at(op, json!([null])), "/value/0");
        }

        assert!(ok("starts_with", json!("pre")));
        assert_eq!(at("starts_with", json!(1)), "/value");

        for op in ["gt", "gte", "lt", "lte"] {
            assert!(ok(op, json!(3)) && ok(op, json!(-2.5)));
            assert_eq!(at(op, json!("3")), "/value");
        }

        for op in ["before", "after"] {
            assert!(ok(op, json!("2024-02-29")));
            assert!(ok(op, json!("2024-05-01T09:30:00Z")));
            assert!(ok(op, json!("2024-05-01T09:30:00.123+02:00")));
            assert_eq!(at(op, json!("2023-02-29")), "/value");
            assert_eq!(at(op, json!("2024-1-5")), "/value");
            assert_eq!(at(op, json!("yesterday")), "/value");
            assert_eq!(at(op, json!(20240101)), "/value");
        }

        for op in ["exists", "not_exists"] {
            assert!(ok(op, json!(null)));
            assert!(parse(&json!({"attribute": "a", "operator": op}), 3).is_ok());
            assert_eq!(at(op, json!(true)), "/value");
        }
    }

    #[test]
    fn compound_rules() {
        assert_eq!(
            pointer_of(json!({"operator": "AND", "conditions": []}), 3),
            "/conditions"
        );
        assert_eq!(
            pointer_of(json!({"operator": "or", "conditions": []}), 3),
            "/conditions"
        );
        assert_eq!(pointer_of(json!({"operator": "AND"}), 3), "");
        assert_eq!(
            pointer_of(json!({"operator": "AND", "conditions": {}}), 3),
            "/conditions"
        );
        let two = json!({"operator": "not", "conditions": [
            leaf("a", "exists", Value::Null), leaf("b", "exists", Value::Null)
        ]});
        assert_eq!(pointer_of(two, 3), "/conditions");
        assert_eq!(
            pointer_of(json!({"operator": "NOT", "conditions": []}), 3),
            "/conditions"
        );
        let bad_inner = json!({"operator": "AND", "conditions": [
            leaf("a", "exists", Value::Null),
            leaf("b", "gt", json!("x"))
        ]});
        assert_eq!(pointer_of(bad_inner, 3), "/conditions/1/value");
    }

    #[test]
    fn depth_limit() {
        let deep = json!({"operator": "AND", "conditions": [
            {"operator": "NOT", "conditions": [leaf("a", "exists", Value::Null)]}
        ]});
        assert!(parse(&deep, 3).is_ok());
        assert_eq!(pointer_of(deep.clone(), 2), "/conditions/0/conditions/0");
        assert_eq!(pointer_of(deep, 0), "");
        assert!(parse(&leaf("a", "exists", Value::Null), 1).is_ok());
    }

    #[test]
    fn error_display() {
        let e = parse(&json!(1), 3).expect_err("not an object");
        assert_eq!(e.to_string(), format!("filter /: {}", e.message));
        let e = parse(&leaf("a", "gt", json!("x")), 3).expect_err("bad value");
        assert_eq!(e.to_string(), format!("filter /value: {}", e.message));
    }

    /// The placeholder numbers in `sql`, in order of appearance; asserts each
    /// is followed by a `::` cast.
    fn placeholders(sql: &str) -> Vec<usize> {
        let bytes = sql.as_bytes();
        let mut found = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] != b'$' {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            let mut n = 0usize;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                n = n * 10 + usize::from(bytes[j] - b'0');
                j += 1;
            }
            assert!(j > i + 1, "bare `$` in {sql}");
            assert!(
                sql[j..].starts_with("::"),
                "placeholder ${n} without a cast in {sql}"
            );
            found.push(n);
            i = j;
        }
        found
    }

    #[test]
    fn simple_sql_shape_and_params() {
        let node = parse(
            &json!({"operator": "AND", "conditions": [
                leaf("plan", "equals", json!("gold")),
                {"operator": "NOT", "conditions": [{"attribute": "vip", "operator": "exists"}]}
            ]}),
            3,
        )
        .expect("valid");
        let compiled = compile(&node, "u", 5);
        assert_eq!(
            compiled.sql,
            "((u.attributes @> jsonb_build_object($5::text, $6::jsonb)) AND \
             (NOT jsonb_exists(u.attributes, $7::text)))"
        );
        assert_eq!(
            compiled.params,
            vec![
                SqlParam::Text("plan".into()),
                SqlParam::Json(json!("gold")),
                SqlParam::Text("vip".into()),
            ]
        );
        assert_eq!(compiled.refs().len(), 3);
    }

    #[test]
    fn hostile_input_never_reaches_the_sql_text() {
        let name = "'); DROP TABLE users; --";
        let long_name = "Z".repeat(10_000);
        let value = "Robert'); DELETE FROM contacts; --";
        let filter = json!({"operator": "OR", "conditions": [
            leaf(name, "equals", json!(value)),
            leaf("名前", "not_equals", json!(987654)),
            leaf(&long_name, "in", json!([value, 987654, true])),
            leaf(name, "not_in", json!(["QQ_NOT_IN"])),
            {"operator": "and", "conditions": [
                leaf(name, "contains", json!("NEEDLE_$9")),
                leaf(name, "starts_with", json!("PREFIX_'")),
                leaf(name, "gt", json!(987654)),
                leaf(name, "gte", json!(987654)),
                leaf(name, "lt", json!(987654)),
                leaf(name, "lte", json!(987654)),
                {"operator": "not", "conditions": [leaf(name, "before", json!("2031-07-04"))]},
                leaf(name, "after", json!("2031-07-04T10:00:00Z")),
                leaf(name, "exists", Value::Null),
                leaf(name, "not_exists", Value::Null),
            ]}
        ]});
        let node = parse(&filter, 4).expect("valid");
        let first = 3;
        let compiled = compile(&node, "u", first);
        let sql = &compiled.sql;
        for needle in [
            "DROP",
            "DELETE",
            "Robert",
            "名前",
            "ZZZZ",
            "987654",
            "QQ_NOT_IN",
            "NEEDLE",
            "PREFIX",
            "2031",
            "true",
            "--",
            ";",
        ] {
            assert!(!sql.contains(needle), "{needle:?} leaked into {sql}");
        }

        // Placeholders: consecutive from `first`, in order of first appearance,
        // one per param.
        let mut distinct: Vec<usize> = Vec::new();
        for n in placeholders(sql) {
            if !distinct.contains(&n) {
                distinct.push(n);
            }
        }
        let expected: Vec<usize> = (first..first + compiled.params.len()).collect();
        assert_eq!(distinct, expected);
        assert_eq!(compiled.refs().len(), compiled.params.len());

        // Params in order: the first leaf's name then value, the contains
        // leaf's name, text and JSON value.
        assert_eq!(compiled.params[0], SqlParam::Text(name.into()));
        assert_eq!(compiled.params[1], SqlParam::Json(json!(value)));
        assert_eq!(compiled.params[2], SqlParam::Text("名前".into()));
        assert_eq!(compiled.params[3], SqlParam::Json(json!(987654)));
        assert_eq!(compiled.params[4], SqlParam::Text(long_name.clone()));
        assert_eq!(
            compiled.params[5],
            SqlParam::Json(json!([value, 987654, true]))
        );
        assert_eq!(compiled.params[8], SqlParam::Text(name.into()));
        assert_eq!(compiled.params[9], SqlParam::Text("NEEDLE_$9".into()));
        assert_eq!(compiled.params[10], SqlParam::Json(json!("NEEDLE_$9")));
        // 2 + 2 + 2 + 2 (not_in) + 3 (contains) + 2 (starts_with) + 4 * 2
        // (comparisons) + 2 + 2 (before/after) + 1 + 1 (exists) = 27.
        assert_eq!(compiled.params.len(), 27);
        assert!(
            compiled
                .params
                .contains(&SqlParam::Text("2031-07-04".into()))
        );
    }

    #[test]
    fn each_leaf_sql_is_balanced_and_cast() {
        let cases = [
            leaf("k", "equals", json!(1)),
            leaf("k", "not_equals", json!(1)),
            leaf("k", "in", json!([1])),
            leaf("k", "not_in", json!([1])),
            leaf("k", "contains", json!(1)),
            leaf("k", "starts_with", json!("p")),
            leaf("k", "gt", json!(1)),
            leaf("k", "gte", json!(1)),
            leaf("k", "lt", json!(1)),
            leaf("k", "lte", json!(1)),
            leaf("k", "before", json!("2024-01-01")),
            leaf("k", "after", json!("2024-01-01")),
            leaf("k", "exists", Value::Null),
            leaf("k", "not_exists", Value::Null),
        ];
        for filter in cases {
            let node = parse(&filter, 1).expect("valid");
            let compiled = compile(&node, "u", 1);
            let opens = compiled.sql.matches('(').count();
            let closes = compiled.sql.matches(')').count();
            assert_eq!(opens, closes, "unbalanced {}", compiled.sql);
            let mut distinct: Vec<usize> = Vec::new();
            for n in placeholders(&compiled.sql) {
                if !distinct.contains(&n) {
                    distinct.push(n);
                }
            }
            let expected: Vec<usize> = (1..=compiled.params.len()).collect();
            assert_eq!(distinct, expected, "{}", compiled.sql);
        }
    }
}
