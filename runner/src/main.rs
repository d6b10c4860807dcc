fn main() {} // TODO(skeleton)
