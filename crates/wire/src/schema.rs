//! JSON Schemas (2020-12) for event data, loaded from `schemas/<category>/<Type>.v<N>.json`.
//!
//! A category with a schemas folder is strict: an event type it does not declare is
//! refused. The newest version of a type validates writes; upcasters registered
//! with [`SchemaRegistry::register_upcaster`] turn data written under an older
//! version into the current shape on read.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::stream::is_valid_category;

/// The schemas shipped with esk, compiled in so that a binary works without the
/// repository at hand. `builtin_matches_schemas_dir` keeps this list honest.
const BUILTIN: &[(&str, &str)] = &[
    ("account/AccountOpened.v1.json", include_str!("../../../schemas/account/AccountOpened.v1.json")),
    ("account/Deposited.v1.json", include_str!("../../../schemas/account/Deposited.v1.json")),
    ("account/Withdrawn.v1.json", include_str!("../../../schemas/account/Withdrawn.v1.json")),
    ("account/HoldPlaced.v1.json", include_str!("../../../schemas/account/HoldPlaced.v1.json")),
    ("account/HoldReleased.v1.json", include_str!("../../../schemas/account/HoldReleased.v1.json")),
    ("inventory/StockAdded.v1.json", include_str!("../../../schemas/inventory/StockAdded.v1.json")),
    ("inventory/StockReserved.v1.json", include_str!("../../../schemas/inventory/StockReserved.v1.json")),
    ("inventory/StockReleased.v1.json", include_str!("../../../schemas/inventory/StockReleased.v1.json")),
    ("inventory/ReservationHeld.v1.json", include_str!("../../../schemas/inventory/ReservationHeld.v1.json")),
    ("inventory/ReservationReleased.v1.json", include_str!("../../../schemas/inventory/ReservationReleased.v1.json")),
];

/// Turns data of version `from` into data of version `from + 1`.
pub type Upcaster = Box<dyn Fn(Value) -> Result<Value, String> + Send + Sync>;

/// Every schema esk knows, by category, type and version.
#[derive(Default)]
pub struct SchemaRegistry {
    categories: BTreeMap<String, BTreeMap<String, BTreeMap<u32, Schema>>>,
    by_uri: HashMap<String, (String, String, u32)>,
    upcasters: HashMap<(String, String, u32), Upcaster>,
}

struct Schema {
    uri: String,
    validator: jsonschema::Validator,
}

impl fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (cat, types) in &self.categories {
            m.entry(cat, &types.keys().collect::<Vec<_>>());
        }
        m.finish()
    }
}

/// A schema file that cannot be used. Raised when loading, never on the write path.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: schema files are named <category>/<Type>.v<N>.json, e.g. account/Deposited.v1.json")]
    FileName { path: PathBuf },
    #[error("{path}: not JSON: {reason}")]
    Json { path: PathBuf, reason: String },
    #[error("{path}: not a valid JSON Schema: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Event data that a strict category refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error(
        "unknown event type '{event_type}' in strict category '{category}' (known: {})",
        known.join(", ")
    )]
    UnknownType { category: String, event_type: String, known: Vec<String> },
    #[error("{event_type} data does not match {schema}: {}", errors.join("; "))]
    Violation { event_type: String, schema: String, errors: Vec<String> },
}

impl SchemaRegistry {
    /// A registry that knows no category: every category is open.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The schemas shipped with esk (the `account` category and its kin).
    pub fn builtin() -> Self {
        let mut reg = Self::default();
        for (path, text) in BUILTIN {
            reg.add_file(Path::new(path), text).unwrap_or_else(|e| panic!("shipped schema {path} is broken: {e}"));
        }
        reg
    }

    /// The built-in schemas and, when `dir` is given, every schema below it
    /// beside them (a file for a type and version already known replaces
    /// it): what `--schemas-dir` means for every esk program.
    pub fn with_dir(dir: Option<&Path>) -> Result<Self, SchemaError> {
        let mut reg = Self::builtin();
        if let Some(dir) = dir {
            reg.add_dir(dir)?;
        }
        Ok(reg)
    }

    /// The built-in schemas of `builtin` categories only (those a program runs
    /// esk's own aggregates or models for) and every schema below `dir`: a
    /// category of a service's own is held to its own schemas or none, even
    /// when it is named like a built-in one.
    pub fn with_dir_for(dir: Option<&Path>, builtin: &[&str]) -> Result<Self, SchemaError> {
        let mut reg = Self::default();
        for (path, text) in BUILTIN {
            if builtin.iter().any(|c| path.starts_with(&format!("{c}/"))) {
                reg.add_file(Path::new(path), text).unwrap_or_else(|e| panic!("shipped schema {path} is broken: {e}"));
            }
        }
        if let Some(dir) = dir {
            reg.add_dir(dir)?;
        }
        Ok(reg)
    }

    /// Loads every `<category>/<Type>.v<N>.json` below `dir`, and nothing else.
    pub fn load_dir(dir: &Path) -> Result<Self, SchemaError> {
        let mut reg = Self::default();
        reg.add_dir(dir)?;
        Ok(reg)
    }

