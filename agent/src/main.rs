//! `ferry`: the node agent and its CLI.
fn main() {
    println!("{}", ferry::bpf::loader::OBJECT.len());
}
