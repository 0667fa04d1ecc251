//! Function knowledge: which calls may run on a streaming replica.
//!
//! Order of precedence (first match wins):
//! 1. `write_overrides` from the operator's configuration;
//! 2. built-in writers: functions that modify data, take locks, touch session state or fail during
//!    recovery (`nextval`, advisory locks, `set_config`, large-object writers, `txid_current`...).
//!    `read_only_overrides` cannot clear these because they would fail on a replica anyway;
//! 3. built-in harmless volatile functions (`random`, `clock_timestamp`, `pg_stat_*` readers...);
//! 4. `read_only_overrides`;
//! 5. `pg_proc` volatility when loaded (VOLATILE => write), otherwise the built-in list of
//!    common STABLE/IMMUTABLE functions;
//! 6. anything else is unknown => write.
//!
//! The built-in lists speak for functions of `pg_catalog` and of extensions only: a function a
//! user wrote is judged by its own volatility. So a call qualified with another schema is
//! judged by that schema's functions, and an unqualified name a user schema also defines is
//! trusted as harmless only when that definition is not VOLATILE (`search_path` may put it
//! before `pg_catalog`). The catalog also knows the operators, attribute-notation calls and
//! relations that hide such calls (see [`super::objects`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use super::PinReason;
use super::objects::{Origin, RelationUse};

/// Outcome of looking a function up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Safe on a replica.
    Read,
    /// Must run on the primary; `pin` when the call also leaves session state behind.
    Write {
        reason: &'static str,
        pin: Option<PinReason>,
    },
}

/// Function facts from pg_proc, loaded by the proxy at start and on refresh; plus operator overrides.
#[derive(Clone, Debug, Default)]
pub struct FunctionCatalog {
    /// Lower-cased proname => worst volatility seen across overloads and schemas
    /// (`v` beats `s` beats `i`); `None` until pg_proc has been loaded.
    pub(super) procs: Option<HashMap<String, char>>,
    /// Lower-cased names of VOLATILE functions users wrote (outside `pg_catalog` and
    /// extensions): such a name is not trusted as a harmless built-in.
    pub(super) custom_volatile: HashSet<String>,
    /// Lower-cased proname => (schema, verdict) of each function outside `pg_catalog`, for calls
    /// qualified with a schema.
    pub(super) qualified: HashMap<String, Vec<(String, Verdict)>>,
    /// Lower-cased names whose attribute notation (`x.name`, a call of `name(x)`) is a write.
    pub(super) attribute_calls: HashMap<String, Verdict>,
    /// Operator names that some operator outside `pg_catalog` implements with a function that
    /// must run on the primary.
    pub(super) operators: HashMap<String, Verdict>,
    /// Relation names whose reading needs the primary (unlogged, or views calling writers).
    pub(super) relations: HashMap<String, RelationUse>,
    pub(super) read_only: HashSet<String>,
    pub(super) write: HashSet<String>,
}

impl FunctionCatalog {
    /// Builds the catalog from `(proname, provolatile)` rows of `pg_catalog` functions plus
    /// operator overrides (see [`super::CatalogFacts`] for everything else the proxy loads).
    pub fn from_pg_proc(
        rows: impl IntoIterator<Item = (String, char)>,
        read_only_overrides: &[String],
        write_overrides: &[String],
    ) -> Self {
        let facts = super::CatalogFacts {
            procs: rows
                .into_iter()
                .map(|(name, volatility)| super::ProcFact {
                    schema: "pg_catalog".into(),
                    name,
                    volatility,
                    ..super::ProcFact::default()
                })
                .collect(),
            ..super::CatalogFacts::default()
        };
        Self::from_facts(&facts, read_only_overrides, write_overrides)
    }

    /// Merges one function's volatility into the by-name table (the worst wins).
    pub(super) fn add_proc(procs: &mut HashMap<String, char>, name: &str, vol: char) {
        let vol = vol.to_ascii_lowercase();
        procs
            .entry(name.to_lowercase())
            .and_modify(|cur| {
                if rank(vol) > rank(*cur) {
                    *cur = vol;
                }
            })
            .or_insert(vol);
    }

