use kvhost_plugin_sdk::build::{Lang, SharedLib};

fn main() {
    SharedLib::new("kvhost_logstore", Lang::Cpp)
        .source("logstore.cpp")
        .build();
}
