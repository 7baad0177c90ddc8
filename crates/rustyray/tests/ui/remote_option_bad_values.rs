#[rustyray::remote(max_retries = 1.5)]
fn fraction() {}

#[rustyray::remote(num_cpus = "two")]
fn string() {}

#[rustyray::remote(num_cpus = 1, num_cpus = 2)]
fn twice() {}

#[rustyray::remote(resource = "disk")]
fn resource_not_a_pair() {}

fn main() {}
