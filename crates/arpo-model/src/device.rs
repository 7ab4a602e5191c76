//! [`DeviceSpec`] and [`DTypeSpec`]: the one way a device and a weight precision are named on
//! command lines and in configs (`cpu`, `cuda`, `cuda:1`, `metal`; `f32`, `bf16`, `f16`).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// A device by name. Parsing checks the spelling only; [`DeviceSpec::open`] opens it (and says
/// which build feature is missing when this build cannot).
///
/// ```
/// use arpo_model::DeviceSpec;
///
/// assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
/// assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
/// assert!("gpu".parse::<DeviceSpec>().is_err());
/// assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (builds with the `cuda` feature).
    Cuda(usize),
    /// An Apple GPU by ordinal (builds with the `metal` feature).
    Metal(usize),
}

/// A device or precision name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {input:?}: use {allowed}")]
pub struct SpecError {
    pub what: &'static str,
    pub input: String,
    pub allowed: &'static str,
}

/// The device could not be opened.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot open {spec}: {source} (is this a build with the `{feature}` feature? e.g. `cargo run --release -p xtask --features {feature} -- ...`; or use cpu)"
)]
pub struct DeviceOpenError {
    pub spec: DeviceSpec,
    pub feature: &'static str,
    #[source]
    pub source: candle_core::Error,
}

const DEVICES: &str = "cpu, cuda, cuda:N, metal or metal:N";

impl DeviceSpec {
    /// Opens the device.
    pub fn open(self) -> Result<Device, DeviceOpenError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n).map_err(|source| DeviceOpenError {
                spec: self,
                feature: "cuda",
                source,
            }),
            Self::Metal(n) => Device::new_metal(n).map_err(|source| DeviceOpenError {
                spec: self,
                feature: "metal",
                source,
            }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SpecError {
            what: "device",
            input: s.to_owned(),
            allowed: DEVICES,
        };
        let ordinal = |rest: &str| -> Result<usize, SpecError> {
            match rest {
                "" => Ok(0),
                _ => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(bad),
            }
        };
        if s == "cpu" {
            Ok(Self::Cpu)
        } else if let Some(rest) = s.strip_prefix("cuda") {
            ordinal(rest).map(Self::Cuda)
        } else if let Some(rest) = s.strip_prefix("metal") {
            ordinal(rest).map(Self::Metal)
        } else {
            Err(bad())
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> Self {
        d.to_string()
    }
}

/// A weight precision by name: `f32`, `bf16` or `f16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DTypeSpec {
    #[default]
    F32,
    Bf16,
    F16,
}

impl DTypeSpec {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl FromStr for DTypeSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            _ => Err(SpecError {
                what: "dtype",
                input: s.to_owned(),
                allowed: "f32, bf16 or f16",
            }),
        }
    }
}

impl TryFrom<String> for DTypeSpec {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DTypeSpec> for String {
    fn from(d: DTypeSpec) -> Self {
        d.to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("metal:0", DeviceSpec::Metal(0)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        for bad in ["", "CPU", "cuda:", "cuda:x", "cuda1", "gpu", "cuda:-1"] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad:?} was accepted");
        }
        assert_eq!("bf16".parse::<DTypeSpec>().unwrap().dtype(), DType::BF16);
        assert!("fp32".parse::<DTypeSpec>().is_err());
        let d: DeviceSpec = serde_json::from_str("\"cuda:2\"").unwrap();
        assert_eq!(d, DeviceSpec::Cuda(2));
        assert!(serde_json::from_str::<DeviceSpec>("\"tpu\"").is_err());
    }
}
