//! `verdict classify --lora PATH`: the binary classifies through a PEFT adapter
//! (with its own 5-label head and labels) and matches PEFT's outputs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `verdict classify --format jsonl` on the CPU over the `bert-cls` fixture with
/// `extra` arguments, `lines` on stdin; its output lines, parsed.
fn classify_jsonl(extra: &[std::ffi::OsString], lines: &[String]) -> Vec<Value> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args([
            "classify",
            "--device",
            "cpu",
            "--format",
            "jsonl",
            "--no-progress",
        ])
        .arg("--model")
        .arg(repo().join("fixtures/models/bert-cls"))
        .args(extra)
        .args(["--input", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running verdict");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all((lines.join("\n") + "\n").as_bytes())
        .expect("writing prompts");
    let out = child.wait_with_output().expect("waiting for verdict");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn classify_through_a_lora_adapter() {
    let adapter = repo().join("fixtures/lora/bert-topics");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("reference.json")).expect("reference.json"),
    )
    .expect("parse");
    let cases = reference["cases"].as_array().expect("cases");
    let lines: Vec<String> = cases
        .iter()
        .map(|c| {
            let mut line = serde_json::json!({"prompt_token_ids": c["input_ids"]});
            if !c["token_type_ids"].is_null() {
                line["token_type_ids"] = c["token_type_ids"].clone();
            }
            line.to_string()
        })
        .collect();
    let results = classify_jsonl(&["--lora".into(), adapter.into_os_string()], &lines);
    assert_eq!(results.len(), cases.len());
    let labels = &reference["id2label"];
    for (got, case) in results.iter().zip(cases) {
        let name = case["name"].as_str().unwrap_or("?");
        let probs: Vec<f64> = got["probs"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: {got}"))
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        let want: Vec<f64> = case["probs"]
            .as_array()
            .expect("probs")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert_eq!(probs.len(), 5, "{name}");
        for (g, w) in probs.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4, "{name}: {probs:?} vs {want:?}");
        }
        let best = (0..want.len()).fold(0, |b, i| if want[i] > want[b] { i } else { b });
        assert_eq!(got["label"], labels[best.to_string()], "{name}");
    }
}

#[test]
fn score_through_a_reranker_adapter() {
    let adapter = repo().join("fixtures/lora/xlmr-rerank");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("reference.json")).expect("reference.json"),
    )
    .expect("parse");
    let case = reference["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["kind"] == "pair")
        .expect("a pair case");
    let out = Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args(["score", "--device", "cpu"])
        .arg("--model")
        .arg(repo().join("fixtures/models/xlmr-rerank"))
        .arg("--lora")
        .arg(&adapter)
        .arg(case["text"].as_str().expect("text"))
        .arg(case["text_pair"].as_str().expect("text_pair"))
        .output()
        .expect("running verdict");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    let score = got["score"].as_f64().expect("score");
    let want = case["probs"][0].as_f64().expect("probs");
    assert!((score - want).abs() <= 1e-4, "{score} vs {want}");
}

/// JSONL lines pick adapters by `model`: base, a 3-label and a 5-label adapter
/// in one run (shared batches), each line as its own reference.
#[test]
fn jsonl_lines_pick_adapters_by_model() {
    let read = |path: PathBuf| -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("parse")
    };
    let runs: Vec<(&str, Value)> = vec![
        (
            "base",
            read(repo().join("fixtures/models/bert-cls/reference.json")),
        ),
        (
            "bert-sentiment",
            read(repo().join("fixtures/lora/bert-sentiment/reference.json")),
        ),
        (
            "bert-topics",
            read(repo().join("fixtures/lora/bert-topics/reference.json")),
        ),
    ];
    let mut lines = Vec::new();
    let mut expected = Vec::new();
    for (model, reference) in &runs {
        for case in reference["cases"].as_array().expect("cases") {
            let mut line = serde_json::json!({"prompt_token_ids": case["input_ids"]});
            if !case["token_type_ids"].is_null() {
                line["token_type_ids"] = case["token_type_ids"].clone();
            }
            if *model != "base" {
                line["model"] = Value::from(*model);
            }
            lines.push(line.to_string());
            expected.push((format!("{model}/{}", case["name"]), case["probs"].clone()));
        }
    }
    lines.push(r#"{"prompt": "x", "model": "missing"}"#.to_string());
    let lora = |name: &str| -> std::ffi::OsString {
        format!(
            "{name}={}",
            repo().join("fixtures/lora").join(name).display()
        )
        .into()
    };
    let extra = [
        "--enable-lora".into(),
        "--max-loras".into(),
        "2".into(),
        "--lora-modules".into(),
        lora("bert-sentiment"),
        lora("bert-topics"),
    ];
    let results = classify_jsonl(&extra, &lines);
    assert_eq!(results.len(), expected.len() + 1);
    for (got, (what, want)) in results.iter().zip(&expected) {
        let want: Vec<f64> = want
            .as_array()
            .expect("probs")
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        let probs: Vec<f64> = got["probs"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: {got}"))
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert_eq!(probs.len(), want.len(), "{what}");
        for (g, w) in probs.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4, "{what}: {probs:?} vs {want:?}");
        }
    }
    let last = results.last().expect("the unknown model's line");
    assert!(
        last["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("The model `missing` does not exist.")),
        "{last}"
    );
}
