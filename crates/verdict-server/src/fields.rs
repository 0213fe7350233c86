//! Typed access to a JSON request body, with pydantic-style errors.
//!
//! Bodies are parsed into a JSON object and fields are taken out one by one:
//! this keeps vLLM's validation messages (which serde's would not match) and
//! ignores unknown fields for free.

use serde_json::{Map, Value};

use crate::error::{ApiError, SchemaIssue};

/// A request body as a JSON object whose fields are taken out as they are read.
#[derive(Debug, Default)]
pub struct Body {
    fields: Map<String, Value>,
}

fn type_error(kind: &'static str, key: &str, msg: &str, value: &Value) -> ApiError {
    SchemaIssue::new(kind, &[key], msg).with_input(value).into()
}

impl Body {
    pub fn new(fields: Map<String, Value>) -> Self {
        Body { fields }
    }

    /// True when the field is present and not null.
    pub fn has(&self, key: &str) -> bool {
        self.fields.get(key).is_some_and(|v| !v.is_null())
    }

    /// Takes a field out; null counts as absent.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.fields.remove(key).filter(|v| !v.is_null())
    }

    pub fn peek(&self, key: &str) -> Option<&Value> {
        self.fields.get(key).filter(|v| !v.is_null())
    }

    pub fn missing(key: &str) -> ApiError {
        SchemaIssue::new("missing", &[key], "Field required").into()
    }

    pub fn opt_str(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(type_error(
                "string_type",
                key,
                "Input should be a valid string",
                &other,
            )),
        }
    }

    pub fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(type_error(
                "bool_type",
                key,
                "Input should be a valid boolean",
                &other,
            )),
        }
    }

    pub fn bool_or(&mut self, key: &str, default: bool) -> Result<bool, ApiError> {
        Ok(self.opt_bool(key)?.unwrap_or(default))
    }

    /// An integer field; integral floats are accepted as pydantic's lax mode does.
    pub fn opt_i64(&mut self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => as_i64(&v).map(Some).ok_or_else(|| int_error(key, &v)),
        }
    }

    /// A non-negative integer that fits a token id.
    pub fn opt_u32(&mut self, key: &str) -> Result<Option<u32>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => as_u32(&v).map(Some).ok_or_else(|| u32_error(&[key], &v)),
        }
    }

    /// A list of non-negative integers that fit token ids.
    pub fn opt_u32_list(&mut self, key: &str) -> Result<Option<Vec<u32>>, ApiError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        let Value::Array(items) = &v else {
            return Err(type_error(
                "list_type",
                key,
                "Input should be a valid list",
                &v,
            ));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let index = i.to_string();
                as_u32(item).ok_or_else(|| u32_error(&[key, index.as_str()], item))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// One of a fixed set of strings (pydantic's `Literal`).
    pub fn opt_literal(
        &mut self,
        key: &str,
        allowed: &[&'static str],
    ) -> Result<Option<&'static str>, ApiError> {
        let Some(v) = self.take(key) else {
            return Ok(None);
        };
        if let Some(found) = v
            .as_str()
            .and_then(|s| allowed.iter().find(|a| **a == s).copied())
        {
            return Ok(Some(found));
        }
        Err(SchemaIssue::new(
            "literal_error",
            &[key],
            format!("Input should be {}", literal_list(allowed)),
        )
        .with_input(&v)
        .into())
    }

    pub fn opt_object(&mut self, key: &str) -> Result<Option<Map<String, Value>>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(other) => Err(type_error(
                "dict_type",
                key,
                "Input should be a valid dictionary",
                &other,
            )),
        }
    }

    /// Checks a field's type without keeping its value (accepted-but-unused fields).
    pub fn check_str(&mut self, key: &str) -> Result<(), ApiError> {
        self.opt_str(key).map(|_| ())
    }

    pub fn check_object(&mut self, key: &str) -> Result<(), ApiError> {
        self.opt_object(key).map(|_| ())
    }
}

pub fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        _ => None,
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    as_i64(v).and_then(|n| u32::try_from(n).ok())
}

fn u32_error(loc: &[&str], v: &Value) -> ApiError {
    match as_i64(v) {
        Some(_) => SchemaIssue::new(
            "greater_than_equal",
            loc,
            "Input should be a token id (an integer from 0 to 4294967295)",
        )
        .with_input(v)
        .into(),
        None => SchemaIssue::new("int_type", loc, "Input should be a valid integer")
            .with_input(v)
            .into(),
    }
}

pub fn int_error(key: &str, v: &Value) -> ApiError {
    let msg = match v {
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() != 0.0) => (
            "int_from_float",
            "Input should be a valid integer, got a number with a fractional part",
        ),
        _ => ("int_type", "Input should be a valid integer"),
    };
    type_error(msg.0, key, msg.1, v)
}

/// `'a', 'b' or 'c'` as pydantic lists a Literal's values.
fn literal_list(allowed: &[&str]) -> String {
    let quoted: Vec<String> = allowed.iter().map(|a| format!("'{a}'")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Body {
        match v {
            Value::Object(m) => Body::new(m),
            _ => unreachable!(),
        }
    }

    #[test]
    fn literal_errors_name_the_bad_value() {
        let mut b = body(json!({"encoding_format": "xml"}));
        let e = b
            .opt_literal("encoding_format", &["float", "base64", "bytes"])
            .unwrap_err();
        assert!(e.message.contains("literal_error"), "{}", e.message);
        assert!(e.message.contains("'xml'"), "{}", e.message);
        assert!(e.message.contains("'float', 'base64' or 'bytes'"));
    }

    #[test]
    fn integers_and_nulls() {
        let mut b = body(json!({"a": 3, "b": 4.0, "c": 4.5, "d": null, "e": "7"}));
        assert_eq!(b.opt_i64("a").unwrap(), Some(3));
        assert_eq!(b.opt_i64("b").unwrap(), Some(4));
        assert!(b
            .opt_i64("c")
            .unwrap_err()
            .message
            .contains("int_from_float"));
        assert_eq!(b.opt_i64("d").unwrap(), None);
        assert!(b.opt_i64("e").unwrap_err().message.contains("int_type"));
    }
}
