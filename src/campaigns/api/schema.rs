//! The parts of the OpenAPI document that derive cannot say: the rules the
//! handlers enforce on text (as ECMA-262 patterns), the campaign states, and
//! segment filters, whose nesting limit is unrolled into one schema per level.
//!
//! Each pattern states exactly what the matching check accepts, so a request
//! the document allows is never refused with 422, and one it forbids is.

use serde_json::Value;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    AdditionalProperties, AnyOfBuilder, ArrayBuilder, KnownFormat, Object, ObjectBuilder, Ref,
    Schema, SchemaFormat, SchemaType, Type,
};

use super::extract::NAME_MAX;
use crate::campaigns::segment::{ChannelOp, Figure, Op};
use crate::model::CampaignStatus;

/// Text PostgreSQL can store: no NUL.
const NO_NUL: &str = r"^[^\x00]*$";

/// No NUL, and one character that is neither NUL nor Unicode White_Space
/// (what `str::trim` removes): a name that is not blank.
const NAME: &str = r"^[^\x00]*[^\x00\x09-\x0D\x20\u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\x00]*$";

/// `template::parse`'s grammar: text without braces or NUL, `{{`, `}}`, or a
/// placeholder; at least one of them.
const TEMPLATE_BODY: &str = r"^(?:[^{}\x00]|\{\{|\}\}|\{[A-Za-z_][A-Za-z0-9_]*\})+$";

/// `HX` and 32 hexadecimal digits.
const CONTENT_SID: &str = r"^HX[0-9a-fA-F]{32}$";

/// A placeholder's name.
const VARIABLE_NAME: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";

/// Numbered variables an approved content may have.
pub(super) const MAX_CONTENT_VARIABLES: usize = 100;

/// `HH:MM` or `HH:MM:SS`.
const TIME_OF_DAY: &str = r"^(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9])?$";

/// Compound operators, in any letter case.
const AND_OR: &str = r"^(?:[Aa][Nn][Dd]|[Oo][Rr])$";
const NOT: &str = r"^[Nn][Oo][Tt]$";

/// The end of a timestamp whose UTC offset PostgreSQL reads (at most ±15:59).
const PG_OFFSET: &str = r"(?:[Zz]|[+-](?:0[0-9]|1[0-5]):[0-5][0-9])$";

fn string(pattern: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
}

/// A template, segment or campaign name (`extract::check_name`).
pub(super) fn name() -> Object {
    string(NAME)
        .min_length(Some(1))
        .max_length(Some(NAME_MAX))
        .description(Some(
            "Not blank, no NUL character, at most 200 characters. \
             Unique among templates, and among segments.",
        ))
        .build()
}

/// A template body (`templates::check_template`).
pub(super) fn template_content() -> Object {
    string(TEMPLATE_BODY)
        .min_length(Some(1))
        .max_length(Some(crate::campaigns::template::MAX_BODY_CHARS))
        .description(Some(
            "Text with `{variable}` placeholders (a letter or `_`, then letters, digits \
             or `_`); `{{` and `}}` are literal braces. No NUL character; at most 1,600 \
             characters (the provider's limit for one message).",
        ))
        .build()
}

/// A template's approved content at the provider (`HX` and 32 hex digits), or null.
pub(super) fn content_sid() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .pattern(Some(CONTENT_SID))
        .description(Some(
            "The ContentSid of the template's approved content (Twilio Content API), \
             which a WhatsApp campaign sends in place of the text; a campaign with \
             a WhatsApp template without one is 422.",
        ))
        .build()
}

/// The variables that fill an approved content's `{{1}}`, `{{2}}`…, in order.
pub(super) fn content_variables() -> utoipa::openapi::schema::Array {
    ArrayBuilder::new()
        .items(string(VARIABLE_NAME))
        .max_items(Some(MAX_CONTENT_VARIABLES))
        .description(Some(
            "Variable names (as in the body's placeholders, looked up like them: \
             the user's attribute, else the default) filling the approved \
             content's {{1}}, {{2}}, … in order; at most 100.",
        ))
        .build()
}

/// A segment's description: any text without NUL, or null.
pub(super) fn description() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .pattern(Some(NO_NUL))
        .build()
}

/// A time of day for quiet hours (`campaigns::quiet_time`).
pub(super) fn time_of_day() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .pattern(Some(TIME_OF_DAY))
        .description(Some(
            "HH:MM or HH:MM:SS in the recipient's local time; \
             quiet_hours_start and quiet_hours_end come together. \
             22:00 to 08:00 unless given; null for none.",
        ))
        .build()
}

/// A moment in a query: a date (midnight UTC) or an RFC 3339 date-time.
pub(super) fn date_or_date_time() -> Schema {
    AnyOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Date))),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
        )
        .description(Some(
            "A date (YYYY-MM-DD, midnight UTC) or an RFC 3339 date-time.",
        ))
        .build()
        .into()
}

