//! `POST /pooling` (spec §6.5): the raw pooled output, as JSON floats, base64
//! or a binary body.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};
use verdict_engine::{PooledData, PoolingTask};

use crate::error::ApiError;
use crate::fields::Body;
use crate::protocol::{
    json_floats, json_response, run_prompts, tokenize_prompts, total_tokens, CommonFields,
    ListResponse, PromptRequest, RequestOutcome,
};
use crate::state::{response_id, unix_now, AppState};

const TASKS: &[&str] = &[
    "classify",
    "token_classify",
    "embed",
    "token_embed",
    "plugin",
    "embed&token_classify",
];
const ENCODING_FORMATS: &[&str] = &["float", "base64", "bytes", "bytes_only"];
const EMBED_DTYPES: &[&str] = &["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"];
const ENDIANNESS: &[&str] = &["native", "big", "little"];

#[derive(Serialize)]
#[serde(untagged)]
enum PooledJson {
    Vector(Vec<f64>),
    Matrix(Vec<Vec<f64>>),
    Base64(String),
}

#[derive(Serialize)]
struct PoolingItem {
    index: usize,
    object: &'static str,
    data: PooledJson,
}

json_route!(pooling_route => pooling);

pub async fn pooling(
    state: &AppState,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<Response, ApiError> {
    // A body with `data` and no prompt is an IO-processor (plugin) request.
    if body.has("data") && !body.has("input") && !body.has("messages") {
        let model = body.opt_str("model")?;
        state.check_model(model.as_deref())?;
        state.engine.check_task(PoolingTask::Plugin, true)?;
    }
    if body.has("normalize") {
        return Err(ApiError::bad_request_param(
            "Parameter `normalize` was removed; use `use_activation` instead.",
            "normalize",
        ));
    }
    let common = CommonFields::parse(&mut body)?;
    let task = parse_task(&mut body)?;
    let encoding_format = body
        .opt_literal("encoding_format", ENCODING_FORMATS)?
        .unwrap_or("float");
    let embed_dtype = body
        .opt_literal("embed_dtype", EMBED_DTYPES)?
        .unwrap_or("float32");
    let endianness = body
        .opt_literal("endianness", ENDIANNESS)?
        .unwrap_or("native");
    let dimensions = body.opt_i64("dimensions")?;
    let request = PromptRequest::parse(&mut body, state)?;

    let selection = state.check_model(common.model.as_deref())?;
    let task = task.unwrap_or(state.info.task);
    state.engine.check_task(task, true)?;
    state.engine.check_step_params(task, &common.step)?;
    if dimensions.is_some() {
        return Err(ApiError::bad_request(
            "dimensions is currently not supported",
        ));
    }

    let prompts = tokenize_prompts(state, request, &common).await?;
    let outputs = run_prompts(state, prompts, &common, &selection).await?;
    let prompt_tokens = total_tokens(&outputs);
    let outcome = RequestOutcome {
        sequences: outputs.len(),
        prompt_tokens,
    };
    let id = response_id("pooling-", headers);
    let created = unix_now();

    if encoding_format == "bytes" || encoding_format == "bytes_only" {
        let mut body_bytes = Vec::new();
        let mut items = Vec::with_capacity(outputs.len());
        for (index, output) in outputs.iter().enumerate() {
            let start = body_bytes.len();
            body_bytes.extend(encode_values(
                &output.data.flatten(),
                embed_dtype,
                endianness,
            ));
            items.push(json!({
                "index": index,
                "embed_dtype": embed_dtype,
                "endianness": endianness,
                "start": start,
                "end": body_bytes.len(),
                "shape": output.data.shape(),
            }));
        }
        let mut response = (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/octet-stream")],
            body_bytes,
        )
            .into_response();
        if encoding_format == "bytes" {
            let metadata = json!({
                "id": id,
                "created": created,
                "model": selection.name,
                "data": items,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            });
            let value = HeaderValue::from_str(&metadata.to_string())
                .map_err(|e| ApiError::internal(format!("metadata header: {e}")))?;
            response.headers_mut().insert("metadata", value);
        }
        response.extensions_mut().insert(outcome);
        return Ok(response);
    }

    let mut data = Vec::with_capacity(outputs.len());
    for (index, output) in outputs.iter().enumerate() {
        let pooled = if encoding_format == "base64" {
            PooledJson::Base64(
                base64::engine::general_purpose::STANDARD.encode(encode_values(
                    &output.data.flatten(),
                    embed_dtype,
                    endianness,
                )),
            )
        } else {
            match &output.data {
                PooledData::Vector(v) => PooledJson::Vector(json_floats(v)?),
                PooledData::Matrix(rows) => PooledJson::Matrix(
                    rows.iter()
                        .map(|r| json_floats(r))
                        .collect::<Result<_, _>>()?,
                ),
            }
        };
        data.push(PoolingItem {
            index,
            object: "pooling",
            data: pooled,
        });
    }
    let response = ListResponse::new(id, created, &selection.name, data, prompt_tokens);
    Ok(json_response(&response, outcome))
}

fn parse_task(body: &mut Body) -> Result<Option<PoolingTask>, ApiError> {
    match body.peek("task").and_then(Value::as_str) {
        Some("score") => {
            return Err(ApiError::bad_request_param(
                "`score` task was removed; use `classify` instead.",
                "task",
            ))
        }
        Some("encode") => {
            return Err(ApiError::bad_request_param(
                "`encode` task was removed; use `token_embed` or `token_classify` instead.",
                "task",
            ))
        }
        _ => {}
    }
    Ok(body
        .opt_literal("task", TASKS)?
        .and_then(PoolingTask::parse))
}

/// The flattened values as raw bytes in the requested dtype and byte order.
pub fn encode_values(values: &[f32], dtype: &str, endianness: &str) -> Vec<u8> {
    let big = match endianness {
        "big" => true,
        "little" => false,
        _ => cfg!(target_endian = "big"),
    };
    let mut out = Vec::with_capacity(values.len() * 4);
    for &v in values {
        match dtype {
            "float16" => {
                let bits = half::f16::from_f32(v).to_bits();
                out.extend(if big {
                    bits.to_be_bytes()
                } else {
                    bits.to_le_bytes()
                });
            }
            "bfloat16" => {
                let bits = half::bf16::from_f32(v).to_bits();
                out.extend(if big {
                    bits.to_be_bytes()
                } else {
                    bits.to_le_bytes()
                });
            }
            "fp8_e4m3" => out.push(fp8_from_f32(v, Fp8::E4M3Fn)),
            "fp8_e5m2" => out.push(fp8_from_f32(v, Fp8::E5M2)),
            _ => out.extend(if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }),
        }
    }
    out
}

