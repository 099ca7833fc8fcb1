//! Validating a stored filter into a [`Node`] tree, naming the bad member
//! by its JSON pointer.

use serde_json::Value;

use super::{ChannelOp, Figure, FilterError, Node, Op};

fn error(pointer: &str, message: impl Into<String>) -> FilterError {
    FilterError {
        pointer: pointer.to_owned(),
        message: message.into(),
    }
}

/// `parent` + one reference token, escaped per RFC 6901 (`~` → `~0`, `/` → `~1`).
fn child(parent: &str, token: &str) -> String {
    format!("{parent}/{}", token.replace('~', "~0").replace('/', "~1"))
}

/// Conditions one AND/OR may hold: a filter's size is bounded by this and
/// the depth limit.
pub const MAX_CONDITIONS: usize = 100;

/// Validates a stored filter. The root node has depth 1, its conditions
/// depth 2, and so on; a node deeper than `max_depth` is refused.
pub fn parse(filter: &Value, max_depth: usize) -> Result<Node, FilterError> {
    parse_node(filter, "", 1, max_depth)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Compound {
    And,
    Or,
    Not,
}

fn parse_node(
    value: &Value,
    pointer: &str,
    depth: usize,
    max_depth: usize,
) -> Result<Node, FilterError> {
    if depth > max_depth {
        return Err(error(
            pointer,
            format!("conditions nest deeper than the limit of {max_depth} levels"),
        ));
    }
    let Some(object) = value.as_object() else {
        return Err(error(pointer, "a condition must be a JSON object"));
    };
    let operator = match object.get("operator") {
        None => return Err(error(pointer, "missing \"operator\"")),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(error(
                &child(pointer, "operator"),
                "\"operator\" must be a string",
            ));
        }
    };
    let compound = if operator.eq_ignore_ascii_case("AND") {
        Some(Compound::And)
    } else if operator.eq_ignore_ascii_case("OR") {
        Some(Compound::Or)
    } else if operator.eq_ignore_ascii_case("NOT") {
        Some(Compound::Not)
    } else {
        None
    };
    match compound {
        Some(kind) => parse_compound(object, pointer, kind, depth, max_depth),
        None if object.contains_key("channel") => parse_channel(object, pointer, operator),
        None if object.contains_key("figure") => parse_figure(object, pointer, operator),
        None => parse_leaf(object, pointer, operator),
    }
}

