//! Prepared statements that exist on one backend connection, under proxy-chosen names, so a
//! client's named statements can follow it to whichever connection serves its next transaction.

use std::collections::HashMap;

use bytes::Bytes;

/// What identifies a statement across connections: the Parse body after the name
/// (query text and parameter types).
pub type StatementKey = Bytes;

/// The name a statement has on one backend: `causeway_<n>`, held inline so that naming a
/// statement in a Bind (every execution of a prepared statement) allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BackendName {
    len: u8,
    buf: [u8; BackendName::CAPACITY],
}

impl BackendName {
    const PREFIX: &'static [u8] = b"causeway_";
    /// The prefix and the 20 digits of the largest `u64`.
    const CAPACITY: usize = 9 + 20;

    fn new(id: u64) -> Self {
        let mut buf = [0u8; Self::CAPACITY];
        buf[..Self::PREFIX.len()].copy_from_slice(Self::PREFIX);
        let mut digits = [0u8; 20];
        let mut n = id;
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let tail = &digits[at..];
        let len = Self::PREFIX.len() + tail.len();
        buf[Self::PREFIX.len()..len].copy_from_slice(tail);
        Self {
            len: len as u8,
            buf,
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::ops::Deref for BackendName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for BackendName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bounded, least-recently-used map from statement key to the name it has on this backend.
/// Entries are scoped by the session settings in force when they were prepared: a statement
/// parsed under one client's search_path must not serve a client with another.
///
/// Every Bind of a prepared statement looks its whole text up here, so keys are hashed with
/// foldhash (seeded per map) rather than SipHash. Keys are client text, but the map holds at
/// most `capacity` entries, so even keys made to collide cost no more per lookup than the
/// eviction scan a full cache already does per insert.
#[derive(Debug)]
pub struct StatementCache {
    map: HashMap<(u64, StatementKey), Entry, foldhash::fast::RandomState>,
    scope: u64,
    tick: u64,
    next_id: u64,
    capacity: usize,
    /// The statement currently bound to the unnamed slot on this backend, if the proxy knows it.
    pub unnamed: Option<StatementKey>,
    /// The proxy's commit-token query is prepared on this backend.
    pub token_prepared: bool,
}

#[derive(Debug)]
struct Entry {
    name: BackendName,
    last_used: u64,
    /// Result columns the server described for it here, once known.
    shape: Option<Vec<u8>>,
}

impl StatementCache {
    /// An empty cache holding at most `capacity` statements.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::with_hasher(foldhash::fast::RandomState::default()),
            scope: 0,
            tick: 0,
            next_id: 0,
            capacity: capacity.max(1),
            unnamed: None,
            token_prepared: false,
        }
    }

    /// Sets the settings fingerprint that later lookups and inserts are scoped by.
    pub fn set_scope(&mut self, scope: u64) {
        self.scope = scope;
    }

    /// The backend name of a prepared statement, marking it recently used.
    pub fn get(&mut self, key: &StatementKey) -> Option<BackendName> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&(self.scope, key.clone())).map(|e| {
            e.last_used = tick;
            e.name
        })
    }

    /// Records a statement about to be prepared; returns its new name and, when the cache was
    /// full, the name of the statement to close first.
    pub fn insert(&mut self, key: StatementKey) -> (BackendName, Option<BackendName>) {
        let evicted = if self.map.len() >= self.capacity {
            self.evict_oldest()
        } else {
            None
        };
        self.next_id += 1;
        self.tick += 1;
        let name = BackendName::new(self.next_id);
        self.map.insert(
            (self.scope, key),
            Entry {
                name,
                last_used: self.tick,
                shape: None,
            },
        );
        (name, evicted)
    }

    /// The result shape recorded for a prepared statement, if any.
    pub fn shape(&self, key: &StatementKey) -> Option<&[u8]> {
        self.map
            .get(&(self.scope, key.clone()))
            .and_then(|e| e.shape.as_deref())
    }

    /// Records the result shape the server described for a prepared statement.
    pub fn set_shape(&mut self, key: &StatementKey, shape: Vec<u8>) {
        if let Some(e) = self.map.get_mut(&(self.scope, key.clone())) {
            e.shape = Some(shape);
        }
    }

    /// The statement prepared here under `name`, in any scope (a scan: for error messages).
    pub fn key_of(&self, name: &str) -> Option<&StatementKey> {
        self.map
            .iter()
            .find(|(_, e)| e.name.as_str() == name)
            .map(|((_, key), _)| key)
    }

    /// Forgets a statement (its Parse failed, or it was closed).
    pub fn remove(&mut self, key: &StatementKey) {
        self.map.remove(&(self.scope, key.clone()));
    }

    /// Number of statements prepared on this connection.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no statement is prepared.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets everything (after DISCARD ALL or DEALLOCATE ALL on the connection).
    pub fn clear(&mut self) {
        self.map.clear();
        self.unnamed = None;
        self.token_prepared = false;
    }

    fn evict_oldest(&mut self) -> Option<BackendName> {
        let key = self
            .map
            .iter()
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone())?;
        self.map.remove(&key).map(|e| e.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_lookups_touch() {
        let mut c = StatementCache::new(2);
        let a = Bytes::from_static(b"select 1\0\0\0");
        let b = Bytes::from_static(b"select 2\0\0\0");
        let (na, ev) = c.insert(a.clone());
        assert!(ev.is_none());
        let (nb, _) = c.insert(b.clone());
        assert_ne!(na, nb);
        assert_eq!(c.get(&a), Some(na));
        // b is now the least recently used and is evicted by a third statement
        let (_, ev) = c.insert(Bytes::from_static(b"select 3\0\0\0"));
        assert_eq!(ev, Some(nb));
        assert!(c.get(&b).is_none());
        assert_eq!(c.len(), 2);
        c.remove(&a);
        assert!(c.get(&a).is_none());
        // Another settings scope does not see statements of the first.
        let (_, _) = c.insert(a.clone());
        c.set_scope(7);
        assert!(c.get(&a).is_none());
        c.set_scope(0);
        assert!(c.get(&a).is_some());
    }

    #[test]
    fn backend_names_spell_their_number() {
        assert_eq!(BackendName::new(0).as_str(), "causeway_0");
        assert_eq!(BackendName::new(7).as_str(), "causeway_7");
        assert_eq!(BackendName::new(1234567890).as_str(), "causeway_1234567890");
        assert_eq!(
            BackendName::new(u64::MAX).as_str(),
            format!("causeway_{}", u64::MAX)
        );
    }
}
