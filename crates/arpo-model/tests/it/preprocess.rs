//! The image processor and the chat template/tokenizer against transformers' outputs.

use crate::common::*;
use arpo_core::{ChatMessage, ContentPart, Role, Screenshot};
use arpo_model::processor::decode_image;
use arpo_model::{ChatTokenizer, ImageProcessor, PreprocessorConfig};
use candle_core::Device;

fn image_bytes(name: &str) -> Vec<u8> {
    std::fs::read(golden_dir().join("images").join(name)).expect("fixture image")
}

fn processor() -> ImageProcessor {
    ImageProcessor::new(
        PreprocessorConfig::from_file(&model_dir().join("preprocessor_config.json")).unwrap(),
    )
}

#[test]
fn pixel_values_match_qwen2vl_image_processor() {
    let golden = golden();
    let want =
        candle_core::safetensors::load(golden_dir().join("processor.safetensors"), &Device::Cpu)
            .unwrap();
    let proc = processor();
    for (key, needs_resize) in [
        ("a_56x84", false),
        ("b_112x56", false),
        ("c_101x75", true),
        ("d_300x200", true),
    ] {
        let img = decode_image(&image_bytes(&format!("{key}.png"))).unwrap();
        let out = proc.preprocess(&[img], &Device::Cpu).unwrap();
        assert_eq!(
            out.grid_thw,
            grids(&serde_json::json!([golden["processor"][key]])),
            "{key}"
        );
        // PIL's bicubic reproduced exactly: same numbers as the PIL-backed processor.
        assert_close(
            &format!("{key} vs PIL"),
            &out.pixel_values,
            &want[&format!("{key}_pil")],
            0.0,
            1e-5,
        );
        // The default (torchvision) processor resamples slightly differently.
        let tol = if needs_resize { 2e-2 } else { 1e-5 };
        assert_close(
            &format!("{key} vs torchvision"),
            &out.pixel_values,
            &want[key],
            0.0,
            tol,
        );
    }
}

fn messages(case: &serde_json::Value) -> Vec<ChatMessage> {
    let mut images = case["images"].as_array().unwrap().iter();
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                _ => Role::Assistant,
            };
            let content = m["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p["type"].as_str().unwrap() {
                    "text" => ContentPart::Text {
                        text: p["text"].as_str().unwrap().to_string(),
                    },
                    _ => {
                        let name = images.next().unwrap().as_str().unwrap();
                        let img = decode_image(&image_bytes(name)).unwrap();
                        ContentPart::Image {
                            image: Screenshot::new(image_bytes(name), img.width(), img.height()),
                        }
                    }
                })
                .collect();
            ChatMessage { role, content }
        })
        .collect()
}

#[test]
fn chat_template_and_tokens_match_transformers() {
    let golden = golden();
    let tok = ChatTokenizer::from_dir(&model_dir()).unwrap();
    let proc = processor();
    for case in ["text_only", "one_image", "two_images"] {
        let g = &golden["cases"][case];
        let msgs = messages(g);
        let rendered = tok.render(&msgs, true).unwrap();
        let counts: Vec<usize> = msgs
            .iter()
            .flat_map(|m| m.images())
            .map(|s| proc.num_image_tokens(s.height, s.width).unwrap())
            .collect();
        let chat = tok.encode_chat(&msgs, &counts, true).unwrap();
        assert_eq!(chat.ids, ids(&g["input_ids"]), "{case}: input ids");
        let prompt = g["prompt"].as_str().unwrap();
        assert_eq!(
            rendered.replace("<|image_pad|>", ""),
            prompt.replace("<|image_pad|>", ""),
            "{case}: rendered template"
        );
        assert_eq!(chat.image_spans.len(), counts.len());
        if case == "two_images" {
            // Only the assistant turn's content and its <|im_end|> are masked in.
            let masked: Vec<u32> = chat
                .ids
                .iter()
                .zip(&chat.assistant_mask)
                .filter(|(_, m)| **m)
                .map(|(i, _)| *i)
                .collect();
            let mut want = tok.encode("Action: click(start_box='(100,200)')").unwrap();
            want.push(tok.im_end_id);
            assert_eq!(masked, want);
        } else {
            assert!(chat.assistant_mask.iter().all(|m| !m));
        }
    }
}
