//! ARPO training for UI-TARS GUI agents.
//!
//! - [`config`]: the seed's YAML config, validated, with `--set` overrides.
//!
//! ```
//! use arpo_trainer::Config;
//!
//! let config = Config::from_yaml_str(
//!     "worker:\n  rollout:\n    n: 4\n",
//!     &["algorithm.enable_replay=false".to_string()],
//! )
//! .unwrap();
//! assert_eq!(config.worker.rollout.n, 4);
//! assert!(!config.algorithm.enable_replay);
//! ```

pub mod config;
mod error;

pub use config::Config;
pub use error::TrainerError;
