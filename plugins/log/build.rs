use kvhost_plugin_sdk::build::{Lang, SharedLib};

fn main() {
    SharedLib::new("kvhost_log", Lang::C)
        .source("log.c")
        .build();
}
