//! Block requests on a queue device: how they are planned for virtio-blk ([`plan`]).
pub mod plan;