    /// Adds every `<category>/<Type>.v<N>.json` below `dir` to this registry (a
    /// file for a type and version already known replaces it).
    pub fn add_dir(&mut self, dir: &Path) -> Result<(), SchemaError> {
        let io = |path: &Path, e: std::io::Error| SchemaError::Io { path: path.to_owned(), reason: e.to_string() };
        let reg = self;
        let mut entries: Vec<_> =
            std::fs::read_dir(dir).map_err(|e| io(dir, e))?.collect::<Result<_, _>>().map_err(|e| io(dir, e))?;
        entries.sort_by_key(|e| e.path());
        for cat in entries {
            let cat_path = cat.path();
            if !cat_path.is_dir() {
                continue;
            }
            let mut files: Vec<_> = std::fs::read_dir(&cat_path)
                .map_err(|e| io(&cat_path, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| io(&cat_path, e))?;
            files.sort_by_key(|e| e.path());
            for file in files {
                let path = file.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
                let rel = path.strip_prefix(dir).unwrap_or(&path).to_owned();
                reg.add_file(&rel, &text).map_err(|e| match e {
                    SchemaError::FileName { .. } => SchemaError::FileName { path: path.clone() },
                    other => other,
                })?;
            }
        }
        Ok(())
    }

    /// Adds one schema file given by its path relative to the schemas root.
    fn add_file(&mut self, rel: &Path, text: &str) -> Result<(), SchemaError> {
        let bad_name = || SchemaError::FileName { path: rel.to_owned() };
        let mut parts = rel.iter().map(|p| p.to_str());
        let (Some(Some(category)), Some(Some(file)), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad_name());
        };
        let stem = file.strip_suffix(".json").ok_or_else(bad_name)?;
        let (event_type, version) = stem.rsplit_once(".v").ok_or_else(bad_name)?;
        let version: u32 = version.parse().map_err(|_| bad_name())?;
        if !is_valid_category(category) || !is_type_name(event_type) || version == 0 {
            return Err(bad_name());
        }
        let schema: Value = serde_json::from_str(text)
            .map_err(|e| SchemaError::Json { path: rel.to_owned(), reason: e.to_string() })?;
        self.add(category, event_type, version, &schema)
            .map_err(|reason| SchemaError::Invalid { path: rel.to_owned(), reason })
    }

    /// Registers a schema; its URI is its `$id`, else `urn:esk:schema:<category>:<Type>:v<N>`.
    pub fn add(&mut self, category: &str, event_type: &str, version: u32, schema: &Value) -> Result<(), String> {
        let validator = jsonschema::draft202012::new(schema).map_err(|e| e.to_string())?;
        let uri = schema
            .get("$id")
            .and_then(Value::as_str)
            .map_or_else(|| format!("urn:esk:schema:{category}:{event_type}:v{version}"), str::to_owned);
        self.by_uri.insert(uri.clone(), (category.to_owned(), event_type.to_owned(), version));
        self.categories
            .entry(category.to_owned())
            .or_default()
            .entry(event_type.to_owned())
            .or_default()
            .insert(version, Schema { uri, validator });
        Ok(())
    }

    /// Whether the category declares its types (and so refuses others).
    pub fn is_strict(&self, category: &str) -> bool {
        self.categories.contains_key(category)
    }

    /// The categories that have schemas.
    pub fn categories(&self) -> impl Iterator<Item = &str> {
        self.categories.keys().map(String::as_str)
    }

    /// Validates event data for a write. Returns the URI of the schema that
    /// validated it (for `ce_dataschema`), or `None` for an open category.
    pub fn validate(&self, category: &str, event_type: &str, data: &Value) -> Result<Option<&str>, ValidationError> {
        let Some(types) = self.categories.get(category) else {
            return Ok(None);
        };
        let Some((_, schema)) = types.get(event_type).and_then(|v| v.iter().next_back()) else {
            return Err(ValidationError::UnknownType {
                category: category.to_owned(),
                event_type: event_type.to_owned(),
                known: types.keys().cloned().collect(),
            });
        };
        let errors: Vec<String> = schema
            .validator
            .iter_errors(data)
            .take(5)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() { e.to_string() } else { format!("{at}: {e}") }
            })
            .collect();
        if errors.is_empty() {
            Ok(Some(&schema.uri))
        } else {
            Err(ValidationError::Violation { event_type: event_type.to_owned(), schema: schema.uri.clone(), errors })
        }
    }

    /// Registers a function that turns `category/event_type` data of version
    /// `from` into version `from + 1`.
    pub fn register_upcaster(
        &mut self,
        category: &str,
        event_type: &str,
        from: u32,
        f: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) {
        self.upcasters.insert((category.to_owned(), event_type.to_owned(), from), Box::new(f));
    }

    /// Brings data written under `data_schema` up to the current version of its
    /// type. Data without a known schema is returned as it is.
    pub fn upcast(&self, data_schema: Option<&str>, data: Value) -> Result<(Value, Option<String>), String> {
        let Some((category, event_type, mut version)) = data_schema.and_then(|u| self.by_uri.get(u)).cloned() else {
            return Ok((data, data_schema.map(str::to_owned)));
        };
        let versions = &self.categories[&category][&event_type];
        let current = *versions.keys().next_back().expect("a registered type has a version");
        let mut data = data;
        while version < current {
            let key = (category.clone(), event_type.clone(), version);
            let f = self
                .upcasters
                .get(&key)
                .ok_or_else(|| format!("no upcaster from {category}/{event_type} v{version} to v{}", version + 1))?;
            data = f(data)?;
            version += 1;
        }
        Ok((data, Some(versions[&current].uri.clone())))
    }
}

