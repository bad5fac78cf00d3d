#!/usr/bin/env bash
# Make sure a Docker engine runs on this machine; leave a running one alone.
#
# On our VMs no engine runs and the capability bounding set lacks CAP_SYS_RESOURCE, so
# `docker run --privileged` (which kind needs for its nodes) fails with "unable to apply caps".
# We install Debian's docker.io, register a tiny runc wrapper as the default runtime that
# drops capabilities the kernel would refuse, and start dockerd in the background.
set -euo pipefail

log=${DOCKERD_LOG:-/var/log/fanout-dockerd.log}
wrapper=/usr/local/bin/fanout-runc
daemon_json=/etc/docker/daemon.json

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

if engine_up; then
  echo "docker: engine already running, leaving it alone" >&2
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "docker: no engine running and not root; start Docker yourself" >&2
  exit 1
fi

if ! command -v dockerd >/dev/null 2>&1; then
  echo "docker: installing docker.io from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker.io >/dev/null
fi

# The wrapper: runc is called as `runc [global opts] create --bundle DIR ...` and
# `runc [global opts] exec --process FILE ...`. We filter the capability lists in that
# JSON down to what /proc/self/status CapBnd allows, then exec the real runc unchanged.
cat > "$wrapper.tmp" <<'PY'
#!/usr/bin/python3
# fanout-runc: strip capabilities missing from our bounding set, then exec runc.
import json, os, sys

CAPS = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
        "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
        "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
        "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
        "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
        "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]

def allowed():
    with open("/proc/self/status") as f:
        bnd = next(int(l.split()[1], 16) for l in f if l.startswith("CapBnd:"))
    return {"CAP_" + n for i, n in enumerate(CAPS) if bnd >> i & 1}

def strip(caps, ok):
    for key in ("bounding", "effective", "inheritable", "permitted", "ambient"):
        if isinstance(caps.get(key), list):
            caps[key] = [c for c in caps[key] if c in ok]

def fix(path, is_process):
    with open(path) as f:
        doc = json.load(f)
    proc = doc if is_process else doc.get("process") or {}
    if isinstance(proc.get("capabilities"), dict):
        strip(proc["capabilities"], allowed())
        with open(path, "w") as f:
            json.dump(doc, f)

def opt(args, names):
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None

args = sys.argv[1:]
try:
    if "create" in args or "run" in args:
        bundle = opt(args, ("--bundle", "-b")) or "."
        fix(os.path.join(bundle, "config.json"), False)
    elif "exec" in args:
        p = opt(args, ("--process", "-p"))
        if p:
            fix(p, True)
except Exception as e:  # never block a container over this; runc reports real errors
    print("fanout-runc: %s" % e, file=sys.stderr)
os.execv("/usr/bin/runc", ["runc"] + args)
PY
chmod 755 "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"

mkdir -p /etc/docker
if [ ! -f "$daemon_json" ] || ! grep -q fanout-runc "$daemon_json"; then
  [ -f "$daemon_json" ] && cp "$daemon_json" "$daemon_json.fanout-backup"
  python3 - "$daemon_json" "$wrapper" <<'PY'
import json, os, sys
path, wrapper = sys.argv[1:]
conf = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
conf.setdefault("runtimes", {})["fanout-runc"] = {"path": wrapper}
conf["default-runtime"] = "fanout-runc"
json.dump(conf, open(path, "w"), indent=2)
PY
fi

# A dockerd may exist but be wedged or still starting; only start one if none runs.
if ! pgrep -x dockerd >/dev/null; then
  echo "docker: starting dockerd (log: $log)" >&2
  setsid nohup dockerd >>"$log" 2>&1 </dev/null &
fi

for _ in $(seq 1 60); do
  if engine_up; then
    echo "docker: engine ready" >&2
    exit 0
  fi
  sleep 1
done
echo "docker: engine did not come up within 60 s; see $log" >&2
tail -20 "$log" >&2 || true
exit 1
