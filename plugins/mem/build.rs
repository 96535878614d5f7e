use kvhost_plugin_sdk::build::{Lang, SharedLib};

fn main() {
    SharedLib::new("kvhost_mem", Lang::C)
        .source("mem.c")
        .build();
}
