#!/usr/bin/env bash
# The end-to-end demo behind `make demo`. Everything runs locally on embedded
# defaults; all files land in .demo/ (recreated on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
EF=".venv/bin/edgefleet"
PY=".venv/bin/python"
D=".demo"
rm -rf "$D" && mkdir -p "$D"

step() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }

step "1. Create an offline root key, a release key and trust root v1"
$EF keys init --dir "$D/keys"

step "2. Make a tiny ONNX model in code (no downloads)"
$PY examples/tiny_model.py "$D/tiny.onnx"

step "3. Build and sign an OTA bundle for Raspberry Pi 4 devices"
$EF bundle build "$D/tiny.onnx" --name tiny --version 1 --key "$D/keys/release-1.key" \
    --device-class pi4 --expires-in 30 --out "$D/tiny-v1.bundle"

step "4. Inspect it (reads the manifest; does not trust it)"
$EF bundle inspect "$D/tiny-v1.bundle"

step "5. Verify it as a pi4 device that has nothing installed would"
$EF bundle verify "$D/tiny-v1.bundle" --trust-root "$D/keys/trust-root.json" --device-class pi4

step "6. A tampered copy (one payload byte flipped) is rejected"
cp "$D/tiny-v1.bundle" "$D/tampered.bundle"
# Flip one byte in the middle of the payload member (after the two metadata members).
offset=$($PY - "$D/tampered.bundle" <<'PYEOF'
import sys
data = open(sys.argv[1], "rb").read()
off = 0
for _ in range(2):  # skip manifest.json and signatures.json
    size = int(data[off + 124 : off + 135], 8)
    off += 512 + size + (-size % 512)
size = int(data[off + 124 : off + 135], 8)
print(off + 512 + size // 2)
PYEOF
)
printf '\x5a' | dd of="$D/tampered.bundle" bs=1 seek="$offset" conv=notrunc status=none
if $EF bundle verify "$D/tampered.bundle" --trust-root "$D/keys/trust-root.json"; then
    echo "demo: a tampered bundle verified; this is a bug" >&2
    exit 1
else
    echo "(rejected with exit code $?, as it must be)"
fi

step "7. A bundle for another device class is refused (mix-and-match)"
if $EF bundle verify "$D/tiny-v1.bundle" --trust-root "$D/keys/trust-root.json" --device-class jetson; then
    echo "demo: wrong-target bundle verified; this is a bug" >&2
    exit 1
else
    echo "(rejected with exit code $?)"
fi

step "8. Train the fraud-detection example (synthetic transactions, a few seconds)"
$PY examples/fraud/train.py --out "$D/fraud" | tee "$D/fraud-train.log"
NAMES=$(tail -n 1 "$D/fraud-train.log" | $PY -c 'import json, sys; print(",".join(json.load(sys.stdin)["feature_names"]))')

step "9. Compress it: prune + quantize candidates, the accuracy gate keeps the smallest that works"
$EF compress "$D/fraud/model.pt2" --calib "$D/fraud/calib.npz" --eval "$D/fraud/eval.npz" \
    --out "$D/fraud/compressed" --metric accuracy --max-drop 0.01 --prune 0.7 --quant auto --feature-names "$NAMES"

step "10. Bundle the compressed model; health check and drift profile come along from the compressor"
$EF bundle build "$D/fraud/compressed/model.onnx" --name fraud --version 1 \
    --key "$D/keys/release-1.key" --device-class pi4 --out "$D/fraud-v1.bundle"
$EF bundle verify "$D/fraud-v1.bundle" --trust-root "$D/keys/trust-root.json" --device-class pi4

step "11. Sideload it on a simulated Raspberry Pi (state dir $D/device): verify, stage, health-check, switch"
$EF agent install "$D/fraud-v1.bundle" --state-dir "$D/device" --trust-root "$D/keys/trust-root.json" \
    --device-class pi4
$EF agent status --state-dir "$D/device" --json

step "12. Run the active model on three held-out transactions"
$PY -c 'import numpy as np, sys; np.save(sys.argv[1], np.load(sys.argv[2])["x"][:3])' \
    "$D/three.npy" "$D/fraud/eval.npz"
$EF agent predict --state-dir "$D/device" --input "$D/three.npy" --json

step "13. A v2 whose golden outputs do not match: staged, trialled, rolled back automatically"
cp -r "$D/fraud/compressed" "$D/fraud-bad"
$PY - "$D/fraud-bad/health_check.json" <<'PYEOF'
import base64, json, sys
import numpy as np
path = sys.argv[1]
spec = json.load(open(path))
for out in spec["expected_outputs"].values():
    arr = np.frombuffer(base64.b64decode(out["data_b64"]), dtype=out["dtype"]) + 5.0
    out["data_b64"] = base64.b64encode(arr.astype(out["dtype"]).tobytes()).decode()
json.dump(spec, open(path, "w"))
PYEOF
$EF bundle build "$D/fraud-bad/model.onnx" --name fraud --version 2 \
    --key "$D/keys/release-1.key" --device-class pi4 --out "$D/fraud-v2-bad.bundle" --json >/dev/null
if $EF agent install "$D/fraud-v2-bad.bundle" --state-dir "$D/device" --device-class pi4; then
    echo "demo: a model failing its health check was committed; this is a bug" >&2
    exit 1
else
    echo "(refused with exit code $?; v1 keeps serving)"
fi
$EF agent status --state-dir "$D/device" --json

step "14. Replaying the old v1 bundle is refused too (anti-rollback floor)"
if $EF agent install "$D/fraud-v1.bundle" --state-dir "$D/device" --device-class pi4 --json; then
    echo "demo: a replayed bundle was installed; this is a bug" >&2
    exit 1
else
    echo "(refused with exit code $?)"
fi

step "15. A whole fleet on this machine: Mosquitto, the server (SQLite), 3 agents over MQTT"
$PY examples/fleet_demo.py --workdir "$D/fleet" --bundle-model "$D/fraud/compressed"

step "Done. Files are in $D/"
