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

/// A boolean SQL expression over the jsonb column `column` (e.g. "u.attributes") whose
/// placeholders are numbered from `$first` on; `params` in placeholder order.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub sql: String,
    pub params: Vec<SqlParam>,
}

/// One bind parameter: `Text` binds as `text`, `Json` as `jsonb`.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlParam {
    Text(String),
    Json(Value),
}

impl Compiled {
    /// The params as tokio-postgres wants them.
    pub fn refs(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        let mut out: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            Vec::with_capacity(self.params.len());
        for param in &self.params {
            match param {
                SqlParam::Text(text) => out.push(text),
                SqlParam::Json(json) => out.push(json),
            }
        }
        out
    }
}

/// Counts the opted-in users `node` selects and stores the count as segment
/// `id`'s `estimated_audience_size` (at most `i32::MAX`, the model's
/// INTEGER); returns the count and when it was taken.
pub async fn store_estimate(
    client: &tokio_postgres::Client,
    id: i64,
    node: &Node,
) -> Result<(i64, chrono::DateTime<chrono::Utc>), tokio_postgres::Error> {
    let filter = compile(node, "u", 1);
    let sql = format!(
        "SELECT count(*) FROM users u WHERE u.consent_state = 'OPT_IN' AND {}",
        filter.sql
    );
    let size: i64 = client.query_one(&sql, &filter.refs()).await?.get(0);
    let stored = i32::try_from(size).unwrap_or(i32::MAX);
    let row = client
        .query_one(
            "UPDATE segments SET estimated_audience_size = $2, estimated_at = now()
              WHERE id = $1 RETURNING estimated_at",
            &[&id, &stored],
        )
        .await?;
    Ok((size, row.get(0)))
}

/// Compiles `node` into SQL over the users row `user` (a table alias from
/// our own code, spliced as is: attributes are `{user}.attributes`, channel
/// conditions look up `{user}.phone_number` in `user_channels`). Placeholders are `$first`, `$first+1`, …
/// in order of first appearance; every one carries an explicit cast.
///
/// Every leaf evaluates to true or false, never NULL (given a non-NULL
/// column), so NOT and NOT IN-style operators treat users without the
/// attribute as "not matching" the inner condition.
pub fn compile(node: &Node, user: &str, first: usize) -> Compiled {
    let column = format!("{user}.attributes");
    let mut builder = Builder {
        user,
        column: &column,
        sql: String::new(),
        params: Vec::new(),
        next: first,
    };
    builder.node(node);
    Compiled {
        sql: builder.sql,
        params: builder.params,
    }
}

struct Builder<'a> {
    user: &'a str,
    column: &'a str,
    sql: String,
    params: Vec<SqlParam>,
    next: usize,
}

impl Builder<'_> {
    /// Allocates the next placeholder for `param`; returns `$n`.
    fn param(&mut self, param: SqlParam) -> String {
        let placeholder = format!("${}", self.next);
        self.next += 1;
        self.params.push(param);
        placeholder
    }

    fn node(&mut self, node: &Node) {
        match node {
            Node::Leaf {
                attribute,
                op,
                value,
            } => {
                let sql = self.leaf(attribute, *op, value);
                self.sql.push_str(&sql);
            }
            Node::And(nodes) => self.join(nodes, " AND "),
            Node::Or(nodes) => self.join(nodes, " OR "),
            Node::Not(inner) => {
                self.sql.push_str("(NOT ");
                self.node(inner);
                self.sql.push(')');
            }
            Node::Channel { channel, op, value } => {
                let sql = self.channel(*channel, *op, value);
                self.sql.push_str(&sql);
            }
            Node::Figure { figure, op, value } => {
                let sql = self.figure(*figure, *op, value);
                self.sql.push_str(&sql);
            }
        }
    }

    /// The SQL of one interaction-figure condition (never NULL).
    fn figure(&mut self, figure: Figure, op: Op, value: &Value) -> String {
        let column = format!("{}.{}", self.user, figure.name());
        let cmp = match op {
            Op::Exists => return format!("({column} IS NOT NULL)"),
            Op::NotExists => return format!("({column} IS NULL)"),
            Op::Before | Op::Lt => "<",
            Op::After | Op::Gt => ">",
            Op::Gte => ">=",
            Op::Lte => "<=",
            Op::NotEquals => "<>",
            _ => "=",
        };
        let v = self.param(SqlParam::Text(scalar_text(value)));
        let cast = if figure == Figure::MessagesReceived {
            "numeric"
        } else {
            "timestamptz"
        };
        format!("coalesce({column} {cmp} {v}::text::{cast}, false)")
    }

    /// The SQL of one channel condition.
    fn channel(&mut self, channel: crate::model::Channel, op: ChannelOp, value: &Value) -> String {
        let u = self.user;
        let c = self.param(SqlParam::Text(channel.as_str().to_owned()));
        let row = format!(
            "SELECT 1 FROM user_channels uc WHERE uc.phone_number = {u}.phone_e164 AND uc.channel = {c}::text"
        );
        match op {
            ChannelOp::WindowOpen => {
                format!("EXISTS ({row} AND uc.last_inbound_at > now() - interval '24 hours')")
            }
            ChannelOp::Reachable => {
                format!("(NOT EXISTS ({row} AND uc.unreachable_at IS NOT NULL))")
            }
            ChannelOp::LastInboundAfter | ChannelOp::LastInboundBefore => {
                let cmp = if op == ChannelOp::LastInboundAfter {
                    ">"
                } else {
                    "<"
                };
                let t = self.param(SqlParam::Text(scalar_text(value)));
                format!("EXISTS ({row} AND uc.last_inbound_at {cmp} {t}::text::timestamptz)")
            }
        }
    }

    fn join(&mut self, nodes: &[Node], separator: &str) {
        self.sql.push('(');
        for (i, node) in nodes.iter().enumerate() {
            if i > 0 {
                self.sql.push_str(separator);
            }
            self.node(node);
        }
        self.sql.push(')');
    }

    /// The SQL of one leaf. Params are allocated in the order their
    /// placeholders first appear in the returned text.
    fn leaf(&mut self, attribute: &str, op: Op, value: &Value) -> String {
        let a = self.column;
        let k = self.param(SqlParam::Text(attribute.to_owned()));
        match op {
            // `@>` with a one-key object uses the GIN jsonb_path_ops index.
            Op::Equals => {
                let v = self.param(SqlParam::Json(value.clone()));
                format!("({a} @> jsonb_build_object({k}::text, {v}::jsonb))")
            }
            Op::NotEquals => {
                let v = self.param(SqlParam::Json(value.clone()));
                format!(
                    "(jsonb_exists({a}, {k}::text) AND NOT ({a} @> jsonb_build_object({k}::text, {v}::jsonb)))"
                )
            }
            Op::In => {
                let v = self.param(SqlParam::Json(value.clone()));
                format!(
                    "coalesce(({a} -> {k}::text) IN (SELECT jsonb_array_elements({v}::jsonb)), false)"
                )
            }
            // The list holds non-null scalars only, so NOT IN never yields NULL
            // once the attribute exists.
            Op::NotIn => {
                let v = self.param(SqlParam::Json(value.clone()));
                format!(
                    "(jsonb_exists({a}, {k}::text) AND ({a} -> {k}::text) NOT IN (SELECT jsonb_array_elements({v}::jsonb)))"
                )
            }
            // A string attribute containing the text, or an array attribute
            // containing the value as an element.
            Op::Contains => {
                let t = self.param(SqlParam::Text(scalar_text(value)));
                let v = self.param(SqlParam::Json(value.clone()));
                format!(
                    "(CASE jsonb_typeof({a} -> {k}::text) \
                     WHEN 'string' THEN strpos({a} ->> {k}::text, {t}::text) > 0 \
                     WHEN 'array' THEN ({a} -> {k}::text) @> jsonb_build_array({v}::jsonb) \
                     ELSE false END)"
                )
            }
            Op::StartsWith => {
                let t = self.param(SqlParam::Text(scalar_text(value)));
                format!(
                    "coalesce(jsonb_typeof({a} -> {k}::text) = 'string' \
                     AND starts_with({a} ->> {k}::text, {t}::text), false)"
                )
            }
            // jsonb compares two numbers numerically.
            Op::Gt | Op::Gte | Op::Lt | Op::Lte => {
                let cmp = match op {
                    Op::Gt => ">",
                    Op::Gte => ">=",
                    Op::Lt => "<",
                    _ => "<=",
                };
                let v = self.param(SqlParam::Json(value.clone()));
                format!(
                    "(CASE WHEN jsonb_typeof({a} -> {k}::text) = 'number' \
                     THEN ({a} -> {k}::text) {cmp} {v}::jsonb ELSE false END)"
                )
            }
            // Bound as text then cast, since tokio-postgres refuses a Rust
            // String for a parameter whose type is timestamptz.
            Op::Before | Op::After => {
                let cmp = if op == Op::Before { "<" } else { ">" };
                let t = self.param(SqlParam::Text(scalar_text(value)));
                format!(
                    "coalesce(ese_try_timestamptz({a} ->> {k}::text) {cmp} {t}::text::timestamptz, false)"
                )
            }
            Op::Exists => format!("jsonb_exists({a}, {k}::text)"),
            Op::NotExists => format!("(NOT jsonb_exists({a}, {k}::text))"),
        }
    }
}

/// The text of a scalar value: strings as they are, anything else as JSON.
fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
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
