//! The configuration file as a JSON Schema (draft 7, which Helm reads in values schemas), made
//! from the types that read it so that it cannot drift from them: `mailgate config-schema`
//! prints it for editors and for the Helm chart, whose values.schema.json embeds it under
//! `config` (a test compares the two).

use schemars::Schema;
use schemars::generate::SchemaSettings;

use super::Config;

impl Config {
    /// The JSON Schema of a configuration file.
    pub fn json_schema() -> serde_json::Value {
        SchemaSettings::draft07()
            .into_generator()
            .into_root_schema_for::<Config>()
            .to_value()
    }
}

/// The keys serde also accepts under an older name (`alias`), which schemars leaves out:
/// `metrics` for `admin`.
pub(super) fn with_aliases(schema: &mut Schema) {
    let Some(properties) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    if let Some(admin) = properties.get("admin").cloned() {
        properties.insert("metrics".to_owned(), admin);
    }
}