    /// Catalog used before pg_proc is known: built-in knowledge only, unknown functions are writes.
    pub fn builtin_only(read_only_overrides: &[String], write_overrides: &[String]) -> Self {
        let norm = |v: &[String]| v.iter().map(|n| normalize(n).into_owned()).collect();
        Self {
            read_only: norm(read_only_overrides),
            write: norm(write_overrides),
            ..Self::default()
        }
    }

    /// True when a call to `name` must go to the primary; `name` may be schema-qualified and in
    /// any case: the schema is stripped and the name lower-cased here.
    pub fn is_write(&self, name: &str) -> bool {
        matches!(self.verdict(name), Verdict::Write { .. })
    }

    /// Lookup of a possibly schema-qualified name (see the module docs for the precedence).
    pub(crate) fn verdict(&self, name: &str) -> Verdict {
        self.verdict_of(&normalize(name))
    }

    /// Lookup of a function's own name, as the parser gives it (no schema, quotes removed):
    /// a dot in it is part of the name.
    pub(crate) fn verdict_bare(&self, name: &str) -> Verdict {
        self.verdict_of(&lower(name))
    }

    /// Lookup of a call as the parser gives it: `schema` when the call names one.
    pub(crate) fn verdict_in(&self, schema: Option<&str>, name: &str) -> Verdict {
        match schema {
            None => self.verdict_bare(name),
            Some(s) if s.eq_ignore_ascii_case("pg_catalog") => self.builtin_verdict(&lower(name)),
            Some(s) => {
                let found = self
                    .qualified
                    .get(lower(name).as_ref())
                    .into_iter()
                    .flatten();
                // Overloads in that schema: the first that needs the primary decides.
                let verdict = found
                    .filter(|(schema, _)| schema == s)
                    .map(|(_, v)| *v)
                    .reduce(|a, b| if a == Verdict::Read { b } else { a });
                // No such function there: the call fails anywhere, but a writer's name keeps
                // its pin, as unqualified.
                verdict.unwrap_or_else(|| match builtin_writer(&lower(name)) {
                    Some(pin) => write("write_function", pin),
                    None => write("unknown_function", None),
                })
            }
        }
    }

    /// The verdict of one resolved function: the built-in lists apply to functions of
    /// `pg_catalog` and extensions; one a user wrote is judged by its volatility.
    pub(super) fn judge(&self, name: &str, vol: char, origin: Origin) -> Verdict {
        let name = name.to_ascii_lowercase();
        if self.write.contains(&name) {
            return write("write_function", None);
        }
        if let Some(pin) = builtin_writer(&name) {
            return write("write_function", pin);
        }
        if self.read_only.contains(&name) || (origin != Origin::User && harmless_volatile(&name)) {
            return Verdict::Read;
        }
        match vol.to_ascii_lowercase() {
            'i' | 's' => Verdict::Read,
            _ => write("volatile_function", None),
        }
    }

    /// What `x.name` means when `name` is a function: `Some` when that call is a write.
    pub(crate) fn attribute_call(&self, name: &str) -> Option<Verdict> {
        if self.attribute_calls.is_empty() {
            return None;
        }
        self.attribute_calls.get(lower(name).as_ref()).copied()
    }

    /// `Some` when an operator of this name may run a function that needs the primary.
    pub(crate) fn operator(&self, name: &str) -> Option<Verdict> {
        if self.operators.is_empty() {
            return None;
        }
        self.operators.get(name).copied()
    }

    /// `Some` when reading the relation `name` needs the primary.
    pub(crate) fn relation(&self, name: &str) -> Option<RelationUse> {
        if self.relations.is_empty() {
            return None;
        }
        self.relations.get(name).copied()
    }

