//! Names of the metric series the trainer reports and the coordinator
//! reads for a run's progress. Other series are stored and served too; only
//! these have a meaning to the coordinator.

/// Training loss at each logged step.
pub const LOSS: &str = "train/loss";

/// Images per second over all ranks of the attempt.
pub const IMAGES_PER_SEC: &str = "train/images_per_sec";

/// Mean loss since the previous logged step.
pub const LOSS_AVG: &str = "train/loss_avg";

/// Learning rate of the step.
pub const LR: &str = "train/lr";

/// Weight decay of the step.
pub const WEIGHT_DECAY: &str = "train/weight_decay";

/// EMA momentum of the step.
pub const MOMENTUM: &str = "train/momentum";

/// Share of wall time spent waiting for data, in [0, 1].
pub const DATA_WAIT: &str = "train/data_wait";

/// RankMe of the target features.
pub const RANKME: &str = "eval/rankme";

/// Top-1 of the average-pooled linear probe, in [0, 1].
pub const PROBE_TOP1: &str = "eval/probe_top1";

/// Top-1 of the pooled linear probe (kernel and stride of the spec), in [0, 1].
pub const POOLED_PROBE_TOP1: &str = "eval/pooled_probe_top1";

/// Longest series name the coordinator accepts, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a series name: 1 to [`MAX_NAME_LEN`] bytes, no control characters.
///
/// # Errors
///
/// Returns a message saying what is wrong.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("series name must be 1 to {MAX_NAME_LEN} bytes, got {}", name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("series name {name:?} holds a control character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name(LOSS).is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a\u{0}b").is_err());
        assert!(check_name(&"x".repeat(129)).is_err());
    }
}
