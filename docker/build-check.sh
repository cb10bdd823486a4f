#!/usr/bin/env bash
# Build voxgrid's OCI images with buildah on a machine with no Docker engine and no image registry,
# then run them: a Debian bookworm base from debootstrap, the grid, node and JupyterLab images from the
# published Dockerfiles (the base passed as a build argument), `voxgrid node doctor` in the node image,
# and a grid plus one node started from the images that answer over TLS while a scientist outside the
# containers runs one round. Prints each step's time, each image's size, and a one-line summary; exits
# non-zero on any failure.
#
#   bash docker/build-check.sh [--images grid,node,jupyter] [--no-run | --no-build] [--torch REQ] [--json FILE] [--keep]
#
#   --images   which images to build (default all three; the test builds only grid)
#   --no-run   build only; otherwise every built server image is started (grid alone: it answers over
#              TLS; grid and node: a federation of one site runs one round)
#   --no-build check and run the images a previous run built (fails if one is missing)
#   --torch    the torch requirement the images install (build argument VOXGRID_TORCH; default the
#              Dockerfiles' torch==2.13.0, which this machine's pip settings resolve to its CPU build)
#   --json     also write the figures (steps, sizes, checks) to FILE
#   --keep     leave the run's kits, homes and logs in place (their folder is printed)
#
# Environment: VOXGRID_BUILDAH_CACHE (default /var/tmp/voxgrid-buildah: the debootstrap root file system
# and buildah's storage live there, so a second run reuses the base and the layer cache),
# VOXGRID_DEBIAN_MIRROR (default http://deb.debian.org/debian), VOXGRID_BUILDAH_DRIVER (overlay or vfs;
# default overlay where the kernel mounts it: vfs copies every layer in full, ~1.5 GB per RUN/USER/...
# step of an image), VOXGRID_PYTHON (the scientist's interpreter, default .venv/bin/python).
# Needs root, buildah and debootstrap (apt-get install buildah debootstrap; scripts/setup.sh does).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${VOXGRID_BUILDAH_CACHE:-/var/tmp/voxgrid-buildah}
MIRROR=${VOXGRID_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${VOXGRID_PYTHON:-$ROOT/.venv/bin/python}
SUITE=bookworm
# python3 + venv + CA certificates: what python:3.11-slim-bookworm gives the Dockerfiles (bookworm: 3.11).
INCLUDE=python3,python3-venv,ca-certificates
BASE_IMAGE=localhost/voxgrid-base:$SUITE
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")
IMAGES=grid,node,jupyter
RUN_IMAGES=1
BUILD=1
JSON=
KEEP=0
TORCH_ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --images) IMAGES=${2:?--images needs a list}; shift 2 ;;
        --no-run) RUN_IMAGES=0; shift ;;
        --no-build) BUILD=0; shift ;;
        --json) JSON=${2:?--json needs a file}; shift 2 ;;
        --torch) TORCH_ARGS=(--build-arg "VOXGRID_TORCH=${2:?--torch needs a requirement}"); shift 2 ;;
        --keep) KEEP=1; shift ;;
        *) echo "build-check: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
    esac
done
for img in ${IMAGES//,/ }; do
    case $img in grid|node|jupyter) ;; *) echo "build-check: unknown image '$img' (grid, node, jupyter)" >&2; exit 2 ;; esac
done
has() { case ",$IMAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

[ "$(id -u)" = 0 ] || { echo "build-check: needs root (debootstrap, buildah's chroot isolation)" >&2; exit 2; }
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "build-check: '$tool' not found: apt-get install buildah debootstrap" >&2; exit 2; }
done
if [ "$RUN_IMAGES" = 1 ] && [ ! -x "$PY" ]; then
    echo "build-check: the scientist's python '$PY' not found (bash scripts/setup.sh makes .venv, or set VOXGRID_PYTHON)" >&2
    exit 2
fi

mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/voxgrid-build-check.XXXXXX")
STEPS=()      # "name seconds"
SIZES=()      # "image bytes"
CHECKS=()     # one line per check that passed
CURRENT=setup
PIDS=()       # buildah run processes serving containers
CONTAINERS=() # working containers to remove
T_ALL=$(date +%s)