    /// Whether any attribute-notation call or operator needs looking for in a statement.
    pub(crate) fn hides_calls(&self) -> bool {
        !self.attribute_calls.is_empty() || !self.operators.is_empty()
    }

    /// Whether any relation needs the primary.
    pub(crate) fn has_relations(&self) -> bool {
        !self.relations.is_empty()
    }

    fn verdict_of(&self, name: &str) -> Verdict {
        if !self.custom_volatile.is_empty()
            && self.custom_volatile.contains(name)
            && harmless_volatile(name)
        {
            // A user's function of that name may come first in search_path.
            return match self.builtin_verdict(name) {
                Verdict::Read => write("volatile_function", None),
                v => v,
            };
        }
        self.builtin_verdict(name)
    }

    /// The verdict by name alone, trusting the built-in lists.
    fn builtin_verdict(&self, name: &str) -> Verdict {
        if self.write.contains(name) {
            return write("write_function", None);
        }
        if let Some(pin) = builtin_writer(name) {
            let lock = name.starts_with("pg_advisory_") || name.starts_with("pg_try_advisory_");
            return write(
                if lock {
                    "advisory_lock"
                } else {
                    "write_function"
                },
                pin,
            );
        }
        if harmless_volatile(name) || self.read_only.contains(name) {
            return Verdict::Read;
        }
        match &self.procs {
            Some(procs) => match procs.get(name) {
                Some('i' | 's') => Verdict::Read,
                Some(_) => write("volatile_function", None),
                None => write("unknown_function", None),
            },
            None if builtin_read(name) => Verdict::Read,
            None => write("unknown_function", None),
        }
    }
}

fn write(reason: &'static str, pin: Option<PinReason>) -> Verdict {
    Verdict::Write { reason, pin }
}

/// Volatility order for merging overloads: unknown letters count as volatile.
fn rank(vol: char) -> u8 {
    match vol {
        'i' => 0,
        's' => 1,
        _ => 2,
    }
}

/// Lower-cases, borrowing in the common already-lower case.
fn lower(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// Strips a schema qualification and lower-cases; borrows in the common already-clean case.
fn normalize(name: &str) -> Cow<'_, str> {
    let base = name.rsplit_once('.').map_or(name, |(_, n)| n);
    let base = base.trim_matches('"');
    if base.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(base.to_ascii_lowercase())
    } else {
        Cow::Borrowed(base)
    }
}

/// Built-in functions that must run on the primary; `Some(pin)` carries the session pin.
fn builtin_writer(name: &str) -> Option<Option<PinReason>> {
    match name {
        // Session-level advisory locks live on the backend that took them.
        "pg_advisory_lock"
        | "pg_advisory_lock_shared"
        | "pg_try_advisory_lock"
        | "pg_try_advisory_lock_shared" => Some(Some(PinReason::AdvisoryLock)),
        // Random seed is per-session state.
        "setseed" => Some(Some(PinReason::SessionSet)),
        // set_config's pin depends on its third argument and is decided by the caller.
        "nextval"
        | "setval"
        | "currval"
        | "lastval"
        | "pg_notify"
        | "set_config"
        | "loread"
        | "lowrite"
        | "txid_current"
        | "pg_current_xact_id"
        | "pg_current_wal_lsn"
        | "pg_current_wal_insert_lsn"
        | "pg_current_wal_flush_lsn"
        | "pg_switch_wal"
        | "pg_create_restore_point"
        | "pg_walfile_name"
        | "pg_walfile_name_offset"
        | "pg_promote"
        | "pg_reload_conf"
        | "pg_rotate_logfile"
        | "pg_terminate_backend"
        | "pg_cancel_backend"
        | "pg_log_standby_snapshot"
        | "pg_drop_replication_slot"
        | "pg_replication_slot_advance"
        | "pg_import_system_collations"
        | "pg_stat_statements_reset"
        | "pg_log_backend_memory_contexts" => Some(None),
        _ if name.starts_with("pg_advisory_")
            || name.starts_with("pg_try_advisory_")
            || (name.starts_with("lo_") && name != "lo_get")
            || name.starts_with("pg_stat_reset")
            || name.starts_with("pg_create_")
            || name.starts_with("pg_copy_")
            || name.starts_with("pg_logical_")
            || name.starts_with("pg_replication_origin_") =>
        {
            Some(None)
        }
        _ => None,
    }
}

