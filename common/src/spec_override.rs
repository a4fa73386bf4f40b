//! Sets one field of a run spec from text, by its dotted path: the engine
//! behind `jepactl submit --set mask.context_scale=0.85:1.0` and behind the
//! axes of a sweep, which name fields the same way.
//!
//! The value is parsed by the type the field already has (integer, float,
//! boolean, string, or a `low:high` range), so every field of
//! [`RunSpec`] is reachable without a table of names here; the spec's own
//! deserialisation rejects unknown paths and bad enum names.

use crate::spec::{RunSpec, SpecError};

fn invalid(field: &str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid { field: field.to_string(), message: message.into() }
}

/// Returns a copy of `spec` with the field at `path` set to `value`.
///
/// Ranges are written `low:high` (or `low,high`); `model.preset` also
/// fills the preset's sizes. The result is not validated; call
/// [`RunSpec::validate`].
///
/// # Errors
///
/// [`SpecError::Invalid`] naming `path` when the path is unknown or the
/// value does not parse as the field's type.
pub fn set_field(spec: &RunSpec, path: &str, value: &str) -> Result<RunSpec, SpecError> {
    if path == "model.preset" {
        let model = spec.model.clone().with_preset(value)?;
        return Ok(RunSpec { model, ..spec.clone() });
    }

    let mut root = toml::Value::try_from(spec)
        .map_err(|err| invalid(path, format!("cannot serialise the spec: {err}")))?;
    let (parents, leaf) = match path.rsplit_once('.') {
        Some((parents, leaf)) => (parents.split('.').collect::<Vec<_>>(), leaf),
        None => (Vec::new(), path),
    };
    let mut table = root.as_table_mut().ok_or_else(|| invalid(path, "is not a field"))?;
    for section in parents {
        table = table
            .get_mut(section)
            .and_then(toml::Value::as_table_mut)
            .ok_or_else(|| invalid(path, format!("unknown section {section:?}")))?;
    }

    let parsed = parse_like(path, table.get(leaf), value)?;
    table.insert(leaf.to_string(), parsed);
    root.try_into::<RunSpec>().map_err(|err| invalid(path, first_line(&err.to_string())))
}

/// Parses `text` as the type of `current`; an absent field (an unset
/// optional) takes the text as a string.
fn parse_like(
    path: &str,
    current: Option<&toml::Value>,
    text: &str,
) -> Result<toml::Value, SpecError> {
    let text = text.trim();
    match current {
        Some(toml::Value::Integer(_)) => text
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| invalid(path, format!("{text:?} is not an integer"))),
        Some(toml::Value::Float(_)) => text
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| invalid(path, format!("{text:?} is not a number"))),
        Some(toml::Value::Boolean(_)) => text
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|_| invalid(path, format!("{text:?} is not true or false"))),
        Some(toml::Value::Array(_)) => parse_range(path, text),
        _ => Ok(toml::Value::String(text.to_string())),
    }
}

/// Parses `low:high`, `low,high` or `[low, high]` into a two-float array.
fn parse_range(path: &str, text: &str) -> Result<toml::Value, SpecError> {
    let inner = text.trim_start_matches('[').trim_end_matches(']');
    let parts: Vec<&str> = inner.split([':', ',']).map(str::trim).collect();
    let [low, high] = parts.as_slice() else {
        return Err(invalid(path, format!("{text:?} is not a range; write low:high")));
    };
    let parse = |s: &str| {
        s.parse::<f64>().map_err(|_| invalid(path, format!("{s:?} in {text:?} is not a number")))
    };
    Ok(toml::Value::Array(vec![toml::Value::Float(parse(low)?), toml::Value::Float(parse(high)?)]))
}

fn first_line(text: &str) -> String {
    text.lines().find(|l| !l.trim().is_empty()).unwrap_or(text).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Conditioning, DatasetKind};

    #[test]
    fn sets_ranges_enums_numbers_and_options() {
        let spec = RunSpec::default();
        let spec = set_field(&spec, "mask.context_scale", "0.4:1.0").unwrap();
        let spec = set_field(&spec, "conditioning.kind", "none").unwrap();
        let spec = set_field(&spec, "optim.lr", "0.002").unwrap();
        let spec = set_field(&spec, "schedule.steps", "50").unwrap();
        let spec = set_field(&spec, "data.dataset", "image_folder").unwrap();
        let spec = set_field(&spec, "data.path", "/data/x").unwrap();
        let spec = set_field(&spec, "eval.enabled", "false").unwrap();
        let spec = set_field(&spec, "name", "tuned").unwrap();
        assert_eq!(spec.mask.context_scale, [0.4, 1.0]);
        assert_eq!(spec.conditioning.kind, Conditioning::None);
        assert_eq!(spec.optim.lr, 0.002);
        assert_eq!(spec.schedule.steps, 50);
        assert_eq!(spec.data.dataset, DatasetKind::ImageFolder);
        assert_eq!(spec.data.path.as_deref(), Some("/data/x"));
        assert!(!spec.eval.enabled);
        assert_eq!(spec.name, "tuned");
    }

    #[test]
    fn preset_fills_sizes() {
        let spec = set_field(&RunSpec::default(), "model.preset", "tiny").unwrap();
        assert_eq!((spec.model.embed_dim, spec.model.depth), (192, 12));
    }

    #[test]
    fn errors_name_the_path() {
        let spec = RunSpec::default();
        for (path, value) in [
            ("mask.context_scal", "0.4:1.0"),
            ("mask.context_scale", "0.4"),
            ("optim.lr", "fast"),
            ("conditioning.kind", "sideways"),
            ("nosuch.field", "1"),
        ] {
            let err = set_field(&spec, path, value).unwrap_err();
            assert_eq!(err.field(), Some(path), "{err}");
        }
    }
}