# Overlay shares unchanged files between layers; vfs (always works) stores every layer as a full copy.
driver() {
    if [ -n "${VOXGRID_BUILDAH_DRIVER:-}" ]; then echo "$VOXGRID_BUILDAH_DRIVER"; return; fi
    local d=$WORK/ovl-probe
    mkdir -p "$d/l" "$d/u" "$d/w" "$d/m"
    if mount -t overlay overlay -o "lowerdir=$d/l,upperdir=$d/u,workdir=$d/w" "$d/m" 2>/dev/null; then
        umount "$d/m"; echo overlay
    else
        echo vfs
    fi
}
DRIVER=$(driver)
BUILDAH=(buildah --root "$CACHE/storage-$DRIVER" --runroot "$CACHE/run-$DRIVER" --storage-driver "$DRIVER")
export BUILDAH_ISOLATION=chroot BUILDAH_FORMAT=docker  # docker format keeps HEALTHCHECK and STOPSIGNAL

# buildah 1.28 reports an image's size only as text ("1.58 GB", decimal units): bytes for the figures
image_bytes() {
    "${BUILDAH[@]}" images --json "$1" | python3 -c '
import json, sys
value, unit = json.load(sys.stdin)[0]["size"].split()
print(int(float(value) * {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]))'
}
step() { CURRENT=$1; T_STEP=$(date +%s); echo "== $1"; }
done_step() { local s=$(( $(date +%s) - T_STEP )); STEPS+=("$CURRENT $s"); echo "   $CURRENT: ${s} s"; }
check() { CHECKS+=("$1"); echo "   ok: $1"; }
fail() { echo "build-check: FAILED in step '$CURRENT': $*" >&2; exit 1; }

