#!/usr/bin/env python3
"""Reference data from transformers for attnkit's checkpoint tests (run where torch and
transformers are installed; attnkit's own tests never need Python).

  python3 scripts/hf_reference.py --tiny models/tiny-llama-bytes --out OUT
  python3 scripts/hf_reference.py --nll DIR [DIR ...] --out OUT   (checkpoints attnkit wrote)

writes
  OUT/tiny_nll.json         float32 mean next-byte NLL of the tiny model on evaluation rows 64-79
                            (and per row), the number attnkit-run must reproduce to 1e-4;
  OUT/rope_reference.json   inv_freq, attention scaling and cos/sin of transformers' rotary
                            embedding for every RoPE scaling type attnkit implements;
  OUT/families.tar          one small random checkpoint per supported family (Llama, Mistral,
                            Qwen2, Qwen3, DeepSeek-V2, DeepSeek-V3; f32/bf16/f16, single file and
                            sharded, 4.x and 5.x config spellings) with reference.safetensors:
                            tokens [T] and float32 logits [T, vocab] and hidden states.
"""
import argparse, io, json, math, os, shutil, sys, tarfile, traceback

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False
torch.set_num_threads(max(1, os.cpu_count() or 1))


def eval_nll(model_dir, data_file):
    """float32 mean next-byte NLL of a checkpoint on rows 64-79 of a byte data file, per row."""
    data = np.fromfile(data_file, dtype=np.uint8).reshape(80, 512)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = torch.tensor(data[64:80].astype(np.int64))
    per_row = []
    with torch.no_grad():
        for r in range(rows.shape[0]):
            x = rows[r : r + 1]
            logits = model(x).logits.double()
            lp = torch.log_softmax(logits[0, :-1], dim=-1)
            nll = -lp.gather(1, x[0, 1:, None]).squeeze(1)
            per_row.append(float(nll.mean()))
    return model, rows, per_row


def converted_nll(dirs, data_file, out):
    res = {"transformers": transformers.__version__, "rows": [64, 80], "models": {}}
    for d in dirs:
        try:
            model, _, per_row = eval_nll(d, data_file)
            res["models"][os.path.basename(os.path.normpath(d))] = {
                "class": type(model).__name__, "mean_nll": float(np.mean(per_row))}
            print("nll", d, type(model).__name__, float(np.mean(per_row)))
        except Exception:
            traceback.print_exc()
    json.dump(res, open(os.path.join(out, "converted_nll.json"), "w"), indent=1)


def tiny_nll(tiny, out):
    model, rows, per_row = eval_nll(tiny, os.path.join(tiny, "data.bin"))
    with torch.no_grad():
        hs = model(rows[:1], output_hidden_states=True).hidden_states
        np.save(os.path.join(out, "tiny_row64_hidden.npy"), torch.stack(hs).float().numpy())
    res = {"transformers": transformers.__version__, "torch": torch.__version__,
           "rows": [64, 80], "tokens_per_row": 511, "dtype": "float32",
           "mean_nll": float(np.mean(per_row)), "per_row_nll": per_row}
    json.dump(res, open(os.path.join(out, "tiny_nll.json"), "w"), indent=1)
    print("tiny NLL", res["mean_nll"])


def rotary_of(model_type, cfg):
    import importlib
    mod = importlib.import_module(type(cfg).__module__.replace("configuration_", "modeling_"))
    cls = [getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding")][0]
    return cls(cfg)


ROPE_CASES = [
    # name, model_type, config kwargs, positions to evaluate (a forward over 0..max)
    ("default", "llama", dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=64,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 64),
    ("linear", "llama", dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=64,
                             rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}), 64),
    ("dynamic_short", "llama", dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=64,
                              rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), 40),
    ("dynamic_long", "llama", dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=64,
                              rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), 200),
    ("yarn_qwen", "qwen2", dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=4096,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 1024}), 64),
    ("yarn_betas_notrunc", "llama", dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=4096,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                 "original_max_position_embeddings": 512, "beta_fast": 16.0,
                                                 "beta_slow": 2.0, "truncate": False}), 64),
    ("yarn_attention_factor", "llama", dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=4096,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                 "original_max_position_embeddings": 512,
                                                 "attention_factor": 1.25}), 64),
    ("yarn_deepseek_v3", "deepseek_v3", dict(hidden_size=128, num_attention_heads=2, qk_rope_head_dim=64,
                                qk_nope_head_dim=64, v_head_dim=64, kv_lora_rank=64, q_lora_rank=None,
                                max_position_embeddings=163840,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                                 "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.5}), 64),
    ("llama3", "llama", dict(hidden_size=128, num_attention_heads=2, max_position_embeddings=131072,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192}), 64),
]


