"""Time an existing ``structkit.distill`` run's ``slim.pt`` against the dense all-MiniLM-L6-v2 in ONNX Runtime
(the deploy protocol of configs/minilm.yaml with the sweep's run counts), for runs made with
``deploy.enabled=false``. Writes RUN_DIR/latency.json.

    python benchmarks/minilm_time_slim.py runs/minilm_budget/ramda_lam0.0008_ft720
"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModel, AutoTokenizer
import structkit
from structkit.distill import load_config, export_and_time, _latency_inputs, _austen, _default_model_path
run = Path(sys.argv[1])
cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "minilm.yaml", ["deploy.runs=[100,15]", "deploy.warmup=[10,3]", "deploy.keep_onnx=false"])
dep = cfg["deploy"]
torch.set_num_threads(1)
path = _default_model_path()
tok = AutoTokenizer.from_pretrained(path)
dense = AutoModel.from_pretrained(path).eval()
slim = structkit.load_slim(run / "slim.pt", build=lambda: AutoModel.from_pretrained(path)).eval()
train, held = _austen(0)
rows = _latency_inputs(tok, held, dep["seq_len"], 8)
ex = tok(held[:4], padding=True, return_tensors="pt")
example = {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]}
res = export_and_time(dense, slim, run, dep, example, rows, log=print)
(run / "latency.json").write_text(json.dumps(res, indent=1, default=str))
