"""The workspace's `rust-version` is true: no crate locked for this platform (Cargo.lock,
via `cargo metadata --locked`) declares a newer one. Clippy's `incompatible_msrv` checks our
own code against the same number. Prints the locked crates that set the floor."""
import json
import subprocess
import sys


def key(v):
    parts = [int(x) for x in v.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


host = next(
    line.split()[1]
    for line in subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout.splitlines()
    if line.startswith("host:")
)
meta = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--locked", "--format-version", "1", "--filter-platform", host],
        capture_output=True, text=True, check=True,
    ).stdout
)
members = set(meta["workspace_members"])
ours = {p["rust_version"] for p in meta["packages"] if p["id"] in members}
if len(ours) != 1 or None in ours:
    sys.exit(f"msrv: every workspace crate must inherit one rust-version, found {sorted(map(str, ours))}")
ours = ours.pop()
used = {n["id"] for n in meta["resolve"]["nodes"]}
need = sorted(
    ((key(p["rust_version"]), p["rust_version"], p["name"], p["version"])
     for p in meta["packages"]
     if p["id"] in used and p["id"] not in members and p.get("rust_version")),
    reverse=True,
)
top = need[0]
floor = ", ".join(f"{n} {v}" for k, _, n, v in need if k == top[0])
print(f"msrv: workspace rust-version {ours}; newest locked requirement {top[1]} ({floor}); "
      f"{len(need)} of {len(used) - len(members)} locked crates declare one")
if top[0] > key(ours):
    sys.exit(f"msrv: rust-version {ours} is untrue: the lock needs {top[1]} ({floor})")
