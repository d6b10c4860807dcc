//! Block requests on a queue device: how they are planned for virtio-blk ([`plan`]), the
//! asynchronous submit-and-poll interface ([`queue`]) and several virtual-disk requests in
//! flight over it ([`pipeline`]).
pub mod pipeline;
pub mod plan;
pub mod queue;

#[cfg(test)]
mod tests;
