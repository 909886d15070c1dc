"""The prepared GPU check runs end to end on the CPU (--dry-run), so it is ready when a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_device_check_dry_run_on_cpu(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--out", str(tmp_path), "--device", "cpu", "--dry-run"])
    doc = json.loads((tmp_path / "device_check.json").read_text())
    assert rc == 0 and doc["supports_ok"], {k: v for k, v in doc["supports"].items() if not v["ok"]}
    assert {"supports", "kernels", "generate", "decode_syncs", "prefill"} <= doc.keys()
    assert doc["decode_syncs"]["syncs_per_step"] == [0, 0, 0], doc["decode_syncs"]
    methods = {n: r for n, r in doc["supports"].items() if n != "block-topk bf16 planner"}
    assert all(isinstance(r["host_syncs"], int) for r in methods.values())
    assert doc["supports"]["block-topk bf16 planner"]["block_agreement"] == 1.0  # same planner on the CPU
    assert "error" not in doc["generate"] and isinstance(doc["generate"]["text"], str)
