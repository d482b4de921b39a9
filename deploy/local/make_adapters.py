#!/usr/bin/env python3
"""Untrained LoRA adapters for load tests of on-demand adapter placement (issue 25).

Runs INSIDE the vLLM venv (it has peft): ``python deploy/local/make_adapters.py N``. Makes N adapters with
the trained `sentiment` adapter's shape (r=8 on q/k/v/o_proj of SmolLM2-135M-Instruct), each with its own
seeded random weights (B is small noise, not zero, so every adapter really changes the model a little and
no two are byte-identical), under $STATE/models/lora-untrained-NN. Cached: an adapter folder whose
``.fingerprint`` matches is kept. They answer like the base model more or less; they exist to be loaded,
unloaded and counted, not to be right. Prints a JSON object {name: path}.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

STATE_DIR = Path(os.environ.get("GATEWAY_STATE_DIR") or Path.home() / ".cache" / "vllm-gateway")
MODELS_DIR = STATE_DIR / "models"
VERSION = "1"


def make(n: int) -> dict[str, str]:
    manifest = json.loads((MODELS_DIR / "manifest.json").read_text())
    base = Path(manifest["chat_model"])
    out: dict[str, str] = {}
    todo = []
    for i in range(n):
        d = MODELS_DIR / f"lora-untrained-{i:02d}"
        fp = f"{VERSION}:{manifest['chat_fingerprint']}:{i}"
        out[f"untrained-{i:02d}"] = str(d)
        if not ((d / ".fingerprint").is_file() and (d / ".fingerprint").read_text().strip() == fp):
            todo.append((i, d, fp))
    if not todo:
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     task_type="CAUSAL_LM", bias="none")
    peft_model = get_peft_model(model, cfg)
    for i, d, fp in todo:
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 1e-3)
                elif "lora_A" in name:
                    p.normal_(0.0, 0.02)
        tmp = d.with_name(d.name + f".tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        peft_model.save_pretrained(str(tmp))
        (tmp / ".fingerprint").write_text(fp + "\n")
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
        print(f"[make_adapters] wrote {d}", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    print(json.dumps(make(int(sys.argv[1]) if len(sys.argv) > 1 else 8)))
