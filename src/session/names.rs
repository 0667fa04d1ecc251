//! The statements a client prepared under names, and the proxy memory they hold.

use std::collections::HashMap;

use super::ClientStatement;

/// What one entry costs besides its name and text: the map's slot, the name's allocation.
const ENTRY_OVERHEAD: usize = 64;

/// The client's named statements. Each holds its Parse message (text and parameter types)
/// until the client closes it, so together they are bounded (`server.max_prepared_bytes`):
/// on a server a session's statements cost that session's own backend, here they would cost
/// every client of the proxy.
#[derive(Debug, Default)]
pub(crate) struct ClientStatements {
    map: HashMap<String, ClientStatement>,
    /// The [`cost`] of every entry.
    bytes: usize,
}

/// Bytes a statement `name` with Parse body `key_len` long is counted for.
pub(crate) fn cost(name: &str, key_len: usize) -> usize {
    name.len() + key_len + ENTRY_OVERHEAD
}

impl ClientStatements {
    pub(crate) fn get(&self, name: &str) -> Option<&ClientStatement> {
        self.map.get(name)
    }

    /// A name the client gave the statement `key` (a scan: for error messages).
    pub(crate) fn name_of(&self, key: &[u8]) -> Option<&str> {
        self.map
            .iter()
            .find(|(_, s)| s.key.as_ref() == key)
            .map(|(name, _)| name.as_str())
    }

    pub(crate) fn get_mut(&mut self, name: &str) -> Option<&mut ClientStatement> {
        self.map.get_mut(name)
    }

    pub(crate) fn contains_key(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Bytes the statements are counted for.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn insert(&mut self, name: String, s: ClientStatement) {
        let name_len = name.len();
        self.bytes += cost(&name, s.key.len());
        if let Some(old) = self.map.insert(name, s) {
            // A name in use is refused before this; the count stays true all the same.
            self.bytes = self
                .bytes
                .saturating_sub(name_len + old.key.len() + ENTRY_OVERHEAD);
        }
    }

    pub(crate) fn remove(&mut self, name: &str) -> Option<ClientStatement> {
        let s = self.map.remove(name)?;
        self.bytes = self.bytes.saturating_sub(cost(name, s.key.len()));
        Some(s)
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn stmt(text: &'static str) -> ClientStatement {
        ClientStatement {
            key: Bytes::from_static(text.as_bytes()),
            shape: None,
        }
    }

    #[test]
    fn the_count_follows_inserts_removals_and_clears() {
        let mut s = ClientStatements::default();
        s.insert("a".into(), stmt("SELECT 1\0"));
        s.insert("bb".into(), stmt("SELECT 22\0"));
        assert_eq!(s.bytes(), cost("a", 9) + cost("bb", 10));
        assert!(s.remove("a").is_some());
        assert!(s.remove("a").is_none());
        assert_eq!(s.bytes(), cost("bb", 10));
        s.clear();
        assert_eq!(s.bytes(), 0);
        assert!(!s.contains_key("bb"));
    }
}