report() {
    local rc=$? total=$(( $(date +%s) - T_ALL ))
    # the servers themselves (chroot isolation: no PID namespace, run.json holds the host's pid), then buildah
    for f in "$WORK"/homes/*/run.json; do
        [ -s "$f" ] && { kill -TERM "$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$f")" 2>/dev/null || true; }
    done
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for c in "${CONTAINERS[@]}"; do "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1 || true; done
    echo
    echo "step                         seconds"
    for s in "${STEPS[@]}"; do printf '%-28s %7s\n' ${s}; done
    echo "image                              size (MB, uncompressed)"
    local name bytes
    for s in "${SIZES[@]}"; do
        read -r name bytes <<< "$s"; printf '%-34s %8d\n' "$name" $(( ${bytes:-0} / 1000000 ))
    done
    if [ -n "$JSON" ]; then
        python3 - "$JSON" "$rc" "$total" "$DRIVER" "$CURRENT" <<'EOF' "${STEPS[@]/#/step:}" "${SIZES[@]/#/size:}" "${CHECKS[@]/#/check:}" || true
import json, sys
out, rc, total, driver, current = sys.argv[1:6]
data = {"rc": int(rc), "total_s": int(total), "driver": driver, "failed_step": current if rc != "0" else None,
        "steps": {}, "sizes": {}, "checks": []}
for item in sys.argv[6:]:
    kind, _, rest = item.partition(":")
    if kind == "step":
        name, s = rest.rsplit(" ", 1); data["steps"][name] = int(s)
    elif kind == "size":
        name, b = rest.rsplit(" ", 1); data["sizes"][name] = int(b)
    else:
        data["checks"].append(rest)
open(out, "w").write(json.dumps(data, indent=1))
EOF
    fi
    if [ "$KEEP" = 1 ]; then echo "kept: $WORK"; else rm -rf "$WORK"; fi
    local built; built=$(printf '%s ' "${SIZES[@]%% *}")
    if [ "$rc" = 0 ]; then
        echo "build-check: OK in ${total} s ($DRIVER): built ${built}; ${#CHECKS[@]} checks passed"
    else
        echo "build-check: FAILED (exit $rc) in step '$CURRENT' after ${total} s; built ${built:-nothing}"
    fi
}
trap report EXIT

if [ "$BUILD" = 1 ]; then
# ---- the base: Debian bookworm from debootstrap, committed as an image ---------------------------
ROOTFS=$CACHE/rootfs-$SUITE
STAMP="$SUITE $INCLUDE $MIRROR"
step base-rootfs
if [ "$(cat "$ROOTFS.ok" 2>/dev/null)" != "$STAMP" ]; then
    rm -rf "$ROOTFS" "$ROOTFS.tmp" "$ROOTFS.ok"
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOTFS.tmp" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap $SUITE from $MIRROR failed"; }
    # apt in the images (node.Dockerfile) sees the point releases and security fixes too
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
        "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" > "$ROOTFS.tmp/etc/apt/sources.list"
    rm -rf "$ROOTFS.tmp"/var/lib/apt/lists/* "$ROOTFS.tmp"/var/cache/apt/*.bin "$ROOTFS.tmp"/var/cache/apt/archives/*.deb
    mv "$ROOTFS.tmp" "$ROOTFS"
    echo "$STAMP" > "$ROOTFS.ok"   # written last: an interrupted debootstrap is redone, never reused
else
    echo "   reusing $ROOTFS"
fi
done_step

step base-image
# The image is remade only when the root file system was: its label names the stamp it came from.
STAMP_ID=$(sha256sum "$ROOTFS.ok" | cut -c1-16)-$(stat -c %Y "$ROOTFS.ok")
if [ "$("${BUILDAH[@]}" inspect --type image --format '{{index .OCIv1.Config.Labels "org.voxgrid.rootfs"}}' "$BASE_IMAGE" 2>/dev/null)" != "$STAMP_ID" ]; then
    ctr=$("${BUILDAH[@]}" from scratch); CONTAINERS+=("$ctr")
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    cp -a "$ROOTFS/." "$mnt/"
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /bin/bash --label "org.voxgrid.rootfs=$STAMP_ID" "$ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
    CONTAINERS=()
else
    echo "   reusing $BASE_IMAGE"
fi
SIZES+=("$BASE_IMAGE $(image_bytes "$BASE_IMAGE")")
done_step

fi

# ---- pip inside the build: this machine's index settings, mounted, never baked in -----------------
# `pip config list` (files and PIP_* variables) becomes one pip.conf mounted at /etc/pip.conf for the
# RUN steps only; the local folders and files it names (wheel folders, file:// indexes, a CA bundle, a
# constraints file) are mounted read-only under /run/voxgrid-build and the pip.conf points there. Mounts
# are not committed (only their empty mount points stay: /etc/pip.conf, /run/voxgrid-build/N), so an
# index URL with credentials never reaches a layer, and no build argument (image history) carries it.
pip_mounts() {
    python3 - "$WORK/pip.conf" <<'EOF'
import os, subprocess, sys
lines = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf, mounts = {}, {}
def local(item: str, index: bool) -> str:
    scheme = "file://" if item.startswith("file://") else ""
    path = item[len(scheme):]
    if not path.startswith("/") or not os.path.exists(path):
        return item
    # a PEP 503 index (.../simple) links its files relative to its parent folder: mount the parent
    src = os.path.dirname(path.rstrip("/")) if index else path
    dst = mounts.setdefault(src, f"/run/voxgrid-build/{len(mounts)}/{os.path.basename(src)}")
    return scheme + dst + path[len(src):]
for line in lines.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.rpartition(".")
    section = "global" if section in ("", ":env:", ":env") else section
    items = [local(i, name.endswith("index-url")) for i in value.strip("'\"").split()]
    conf.setdefault(section, {})[name] = " ".join(items)
with open(sys.argv[1], "w") as f:
    for section, items in conf.items():
        f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()))
print("\n".join(f"{src}:{dst}:ro" for src, dst in mounts.items()))
EOF
}
VOLUMES=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
while IFS= read -r m; do [ -n "$m" ] && VOLUMES+=(-v "$m"); done < <(pip_mounts)

# ---- the images -----------------------------------------------------------------------------------
build() {  # build NAME DOCKERFILE BUILD-ARG...
    local name=$1 file=$2; shift 2
    step "build-$name"
    nice -n 15 "${BUILDAH[@]}" bud --layers --pull=never --isolation chroot --format docker "${VOLUMES[@]}" \
        "${TORCH_ARGS[@]}" "$@" \
        -f "$ROOT/docker/$file" -t "localhost/voxgrid-$name:$VERSION" "$ROOT" >"$WORK/build-$name.log" 2>&1 \
        || { tail -30 "$WORK/build-$name.log" >&2; fail "buildah bud docker/$file failed (log above)"; }
    SIZES+=("localhost/voxgrid-$name:$VERSION $(image_bytes "localhost/voxgrid-$name:$VERSION")")
    done_step
}
if [ "$BUILD" = 1 ]; then
    has grid && build grid grid.Dockerfile --build-arg "BASE=$BASE_IMAGE"
    has node && build node node.Dockerfile --build-arg "BASE=$BASE_IMAGE"
    has jupyter && build jupyter jupyter.Dockerfile --build-arg "BASE=$BASE_IMAGE"
else
    for img in ${IMAGES//,/ }; do
        ref=localhost/voxgrid-$img:$VERSION
        "${BUILDAH[@]}" inspect --type image "$ref" >/dev/null 2>&1 || fail "--no-build: no image $ref (build it first)"
        SIZES+=("$ref $(image_bytes "$ref")")
    done
fi

# ---- what every image must be: a numeric non-root user, no secret, no build-time pip settings -----
step inspect
for img in ${IMAGES//,/ }; do
    ref=localhost/voxgrid-$img:$VERSION
    user=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$ref")
    [ "$user" = 10001:10001 ] || fail "$ref runs as '$user', not the unprivileged 10001:10001"
    ctr=$("${BUILDAH[@]}" from --pull=never "$ref"); CONTAINERS+=("$ctr")
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    leaks=$(cd "$mnt" && find . -xdev \( -path ./proc -o -path ./sys -o -path ./opt/voxgrid/lib \) -prune -o -type f \
        \( -name '*.key' -o -name '*.token' -o -name 'node-tokens.json' -o -name 'kit.json' \) -print | head -5)
    [ -z "$leaks" ] || fail "$ref holds secrets or kit files: $leaks"
    [ ! -s "$mnt/etc/pip.conf" ] || fail "$ref kept the build's pip.conf (it must only be mounted)"
    [ ! -e "$mnt/kit" ] || fail "$ref has /kit baked in: the kit must be mounted"
    [ -z "$(find "$mnt/run/voxgrid-build" -type f -size +0 2>/dev/null)" ] \
        || fail "$ref kept files of the build's pip mounts under /run/voxgrid-build"
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    check "$img: runs as 10001:10001, no keys/tokens/kit/pip.conf inside"
    # what the image runs with: its user, its venv on PATH (the install script's own import check, again)
    "${BUILDAH[@]}" run --isolation chroot "$ctr" -- python -I -c "import voxgrid, voxgrid.nodes, torch, monai; \
print('voxgrid', voxgrid.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)" \
        > "$WORK/imports-$img.txt" || fail "voxgrid, torch or MONAI does not import in $ref"
    sed 's/^/   /' "$WORK/imports-$img.txt"
    check "$img: $(cat "$WORK/imports-$img.txt")"
    if [ "$img" = jupyter ]; then
        "${BUILDAH[@]}" run --isolation chroot "$ctr" -- jupyter lab --version >/dev/null \
            || fail "jupyter lab does not run in $ref"
        check "jupyter: jupyter lab --version runs"
    fi
done
done_step

[ "$RUN_IMAGES" = 1 ] || exit 0
has grid || { echo "   nothing started: a node or JupyterLab runs against a grid (add grid to --images)"; exit 0; }

# ---- run: a grid (and a node) from the images, kits and homes mounted, host network on loopback ----
# Containers run with `buildah run` (chroot isolation: no Docker engine or OCI runtime is needed), as the
# image's user, with the image's environment; each serves on 127.0.0.1 on ports of this machine.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
start_ctr() {  # start_ctr NAME IMAGE MOUNT... : serves the image's /kit/start.sh in the background
    local name=$1 ref=$2; shift 2
    local ctr; ctr=$("${BUILDAH[@]}" from --pull=never --name "vxcheck-$name-$$" "localhost/voxgrid-$ref:$VERSION")
    CONTAINERS+=("$ctr")
    # buildah run puts an anonymous volume on a VOLUME path over a bind mount there (docker and compose put
    # the named volume there): drop the declaration in this working container so the home is the one mounted
    "${BUILDAH[@]}" config --volume /srv/voxgrid- "$ctr"
    "${BUILDAH[@]}" run --isolation chroot --env VOXGRID_LISTEN=127.0.0.1 "$@" "$ctr" -- /kit/start.sh \
        >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    STARTED_CTR=$ctr STARTED_PID=$!
}
in_ctr() {  # in_ctr MOUNT... CTR -- COMMAND...: a command beside the server (as `docker exec`)
    "${BUILDAH[@]}" run --isolation chroot "$@"
}
wait_file() {  # wait_file PATH PID NAME
    local deadline=$(( $(date +%s) + 120 ))
    until [ -s "$1" ]; do
        kill -0 "$2" 2>/dev/null || { tail -20 "$WORK/$3.log" >&2; fail "$3 exited before writing $1"; }
        [ "$(date +%s)" -lt "$deadline" ] || { tail -20 "$WORK/$3.log" >&2; fail "$3 did not write $1 in 120 s"; }
        sleep 0.5
    done
}

step provision
GPORT=$(free_port); NPORT=$(free_port)
SITES='[{"name": "node-a", "host": "127.0.0.1", "port": '"$NPORT"'}]'
printf '{"federation": "build-check", "grid": {"name": "grid", "host": "127.0.0.1", "port": %s}, "sites": %s}\n' \
    "$GPORT" "$SITES" > "$WORK/project.json"
"$PY" -m voxgrid provision --project "$WORK/project.json" --out "$WORK/kits" >/dev/null \
    || fail "voxgrid provision failed"
mkdir -p "$WORK/homes/grid" "$WORK/homes/node-a"
# the containers' user reads its own kit and owns its home; the CA key stays out of every mount
chown -R 10001:10001 "$WORK/kits/grid" "$WORK/kits/node-a" "$WORK/homes"
done_step

step run-grid
start_ctr grid grid -v "$WORK/kits/grid:/kit:ro" -v "$WORK/homes/grid:/srv/voxgrid"
CTR_grid=$STARTED_CTR PID_grid=$STARTED_PID
wait_file "$WORK/homes/grid/run.json" "$PID_grid" grid
in_ctr -v "$WORK/homes/grid:/srv/voxgrid" "$CTR_grid" -- voxgrid grid status --home /srv/voxgrid \
    >"$WORK/grid-status.json" || fail "voxgrid grid status (the image's HEALTHCHECK) failed in the grid container"
# from outside: the grid's certificate verifies against the federation's CA, and it answers
"$PY" - "$GPORT" "$WORK/kits/ca/ca.crt" "$WORK/homes/grid/owner.token" <<'EOF' || fail "the grid does not answer over TLS"
import sys
from pathlib import Path
from voxgrid.client import GridClient
port, ca, token = sys.argv[1:]
with GridClient(f"https://127.0.0.1:{port}", Path(token).read_text().strip(), ca) as g:
    print("   grid answers over TLS; nodes registered:", [n.name for n in g.nodes()])
EOF
check "grid container serves over TLS (CA-verified) on 127.0.0.1:$GPORT"
done_step

if has node; then
    step node-doctor-and-run
    mkdir -p "$WORK/data"
    "$PY" - "$WORK/data" <<'EOF' || fail "writing phantom data failed"
import sys
from pathlib import Path
from voxgrid.datasets import default_sites, write_site
site = default_sites(n_sites=1, shape=(16, 16, 16), n_volumes=4, seed=0)[0]
write_site(site, Path(sys.argv[1]), fmt="nifti")
print("   phantoms:", site.name, dict(site.labels))
EOF
    chown -R 10001:10001 "$WORK/data"
    NODE_MOUNTS=(-v "$WORK/kits/node-a:/kit:ro" -v "$WORK/homes/node-a:/srv/voxgrid" -v "$WORK/data:/data:ro")
    start_ctr node node "${NODE_MOUNTS[@]}"
    CTR_node=$STARTED_CTR PID_node=$STARTED_PID
    wait_file "$WORK/homes/node-a/run.json" "$PID_node" node
    in_ctr "${NODE_MOUNTS[@]}" "$CTR_node" -- voxgrid node doctor --home /srv/voxgrid \
        >"$WORK/doctor.txt" 2>&1 || { cat "$WORK/doctor.txt" >&2; fail "voxgrid node doctor failed in the node image"; }
    sed 's/^/   doctor: /' "$WORK/doctor.txt"
    check "voxgrid node doctor passes in the node container"
    # the owner's steps of docker/README.md, as `docker compose exec` would run them
    labels=$("$PY" -c 'from voxgrid.datasets import default_sites; s = default_sites(n_sites=1)[0]; print(",".join(f"{k}={v}" for k, v in s.labels.items() if k))')
    in_ctr "${NODE_MOUNTS[@]}" "$CTR_node" -- voxgrid node dataset add --home /srv/voxgrid --name ct \
        --images /data/images --labels /data/labels --tags ct,pancreas --label-names "$labels" \
        --policy open >/dev/null \
        || fail "voxgrid node dataset add failed in the node container"
    in_ctr -v "$WORK/homes/grid:/srv/voxgrid" "$CTR_grid" -- voxgrid grid token issue --home /srv/voxgrid \
        --name alice --token-file /srv/voxgrid/alice.token >/dev/null || fail "grid token issue failed"
    cp "$WORK/homes/grid/alice.token" "$WORK/homes/node-a/alice.token"; chown 10001:10001 "$WORK/homes/node-a/alice.token"
    in_ctr "${NODE_MOUNTS[@]}" "$CTR_node" -- voxgrid node token issue --home /srv/voxgrid \
        --name alice --token-file /srv/voxgrid/alice.token >/dev/null || fail "node token issue failed"
    in_ctr "${NODE_MOUNTS[@]}" "$CTR_node" -- voxgrid node register --home /srv/voxgrid >/dev/null \
        || fail "voxgrid node register failed in the node container"
    # the scientist, outside the containers: search the grid, one FedAvg round on the node, over TLS
    OMP_NUM_THREADS=1 timeout 600 "$PY" - "$GPORT" "$WORK/kits/ca/ca.crt" "$WORK/homes/grid/alice.token" "$labels" <<'EOF' \
        || { tail -30 "$WORK/node.log" >&2; fail "the scientist's round failed"; }
import sys
from pathlib import Path
import voxgrid
port, ca, token, labels = sys.argv[1:]
names = ["background"] + [kv.split("=")[1] for kv in labels.split(",")]
grid = voxgrid.connect(f"https://127.0.0.1:{port}", token=Path(token).read_text().strip(), ca=ca)
pointers = grid.search("#ct", "#pancreas")
assert len(pointers) == 1, f"expected the node's one dataset, the grid found {pointers!r}"
plan = voxgrid.unet_plan(names, patch_size=(16, 16, 16), channels=(4, 8), strides=(2,), num_res_units=0,
                         local_epochs=1)
exp = voxgrid.Experiment(plan, pointers, rounds=1)
exp.run(progress=False)
r = exp.history[-1]
print(f"   round 1 over TLS: {len(pointers)} site, mean test Dice {r.mean_test_dice:.3f}, wall {r.wall_s:.1f} s")
grid.close()
EOF
    check "a scientist outside the containers ran one round on the node container through the grid"
    # SIGTERM (docker stop) stops the node cleanly: it removes its run.json
    kill -TERM "$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$WORK/homes/node-a/run.json")"
    wait "$PID_node" || fail "the node container exited non-zero after SIGTERM"
    [ ! -e "$WORK/homes/node-a/run.json" ] || fail "the node left run.json after SIGTERM (unclean stop)"
    check "SIGTERM stops the node container cleanly"
    done_step
fi