/// What a stored attribute or default can be: a string without NUL, a number or a boolean.
fn stored_scalar() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([
            Type::String,
            Type::Number,
            Type::Boolean,
        ]))
        .pattern(Some(NO_NUL))
}

/// A template's `defaults`: value per variable, stored as jsonb.
pub(super) fn defaults() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(string(NO_NUL).build()))
        .additional_properties(Some(stored_scalar()))
        .description(Some(
            "Value per variable, used when a user has no such attribute: \
             a string, number or boolean.",
        ))
        .build()
}

/// The `variables` of a render: value per variable.
pub(super) fn variables() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(ObjectBuilder::new().schema_type(
            SchemaType::from_iter([Type::String, Type::Number, Type::Boolean]),
        )))
        .description(Some(
            "Value per variable (a string, number or boolean); the template's \
             defaults fill the others, and a variable with neither is 422.",
        ))
        .build()
}

/// A campaign's state.
pub(super) fn campaign_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(CampaignStatus::ALL.iter().map(|s| s.as_str())))
        .build()
}

/// The state a paused campaign resumes to, or null.
pub(super) fn paused_from() -> Object {
    let states = CampaignStatus::ALL.iter().map(|s| Value::from(s.as_str()));
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(states.chain([Value::Null])))
        .build()
}

/// `?status=`: only campaigns in this state.
pub(super) fn status_filter() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(CampaignStatus::ALL.iter().map(|s| s.as_str())))
        .description(Some("Only campaigns in this state."))
        .build()
}

/// A reference to the segment filter schema.
pub(super) fn filter() -> Ref {
    Ref::from_schema_name("Filter")
}

/// What a leaf operator compares with, as `segment::check_value` wants it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Scalar,
    List,
    Text,
    Number,
    Moment,
    Nothing,
}

impl ValueKind {
    const ALL: [ValueKind; 6] = [
        ValueKind::Scalar,
        ValueKind::List,
        ValueKind::Text,
        ValueKind::Number,
        ValueKind::Moment,
        ValueKind::Nothing,
    ];

    fn of(op: Op) -> ValueKind {
        match op {
            Op::Equals | Op::NotEquals | Op::Contains => ValueKind::Scalar,
            Op::In | Op::NotIn => ValueKind::List,
            Op::StartsWith => ValueKind::Text,
            Op::Gt | Op::Gte | Op::Lt | Op::Lte => ValueKind::Number,
            Op::Before | Op::After => ValueKind::Moment,
            Op::Exists | Op::NotExists => ValueKind::Nothing,
        }
    }

    fn schema(self) -> RefOr<Schema> {
        match self {
            ValueKind::Scalar => stored_scalar().into(),
            ValueKind::List => ArrayBuilder::new()
                .items(stored_scalar())
                .min_items(Some(1))
                .into(),
            ValueKind::Text => string(NO_NUL).into(),
            ValueKind::Number => ObjectBuilder::new().schema_type(Type::Number).into(),
            ValueKind::Moment => AnyOfBuilder::new()
                .item(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Date))),
                )
                .item(
                    string(PG_OFFSET)
                        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
                        .description(Some("UTC offset at most ±15:59")),
                )
                .into(),
            ValueKind::Nothing => ObjectBuilder::new().schema_type(Type::Null).into(),
        }
    }
}

/// A leaf: `{attribute, operator, value}`, one branch per kind of value.
fn condition() -> AnyOfBuilder {
    let mut any = AnyOfBuilder::new().description(Some(
        "A condition on one user attribute: `{attribute, operator, value}`.",
    ));
    for kind in ValueKind::ALL {
        let operators: Vec<&str> = Op::ALL
            .into_iter()
            .filter(|op| ValueKind::of(*op) == kind)
            .map(Op::name)
            .collect();
        let mut leaf = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("attribute", string(NO_NUL).min_length(Some(1)))
            .property(
                "operator",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(operators)),
            )
            .property("value", kind.schema())
            .required("attribute")
            .required("operator")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        if kind != ValueKind::Nothing {
            leaf = leaf.required("value");
        }
        any = any.item(leaf);
    }
    // Conditions on the person's channel (`user_channels`).
    for timed in [false, true] {
        let operators: Vec<&str> = ChannelOp::ALL
            .into_iter()
            .filter(|op| op.takes_time() == timed)
            .map(ChannelOp::name)
            .collect();
        let value = if timed {
            ValueKind::Moment
        } else {
            ValueKind::Nothing
        };
        let mut leaf = ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A condition on the person's channel: window_open (wrote within 24 hours), \
                 reachable (not marked unreachable by the provider), last_inbound_after / \
                 last_inbound_before a time.",
            ))
            .property(
                "channel",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["SMS", "WHATSAPP"])),
            )
            .property(
                "operator",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(operators)),
            )
            .property("value", value.schema())
            .required("channel")
            .required("operator")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        if timed {
            leaf = leaf.required("value");
        }
        any = any.item(leaf);
    }
    // Conditions on the person's interaction figures (`users`).
    let count_ops = Figure::MessagesReceived.ops().iter().map(|op| op.name());
    let time_figures: Vec<&str> = Figure::ALL
        .into_iter()
        .filter(|f| *f != Figure::MessagesReceived)
        .map(Figure::name)
        .collect();
    for (figures, operators, value) in [
        (
            vec![Figure::MessagesReceived.name()],
            count_ops.collect::<Vec<_>>(),
            Some(ValueKind::Number),
        ),
        (
            time_figures.clone(),
            vec![Op::Before.name(), Op::After.name()],
            Some(ValueKind::Moment),
        ),
        (
            time_figures,
            vec![Op::Exists.name(), Op::NotExists.name()],
            None,
        ),
    ] {
        let mut leaf = ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A condition on the person's interaction figures: messages_received (a count), \
                 last_message_received and last_message_delivered (times).",
            ))
            .property(
                "figure",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(figures)),
            )
            .property(
                "operator",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(operators)),
            )
            .property("value", value.unwrap_or(ValueKind::Nothing).schema())
            .required("figure")
            .required("operator")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        if value.is_some() {
            leaf = leaf.required("value");
        }
        any = any.item(leaf);
    }
    any
}

