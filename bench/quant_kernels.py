"""Weight-only kernels on this CPU: the fused int8 / int4 kernels against the dequantizing one
and against fp32, on smollm2 (decoding) and the minilm sentiment classifier (batch-1 latency).

    HF_HUB_OFFLINE=1 python bench/quant_kernels.py [--part lm|classifier|all] [--rounds 7]

- lm: smollm2 quantized several ways (rtn / gptq 4-bit g128, rtn 8-bit per channel, each also
  with the embedding table and the tied LM head at 8 bits). Per variant: bbc-text perplexity
  with the fused kernels and with MMKIT_QUANT_KERNEL=dequant (their relative difference), then
  decoding timed interleaved across all variants and fp32, round by round (prefill of a
  128-token prompt, 32 greedy tokens on the KV cache, batch 1 and 4). Decoding is
  memory-bound, so the ceiling of each speed-up is fp32's weight bytes over the variant's.
- classifier: the same comparison on the minilm classifier: accuracy with either kernel,
  batch-1 and batch-32 forward latency interleaved with fp32 (seq 64), size on disk.
- layers: one MiniLM-shaped layer (384 -> 1536, 1536 -> 384, 384 -> 384) at 1, 16, 64 and 256
  input rows, each kernel timed in turns with fp32 `F.linear`: torch's weight-only int8
  kernel (bf16 activations, what rtn-8 runs for few rows), a bf16 `F.linear` (AMX where the
  CPU has it), mmkit's packed bf16 kernel (the weight reordered once for oneDNN; where oneDNN
  has bf16) and torch's dynamic int8 Linear (activations quantized too). Which kernel a CPU
  favours at which row count; figures are each kernel's median over fp32's.

Writes bench/results/quant_kernels.json. Not a test. Run it alone: two benchmarks on two cores
measure each other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script
from runtime import interleaved  # bench/runtime.py: forward latency of models, in turns

LM_VARIANTS = {
    "rtn-4-g128": {"method": "rtn", "bits": 4, "group_size": 128},
    "gptq-4-g128-act-order": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True,
                              "calib": "bbc-text", "calib_samples": 64, "calib_length": 256},
    "rtn-8": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
    "rtn-4-g128+emb8": {"method": "rtn", "bits": 4, "group_size": 128, "embeddings": 8},
    "rtn-8+emb8": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True,
                   "embeddings": 8},
}
CLS_VARIANTS = {
    "rtn-8": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
    "gptq-4-g128": {"method": "gptq", "bits": 4, "group_size": 128, "calib": "tweets-sentiment",
                    "calib_samples": 256, "calib_length": 64},
    "rtn-8+emb8": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True,
                   "embeddings": 8},
    "gptq-4-g128+emb4": {"method": "gptq", "bits": 4, "group_size": 128, "embeddings": 4,
                         "calib": "tweets-sentiment", "calib_samples": 256, "calib_length": 64},
}


def _kernel(mode: str) -> None:
    os.environ["MMKIT_QUANT_KERNEL"] = mode


def quantized(ref, step, workdir: Path, name: str, data=None) -> str:
    """Quantize `ref` to an artifact folder (once per name)."""
    from mmkit.core.recipe import run_recipe

    out = workdir / name
    if not (out / "mmkit.json").is_file():
        recipe = {"model": ref, "steps": [{"step": "quantize", **step}]}
        if data:
            recipe.update(data=data, max_samples=2000)
        run_recipe(recipe, out, overwrite=True)
    return str(out)


def scores(loaded, dataset, task, both: bool = True) -> dict:
    """The metric with the fused kernels and (`both`) with the dequantizing one."""
    from mmkit.core.evaluate import evaluate

    key = "perplexity" if task == "causal-lm" else "accuracy"
    out = {}
    for mode in ("auto", "dequant") if both else ("auto",):
        _kernel(mode)
        out[mode] = evaluate(loaded, dataset, "test", batch_size=8 if key == "perplexity" else 32,
                             max_length=256 if key == "perplexity" else 128)[key]
    _kernel("auto")
    if not both:
        return {key: out["auto"]}
    return {key: out["auto"], f"{key}_dequant_kernel": out["dequant"],
            f"{key}_rel_diff": abs(out["auto"] - out["dequant"]) / out["dequant"]}


def decode_rounds(models: dict, batch: int, rounds: int, prompt_len=128, new_tokens=32) -> dict:
    """Prefill and decode times of every model, interleaved round by round (the order
    rotating), after one warm-up each: medians per model."""
    import torch

    from mmkit.core.decoding import greedy_decode

    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(5, vocab, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(0))
    times = {k: ([], []) for k in models}
    names = list(models)
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _, prefill, decode = greedy_decode(models[name], prompt, new_tokens)
            if r:  # round 0 warms up
                times[name][0].append(prefill * 1e3)
                times[name][1].append(decode * 1e3 / new_tokens)
    return {k: {"prefill_ms": statistics.median(p), "decode_ms_per_token": statistics.median(d),
                "decode_tokens_per_s": batch * 1e3 / statistics.median(d)}
            for k, (p, d) in times.items()}


def _sizes(loaded, folder) -> dict:
    from mmkit.core.layers import weight_bytes
    from mmkit.core.profile import disk_bytes

    return {"weights_mb": weight_bytes(loaded.model) / 1e6,
            "disk_mb": None if folder is None else disk_bytes(folder) / 1e6}


def kernel_copies_mb(model) -> dict:
    """Memory the kernels built beside the saved codes, in MB: fused int8 / int4 plans and
    packed bf16 weights (2 bytes per weight, only in layers that measured bf16 fastest)."""
    from mmkit.compression.quantize.qlinear import QuantLinear

    fused = bf16 = 0
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            if layer._plan:
                fused += layer._plan.weight.numel() * layer._plan.weight.element_size()
            if layer._bf16:
                bf16 += 2 * layer.out_features * layer.in_features
    return {"fused_plans_mb": fused / 1e6, "bf16_copies_mb": bf16 / 1e6}


def lm_part(workdir: Path, docs: int, rounds: int) -> dict:
    """smollm2: perplexity with either kernel, decoding speed interleaved, ceilings."""
    from mmkit.core.data import load_data
    from mmkit.core.loading import load_model

    data = load_data("bbc-text", "causal-lm", max_samples=docs)
    loaded = {"fp32": load_model("smollm2", "causal-lm")}
    rows = {"fp32": {**_sizes(loaded["fp32"], None), **scores(loaded["fp32"], data, "causal-lm",
                                                                False)}}
    for name, step in LM_VARIANTS.items():
        start = time.perf_counter()
        folder = quantized("smollm2", step, workdir, name)
        loaded[name] = load_model(folder, "causal-lm")
        rows[name] = {**_sizes(loaded[name], folder), **scores(loaded[name], data, "causal-lm"),
                      "quantize_and_score_s": time.perf_counter() - start}
        print(name, rows[name], flush=True)
    models = {k: v.model for k, v in loaded.items()}
    for batch in (1, 4):
        timing = decode_rounds(models, batch, rounds)
        for name, t in timing.items():
            rows[name][f"batch_{batch}"] = t
    for name, model in models.items():
        rows[name]["kernel_copies"] = kernel_copies_mb(model)
    fp = rows["fp32"]
    for row in rows.values():
        row["bytes_ceiling"] = fp["weights_mb"] / row["weights_mb"]
        for batch in (1, 4):
            t, f = row[f"batch_{batch}"], fp[f"batch_{batch}"]
            t["decode_speedup"] = t["decode_tokens_per_s"] / f["decode_tokens_per_s"]
            t["prefill_ratio"] = t["prefill_ms"] / f["prefill_ms"]
        row["share_of_ceiling_batch_1"] = (row["batch_1"]["decode_speedup"]
                                           / row["bytes_ceiling"])
    return {"model": "smollm2", "data": f"bbc-text, {docs} documents per split, windows of 256",
            "decoding": "prompt 128 random tokens, 32 greedy tokens on the KV cache; medians "
                        f"of {rounds} interleaved rounds", "variants": rows}


def classifier_part(workdir: Path, samples: int, rounds: int) -> dict:
    """minilm classifier: accuracy with either kernel, latency interleaved with fp32."""
    from classifier import trained_classifier
    from mmkit.core.data import load_data
    from mmkit.core.loading import load_model

    trained = trained_classifier(samples)
    data = load_data("tweets-sentiment", "text-classification", max_samples=samples)
    task = "text-classification"
    loaded = {"fp32": load_model(trained, task)}
    rows = {"fp32": {**_sizes(loaded["fp32"], trained),
                     **scores(loaded["fp32"], data, task, False)}}
    for name, step in CLS_VARIANTS.items():
        folder = quantized(trained, step, workdir, f"cls-{name}", data="tweets-sentiment")
        loaded[name] = load_model(folder, task)
        rows[name] = {**_sizes(loaded[name], folder), **scores(loaded[name], data, task)}
        print(name, rows[name], flush=True)
    for batch in (1, 32):
        timing = interleaved(loaded, batch, 64, rounds * (20 if batch == 1 else 3))
        timing = {name: t["median_ms"] for name, t in timing.items()}
        for name, ms in timing.items():
            rows[name][f"batch_{batch}_median_ms"] = ms
            rows[name][f"batch_{batch}_speedup"] = timing["fp32"] / ms
    for name, one in loaded.items():
        rows[name]["kernel_copies"] = kernel_copies_mb(one.model)
    for row in rows.values():
        row["accuracy_drop_points"] = 100 * (rows["fp32"]["accuracy"] - row["accuracy"])
    return {"model": "minilm fine-tuned on tweets-sentiment (full, 1 epoch)",
            "data": f"{samples} tweets per split; latency at seq 64, interleaved",
            "variants": rows}


def layers_part(rounds: int) -> dict:
    """Per-layer kernel times over fp32's (see the module docstring), in turns: each round
    calls every kernel once, after five warm-up rounds."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from mmkit.compression.quantize import kernels as qkernels

    rows_out = []
    for rows in (1, 16, 64, 256):
        for n_in, n_out in ((384, 1536), (1536, 384), (384, 384)):
            x = torch.randn(rows, n_in)
            w = torch.randn(n_out, n_in) * 0.02
            scale = w.abs().amax(1) / 127
            codes = (w / scale[:, None]).round().to(torch.int8).contiguous()
            dynamic = DynamicLinear(n_in, n_out, dtype=torch.qint8)
            dynamic.set_weight_bias(torch.quantize_per_channel(
                w, scale.double(), torch.zeros(n_out, dtype=torch.long), 0, torch.qint8), None)
            w_bf16, ones = w.bfloat16(), torch.ones(n_out, dtype=torch.bfloat16)
            kernels = {
                "fp32": lambda: torch.nn.functional.linear(x, w),
                "weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(
                    x.bfloat16(), codes, ones).float() * scale,
                "bf16_linear": lambda: torch.nn.functional.linear(x.bfloat16(), w_bf16).float(),
                "dynamic_int8": lambda: dynamic(x),
            }
            if qkernels._bf16_supported():
                packed = qkernels.pack_bf16(codes.float(), scale)
                kernels["packed_bf16"] = lambda: qkernels.run_bf16(packed, x, None)
            times = {k: [] for k in kernels}
            with torch.inference_mode():
                for i in range(rounds + 5):
                    for name, run in kernels.items():
                        start = time.perf_counter()
                        run()
                        if i >= 5:
                            times[name].append(time.perf_counter() - start)
            fp32 = statistics.median(times["fp32"])
            rows_out.append({"rows": rows, "in": n_in, "out": n_out,
                             "fp32_ms": 1e3 * fp32,
                             **{f"{k}_over_fp32": statistics.median(v) / fp32
                                for k, v in times.items() if k != "fp32"}})
            print(rows_out[-1], flush=True)
    return {"rounds": rounds, "threads": torch.get_num_threads(), "rows": rows_out}


def main() -> None:
    """Run the parts asked for and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["lm", "classifier", "layers", "all"], default="all")
    parser.add_argument("--docs", type=int, default=20, help="bbc-text documents per split")
    parser.add_argument("--samples", type=int, default=2000, help="tweets per split")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "quant_kernels.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from mmkit.core.versions import environment

    torch.manual_seed(0)
    torch.set_num_threads(2)
    workdir = Path(tempfile.mkdtemp(prefix="mmkit-bench-k-"))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}  # parts not run are kept
    result.update({"environment": environment("cpu"),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    try:
        if args.part in ("layers", "all"):
            result["layers"] = layers_part(max(args.rounds * 5, 30))
        if args.part in ("classifier", "all"):
            result["classifier"] = classifier_part(workdir, args.samples, args.rounds)
        if args.part in ("lm", "all"):
            result["lm"] = lm_part(workdir, args.docs, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
