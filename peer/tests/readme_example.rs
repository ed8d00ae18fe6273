//! The README's library example is the body of `examples/quickstart.rs`
//! (which CI runs): this fails when the two drift apart.

#[test]
fn readme_library_block_is_the_quickstart_example() {
    let example = include_str!("../examples/quickstart.rs");
    let readme = include_str!("../../README.md");
    let begin = example.find("// README: begin\n").expect("begin marker") + 17;
    let end = example.find("    // README: end").expect("end marker");
    let body: Vec<&str> = example[begin..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    let section = readme
        .split("## Library (Rust)")
        .nth(1)
        .expect("README has a Library section");
    let block = section
        .split("```rust\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a rust code block");
    assert_eq!(
        block,
        body.join("\n"),
        "README block != examples/quickstart.rs"
    );
}