/// `{operator, conditions}` over filters of the level below.
fn compound(operator: &str, max_items: Option<usize>, below: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("operator", string(operator))
        .property(
            "conditions",
            ArrayBuilder::new()
                .items(Ref::from_schema_name(below))
                .min_items(Some(1))
                .max_items(max_items),
        )
        .required("operator")
        .required("conditions")
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
}

/// The filter schemas for a nesting limit of `max_depth` levels
/// (`campaigns.max-filter-depth`): `Filter` is the root (level 1),
/// `FilterN` level N, and `Condition` the leaf, the only node the deepest
/// level may hold. JSON Schema has no depth limit of its own, so the levels
/// are spelled out.
pub(super) fn filters(max_depth: usize) -> Vec<(String, RefOr<Schema>)> {
    let max_depth = max_depth.max(1);
    let level = |n: usize| {
        if n == 1 {
            "Filter".to_string()
        } else {
            format!("Filter{n}")
        }
    };
    let mut schemas: Vec<(String, RefOr<Schema>)> =
        vec![("Condition".to_string(), condition().into())];
    if max_depth == 1 {
        let only = AnyOfBuilder::new()
            .item(Ref::from_schema_name("Condition"))
            .description(Some(
                "A segment filter: one condition (no nesting allowed).",
            ));
        schemas.push((level(1), only.into()));
        return schemas;
    }
    for n in 1..max_depth {
        let below = if n + 1 == max_depth {
            "Condition".to_string()
        } else {
            level(n + 1)
        };
        let description = if n == 1 {
            format!(
                "A segment filter: a condition, or `{{operator: AND|OR|NOT, conditions: [...]}}` \
                 (operators in any letter case; NOT takes exactly one condition), nested at most \
                 {max_depth} levels deep. Leaf operators: {}. Only opted-in users are ever in an \
                 audience.",
                Op::ALL.map(Op::name).join(", ")
            )
        } else {
            format!("Level {n} of a segment filter.")
        };
        let node = AnyOfBuilder::new()
            .item(Ref::from_schema_name("Condition"))
            .item(compound(
                AND_OR,
                Some(crate::campaigns::segment::MAX_CONDITIONS),
                &below,
            ))
            .item(compound(NOT, Some(1), &below))
            .description(Some(description));
        schemas.push((level(n), node.into()));
    }
    schemas
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every compound level points at the next, the last at `Condition`.
    #[test]
    fn filters_unroll_to_the_depth_limit() {
        let names: Vec<String> = filters(4).into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["Condition", "Filter", "Filter2", "Filter3"]);
        let json = serde_json::to_value(
            filters(4)
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
        .expect("schemas serialize");
        let below = &json["Filter3"]["anyOf"][1]["properties"]["conditions"]["items"]["$ref"];
        assert_eq!(below, "#/components/schemas/Condition");
        let branches = json["Condition"]["anyOf"].as_array().expect("branches");
        let enum_len = |b: &serde_json::Value, key: &str| {
            b["properties"][key]["enum"].as_array().map_or(0, Vec::len)
        };
        let (figures, others): (Vec<_>, Vec<_>) = branches
            .iter()
            .partition(|b| b["properties"].get("figure").is_some());
        let operators: usize = others.iter().map(|b| enum_len(b, "operator")).sum();
        assert_eq!(
            operators,
            Op::ALL.len() + ChannelOp::ALL.len(),
            "every operator in one branch"
        );
        let pairs: usize = figures
            .iter()
            .map(|b| enum_len(b, "figure") * enum_len(b, "operator"))
            .sum();
        assert_eq!(
            pairs,
            Figure::ALL.iter().map(|f| f.ops().len()).sum::<usize>(),
            "every figure with each of its operators once"
        );
    }
}