/// Refuses any key of `object` not in `allowed`, pointing at the key.
fn check_keys(
    object: &serde_json::Map<String, Value>,
    pointer: &str,
    allowed: &[&str],
) -> Result<(), FilterError> {
    for key in object.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(error(
                &child(pointer, key),
                format!("unknown key {key:?}; expected {}", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

fn parse_compound(
    object: &serde_json::Map<String, Value>,
    pointer: &str,
    kind: Compound,
    depth: usize,
    max_depth: usize,
) -> Result<Node, FilterError> {
    check_keys(object, pointer, &["operator", "conditions"])?;
    let name = match kind {
        Compound::And => "AND",
        Compound::Or => "OR",
        Compound::Not => "NOT",
    };
    let list_pointer = child(pointer, "conditions");
    let list = match object.get("conditions") {
        None => {
            return Err(error(
                pointer,
                format!("{name} needs a \"conditions\" array"),
            ));
        }
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(error(&list_pointer, "\"conditions\" must be an array"));
        }
    };
    if kind == Compound::Not {
        if list.len() != 1 {
            return Err(error(
                &list_pointer,
                format!("NOT takes exactly one condition, got {}", list.len()),
            ));
        }
        let inner = parse_node(&list[0], &child(&list_pointer, "0"), depth + 1, max_depth)?;
        return Ok(Node::Not(Box::new(inner)));
    }
    if list.is_empty() {
        return Err(error(
            &list_pointer,
            format!("{name} needs at least one condition"),
        ));
    }
    if list.len() > MAX_CONDITIONS {
        return Err(error(
            &list_pointer,
            format!(
                "{name} has {} conditions; at most {MAX_CONDITIONS} per level",
                list.len()
            ),
        ));
    }
    let mut nodes = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let item_pointer = child(&list_pointer, &i.to_string());
        nodes.push(parse_node(item, &item_pointer, depth + 1, max_depth)?);
    }
    Ok(match kind {
        Compound::Or => Node::Or(nodes),
        _ => Node::And(nodes),
    })
}

fn parse_leaf(
    object: &serde_json::Map<String, Value>,
    pointer: &str,
    operator: &str,
) -> Result<Node, FilterError> {
    let Some(op) = Op::from_name(operator) else {
        let names: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
        return Err(error(
            &child(pointer, "operator"),
            format!(
                "unknown operator {operator:?}; expected AND, OR, NOT or one of {}",
                names.join(", ")
            ),
        ));
    };
    check_keys(object, pointer, &["attribute", "operator", "value"])?;
    let attribute = match object.get("attribute") {
        None => return Err(error(pointer, "missing \"attribute\"")),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(error(
                &child(pointer, "attribute"),
                "\"attribute\" must be a non-empty string",
            ));
        }
    };
    let value = check_value(op, object.get("value"), pointer)?;
    Ok(Node::Leaf {
        attribute,
        op,
        value,
    })
}

fn parse_channel(
    object: &serde_json::Map<String, Value>,
    pointer: &str,
    operator: &str,
) -> Result<Node, FilterError> {
    let Some(op) = ChannelOp::ALL.into_iter().find(|op| op.name() == operator) else {
        let names: Vec<&str> = ChannelOp::ALL.iter().map(|op| op.name()).collect();
        return Err(error(
            &child(pointer, "operator"),
            format!(
                "unknown channel operator {operator:?}; expected one of {}",
                names.join(", ")
            ),
        ));
    };
    check_keys(object, pointer, &["channel", "operator", "value"])?;
    let channel = match object.get("channel") {
        Some(Value::String(c)) if c == "SMS" || c == "WHATSAPP" => c
            .parse::<crate::model::Channel>()
            .map_err(|e| error(&child(pointer, "channel"), e.to_string()))?,
        _ => {
            return Err(error(
                &child(pointer, "channel"),
                "\"channel\" must be \"SMS\" or \"WHATSAPP\"",
            ));
        }
    };
    let as_attribute = if op.takes_time() {
        Op::After
    } else {
        Op::Exists
    };
    let value = check_value(as_attribute, object.get("value"), pointer).map_err(|mut e| {
        e.message = e.message.replacen(as_attribute.name(), op.name(), 1);
        e
    })?;
    Ok(Node::Channel { channel, op, value })
}

fn parse_figure(
    object: &serde_json::Map<String, Value>,
    pointer: &str,
    operator: &str,
) -> Result<Node, FilterError> {
    check_keys(object, pointer, &["figure", "operator", "value"])?;
    let names: Vec<&str> = Figure::ALL.iter().map(|f| f.name()).collect();
    let Some(figure) = object
        .get("figure")
        .and_then(Value::as_str)
        .and_then(|name| Figure::ALL.into_iter().find(|f| f.name() == name))
    else {
        return Err(error(
            &child(pointer, "figure"),
            format!("\"figure\" must be one of {}", names.join(", ")),
        ));
    };
    let Some(op) = figure
        .ops()
        .iter()
        .copied()
        .find(|op| op.name() == operator)
    else {
        let ops: Vec<&str> = figure.ops().iter().map(|op| op.name()).collect();
        return Err(error(
            &child(pointer, "operator"),
            format!(
                "{} takes the operators {}, not {operator:?}",
                figure.name(),
                ops.join(", ")
            ),
        ));
    };
    let value = check_value(op, object.get("value"), pointer)?;
    if figure == Figure::MessagesReceived && !value.is_number() {
        return Err(error(
            &child(pointer, "value"),
            format!("{} compares with a number", figure.name()),
        ));
    }
    Ok(Node::Figure { figure, op, value })
}

/// A string, number or boolean (what an attribute can be compared with).
fn is_scalar(value: &Value) -> bool {
    matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

/// Checks the `value` member of a leaf with operator `op`; returns the value
/// to keep (Null for exists / not_exists; RFC 3339 timestamps normalised).
fn check_value(op: Op, value: Option<&Value>, pointer: &str) -> Result<Value, FilterError> {
    let name = op.name();
    let value_pointer = child(pointer, "value");
    if matches!(op, Op::Exists | Op::NotExists) {
        return match value {
            None | Some(Value::Null) => Ok(Value::Null),
            Some(_) => Err(error(&value_pointer, format!("{name} takes no value"))),
        };
    }
    let Some(value) = value else {
        return Err(error(pointer, format!("{name} needs a \"value\"")));
    };
    let bad = |message: String| Err(error(&value_pointer, message));
    match op {
        Op::Equals | Op::NotEquals | Op::Contains => {
            if !is_scalar(value) {
                return bad(format!("{name} needs a string, number or boolean value"));
            }
        }
        Op::In | Op::NotIn => {
            let items = match value.as_array() {
                Some(items) if !items.is_empty() => items,
                _ => {
                    return bad(format!(
                        "{name} needs a non-empty array of strings, numbers or booleans"
                    ));
                }
            };
            for (i, item) in items.iter().enumerate() {
                if !is_scalar(item) {
                    return Err(error(
                        &child(&value_pointer, &i.to_string()),
                        format!("{name} list elements must be strings, numbers or booleans"),
                    ));
                }
            }
        }
        Op::StartsWith => {
            if !value.is_string() {
                return bad(format!("{name} needs a string value"));
            }
        }
        Op::Gt | Op::Gte | Op::Lt | Op::Lte => {
            if !value.is_number() {
                return bad(format!("{name} needs a number value"));
            }
        }
        Op::Before | Op::After => {
            return match value.as_str().and_then(moment) {
                Some(text) => Ok(Value::String(text)),
                None => bad(format!(
                    "{name} needs a date (YYYY-MM-DD) or an RFC 3339 timestamp \
                     such as 2024-05-01T09:30:00Z"
                )),
            };
        }
        Op::Exists | Op::NotExists => {}
    }
    Ok(value.clone())
}

/// The text to hand Postgres for a before/after value: a `YYYY-MM-DD` date
/// unchanged (Postgres reads it as midnight), an RFC 3339 timestamp in
/// chrono's canonical form; None when it is neither (or before year 1,
/// which Postgres refuses).
fn moment(text: &str) -> Option<String> {
    use chrono::Datelike;
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text) {
        return (at.year() >= 1).then(|| at.to_rfc3339());
    }
    let shaped = text.len() == 10
        && text.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !shaped {
        return None;
    }
    let date = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    (date.year() >= 1).then(|| text.to_owned())
}