/// torch's float8 formats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fp8 {
    /// 4 exponent bits (bias 7), 3 mantissa bits, no infinities, max 448.
    E4M3Fn,
    /// 5 exponent bits (bias 15), 2 mantissa bits, IEEE-like with infinities.
    E5M2,
}

/// Rounds to nearest-even as torch's `tensor.to(float8_*)` does: E4M3Fn
/// turns overflow into NaN, E5M2 into infinity.
pub fn fp8_from_f32(v: f32, format: Fp8) -> u8 {
    let (mantissa_bits, bias, nan): (i32, i32, u8) = match format {
        Fp8::E4M3Fn => (3, 7, 0x7F),
        Fp8::E5M2 => (2, 15, 0x7F),
    };
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    if v.is_nan() {
        return sign | nan;
    }
    let overflow = match format {
        Fp8::E4M3Fn => sign | 0x7F,
        Fp8::E5M2 => sign | 0x7C,
    };
    if v.is_infinite() {
        return overflow;
    }
    let a = f64::from(v.abs());
    if a == 0.0 {
        return sign;
    }
    let min_normal_exp = 1 - bias;
    let exp = exponent_of(a).max(min_normal_exp);
    // Values are multiples of this quantum in the binade (or the subnormal range).
    let quantum = 2f64.powi(exp - mantissa_bits);
    let rounded = (a / quantum).round_ties_even() * quantum;
    let max_finite = match format {
        Fp8::E4M3Fn => 448.0,
        Fp8::E5M2 => 57344.0,
    };
    if rounded > max_finite {
        return overflow;
    }
    if rounded == 0.0 {
        return sign;
    }
    let e = exponent_of(rounded);
    if e < min_normal_exp {
        let mantissa = (rounded / 2f64.powi(min_normal_exp - mantissa_bits)) as u8;
        return sign | mantissa;
    }
    let field = (e + bias) as u8;
    let mantissa = (rounded / 2f64.powi(e - mantissa_bits)) as u32 - (1u32 << mantissa_bits);
    sign | (field << mantissa_bits) | mantissa as u8
}

/// floor(log2(a)) for a positive normal f64.
fn exponent_of(a: f64) -> i32 {
    ((a.to_bits() >> 52) & 0x7FF) as i32 - 1023
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_matches_known_encodings() {
        use Fp8::*;
        assert_eq!(fp8_from_f32(1.0, E4M3Fn), 0x38);
        assert_eq!(fp8_from_f32(-2.0, E4M3Fn), 0xC0);
        assert_eq!(fp8_from_f32(448.0, E4M3Fn), 0x7E);
        assert_eq!(fp8_from_f32(500.0, E4M3Fn), 0x7F);
        assert_eq!(fp8_from_f32(2f32.powi(-9), E4M3Fn), 0x01); // smallest subnormal
        assert_eq!(fp8_from_f32(0.3, E4M3Fn), 0x2A); // 0.3125
        assert_eq!(fp8_from_f32(1.0, E5M2), 0x3C);
        assert_eq!(fp8_from_f32(57344.0, E5M2), 0x7B);
        assert_eq!(fp8_from_f32(1e6, E5M2), 0x7C);
        assert_eq!(fp8_from_f32(2f32.powi(-16), E5M2), 0x01);
        assert_eq!(fp8_from_f32(f32::NAN, E5M2), 0x7F);
    }

    #[test]
    fn byte_orders() {
        assert_eq!(
            encode_values(&[1.0], "float32", "big"),
            vec![0x3F, 0x80, 0, 0]
        );
        assert_eq!(
            encode_values(&[1.0], "float32", "little"),
            vec![0, 0, 0x80, 0x3F]
        );
        assert_eq!(encode_values(&[1.0], "float16", "big"), vec![0x3C, 0x00]);
        assert_eq!(encode_values(&[1.0], "bfloat16", "big"), vec![0x3F, 0x80]);
    }
}
