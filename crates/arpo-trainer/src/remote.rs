//! Rollouts through OpenAI-compatible servers (arpo-serve, vLLM, SGLang) and the weight sync
//! that keeps them on the weights being trained (`worker.rollout.use_external_server`).

use std::path::Path;

use arpo_serve::{RemotePolicy, RemotePolicyConfig, TokenMapper, WeightSync};

use crate::TrainerError;
use crate::config::Config;
use crate::model::{CandleLearner, prompt_config};

/// The served adapter's name when the sync sends LoRA adapters.
pub const ADAPTER: &str = "arpo-policy";

/// The weight sync of `worker.rollout.weight_sync` for a run that trains LoRA (`lora`) or full
/// weights: `auto` picks `lora_adapter` or `arpo_reload`; a sync that sends the other kind of
/// weights than the run trains is refused.
pub fn weight_sync(config: &Config, lora: bool) -> Result<WeightSync, TrainerError> {
    let r = &config.worker.rollout;
    let bad = |reason: String| TrainerError::ConfigInvalid {
        problems: vec![format!(
            "worker.rollout.weight_sync {:?}: {reason}",
            r.weight_sync
        )],
    };
    let sync = match r.weight_sync.as_str() {
        "auto" if lora => WeightSync::LoraAdapter,
        "auto" => WeightSync::ArpoReload,
        other => other
            .parse::<WeightSync>()
            .map_err(|e| bad(e.to_string()))?,
    };
    if sync != WeightSync::None && sync.is_adapter() != lora {
        return Err(bad(format!(
            "it sends {} but this run trains {}: use {}",
            if sync.is_adapter() {
                "a LoRA adapter"
            } else {
                "full weights"
            },
            if lora {
                "a LoRA adapter"
            } else {
                "full weights"
            },
            if lora {
                "lora_adapter"
            } else {
                "arpo_reload (arpo-serve) or sglang_disk (SGLang)"
            },
        )));
    }
    Ok(sync)
}

/// The rollout policy of `worker.rollout`'s server(s) for evaluation (no weight sync): its URLs
/// (`server_url`, `server_urls`), model name (empty: the first `GET /v1/models` lists), API key
/// (`server_api_key`, else `ARPO_SERVER_API_KEY`), the model's tokenizer as the fallback token
/// mapper; checked to answer before it is returned.
pub async fn server_policy(config: &Config) -> Result<RemotePolicy, TrainerError> {
    checked_policy(config, &config.worker.actor.model.model_path).await
}

/// The policy of `worker.rollout`'s server(s), the tokenizer of `model_dir` as the fallback
/// token mapper, checked to answer (its model resolved when unnamed).
async fn checked_policy(config: &Config, model_dir: &Path) -> Result<RemotePolicy, TrainerError> {
    let r = &config.worker.rollout;
    let preflight = |e: String| TrainerError::Preflight {
        problems: vec![format!("worker.rollout.server_url {}: {e}", r.server_url)],
    };
    let mut remote_config =
        RemotePolicyConfig::new(r.server_url.trim_end_matches('/'), &r.server_model)
            .with_more_urls(&r.server_urls);
    if let Some(key) = r.server_api_key.clone().filter(|k| !k.is_empty()) {
        remote_config.api_key = Some(key);
    }
    remote_config.prompt = prompt_config(config);
    // Token ids of servers that do not name them (SGLang) come through the model's vocabulary.
    let mapper = TokenMapper::from_file(&model_dir.join("tokenizer.json")).ok();
    let policy = RemotePolicy::new(remote_config, mapper).map_err(|e| preflight(e.to_string()))?;
    policy
        .preflight()
        .await
        .map_err(|e| preflight(e.to_string()))?;
    Ok(policy)
}

/// Rollouts through the server(s) of `worker.rollout`: the policy, checked to answer (its model
/// resolved from `GET /v1/models` when unnamed), and the learner with a hook that pushes the new
/// weights after every update as `worker.rollout.weight_sync` says (a LoRA adapter through
/// `/v1/load_lora_adapter`, full weights through `/v1/reload_weights` or SGLang's
/// `/update_weights_from_disk`). The current weights are pushed once before returning, so the
/// first rollout already samples from them.
pub async fn remote_policy(
    config: &Config,
    mut learner: CandleLearner,
) -> Result<(RemotePolicy, CandleLearner), TrainerError> {
    let mut policy = checked_policy(config, &learner.source_dir).await?;
    let lora = learner.trainable.lora_set().is_some();
    let sync = weight_sync(config, lora)?;
    let push_dir = std::path::absolute(config.checkpoint_dir().join("server_push"))
        .map_err(|e| TrainerError::io(config.checkpoint_dir(), e))?;
    let pusher = policy.clone();
    let source = learner.source_dir.clone();
    let push =
        move |trainable: &arpo_model::train::trainable::Trainable| -> Result<(), TrainerError> {
            let what = "pushing weights to the server";
            if sync == WeightSync::None {
                return Ok(());
            }
            if lora {
                trainable
                    .save_adapter(&push_dir, &source.to_string_lossy(), None)
                    .map_err(|e| TrainerError::learner(what, e))?;
            } else {
                trainable
                    .save(&push_dir, &source, None)
                    .map_err(|e| TrainerError::learner(what, e))?;
            }
            let handle = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| {
                handle.block_on(pusher.push_weights(sync, &push_dir, ADAPTER))
            })
            .map_err(|e| TrainerError::learner(what, e))
        };
    push(&learner.trainable)?;
    if sync.is_adapter() {
        policy.set_model(ADAPTER);
    }
    learner.after_update = Some(Box::new(push));
    Ok((policy, learner))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_what_the_run_trains_and_a_mismatch_is_refused() {
        let c = |sync: &str| {
            Config::from_yaml_str("", &[format!("worker.rollout.weight_sync={sync}")]).unwrap()
        };
        assert_eq!(
            weight_sync(&c("auto"), true).unwrap(),
            WeightSync::LoraAdapter
        );
        assert_eq!(
            weight_sync(&c("auto"), false).unwrap(),
            WeightSync::ArpoReload
        );
        assert_eq!(
            weight_sync(&c("sglang_disk"), false).unwrap(),
            WeightSync::SglangDisk
        );
        assert_eq!(weight_sync(&c("none"), true).unwrap(), WeightSync::None);
        let err = weight_sync(&c("lora_adapter"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("arpo_reload"), "{err}");
        assert!(weight_sync(&c("rsync"), false).is_err());
    }
}
