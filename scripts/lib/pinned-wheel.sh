# Shared by the setup scripts: fetch a Python wheel pinned by sha256 into a
# cache folder, with `pip download` (no install, no root). Source it after
# defining log() and die().

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum -- "$1" | cut -d' ' -f1
    else
        shasum -a 256 -- "$1" | cut -d' ' -f1
    fi
}

# fetch_pinned_wheel DIR NAME SHA256 REQUIREMENT LOCAL_COPY [pip download args...]
# Leaves DIR/NAME verified; a cached copy with the wrong sha256 is fetched
# again; LOCAL_COPY (may be empty) replaces the download.
fetch_pinned_wheel() {
    local dir=$1 name=$2 sha=$3 req=$4 local_copy=$5
    shift 5
    local wheel=$dir/$name tmp got
    mkdir -p -- "$dir"
    if [ -f "$wheel" ] && [ "$(sha256_of "$wheel")" != "$sha" ]; then
        log "cached $wheel has the wrong sha256; fetching it again"
        rm -f -- "$wheel"
    fi
    if [ ! -f "$wheel" ]; then
        tmp=$(mktemp -d "$dir/.download.XXXXXX")
        if [ -n "$local_copy" ]; then
            log "using local wheel $local_copy"
            cp -- "$local_copy" "$tmp/$name"
        else
            log "downloading $req"
            "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: "$@" "$req" -d "$tmp" >&2 ||
                { rm -rf -- "$tmp"; die "pip download $req failed"; }
        fi
        [ -f "$tmp/$name" ] || { rm -rf -- "$tmp"; die "download did not produce $name"; }
        mv -f -- "$tmp/$name" "$wheel"
        rm -rf -- "$tmp"
    fi
    got=$(sha256_of "$wheel")
    [ "$got" = "$sha" ] || { rm -f -- "$wheel"; die "sha256 mismatch for $req: got $got, want $sha"; }
}
