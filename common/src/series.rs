//! Names of the metric series the trainer reports and the coordinator
//! reads for a run's progress. Other series are stored and served too; only
//! these have a meaning to the coordinator.

/// Training loss at each logged step.
pub const LOSS: &str = "train/loss";

/// Images per second over all ranks of the attempt.
pub const IMAGES_PER_SEC: &str = "train/images_per_sec";

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
