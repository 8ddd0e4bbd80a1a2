"""run.sh's devices step: jax's devices, their kind and memory, as JSON (stdout and OUT_JSON).

    python experiments/gpu/devices.py OUT_JSON [require]

With ``require`` it exits 1 when jax's default backend is not a GPU.
"""

import json
import sys

import jax


def main(out_json: str, mode: str = "") -> int:
    devices = jax.devices()
    d = devices[0]
    stats = d.memory_stats() or {}
    info = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(x) for x in devices],
        "device_kind": d.device_kind,
        "platform": d.platform,
        "memory_stats": {k: v for k, v in stats.items() if "limit" in k or "in_use" in k},
    }
    print(json.dumps(info, indent=1))
    with open(out_json, "w") as f:
        f.write(json.dumps(info) + "\n")
    if mode == "require" and d.platform != "gpu":
        print(f"devices: jax sees no GPU: {devices}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
