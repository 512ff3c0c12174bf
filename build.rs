//! Compiles `proto/` with protox (pure Rust), so building locus needs no `protoc`.

use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/locus/v1/locus.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("locus_descriptor.bin"), fds.encode_to_vec())?;
    // Answers made of encoded locations (see src/query/encoded.rs).
    tonic_prost_build::configure()
        .extern_path(
            ".locus.v1.GetLatestResponse",
            "crate::query::encoded::LocationPage",
        )
        .extern_path(
            ".locus.v1.GetTrackResponse",
            "crate::query::encoded::LocationPage",
        )
        .extern_path(
            ".locus.v1.LiveUpdate",
            "crate::query::encoded::EncodedLocations",
        )
        .compile_fds(fds)?;
    Ok(())
}
