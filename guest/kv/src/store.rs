//! The key-value store: binary keys to binary string values, with an estimate of the memory it
//! uses (for the `maxmemory`-style guard).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Bound;

/// Bytes charged per entry on top of its key and value (map node share and two vectors).
pub const ENTRY_OVERHEAD: usize = 64;

/// The string keyspace (one database, like Redis's db 0).
#[derive(Debug, Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    bytes: usize,
}

fn cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

impl Store {
    /// An empty store.
    pub const fn new() -> Self {
        Self {
            map: BTreeMap::new(),
            bytes: 0,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Estimated memory used by the entries.
    pub fn used_bytes(&self) -> usize {
        self.bytes
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    /// True if `key` exists.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.map.contains_key(key)
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn set(&mut self, key: &[u8], value: Vec<u8>) -> Option<Vec<u8>> {
        self.bytes += cost(key, &value);
        if let Some(slot) = self.map.get_mut(key) {
            let old = core::mem::replace(slot, value);
            self.bytes -= cost(key, &old);
            return Some(old);
        }
        self.map.insert(key.to_vec(), value);
        None
    }

    /// Removes `key`; true if it existed.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        match self.map.remove_entry(key) {
            Some((k, v)) => {
                self.bytes -= cost(&k, &v);
                true
            }
            None => false,
        }
    }

    /// The entries in key order, from the first key after `after` (from the first key if
    /// `None`): a cursor that survives changes to the store between calls.
    pub fn iter_after<'a>(
        &'a self,
        after: Option<&[u8]>,
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.map
            .range::<[u8], _>((from, Bound::Unbounded))
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Removes every key.
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn set_get_remove_and_accounting() {
        let mut s = Store::new();
        assert!(s.is_empty());
        assert_eq!(s.set(b"k", b"v1".to_vec()), None);
        assert_eq!(s.used_bytes(), 1 + 2 + ENTRY_OVERHEAD);
        assert_eq!(s.set(b"k", b"value".to_vec()), Some(b"v1".to_vec()));
        assert_eq!(s.used_bytes(), 1 + 5 + ENTRY_OVERHEAD);
        assert_eq!(s.get(b"k"), Some(&b"value"[..]));
        assert!(s.contains(b"k"));
        s.set(b"other", vec![0; 10]);
        assert_eq!(s.len(), 2);
        assert!(s.remove(b"k"));
        assert!(!s.remove(b"k"));
        assert_eq!(s.used_bytes(), 5 + 10 + ENTRY_OVERHEAD);
        s.clear();
        assert_eq!((s.len(), s.used_bytes()), (0, 0));
    }

    #[test]
    fn iteration_resumes_after_a_key() {
        let mut s = Store::new();
        for k in ["b", "d", "a", "c"] {
            s.set(k.as_bytes(), k.as_bytes().to_vec());
        }
        let keys = |after: Option<&[u8]>| -> Vec<Vec<u8>> {
            s.iter_after(after).map(|(k, _)| k.to_vec()).collect()
        };
        assert_eq!(keys(None), [b"a", b"b", b"c", b"d"]);
        assert_eq!(keys(Some(b"b")), [b"c", b"d"]);
        assert_eq!(
            keys(Some(b"bb")),
            [b"c", b"d"],
            "the cursor key need not exist"
        );
        assert!(keys(Some(b"d")).is_empty());
    }
}
