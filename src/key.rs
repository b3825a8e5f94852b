//! Advisory lock keys: the two key spaces PostgreSQL offers, and stable ways to derive them.

use std::fmt;

use sha2::{Digest, Sha256};

/// The domain-separation prefix of [`AdvisoryKey::from_name`], version 1.
///
/// Changing it would move every named lock to a new key, so it is frozen: a new function
/// gets a new version and a new constructor, never a change here.
const NAME_PREFIX_V1: &[u8] = b"pglock:v1:";

/// The key of a PostgreSQL advisory lock.
///
/// PostgreSQL has two disjoint key spaces: one `bigint`, or a pair of `integer`s. A lock taken
/// with `pg_advisory_lock(1)` never conflicts with `pg_advisory_lock(0, 1)`.
///
/// # Examples
///
/// ```
/// use pglock::AdvisoryKey;
///
/// let by_name = AdvisoryKey::from_name("migrations");
/// assert_eq!(by_name, AdvisoryKey::from("migrations"));
/// assert_eq!(AdvisoryKey::from(42_i64), AdvisoryKey::Single(42));
/// assert_eq!(AdvisoryKey::from((1, 2)), AdvisoryKey::Pair(1, 2));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdvisoryKey {
    /// A key in the single `bigint` space: `pg_advisory_lock(bigint)`.
    Single(i64),
    /// A key in the two-`integer` space: `pg_advisory_lock(integer, integer)`.
    Pair(i32, i32),
}

impl AdvisoryKey {
    /// The key pglock derives from a lock name (key function version 1).
    ///
    /// The key is the first eight bytes, read big-endian as a signed integer, of the SHA-256
    /// digest of the bytes `pglock:v1:` followed by the name's UTF-8 bytes. It is the same on
    /// every platform, Rust version and pglock version, so any program in any language can
    /// compute it; see `docs/design.md` for test vectors.
    pub fn from_name(name: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(NAME_PREFIX_V1);
        hasher.update(name.as_bytes());
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        AdvisoryKey::Single(i64::from_be_bytes(first))
    }

    /// How this key appears in `pg_locks`: `(classid, objid, objsubid)`.
    ///
    /// A single `bigint` key is split into its high and low 32 bits with `objsubid = 1`; a pair
    /// is `(first, second, 2)`. `classid` and `objid` are `oid`s (unsigned) in the view.
    pub fn pg_locks_ids(self) -> (u32, u32, i16) {
        match self {
            AdvisoryKey::Single(k) => ((k as u64 >> 32) as u32, k as u64 as u32, 1),
            AdvisoryKey::Pair(a, b) => (a as u32, b as u32, 2),
        }
    }

    /// The key that a `pg_locks` row with these `(classid, objid, objsubid)` describes, if it is
    /// an advisory lock key.
    pub fn from_pg_locks_ids(classid: u32, objid: u32, objsubid: i16) -> Option<Self> {
        match objsubid {
            1 => Some(AdvisoryKey::Single(
                ((u64::from(classid) << 32) | u64::from(objid)) as i64,
            )),
            2 => Some(AdvisoryKey::Pair(classid as i32, objid as i32)),
            _ => None,
        }
    }
}

impl fmt::Debug for AdvisoryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for AdvisoryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdvisoryKey::Single(k) => write!(f, "{k}"),
            AdvisoryKey::Pair(a, b) => write!(f, "({a}, {b})"),
        }
    }
}

impl From<i64> for AdvisoryKey {
    fn from(key: i64) -> Self {
        AdvisoryKey::Single(key)
    }
}

impl From<(i32, i32)> for AdvisoryKey {
    fn from((a, b): (i32, i32)) -> Self {
        AdvisoryKey::Pair(a, b)
    }
}

impl From<&str> for AdvisoryKey {
    fn from(name: &str) -> Self {
        AdvisoryKey::from_name(name)
    }
}

impl From<&String> for AdvisoryKey {
    fn from(name: &String) -> Self {
        AdvisoryKey::from_name(name)
    }
}

impl From<String> for AdvisoryKey {
    fn from(name: String) -> Self {
        AdvisoryKey::from_name(&name)
    }
}
