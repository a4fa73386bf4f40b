//! Configuration of the coordinator process: a TOML file whose every key
//! has a default that suits one machine, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Which store backs the coordinator's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// sled in `data_dir`; survives restarts.
    #[default]
    Sled,
    /// Process memory; lost on exit. For tests and benchmarks.
    Memory,
}

/// Everything the coordinator reads at start-up.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// Folder of the sled store.
    pub data_dir: PathBuf,
    /// Store backend.
    pub store: StoreKind,
    /// How long a worker's lease lasts without a heartbeat, in ms.
    pub lease_timeout_ms: u64,
    /// Heartbeat interval handed to workers, in ms; below the lease timeout.
    pub heartbeat_interval_ms: u64,
    /// How often expired leases are looked for, in ms.
    pub reap_interval_ms: u64,
    /// How long a rank waits for rank 0's rendezvous data, in ms.
    pub rendezvous_timeout_ms: u64,
    /// Largest checkpoint chunk accepted in one upload message, in bytes.
    pub checkpoint_chunk_bytes: usize,
    /// Largest checkpoint accepted, in bytes.
    pub max_checkpoint_bytes: u64,
    /// Events a watcher may fall behind before it gets a fresh snapshot.
    pub watch_buffer: usize,
    /// Emit logs as JSON lines.
    pub log_json: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from(".data/coordinator"),
            store: StoreKind::Sled,
            lease_timeout_ms: 15_000,
            heartbeat_interval_ms: 5_000,
            reap_interval_ms: 1_000,
            rendezvous_timeout_ms: 30_000,
            checkpoint_chunk_bytes: 1 << 20,
            max_checkpoint_bytes: 64 << 30,
            watch_buffer: 4096,
            log_json: false,
        }
    }
}

/// Errors of loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range.
    #[error("{field}: {message}")]
    Invalid {
        /// The key.
        field: &'static str,
        /// What is allowed.
        message: String,
    },
}

impl CoordinatorConfig {
    /// Reads a TOML config file; missing keys take their defaults.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be read or parsed, or a value is out of
    /// range.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
        let config: CoordinatorConfig = toml::from_str(&text).map_err(|err| {
            ConfigError::Parse { path: path.display().to_string(), message: err.to_string() }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between values.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        if self.lease_timeout_ms == 0 {
            return invalid("lease_timeout_ms", "must be above 0".into());
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms >= self.lease_timeout_ms {
            return invalid(
                "heartbeat_interval_ms",
                format!("must lie in 1 to {} (below lease_timeout_ms)", self.lease_timeout_ms - 1),
            );
        }
        if self.reap_interval_ms == 0 {
            return invalid("reap_interval_ms", "must be above 0".into());
        }
        if !(1024..=(16 << 20)).contains(&self.checkpoint_chunk_bytes) {
            return invalid("checkpoint_chunk_bytes", "must lie in 1024 to 16777216".into());
        }
        if self.watch_buffer == 0 {
            return invalid("watch_buffer", "must be above 0".into());
        }
        Ok(())
    }

    /// The lease timeout as a duration.
    pub fn lease_timeout(&self) -> Duration {
        Duration::from_millis(self.lease_timeout_ms)
    }
}

pub use jepa_common::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        CoordinatorConfig::default().validate().unwrap();
    }

    #[test]
    fn file_overrides_some_keys_and_rejects_unknown_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lease_timeout_ms = 3000\nheartbeat_interval_ms = 1000\n").unwrap();
        let config = CoordinatorConfig::load(&path).unwrap();
        assert_eq!(config.lease_timeout_ms, 3000);
        assert_eq!(config.reap_interval_ms, 1000);
        std::fs::write(&path, "lease_timeout = 3\n").unwrap();
        assert!(matches!(CoordinatorConfig::load(&path), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn the_example_config_holds_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator.toml");
        assert_eq!(CoordinatorConfig::load(&path).unwrap(), CoordinatorConfig::default());
    }

    #[test]
    fn heartbeat_must_be_shorter_than_the_lease() {
        let config = CoordinatorConfig { heartbeat_interval_ms: 20_000, ..Default::default() };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::Invalid { field: "heartbeat_interval_ms", .. })
        ));
    }
}
