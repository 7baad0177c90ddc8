//! Prints the resources an embedded runtime detects on this machine (CPUs,
//! GPUs, object store memory) and runs one GPU task when a GPU is present.
//!
//! ```sh
//! cargo run -p rustyray --example resources
//! ```

use rustyray::prelude::*;

/// Reports the GPU share the task holds.
#[rustyray::remote(num_gpus = 1.0)]
fn on_gpu() -> String {
    "ran with one GPU".to_owned()
}

fn main() -> rustyray::Result<()> {
    let ray = rustyray::init()?;
    println!("detected GPUs: {}", rustyray::detect_gpus());
    println!("cluster resources: {}", ray.cluster_resources());
    println!("object store capacity: {} bytes", ray.store_stats().capacity);
    if ray.cluster_resources().get(rustyray::GPU) >= 1.0 {
        println!("{}", ray.get(&on_gpu::options().name("gpu probe").remote(&ray)?)?);
    }
    Ok(())
}