def rope_reference(out):
    cases = []
    for name, mt, kw, n in ROPE_CASES:
        try:
            cfg = AutoConfig.for_model(mt, **kw)
            rot = rotary_of(mt, cfg)
            pos = torch.arange(n)[None]
            x = torch.zeros(1, n, 8)
            cos, sin = rot(x, pos)
            inv = rot.inv_freq.double().tolist()
            sel = [0, 1, 7, n // 2, n - 1]
            cases.append({"name": name, "model_type": mt, "rope_parameters": kw["rope_parameters"],
                          "max_position_embeddings": kw["max_position_embeddings"],
                          "dim": 2 * len(inv), "sequence_length": n, "inv_freq": inv,
                          "attention_scaling": float(rot.attention_scaling),
                          "positions": sel, "cos": cos[0, sel].double().tolist(),
                          "sin": sin[0, sel].double().tolist()})
            print("rope", name, "ok", cases[-1]["attention_scaling"])
        except Exception:
            traceback.print_exc()
    json.dump({"transformers": transformers.__version__, "cases": cases},
              open(os.path.join(out, "rope_reference.json"), "w"))


COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False)
FAMILIES = [
    # name, model_type, extra config, dtype, shard size, 4.x spelling
    ("llama", "llama", dict(num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}),
     torch.bfloat16, None, True),
    ("mistral", "mistral", dict(num_key_value_heads=1, head_dim=16, max_position_embeddings=16,
                                sliding_window=None,
                                rope_parameters={"rope_type": "dynamic", "rope_theta": 1000000.0, "factor": 2.0}),
     torch.float16, None, False),
    ("qwen2", "qwen2", dict(num_key_value_heads=2, max_position_embeddings=128,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                             "original_max_position_embeddings": 16}),
     torch.float32, None, True),
    ("qwen3", "qwen3", dict(num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
     torch.bfloat16, "60KB", False),
    ("deepseek_v2", "deepseek_v2", dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
                                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                        first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32, n_shared_experts=1, max_position_embeddings=256,
                                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                         "original_max_position_embeddings": 32, "beta_fast": 32.0,
                                                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
     torch.bfloat16, None, True),
    ("deepseek_v3", "deepseek_v3", dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                        first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32, n_shared_experts=1, n_group=1, topk_group=1,
                                        max_position_embeddings=256,
                                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                                         "original_max_position_embeddings": 32, "beta_fast": 32.0,
                                                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.5}),
     torch.float32, None, False),
]


def to_4x_spelling(path):
    cfg = json.load(open(path))
    rp = cfg.pop("rope_parameters", None)
    if rp is not None:
        rp = dict(rp)
        cfg["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rp
        else:
            cfg["rope_scaling"] = None
    cfg["transformers_version"] = "4.46.0"
    json.dump(cfg, open(path, "w"), indent=2)


def families(out):
    root = os.path.join(out, "families")
    os.makedirs(root, exist_ok=True)
    report = {}
    for name, mt, extra, dtype, shard, old in FAMILIES:
        try:
            torch.manual_seed(1)
            kw = dict(COMMON); kw.update(extra)
            if mt in ("qwen2",):
                kw["use_sliding_window"] = False
            cfg = AutoConfig.for_model(mt, **kw)
            model = AutoModelForCausalLM.from_config(cfg).eval()
            with torch.no_grad():  # larger than default init so that attention is not uniform
                for n, p in model.named_parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.2)
                    elif n.endswith("bias"):
                        p.normal_(0, 0.1)
                    else:
                        p.copy_(1 + 0.1 * torch.randn_like(p))
            d = os.path.join(root, name)
            model.to(dtype).save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
            if old:
                to_4x_spelling(os.path.join(d, "config.json"))
            back = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            tokens = torch.randint(0, 64, (1, 24))
            with torch.no_grad():
                o = back(tokens, output_hidden_states=True)
            save_file({"tokens": tokens[0].to(torch.int64), "logits": o.logits[0].float().contiguous(),
                       "hidden_states": torch.stack(o.hidden_states)[:, 0].float().contiguous()},
                      os.path.join(d, "reference.safetensors"))
            report[name] = sorted(os.listdir(d))
            print("family", name, "ok", report[name])
        except Exception:
            traceback.print_exc()
    with tarfile.open(os.path.join(out, "families.tar"), "w") as t:
        t.add(root, arcname="families")
    shutil.rmtree(root)
    return report


def sources(out):
    base = os.path.dirname(transformers.__file__)
    with tarfile.open(os.path.join(out, "sources.tar"), "w") as t:
        for rel in ["modeling_rope_utils.py", "models/deepseek_v3/modeling_deepseek_v3.py",
                    "models/deepseek_v3/configuration_deepseek_v3.py",
                    "models/deepseek_v2/modeling_deepseek_v2.py",
                    "models/deepseek_v2/configuration_deepseek_v2.py",
                    "models/qwen3/modeling_qwen3.py", "models/llama/modeling_llama.py",
                    "models/llama/configuration_llama.py", "configuration_utils.py"]:
            p = os.path.join(base, rel)
            if os.path.exists(p):
                t.add(p, arcname=rel)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", default="models/tiny-llama-bytes")
    ap.add_argument("--out", required=True)
    ap.add_argument("--nll", nargs="*", default=None)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    print("transformers", transformers.__version__, "torch", torch.__version__)
    if a.nll:
        converted_nll(a.nll, os.path.join(a.tiny, "data.bin"), a.out)
        sys.exit(0)
    for step in (sources, rope_reference, families, lambda o: tiny_nll(a.tiny, o)):
        try:
            step(a.out)
        except Exception:
            traceback.print_exc()
