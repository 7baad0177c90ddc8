//! Flat arrays of numbers to and from their little-endian bytes, at memory
//! speed.
//!
//! An object's bytes form for a `Vec` of numbers is the numbers'
//! little-endian bytes, one after the other. On a little-endian machine that
//! is exactly the array's memory, so writing an array into the arena, or
//! reading one back, is one `memcpy` — which a loop over elements is not
//! reliably compiled to. Large copies are also split across threads: a
//! single core cannot use all of a machine's memory bandwidth. (Ray's
//! serializer copies large buffers on several threads for the same reason.)
//!
//! ```
//! use rustyray_shm::plain;
//!
//! let xs = [1_i32, -2, 3];
//! let mut bytes = [0_u8; 12];
//! assert!(plain::write_le(&xs, &mut bytes));
//! assert_eq!(bytes[..4], 1_i32.to_le_bytes());
//! assert_eq!(plain::read_le::<i32>(&bytes), Some(xs.to_vec()));
//! ```

mod sealed {
    /// Only the primitive numbers below implement [`super::Plain`].
    pub trait Sealed {}
}

/// A primitive number: no padding, every bit pattern valid, so its memory
/// is its bytes. Implemented for `u8`..`u64`, `i8`..`i64`, `f32` and `f64`
/// only (sealed).
pub trait Plain: Copy + Default + Send + Sync + sealed::Sealed + 'static {
    /// Its little-endian bytes, written into `out` (exactly its size long).
    fn put_le(self, out: &mut [u8]);
    /// The number whose little-endian bytes `b` holds (exactly its size
    /// long).
    fn get_le(b: &[u8]) -> Self;
}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Plain for $t {
            fn put_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn get_le(b: &[u8]) -> Self {
                let mut a = [0_u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}
plain!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

/// Below this many bytes a copy runs on the calling thread alone.
const SPLIT_MIN: usize = 16 << 20;

/// Most threads one copy is split across. On a 2-core machine two threads
/// copy about half as fast again as one; threads beyond the cores only
/// slow it down.
const SPLIT_MAX: usize = 4;

/// Copies `src` into `dst` (the same length), on several threads when it
/// is large.
fn copy_bytes(src: &[u8], dst: &mut [u8]) {
    let threads = if src.len() < SPLIT_MIN {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |p| p.get().min(SPLIT_MAX))
    };
    if threads <= 1 {
        dst.copy_from_slice(src);
        return;
    }
    let per = src.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut parts = dst.chunks_mut(per).zip(src.chunks(per));
        // The calling thread copies the first part itself, and any part
        // no thread could be started for.
        let first = parts.next();
        for part in parts {
            // The thread is started before it is handed its part, so a
            // thread the system refuses leaves the part here.
            let (give, take) = std::sync::mpsc::channel::<(&mut [u8], &[u8])>();
            let helper = std::thread::Builder::new().spawn_scoped(scope, move || {
                if let Ok((to, from)) = take.recv() {
                    to.copy_from_slice(from);
                }
            });
            let undone = match helper {
                Ok(_) => give.send(part).err().map(|e| e.0),
                Err(_) => Some(part),
            };
            if let Some((to, from)) = undone {
                to.copy_from_slice(from);
            }
        }
        if let Some((to, from)) = first {
            to.copy_from_slice(from);
        }
    });
}

/// The memory of `xs`, as bytes.
fn bytes_of<T: Plain>(xs: &[T]) -> &[u8] {
    // SAFETY: `T` is a primitive number (the trait is sealed): no padding,
    // so all `size_of_val(xs)` bytes from its start are initialised and
    // belong to `xs`'s allocation; `u8` needs no alignment; the view
    // borrows `xs`, so the memory stays alive and unmodified for as long.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

/// The memory of `xs`, as writable bytes.
fn bytes_of_mut<T: Plain>(xs: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`, and every bit pattern is a valid `T`, so
    // any bytes written through the view leave valid numbers; the view
    // borrows `xs` mutably, so nothing else reads or writes it meanwhile.
    unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

/// Copies `src` into `dst`, on several threads when it is large; `false`
/// (and nothing copied) unless both are the same length.
pub fn copy<T: Plain>(src: &[T], dst: &mut [T]) -> bool {
    if src.len() != dst.len() {
        return false;
    }
    copy_bytes(bytes_of(src), bytes_of_mut(dst));
    true
}

/// Writes `src`'s little-endian bytes into `dst`; `false` (and nothing
/// written) unless `dst` is exactly that long.
pub fn write_le<T: Plain>(src: &[T], dst: &mut [u8]) -> bool {
    if dst.len() != std::mem::size_of_val(src) {
        return false;
    }
    #[cfg(target_endian = "little")]
    copy_bytes(bytes_of(src), dst);
    #[cfg(not(target_endian = "little"))]
    for (out, x) in dst.chunks_exact_mut(std::mem::size_of::<T>()).zip(src) {
        x.put_le(out);
    }
    true
}

/// The numbers whose little-endian bytes `src` holds; `None` unless its
/// length is a whole number of them.
pub fn read_le<T: Plain>(src: &[u8]) -> Option<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !src.len().is_multiple_of(size) {
        return None;
    }
    #[cfg(target_endian = "little")]
    {
        let mut out = vec![T::default(); src.len() / size];
        copy_bytes(src, bytes_of_mut(&mut out));
        Some(out)
    }
    #[cfg(not(target_endian = "little"))]
    Some(src.chunks_exact(size).map(T::get_le).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_through_their_little_endian_bytes() {
        let xs: Vec<i64> = (0..1000).map(|i| i * -7_919).collect();
        let mut bytes = vec![0_u8; xs.len() * 8];
        assert!(write_le(&xs, &mut bytes));
        for (chunk, x) in bytes.chunks_exact(8).zip(&xs) {
            assert_eq!(chunk, x.to_le_bytes());
        }
        assert_eq!(read_le::<i64>(&bytes), Some(xs));

        let fs = [1.5_f32, -0.0, f32::MAX];
        let mut fb = [0_u8; 12];
        assert!(write_le(&fs, &mut fb));
        assert_eq!(read_le::<f32>(&fb), Some(fs.to_vec()));
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let mut short = [0_u8; 7];
        assert!(!write_le(&[1_u64], &mut short));
        assert_eq!(short, [0; 7]);
        assert_eq!(read_le::<u32>(&[0; 6]), None);
        assert_eq!(read_le::<u16>(&[]), Some(vec![]));
    }

    #[test]
    fn a_large_copy_split_across_threads_is_exact() {
        // Above SPLIT_MIN, with a length that does not divide evenly.
        let n = (SPLIT_MIN / 4) + 12_345;
        let xs: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let mut bytes = vec![0_u8; n * 4];
        assert!(write_le(&xs, &mut bytes));
        for (i, chunk) in bytes.chunks_exact(4).enumerate().step_by(997) {
            assert_eq!(chunk, xs[i].to_le_bytes());
        }
        assert_eq!(read_le::<u32>(&bytes).as_deref(), Some(&xs[..]));
        let mut again = vec![0_u32; n];
        assert!(copy(&xs, &mut again));
        assert_eq!(again, xs);
        assert!(!copy(&xs, &mut again[1..]));
    }
}
