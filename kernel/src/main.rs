fn main() {} // TODO(skeleton): the kernel helper replaces this
