use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JinjaValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EngineError, Result};

/// One chat message. Content may be a string or a list of parts; text parts
/// are joined with newlines for text-only models (vLLM's "string" content format).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    /// Other fields (name, tool_calls, reasoning_content, ...) reach the template as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// How to render a conversation.
#[derive(Debug, Clone, Default)]
pub struct ChatOptions {
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// Extra variables for the template (`chat_template_kwargs`).
    pub template_kwargs: serde_json::Map<String, Value>,
}

/// An image or video a chat message refers to, by URL (http(s), `data:` or `file:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRef {
    pub is_video: bool,
    pub url: String,
}

/// The images and videos of a conversation, in the order the template places them.
pub fn media_parts(messages: &[ChatMessage]) -> Result<Vec<MediaRef>> {
    let mut out = Vec::new();
    for m in messages {
        let Value::Array(parts) = &m.content else {
            continue;
        };
        for part in parts {
            if let Some(media) = media_of(part)? {
                out.push(media);
            }
        }
    }
    Ok(out)
}

/// The media a content part carries: OpenAI's `image_url`/`video_url` parts
/// (object with `url`, or a bare string), `input_image`, or transformers'
/// `{"type": "image", "image"|"url": ...}` style.
fn media_of(part: &Value) -> Result<Option<MediaRef>> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or("text");
    let (is_video, keys): (bool, &[&str]) = match kind {
        "image_url" | "input_image" => (false, &["image_url"]),
        "video_url" => (true, &["video_url"]),
        "image" => (false, &["image", "url", "image_url"]),
        "video" => (true, &["video", "url", "video_url"]),
        _ => return Ok(None),
    };
    let url = keys.iter().find_map(|k| match part.get(*k)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("url").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    });
    match url {
        Some(url) => Ok(Some(MediaRef { is_video, url })),
        None => Err(EngineError::validation(format!(
            "a `{kind}` content part needs a URL (e.g. {{\"type\": \"{kind}\", \"{key}\": {{\"url\": ...}}}})",
            key = keys[0]
        ))),
    }
}

/// A compiled chat template (Jinja, rendered with minijinja the way transformers renders it).
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<JinjaValue, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        // Python's json.dumps(ensure_ascii=False): no HTML escaping, ", " and ": " separators.
        env.add_filter(
            "tojson",
            |v: JinjaValue, indent: Option<usize>| -> Result<String, JinjaError> {
                let json = serde_json::to_value(&v)
                    .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
                Ok(python_json_dumps(&json, indent))
            },
        );
        env.add_template_owned(TEMPLATE_NAME.to_string(), source.to_string())
            .map_err(|e| EngineError::Config(format!("chat template does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders the conversation to the prompt text. `multimodal` passes
    /// content-part lists through (images and videos as `{"type": "image"}` /
    /// `{"type": "video"}`) for templates that place vision tokens; otherwise
    /// content is flattened to text.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
        multimodal: bool,
    ) -> Result<String> {
        if options.add_generation_prompt && options.continue_final_message {
            return Err(EngineError::validation(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            ));
        }
        let mut msgs = Vec::with_capacity(messages.len());
        for m in messages {
            let mut obj = m.extra.clone();
            obj.insert("role".into(), Value::String(m.role.clone()));
            let content = match (&m.content, multimodal) {
                (Value::Array(parts), true) => Value::Array(template_parts(parts)?),
                (other, _) => Value::String(text_content(other, multimodal)?),
            };
            obj.insert("content".into(), content);
            msgs.push(Value::Object(obj));
        }
        let mut ctx = serde_json::Map::new();
        for (k, v) in &options.template_kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::Array(msgs));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(options.add_generation_prompt),
        );
        if let Some(b) = &self.bos_token {
            ctx.entry("bos_token").or_insert(Value::String(b.clone()));
        }
        if let Some(e) = &self.eos_token {
            ctx.entry("eos_token").or_insert(Value::String(e.clone()));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let mut rendered = tmpl
            .render(JinjaValue::from_serialize(Value::Object(ctx)))
            .map_err(|e| {
                EngineError::Template(format!("chat template failed: {}", jinja_message(&e)))
            })?;
        if options.continue_final_message {
            let last = messages.last().ok_or_else(|| {
                EngineError::validation("continue_final_message needs at least one message")
            })?;
            let final_text = text_content(&last.content, multimodal)?;
            // As transformers: cut everything the template adds after the final message.
            if let Some(pos) = rendered.rfind(&final_text) {
                rendered.truncate(pos + final_text.len());
            } else if let Some(pos) = rendered.rfind(final_text.trim()) {
                rendered.truncate(pos + final_text.trim().len());
            } else {
                return Err(EngineError::validation(
                    "continue_final_message is set but the final message does not appear in the rendered chat",
                ));
            }
        }
        Ok(rendered)
    }
}

