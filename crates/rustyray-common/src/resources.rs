//! Resource sets and their arithmetic — Ray's `ResourceRequest` and
//! `NodeResources`.
//!
//! Amounts are fixed-point with four decimal places, as in Ray, so that
//! fractional requests (`num_cpus = 0.5`) add and subtract exactly.

use crate::error::{Error, Result};
use std::fmt;
use std::sync::Arc;

/// Fixed-point units per whole resource.
const UNIT: f64 = 10_000.0;

/// The name of the CPU resource.
pub const CPU: &str = "CPU";
/// The name of the GPU resource.
pub const GPU: &str = "GPU";

/// A set of named resource amounts. Kept sorted by name; zero amounts are
/// not stored.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ResourceSet {
    items: Vec<(Arc<str>, i64)>,
}

impl ResourceSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Converts a user amount to fixed point, rejecting negative, NaN or
    /// infinite amounts.
    pub fn units(name: &str, amount: f64) -> Result<i64> {
        if !amount.is_finite() || amount < 0.0 {
            return Err(Error::invalid(format!(
                "resource {name} must be a finite, non-negative amount, got {amount}"
            )));
        }
        Ok((amount * UNIT).round() as i64)
    }

    /// Sets `name` to `amount` (whole units, fractions allowed).
    pub fn set(&mut self, name: &str, amount: f64) -> Result<()> {
        let units = Self::units(name, amount)?;
        self.set_units(name, units);
        Ok(())
    }

    fn set_units(&mut self, name: &str, units: i64) {
        match self.items.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) if units == 0 => {
                self.items.remove(i);
            }
            Ok(i) => self.items[i].1 = units,
            Err(_) if units == 0 => {}
            Err(i) => self.items.insert(i, (Arc::from(name), units)),
        }
    }

    /// The amount of `name`, in whole units.
    pub fn get(&self, name: &str) -> f64 {
        self.get_units(name) as f64 / UNIT
    }

    fn get_units(&self, name: &str) -> i64 {
        self.items
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .map(|i| self.items[i].1)
            .unwrap_or(0)
    }

    /// Whether no resource is requested.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether every amount in `self` is available in `avail`.
    pub fn fits_in(&self, avail: &ResourceSet) -> bool {
        self.items.iter().all(|(n, u)| avail.get_units(n) >= *u)
    }

    /// Adds every amount of `other` to `self`.
    pub fn add(&mut self, other: &ResourceSet) {
        for (n, u) in &other.items {
            let cur = self.get_units(n);
            self.set_units_keep_zero(n, cur + u);
        }
    }

    /// Subtracts every amount of `other` from `self`; amounts may go
    /// negative (a task that unblocks re-takes its CPU unconditionally).
    pub fn sub(&mut self, other: &ResourceSet) {
        for (n, u) in &other.items {
            let cur = self.get_units(n);
            self.set_units_keep_zero(n, cur - u);
        }
    }

    fn set_units_keep_zero(&mut self, name: &str, units: i64) {
        match self.items.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) => self.items[i].1 = units,
            Err(i) => self.items.insert(i, (Arc::from(name), units)),
        }
    }

    /// The CPU part of this set alone.
    pub fn cpu_only(&self) -> ResourceSet {
        let mut out = ResourceSet::new();
        out.set_units(CPU, self.get_units(CPU));
        out
    }

    /// The resources and amounts, in whole units.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.items.iter().map(|(n, u)| (&**n, *u as f64 / UNIT))
    }
}

impl fmt::Display for ResourceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (n, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}: {v}")?;
        }
        f.write_str("}")
    }
}

impl fmt::Debug for ResourceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Counts the GPUs this machine exposes, the way Ray does without NVML:
/// the entries of `CUDA_VISIBLE_DEVICES` when it is set; otherwise the
/// NVIDIA driver's per-GPU directories under `/proc/driver/nvidia/gpus`;
/// otherwise the `/dev/nvidiaN` device nodes (sandboxed kernels such as
/// gVisor expose those but not the driver's `/proc` entries).
pub fn detect_gpus() -> u32 {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return count_visible_devices(&v);
    }
    let from_proc = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|d| d.filter_map(|e| e.ok()).count() as u32)
        .unwrap_or(0);
    if from_proc > 0 {
        return from_proc;
    }
    std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| is_gpu_node(&e.file_name().to_string_lossy()))
                .count() as u32
        })
        .unwrap_or(0)
}

/// The number of devices `CUDA_VISIBLE_DEVICES` names.
fn count_visible_devices(v: &str) -> u32 {
    let v = v.trim();
    if v.is_empty() || v == "NoDevFiles" {
        return 0;
    }
    v.split(',').filter(|s| !s.trim().is_empty()).count() as u32
}

/// `nvidia0`, `nvidia1`, ...: one node per GPU (not `nvidiactl`,
/// `nvidia-uvm`).
fn is_gpu_node(name: &str) -> bool {
    name.strip_prefix("nvidia")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_amounts_add_exactly() {
        let mut avail = ResourceSet::new();
        avail.set(CPU, 1.0).unwrap();
        let mut tenth = ResourceSet::new();
        tenth.set(CPU, 0.1).unwrap();
        for _ in 0..10 {
            assert!(tenth.fits_in(&avail));
            avail.sub(&tenth);
        }
        assert_eq!(avail.get(CPU), 0.0);
        assert!(!tenth.fits_in(&avail));
    }

    #[test]
    fn gpu_detection_helpers() {
        assert_eq!(count_visible_devices("0,1,3"), 3);
        assert_eq!(count_visible_devices(""), 0);
        assert_eq!(count_visible_devices("NoDevFiles"), 0);
        assert!(is_gpu_node("nvidia0"));
        assert!(is_gpu_node("nvidia12"));
        assert!(!is_gpu_node("nvidiactl"));
        assert!(!is_gpu_node("nvidia-uvm"));
        assert!(!is_gpu_node("nvidia"));
    }

    #[test]
    fn rejects_negative_and_nan() {
        let mut r = ResourceSet::new();
        assert!(r.set(CPU, -1.0).is_err());
        assert!(r.set(CPU, f64::NAN).is_err());
        assert!(r.set(GPU, f64::INFINITY).is_err());
    }
}
