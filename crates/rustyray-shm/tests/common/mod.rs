//! Helpers shared by the store's integration tests.

#![allow(dead_code, unreachable_pub)]

use rustyray_shm::{ShmStore, StoreConfig};

/// A deterministic byte pattern for object `id`: xorshift64* seeded by the id.
pub fn pattern(id: u128, len: usize) -> Vec<u8> {
    let mut x = (id as u64 ^ (id >> 64) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// FNV-1a over `bytes`.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A store of `capacity` bytes spilling into its own temporary directory.
pub fn store(capacity: usize) -> (tempfile::TempDir, ShmStore) {
    store_with(capacity, |c| c)
}

/// Like [`store`], with the configuration adjusted by `f`.
pub fn store_with(
    capacity: usize,
    f: impl FnOnce(StoreConfig) -> StoreConfig,
) -> (tempfile::TempDir, ShmStore) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = f(StoreConfig::new(capacity, dir.path().join("spill")));
    let store = ShmStore::new(config).expect("store");
    (dir, store)
}

/// Number of files in the store's spill directory.
pub fn files_in(dir: &tempfile::TempDir) -> usize {
    std::fs::read_dir(dir.path().join("spill"))
        .map(|d| d.count())
        .unwrap_or(0)
}