fn jinja_message(e: &JinjaError) -> String {
    match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => format!("{e:#}"),
    }
}

/// Content parts as a multimodal template expects them.
fn template_parts(parts: &[Value]) -> Result<Vec<Value>> {
    parts
        .iter()
        .map(|part| {
            Ok(match media_of(part)? {
                Some(m) => serde_json::json!({"type": if m.is_video { "video" } else { "image" }}),
                None => serde_json::json!({"type": "text", "text": part_text(part)?}),
            })
        })
        .collect()
}

fn part_text(part: &Value) -> Result<String> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or("text");
    match kind {
        "text" | "input_text" => part
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| EngineError::validation("a text content part needs a `text` string")),
        other => Err(EngineError::validation(format!(
            "content part of type `{other}` is not supported"
        ))),
    }
}

/// A message's content as text: strings as they are, text parts joined by
/// newlines (media parts are skipped when the model takes them).
fn text_content(content: &Value, multimodal: bool) -> Result<String> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                if media_of(part)?.is_some() {
                    if multimodal {
                        continue;
                    }
                    let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                    return Err(EngineError::validation(format!(
                        "content part of type `{kind}` is not supported by this text-only model"
                    )));
                }
                texts.push(part_text(part)?);
            }
            Ok(texts.join("\n"))
        }
        _ => Err(EngineError::validation(
            "message content must be a string or a list of content parts",
        )),
    }
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)` as Python writes it.
fn python_json_dumps(v: &Value, indent: Option<usize>) -> String {
    fn write(v: &Value, indent: Option<usize>, level: usize, out: &mut String) {
        let newline = |out: &mut String, level: usize| {
            if let Some(n) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * level));
            }
        };
        match v {
            Value::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        if indent.is_none() {
                            out.push(' ');
                        }
                    }
                    newline(out, level + 1);
                    write(it, indent, level + 1, out);
                }
                newline(out, level);
                out.push(']');
            }
            Value::Object(map) if !map.is_empty() => {
                out.push('{');
                for (i, (k, it)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        if indent.is_none() {
                            out.push(' ');
                        }
                    }
                    newline(out, level + 1);
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push_str(": ");
                    write(it, indent, level + 1, out);
                }
                newline(out, level);
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, indent, 0, &mut out);
    out
}

/// `datetime.now().strftime(fmt)` for the directives chat templates use.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: json!(content),
            extra: Default::default(),
        }
    }

    #[test]
    fn renders_with_python_methods_and_continuation() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
            None,
            None,
        )
        .unwrap();
        let msgs = vec![msg("user", " hi "), msg("assistant", "hello")];
        let plain = t.render(&msgs, &ChatOptions::default(), false).unwrap();
        assert_eq!(plain, "<|user|>hi<|end|>\n<|assistant|>hello<|end|>\n");
        let cont = t
            .render(
                &msgs,
                &ChatOptions {
                    continue_final_message: true,
                    ..Default::default()
                },
                false,
            )
            .unwrap();
        assert_eq!(cont, "<|user|>hi<|end|>\n<|assistant|>hello");
        let both = ChatOptions {
            continue_final_message: true,
            add_generation_prompt: true,
            ..Default::default()
        };
        assert!(t.render(&msgs, &both, false).is_err());
    }

    #[test]
    fn raise_exception_surfaces_message() {
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let err = t
            .render(&[msg("user", "x")], &ChatOptions::default(), false)
            .unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn tojson_matches_python() {
        assert_eq!(
            python_json_dumps(&json!({"a":[1,"é<"],"b":{}}), None),
            "{\"a\": [1, \"é<\"], \"b\": {}}"
        );
        assert_eq!(
            python_json_dumps(&json!({"a":[1]}), Some(2)),
            "{\n  \"a\": [\n    1\n  ]\n}"
        );
    }
}
