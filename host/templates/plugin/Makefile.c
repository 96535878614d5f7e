# Builds lib{{name}}.so against the installed kvhost plugin headers (`kvhost sdk install --prefix P`,
# then PKG_CONFIG_PATH=P/lib/pkgconfig).
CC ?= cc
CFLAGS ?= -O2 -g
KVH_CFLAGS := $(shell pkg-config --cflags kvhost-plugin)

lib{{name}}.so: {{name}}.c
	$(CC) -std=c11 -shared -fPIC -Wall -Wextra -Werror -pedantic -pthread $(KVH_CFLAGS) $(CFLAGS) $< -o $@

clean:
	rm -f lib{{name}}.so

.PHONY: clean