/// VOLATILE built-ins that are nevertheless safe (and meaningful) on a replica.
fn harmless_volatile(name: &str) -> bool {
    matches!(
        name,
        "random"
            | "random_normal"
            | "clock_timestamp"
            | "timeofday"
            | "pg_sleep"
            | "pg_sleep_for"
            | "pg_sleep_until"
            | "gen_random_uuid"
            | "uuidv4"
            | "uuidv7"
            | "uuid_generate_v1"
            | "uuid_generate_v1mc"
            | "uuid_generate_v4"
            | "pg_last_wal_replay_lsn"
            | "pg_last_wal_receive_lsn"
            | "pg_last_xact_replay_timestamp"
            | "pg_is_in_recovery"
            | "pg_is_wal_replay_paused"
            | "pg_get_wal_replay_pause_state"
            | "pg_database_size"
            | "pg_relation_size"
            | "pg_total_relation_size"
            | "pg_table_size"
            | "pg_indexes_size"
            | "pg_tablespace_size"
            | "pg_ls_dir"
            | "pg_ls_logdir"
            | "pg_ls_waldir"
            | "pg_ls_tmpdir"
            | "pg_ls_archive_statusdir"
            | "pg_read_file"
            | "pg_read_binary_file"
            | "pg_stat_file"
            | "pg_current_logfile"
            | "pg_lock_status"
            | "pg_blocking_pids"
            | "pg_safe_snapshot_blocking_pids"
            | "pg_notification_queue_usage"
            | "pg_prepared_xact"
            | "pg_cursor"
            | "pg_prepared_statement"
            | "pg_get_backend_memory_contexts"
            | "pg_get_shmem_allocations"
            | "pg_control_checkpoint"
            | "pg_control_system"
            | "pg_control_init"
            | "pg_control_recovery"
            | "lo_get"
    ) || (name.starts_with("pg_stat_") && !name.starts_with("pg_stat_reset"))
}