fn is_type_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic()) && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builtin_matches_schemas_dir() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let from_disk = SchemaRegistry::load_dir(&dir).unwrap();
        let builtin = SchemaRegistry::builtin();
        assert_eq!(format!("{from_disk:?}"), format!("{builtin:?}"), "update BUILTIN in schema.rs");
        assert_eq!(from_disk.by_uri.len(), BUILTIN.len(), "update BUILTIN in schema.rs");
    }

    #[test]
    fn a_schemas_dir_adds_to_the_builtin_schemas() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shop")).unwrap();
        std::fs::write(dir.path().join("shop/Bought.v1.json"), r#"{"type": "object"}"#).unwrap();
        let reg = SchemaRegistry::with_dir(Some(dir.path())).unwrap();
        assert!(reg.is_strict("shop"));
        assert!(reg.is_strict("account"), "the built-in categories keep their schemas");
        assert!(reg.validate("account", "Deposited", &json!({"amount": 0})).is_err());
        assert_eq!(
            format!("{:?}", SchemaRegistry::with_dir(None).unwrap()),
            format!("{:?}", SchemaRegistry::builtin())
        );
    }

    #[test]
    fn account_schemas_validate() {
        let only = SchemaRegistry::with_dir_for(None, &["inventory"]).unwrap();
        assert!(only.is_strict("inventory") && !only.is_strict("account"), "only the categories named");
        assert!(only.validate("account", "AnythingAtAll", &serde_json::json!({})).is_ok());
        let reg = SchemaRegistry::builtin();
        assert!(reg.is_strict("account"));
        assert_eq!(
            reg.validate("account", "Deposited", &json!({"amount": 5})).unwrap(),
            Some("urn:esk:schema:account:Deposited:v1")
        );
        assert!(reg.validate("account", "AccountOpened", &json!({"owner": "ann"})).is_ok());
        for bad in [json!({"amount": 0}), json!({"amount": "5"}), json!({}), json!({"amount": 1, "x": 1})] {
            let err = reg.validate("account", "Deposited", &bad).unwrap_err();
            assert!(matches!(err, ValidationError::Violation { .. }), "{bad}: {err}");
        }
        let err = reg.validate("account", "AccountOpened", &json!({"owner": ""})).unwrap_err();
        assert!(err.to_string().contains("/owner"), "{err}");
        let err = reg.validate("account", "Stolen", &json!({})).unwrap_err();
        assert!(err.to_string().contains("unknown event type 'Stolen'"), "{err}");
        // An open category takes anything.
        assert_eq!(reg.validate("note", "Anything", &json!(1)).unwrap(), None);
    }

    #[test]
    fn upcasters_bring_old_data_to_the_current_version() {
        let mut reg = SchemaRegistry::empty();
        reg.add("user", "Named", 1, &json!({"type": "object", "required": ["name"]})).unwrap();
        reg.add("user", "Named", 2, &json!({"type": "object", "required": ["first", "last"]})).unwrap();
        reg.register_upcaster("user", "Named", 1, |mut v| {
            let name = v["name"].as_str().ok_or("name is not a string")?.to_owned();
            let (first, last) = name.split_once(' ').unwrap_or((&name, ""));
            v = json!({"first": first, "last": last});
            Ok(v)
        });
        let (data, schema) = reg.upcast(Some("urn:esk:schema:user:Named:v1"), json!({"name": "Ada Lovelace"})).unwrap();
        assert_eq!(data, json!({"first": "Ada", "last": "Lovelace"}));
        assert_eq!(schema.as_deref(), Some("urn:esk:schema:user:Named:v2"));
        assert!(reg.validate("user", "Named", &data).is_ok());
        // Unknown schemas pass through untouched.
        let (same, _) = reg.upcast(Some("urn:other"), json!(1)).unwrap();
        assert_eq!(same, json!(1));
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shop")).unwrap();
        std::fs::write(dir.path().join("shop/Bought.json"), "{}").unwrap();
        let err = SchemaRegistry::load_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("Bought.json"), "{err}");
        std::fs::remove_file(dir.path().join("shop/Bought.json")).unwrap();
        std::fs::write(dir.path().join("shop/Bought.v1.json"), "{").unwrap();
        let err = SchemaRegistry::load_dir(dir.path()).unwrap_err();
        assert!(matches!(err, SchemaError::Json { .. }), "{err}");
        std::fs::write(dir.path().join("shop/Bought.v1.json"), r#"{"type": 12}"#).unwrap();
        let err = SchemaRegistry::load_dir(dir.path()).unwrap_err();
        assert!(matches!(err, SchemaError::Invalid { .. }), "{err}");
    }
}
