//! The JSON Schemas of the OpenAPI document, enforced: segment filters and
//! template variables are validated by a JSON Schema validator (the
//! `jsonschema` crate, draft 2020-12, which OpenAPI 3.1 schemas are) against
//! the very schemas the served document publishes, compiled once from it.
//! The handlers' own checks run first and name the problem in the API's
//! words; the contract makes sure nothing the document forbids gets through.

use jsonschema::Validator;
use serde_json::Value;

use super::error::ApiError;

/// The validators of what the document publishes.
pub(super) struct Contract {
    filter: Validator,
    defaults: Validator,
    content_variables: Validator,
    render_variables: Validator,
}

/// What a checked value is.
#[derive(Debug, Clone, Copy)]
pub(super) enum Part {
    /// A segment's `filter_criteria` (`components.schemas.Filter`).
    Filter,
    /// A template's `defaults`: its variables' default values.
    Defaults,
    /// A template's `content_variables`.
    ContentVariables,
    /// The `variables` of a render request.
    RenderVariables,
}

/// A validator for the schema at `pointer` (a JSON pointer into `document`),
/// its references resolved within the document.
fn compile(document: &Value, pointer: &str) -> anyhow::Result<Validator> {
    let mut root = serde_json::json!({ "$ref": format!("#{pointer}") });
    if let (Some(root), Some(components)) = (root.as_object_mut(), document.get("components")) {
        root.insert("components".into(), components.clone());
    }
    if document.pointer(pointer).is_none() {
        anyhow::bail!("the OpenAPI document has no schema at {pointer}");
    }
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .map_err(|e| anyhow::anyhow!("the OpenAPI schema at {pointer} does not compile: {e}"))
}

impl Contract {
    pub(super) fn new(document: &utoipa::openapi::OpenApi) -> anyhow::Result<Self> {
        let document = serde_json::to_value(document)?;
        let property = |schema: &str, name: &str| {
            compile(
                &document,
                &format!("/components/schemas/{schema}/properties/{name}"),
            )
        };
        Ok(Self {
            filter: compile(&document, "/components/schemas/Filter")?,
            defaults: property("TemplateIn", "defaults")?,
            content_variables: property("TemplateIn", "content_variables")?,
            render_variables: property("RenderIn", "variables")?,
        })
    }

    /// 422 naming the first place where `value`, found at `at` in the
    /// request body, breaks the published schema of `part`.
    pub(super) fn check(&self, part: Part, at: &str, value: &Value) -> Result<(), ApiError> {
        let validator = match part {
            Part::Filter => &self.filter,
            Part::Defaults => &self.defaults,
            Part::ContentVariables => &self.content_variables,
            Part::RenderVariables => &self.render_variables,
        };
        let evaluation = validator.evaluate(value);
        if evaluation.flag().valid {
            return Ok(());
        }
        // The deepest error says most: an `anyOf` at the top only says that
        // no alternative fits, the alternative that got furthest says why.
        let worst = evaluation
            .iter_errors()
            .max_by_key(|e| e.instance_location.as_str().len());
        let (path, why) = match worst {
            Some(e) => (
                e.instance_location.as_str().to_string(),
                e.error.to_string(),
            ),
            None => (String::new(), "not valid".to_string()),
        };
        Err(ApiError::invalid(
            format!("{at}{path}"),
            format!("does not match the published schema: {why}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Contract, Part};

    fn contract() -> Contract {
        Contract::new(&super::super::openapi(3)).expect("the document's schemas compile")
    }

    fn refused(c: &Contract, part: Part, value: serde_json::Value) -> (String, String) {
        let e = c
            .check(part, "/x", &value)
            .expect_err(&format!("{value} should be refused"));
        let (field, message) = e.field_and_message();
        (field.to_string(), message.to_string())
    }

    #[test]
    fn filters_the_document_allows_pass_and_others_are_refused_where_they_go_wrong() {
        let c = contract();
        for ok in [
            json!({"attribute": "plan", "operator": "equals", "value": "pro"}),
            json!({"operator": "AND", "conditions": [
                {"attribute": "age", "operator": "gt", "value": 30},
                {"operator": "not", "conditions": [{"attribute": "vip", "operator": "exists"}]}
            ]}),
            json!({"figure": "messages_received", "operator": "gt", "value": 3}),
        ] {
            let r = c
                .check(Part::Filter, "/x", &ok)
                .map_err(|e| e.field_and_message().1.to_string());
            assert!(r.is_ok(), "{ok}: {r:?}");
        }
        let (field, message) = refused(&c, Part::Filter, json!(["plan"]));
        assert_eq!(field, "/x");
        assert!(message.contains("published schema"), "{message}");
        let (field, message) = refused(
            &c,
            Part::Filter,
            json!({"operator": "AND", "conditions": [
                {"attribute": "plan", "operator": "equals", "value": "pro"},
                {"attribute": "plan", "operator": "resembles", "value": "pro"}
            ]}),
        );
        assert!(field.starts_with("/x/conditions/1"), "{field}");
        assert!(message.contains("resembles"), "{message}");
        // Deeper than the document's three levels.
        let leaf = json!({"attribute": "a", "operator": "exists"});
        let deep = (0..3).fold(
            leaf,
            |inner, _| json!({"operator": "OR", "conditions": [inner]}),
        );
        refused(&c, Part::Filter, deep);
    }

    #[test]
    fn template_variables_are_held_to_the_document() {
        let c = contract();
        assert!(
            c.check(Part::Defaults, "/defaults", &json!({"name": "you", "n": 2}))
                .is_ok()
        );
        let (field, _) = refused(&c, Part::Defaults, json!({"name": {"first": "Ann"}}));
        assert_eq!(field, "/x/name");
        assert!(
            c.check(Part::ContentVariables, "/x", &json!(["name", "_n2"]))
                .is_ok()
        );
        let (field, _) = refused(&c, Part::ContentVariables, json!(["name", "2nd"]));
        assert_eq!(field, "/x/1");
        let (field, _) = refused(&c, Part::RenderVariables, json!({"name": [1]}));
        assert_eq!(field, "/x/name");
    }
}
