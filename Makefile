# Build and install reservd. The Debian and RPM packages both use
# `make install`, so a file goes into both packages or into neither.
#
#   make                                  build (cargo build --release --locked)
#   make install DESTDIR=/tmp/root PREFIX=/usr
#
# `install` builds first when a binary or a generated file is missing or
# older than the sources; otherwise it does not run cargo at all, so the two
# package builds share one compilation in target/.
#
# Directories can be overridden one by one, e.g. UNITDIR=/lib/systemd/system
# (Debian 12) or ZSHCOMPDIR=/usr/share/zsh/site-functions (Fedora).

PREFIX      ?= /usr/local
BINDIR      ?= $(PREFIX)/bin
DATADIR     ?= $(PREFIX)/share
MANDIR      ?= $(DATADIR)/man
DOCDIR      ?= $(DATADIR)/doc/reservd
UNITDIR     ?= $(PREFIX)/lib/systemd/system
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
ZSHCOMPDIR  ?= $(DATADIR)/zsh/vendor-completions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d

CARGO       ?= cargo
INSTALL     ?= install
# cargo's own variable, so `make` and `cargo` agree on where target/ is.
CARGO_TARGET_DIR ?= target

out := $(CARGO_TARGET_DIR)/release
gen := $(out)/generated
stamp := $(out)/.reservd-make-stamp

# reservdctl has a page for itself and one for each subcommand.
ctl_pages := reservdctl reservdctl-in reservdctl-out reservdctl-raw \
	reservdctl-status reservdctl-check

outputs := $(out)/reservd $(out)/reservdctl $(gen)/reservd.8 \
	$(foreach p,$(ctl_pages),$(gen)/$(p).8) \
	$(foreach c,reservd reservdctl,$(gen)/completions/$(c).bash \
		$(gen)/completions/_$(c) $(gen)/completions/$(c).fish)

# Everything cargo reads to build the two binaries.
sources := Cargo.toml Cargo.lock build.rs \
	$(shell find src proto daemon client mpath-sys -type f \
		\( -name '*.rs' -o -name '*.h' -o -name Cargo.toml -o -name build.rs \) 2>/dev/null)

missing := $(strip $(foreach f,$(outputs),$(if $(wildcard $(f)),,$(f))))

.PHONY: all build install uninstall FORCE

all: build

build: $(stamp)

$(stamp): $(sources) $(if $(missing),FORCE)
	$(CARGO) build --release --locked
	@touch $@

docs := README.md $(wildcard docs/*.md)

install: build
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR) \
		$(DESTDIR)$(DOCDIR)
	$(INSTALL) -m 0755 $(out)/reservd $(out)/reservdctl $(DESTDIR)$(BINDIR)/
	for u in reservd.socket reservd.service; do \
		sed 's|/usr/bin/reservd|$(BINDIR)/reservd|g' packaging/systemd/$$u \
			> $(DESTDIR)$(UNITDIR)/$$u.tmp && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.tmp && \
		mv $(DESTDIR)$(UNITDIR)/$$u.tmp $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	$(INSTALL) -m 0644 $(gen)/reservd.8 $(foreach p,$(ctl_pages),$(gen)/$(p).8) \
		$(DESTDIR)$(MANDIR)/man8/
	for c in reservd reservdctl; do \
		$(INSTALL) -m 0644 $(gen)/completions/$$c.bash $(DESTDIR)$(BASHCOMPDIR)/$$c && \
		$(INSTALL) -m 0644 $(gen)/completions/_$$c $(DESTDIR)$(ZSHCOMPDIR)/_$$c && \
		$(INSTALL) -m 0644 $(gen)/completions/$$c.fish $(DESTDIR)$(FISHCOMPDIR)/$$c.fish \
			|| exit 1; \
	done
	$(INSTALL) -m 0644 $(docs) $(DESTDIR)$(DOCDIR)/

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/reservd $(DESTDIR)$(BINDIR)/reservdctl \
		$(DESTDIR)$(UNITDIR)/reservd.socket $(DESTDIR)$(UNITDIR)/reservd.service \
		$(DESTDIR)$(MANDIR)/man8/reservd.8 \
		$(foreach p,$(ctl_pages),$(DESTDIR)$(MANDIR)/man8/$(p).8) \
		$(foreach c,reservd reservdctl,$(DESTDIR)$(BASHCOMPDIR)/$(c) \
			$(DESTDIR)$(ZSHCOMPDIR)/_$(c) $(DESTDIR)$(FISHCOMPDIR)/$(c).fish)
	rm -f $(addprefix $(DESTDIR)$(DOCDIR)/,$(notdir $(docs)))
	-rmdir $(DESTDIR)$(DOCDIR)

FORCE:
