# Sourced by build.sh and virtio-rdma.sh: which guest kernel they work on.
#
#   VRDMA_GUEST_FLAVOUR=bookworm   (default) Debian 12's own kernel, 6.1;
#                                  packages from the host's apt sources
#   VRDMA_GUEST_FLAVOUR=backports  Debian 12's backports kernel (6.12 in
#                                  2026); packages through a private apt
#                                  set-up in the cache, so the host's apt
#                                  sources and lists stay as they are
#
# Sets FLAVOUR_SUFFIX ("" or "-backports", for cache directory names) and
# APT_OPTS (options for every apt-get / apt-cache call on this flavour's
# packages). Needs CACHE_ROOT. flavour_apt_update refreshes the private
# lists (a no-op for bookworm: the callers update the host's lists).

FLAVOUR=${VRDMA_GUEST_FLAVOUR:-bookworm}
case "$FLAVOUR" in
bookworm)
	FLAVOUR_SUFFIX=""
	APT_OPTS=()
	;;
backports)
	FLAVOUR_SUFFIX="-backports"
	FLAVOUR_APT="$CACHE_ROOT/apt-backports"
	APT_OPTS=(
		-o "Dir::Etc::SourceList=$FLAVOUR_APT/sources.list"
		-o "Dir::Etc::SourceParts=$FLAVOUR_APT/sources.list.d"
		-o "Dir::State::Lists=$FLAVOUR_APT/lists"
		-o "Dir::Cache=$FLAVOUR_APT/cache"
	)
	mkdir -p "$FLAVOUR_APT/lists/partial" "$FLAVOUR_APT/cache/archives/partial" "$FLAVOUR_APT/sources.list.d"
	printf 'deb http://deb.debian.org/debian bookworm-backports main\n' >"$FLAVOUR_APT/sources.list"
	;;
*)
	printf 'VRDMA_GUEST_FLAVOUR must be bookworm or backports, not %s\n' "$FLAVOUR" >&2
	exit 2
	;;
esac

# Refreshes the private backports lists when they are missing or a day old.
flavour_apt_update() {
	[ "$FLAVOUR" = backports ] || return 0
	local stamp="$FLAVOUR_APT/updated"
	if [ "${1:-}" != --force ] && [ -f "$stamp" ] && [ -n "$(find "$stamp" -mmin -1440)" ]; then return 0; fi
	apt-get "${APT_OPTS[@]}" update -qq >"$FLAVOUR_APT/update.log" 2>&1 || return 1
	touch "$stamp"
}
