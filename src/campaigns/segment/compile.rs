//! Compiling a [`Node`] tree into a parameterised SQL boolean expression.

use serde_json::Value;
use uuid::Uuid;

use super::{ChannelOp, Figure, Node, Op};

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
    id: Uuid,
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
