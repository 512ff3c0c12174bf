//! Types and services generated from `proto/locus/v1/locus.proto`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("locus.v1");

/// The encoded `FileDescriptorSet` of the locus protos, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/locus_descriptor.bin"));