/// Common STABLE/IMMUTABLE built-ins, trusted before pg_proc has been loaded.
fn builtin_read(name: &str) -> bool {
    matches!(
        name,
        // aggregates and window functions
        "count" | "sum" | "avg" | "min" | "max" | "array_agg" | "string_agg" | "json_agg"
            | "jsonb_agg" | "json_object_agg" | "jsonb_object_agg" | "bool_and" | "bool_or"
            | "every" | "bit_and" | "bit_or" | "stddev" | "stddev_pop" | "stddev_samp"
            | "variance" | "var_pop" | "var_samp" | "percentile_cont" | "percentile_disc"
            | "mode" | "row_number" | "rank" | "dense_rank" | "percent_rank" | "cume_dist"
            | "ntile" | "lag" | "lead" | "first_value" | "last_value" | "nth_value"
            // strings
            | "lower" | "upper" | "length" | "char_length" | "character_length"
            | "octet_length" | "bit_length" | "substr" | "substring" | "position" | "strpos"
            | "btrim" | "ltrim" | "rtrim" | "replace" | "concat" | "concat_ws" | "left"
            | "right" | "lpad" | "rpad" | "repeat" | "reverse" | "split_part" | "format"
            | "initcap" | "md5" | "sha224" | "sha256" | "sha384" | "sha512" | "encode"
            | "decode" | "regexp_replace" | "regexp_match" | "regexp_matches" | "regexp_like"
            | "regexp_split_to_array" | "regexp_split_to_table" | "starts_with" | "translate"
            | "to_hex" | "ascii" | "chr" | "quote_ident" | "quote_literal" | "quote_nullable"
            | "overlay" | "normalize" | "is_normalized"
            // date/time and numbers
            | "now" | "statement_timestamp" | "transaction_timestamp" | "to_char" | "to_date"
            | "to_timestamp" | "to_number" | "date_trunc" | "date_part" | "date_bin"
            | "extract" | "age" | "make_date" | "make_time" | "make_timestamp"
            | "make_timestamptz" | "make_interval" | "justify_days" | "justify_hours"
            | "justify_interval" | "isfinite" | "timezone" | "abs" | "ceil" | "ceiling"
            | "floor" | "round" | "trunc" | "mod" | "power" | "pow" | "sqrt" | "cbrt" | "exp"
            | "ln" | "log" | "log10" | "sign" | "div" | "gcd" | "lcm" | "factorial" | "scale"
            | "pi" | "degrees" | "radians" | "sin" | "cos" | "tan" | "asin" | "acos" | "atan"
            | "atan2" | "width_bucket" | "num_nulls" | "num_nonnulls"
            // arrays, sets and json
            | "generate_series" | "generate_subscripts" | "unnest" | "array_length"
            | "array_upper" | "array_lower" | "array_dims" | "array_fill" | "cardinality"
            | "array_position" | "array_positions" | "array_append" | "array_prepend"
            | "array_cat" | "array_remove" | "array_replace" | "array_to_string"
            | "string_to_array" | "array_to_json" | "row_to_json" | "to_json" | "to_jsonb"
            | "json_build_object" | "jsonb_build_object" | "json_build_array"
            | "jsonb_build_array" | "json_object" | "jsonb_object" | "jsonb_set"
            | "jsonb_insert" | "jsonb_pretty" | "json_extract_path" | "json_extract_path_text"
            | "jsonb_extract_path" | "jsonb_extract_path_text" | "json_array_elements"
            | "jsonb_array_elements" | "json_array_elements_text" | "jsonb_array_elements_text"
            | "json_each" | "jsonb_each" | "json_each_text" | "jsonb_each_text"
            | "json_object_keys" | "jsonb_object_keys" | "json_typeof" | "jsonb_typeof"
            | "json_array_length" | "jsonb_array_length" | "jsonb_strip_nulls"
            | "json_strip_nulls" | "jsonb_path_query" | "jsonb_path_query_array"
            | "jsonb_path_query_first" | "jsonb_path_exists" | "jsonb_path_match"
            // system information
            | "current_setting" | "current_database" | "current_schema" | "current_schemas"
            | "version" | "inet_server_port" | "inet_server_addr" | "inet_client_addr"
            | "inet_client_port" | "pg_backend_pid" | "pg_postmaster_start_time"
            | "pg_conf_load_time" | "pg_typeof" | "pg_size_pretty" | "pg_size_bytes"
            | "pg_column_size" | "pg_get_viewdef" | "pg_get_indexdef" | "pg_get_constraintdef"
            | "pg_get_functiondef" | "pg_get_triggerdef" | "pg_get_expr" | "pg_get_userbyid"
            | "pg_get_serial_sequence" | "pg_table_is_visible" | "pg_type_is_visible"
            | "pg_function_is_visible" | "format_type" | "obj_description" | "col_description"
            | "shobj_description" | "has_table_privilege" | "has_schema_privilege"
            | "has_database_privilege" | "has_column_privilege" | "has_function_privilege"
            | "has_sequence_privilege" | "pg_has_role" | "to_regclass" | "to_regtype"
            | "to_regproc" | "to_regprocedure" | "to_regnamespace" | "to_regrole"
            | "txid_current_snapshot" | "pg_current_snapshot" | "pg_snapshot_xmin"
            | "pg_snapshot_xmax" | "txid_snapshot_xmin" | "txid_snapshot_xmax"
            | "pg_relation_filepath" | "pg_relation_filenode" | "pg_encoding_to_char"
            | "pg_client_encoding" | "pg_listening_channels" | "pg_jit_available"
            | "pg_wal_lsn_diff" | "pg_get_keywords"
    )
}
