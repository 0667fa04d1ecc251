//! Reading `proxy.toml` and the `CAUSEWAY__…` variables into one tree that deserialises
//! strictly. A value from the file must already have the key's type: TOML says whether it is a
//! string, an integer, a float or a boolean, and nothing converts between them (`2.9` is not a
//! pool size, `"yes"` not a boolean). A value from the environment is text by nature and must
//! parse as the key's type, completely (`2.9` is not an integer there either).

use std::fmt;

use serde::Deserializer;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

/// The prefix of variables that override keys, with `__` between levels.
pub(super) const ENV_PREFIX: &str = "causeway__";

/// The configuration as read: tables down to the values, each value from the file or from
/// the environment.
pub(super) enum Node {
    Table(Vec<(String, Node)>),
    File(toml::Value),
    Env(EnvValue),
}

/// A value from the environment, with the variable it came from.
pub(super) struct EnvValue {
    var: String,
    text: String,
}

/// A value that does not fit its key; the caller adds the key.
#[derive(Debug)]
pub(super) struct DeError {
    pub message: String,
    /// The variable the value came from, if not the file.
    pub var: Option<String>,
}

impl DeError {
    fn file(e: toml::de::Error) -> DeError {
        DeError {
            message: e.message().trim().to_string(),
            var: None,
        }
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            message: msg.to_string(),
            var: None,
        }
    }
}

impl Node {
    /// The file's tables, each value keeping its TOML type.
    pub(super) fn from_file(table: toml::Table) -> Node {
        Node::Table(
            table
                .into_iter()
                .map(|(k, v)| match v {
                    toml::Value::Table(t) => (k, Node::from_file(t)),
                    other => (k, Node::File(other)),
                })
                .collect(),
        )
    }

    /// Applies every `CAUSEWAY__SECTION__KEY` variable among `vars` (names are matched without
    /// regard to case and lower-cased into keys), replacing what the file says.
    pub(super) fn override_from(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), String> {
        for (var, text) in vars {
            let lower = var.to_ascii_lowercase();
            let Some(rest) = lower.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<&str> = rest.split("__").collect();
            let Node::Table(entries) = self else {
                return Err("the configuration is not a table".into());
            };
            set(entries, &path, EnvValue { var, text })?;
        }
        Ok(())
    }
}

fn set(entries: &mut Vec<(String, Node)>, path: &[&str], value: EnvValue) -> Result<(), String> {
    let Some((head, rest)) = path.split_first() else {
        return Ok(());
    };
    let found = entries.iter().position(|(k, _)| k == head);
    if rest.is_empty() {
        match found {
            Some(i) => entries[i].1 = Node::Env(value),
            None => entries.push((head.to_string(), Node::Env(value))),
        }
        return Ok(());
    }
    let i = found.unwrap_or_else(|| {
        entries.push((head.to_string(), Node::Table(Vec::new())));
        entries.len() - 1
    });
    match &mut entries[i].1 {
        Node::Table(inner) => set(inner, rest, value),
        _ => Err(format!(
            "{}: `{head}` is not a table in the configuration file, so it has no keys to set",
            value.var
        )),
    }
}

/// Rust's names for the types a key can have, in words.
pub(super) fn plain(message: &str) -> String {
    let mut out = message.to_string();
    for (rust, words) in [
        ("expected usize", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", super::PORT_RANGE),
        ("expected f64", "expected a number"),
    ] {
        out = out.replace(rust, words);
    }
    out
}

struct Entries {
    iter: std::vec::IntoIter<(String, Node)>,
    value: Option<Node>,
}

impl<'de> MapAccess<'de> for Entries {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.iter.next() {
            Some((key, value)) => {
                self.value = Some(value);
                seed.deserialize(key.into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.value.take() {
            Some(value) => seed.deserialize(value),
            None => Err(de::Error::custom("a key without a value")),
        }
    }
}

/// Deserialises a file value or an environment value by the type the key asks for.
macro_rules! by_hint {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            match self {
                Node::File(v) => v.$method(visitor).map_err(DeError::file),
                Node::Env(e) => e.$method(visitor),
                table => table.deserialize_any(visitor),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Node {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self {
            Node::Table(entries) => visitor.visit_map(Entries {
                iter: entries.into_iter(),
                value: None,
            }),
            Node::File(v) => v.deserialize_any(visitor).map_err(DeError::file),
            Node::Env(e) => e.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_some(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self {
            Node::File(toml::Value::String(s)) => visitor.visit_enum(s.into_deserializer()),
            Node::File(other) => Err(de::Error::custom(format!(
                "invalid type: {} `{other}`, expected one of {}",
                other.type_str(),
                variants
                    .iter()
                    .map(|v| format!("\"{v}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            Node::Env(e) => e.deserialize_enum(name, variants, visitor),
            table => table.deserialize_any(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    by_hint! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_f32
        deserialize_f64 deserialize_char deserialize_str deserialize_string deserialize_bytes
        deserialize_byte_buf deserialize_unit deserialize_seq deserialize_map
        deserialize_identifier deserialize_ignored_any
    }

    serde::forward_to_deserialize_any! {
        unit_struct tuple tuple_struct struct
    }
}

impl EnvValue {
    fn named(&self, mut e: DeError) -> DeError {
        e.var = Some(self.var.clone());
        e
    }

    fn invalid(&self, expected: &str) -> DeError {
        DeError {
            message: format!("invalid value: {:?}, expected {expected}", self.text),
            var: Some(self.var.clone()),
        }
    }

    fn unsigned(&self) -> Result<u64, DeError> {
        self.text
            .trim()
            .parse()
            .map_err(|_| self.invalid("a whole number"))
    }

    fn signed(&self) -> Result<i64, DeError> {
        self.text
            .trim()
            .parse()
            .map_err(|_| self.invalid("a whole number"))
    }
}

macro_rules! env_parsed {
    ($($method:ident => $parse:ident, $visit:ident;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let n = self.$parse()?;
            visitor.$visit(n).map_err(|e| self.named(e))
        }
    )*};
}

impl<'de> Deserializer<'de> for EnvValue {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let var = self.var.clone();
        visitor.visit_string(self.text).map_err(|mut e: DeError| {
            e.var = Some(var);
            e
        })
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let value = match self.text.trim().to_ascii_lowercase().as_str() {
            "true" => true,
            "false" => false,
            _ => return Err(self.invalid("true or false")),
        };
        visitor.visit_bool(value).map_err(|e| self.named(e))
    }

    env_parsed! {
        deserialize_u8 => unsigned, visit_u64;
        deserialize_u16 => unsigned, visit_u64;
        deserialize_u32 => unsigned, visit_u64;
        deserialize_u64 => unsigned, visit_u64;
        deserialize_i8 => signed, visit_i64;
        deserialize_i16 => signed, visit_i64;
        deserialize_i32 => signed, visit_i64;
        deserialize_i64 => signed, visit_i64;
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let n: f64 = match self.text.trim().parse() {
            Ok(n) if f64::is_finite(n) => n,
            _ => return Err(self.invalid("a number")),
        };
        visitor.visit_f64(n).map_err(|e| self.named(e))
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let var = self.var.clone();
        visitor.visit_some(self).map_err(|mut e: DeError| {
            e.var = Some(var);
            e
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let var = self.var.clone();
        visitor
            .visit_enum(self.text.into_deserializer())
            .map_err(|mut e: DeError| {
                e.var = Some(var);
                e
            })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        char str string bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}
