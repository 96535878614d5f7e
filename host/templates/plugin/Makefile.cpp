# Builds lib{{name}}.so against the installed kvhost plugin headers (`kvhost sdk install --prefix P`,
# then PKG_CONFIG_PATH=P/lib/pkgconfig).
CXX ?= c++
CXXFLAGS ?= -O2 -g
KVH_CFLAGS := $(shell pkg-config --cflags kvhost-plugin)

lib{{name}}.so: {{name}}.cpp
	$(CXX) -std=c++17 -shared -fPIC -fvisibility=hidden -Wall -Wextra -Werror -pedantic -pthread $(KVH_CFLAGS) $(CXXFLAGS) $< -o $@

clean:
	rm -f lib{{name}}.so

.PHONY: clean
