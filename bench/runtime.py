"""ONNX Runtime against PyTorch on the minilm sentiment classifier, and the model
`mmkit search --runtime onnxruntime` finds, all timed interleaved on this CPU.

    HF_HUB_OFFLINE=1 python bench/runtime.py [--parts compare,decode,search] [--quick]

- compare: the dense fine-tune (bench/elastic.py's, 2,000 tweets, 2 epochs; trained once and
  cached in --work) as PyTorch fp32, mmkit dynamic-int8, ONNX Runtime fp32 and ONNX Runtime
  int8 (dynamic, per channel, embeddings too): test accuracy, size, and latency at batch 1 and
  32 (seq 64, 2 threads), all four interleaved round by round, idle threads sleeping in both
  runtimes (OMP_WAIT_POLICY=PASSIVE for torch), which costs torch some of its own speed.
- search: `mmkit search --runtime onnxruntime` on bench/elastic.py's elastic super-network
  (its trained sub-networks x ONNX Runtime int8; --knobs), 30 TPE trials under a budget
  relative to the unmodified model's float export; its exported graph is then timed
  interleaved with ONNX Runtime int8 of the dense fine-tune (the best a user gets from an
  exporter and ONNX Runtime's quantizer alone). Goal: >= 2x faster at <= 1 point of test
  accuracy.
- decode: smollm2 exported with its KV cache (`mmkit export --onnx`, float32) against PyTorch
  float32: prefill of 128 tokens and greedy decode tokens/s at batch 1 and 4, interleaved in
  one process; then at batch 1 each in its own `mmkit bench --generate` process, alternated.

Writes bench/results/runtime.json. Not a test; run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script

KNOBS = "layers,heads,ffn,quant"  # the search's knobs unless --knobs says otherwise


def _variants(work: Path, dense: str) -> dict:
    """name -> folder: the dense model in each runtime / precision (exports cached)."""
    from mmkit.compression.onnx_export import export_onnx
    from mmkit.core.recipe import run_recipe

    folders = {"pytorch-fp32": dense}
    dyn = work / "dense-dynamic-int8"
    if not (dyn / "mmkit.json").is_file():
        run_recipe({"model": dense, "steps": [{"step": "quantize", "method": "dynamic-int8"}]},
                   dyn, overwrite=True)
    folders["mmkit-dynamic-int8"] = str(dyn)
    for name, int8 in (("ort-fp32", False), ("ort-int8", True)):
        out = work / f"dense-{name}"
        if not (out / "mmkit_onnx.json").is_file():
            export_onnx(dense, out, int8=int8, overwrite=True)
        folders[name] = str(out)
    return folders


def _load(folder: str, dense, threads: int):
    """A LoadedModel for a PyTorch artifact or an ONNX export (through OrtModel)."""
    from mmkit.core.loading import load_model
    from mmkit.core.ort_model import as_onnx
    from mmkit.core.ort_runtime import is_onnx_export

    if is_onnx_export(folder):
        return as_onnx(dense, folder, threads)
    return load_model(folder, "text-classification")


def _sizes(folder: str) -> float:
    from mmkit.core.ort_runtime import is_onnx_export, onnx_bytes
    from mmkit.core.profile import disk_bytes

    return (onnx_bytes(folder) if is_onnx_export(folder) else disk_bytes(folder)) / 1e6


def interleaved(loaded: dict, batch: int, seq_len: int, rounds: int) -> dict:
    """Median forward latency (ms) of every model, one call each per round, the order
    rotating from round to round, after a warm-up call each."""
    from mmkit.core.profile import _forward, _time_one

    runs = {k: _forward(m, "cpu", batch, seq_len)[2] for k, m in loaded.items()}
    for run in runs.values():
        run()
        run()
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_time_one(runs[name], "cpu") * 1e3)
    return {k: {"median_ms": statistics.median(v), "p10_ms": sorted(v)[len(v) // 10],
                "p90_ms": sorted(v)[(9 * len(v)) // 10]} for k, v in times.items()}


def measure(folders: dict, dense_folder: str, data, args) -> dict:
    """Accuracy, size and interleaved latency of every folder."""
    from mmkit.core.evaluate import evaluate
    from mmkit.core.loading import load_model

    dense = load_model(dense_folder, "text-classification")
    loaded = {k: _load(f, dense, args.threads) for k, f in folders.items()}
    rows = {k: {"folder": f, "size_mb": _sizes(f),
                "test_accuracy": evaluate(loaded[k], data, "test")["accuracy"]}
            for k, f in folders.items()}
    for batch, rounds in ((1, args.rounds), (32, max(args.rounds // 5, 5))):
        timing = interleaved(loaded, batch, 64, rounds)
        for k, t in timing.items():
            rows[k][f"batch_{batch}"] = t
    return rows


def compare(args, work: Path, data, dense: str) -> dict:
    """The dense model in the four runtimes / precisions."""
    rows = measure(_variants(work, dense), dense, data, args)
    fp32 = rows["pytorch-fp32"]
    for row in rows.values():
        for b in (1, 32):
            row[f"batch_{b}"]["speedup_vs_pytorch_fp32"] = (
                fp32[f"batch_{b}"]["median_ms"] / row[f"batch_{b}"]["median_ms"])
    return {"model": "minilm, dense full fine-tune (bench/elastic.py)", "seq_len": 64,
            "threads": args.threads, "variants": rows}


def search_part(args, work: Path, data, trained: dict) -> dict:
    """The search in ONNX Runtime on the elastic model; its export against ORT int8."""
    from mmkit.core.data import DataSpec
    from mmkit.core.recipe import RunOptions
    from mmkit.search.run import prepare, search
    from mmkit.search.settings import SearchRequest

    from mmkit.core.errors import RuntimeFailure

    out = work / "search-onnxruntime"
    request = SearchRequest(model=trained["elastic"]["artifact"],
                            data=DataSpec(data="tweets-sentiment", max_samples=args.samples,
                                          seed=0),
                            budget=f"{args.budget}x",
                            knobs=None if args.space_file else args.knobs,
                            space_file=args.space_file or None,
                            sampler="tpe", seq_len=64, threads=args.threads, out=out,
                            runtime="onnxruntime")
    try:
        result = search(prepare(request, RunOptions(overwrite=True)), args.trials, None, 1,
                        "best")
    except RuntimeFailure as exc:  # no point met the budget: say so
        return {"budget": f"{args.budget}x", "failure": str(exc)}
    dense = trained["dense"]["artifact"]
    folders = {"searched": result["exported"][0], "ort-int8": str(work / "dense-ort-int8"),
               "ort-fp32": str(work / "dense-ort-fp32")}
    rows = measure(folders, dense, data, args)
    searched, int8 = rows["searched"], rows["ort-int8"]
    speedups = {b: int8[f"batch_{b}"]["median_ms"] / searched[f"batch_{b}"]["median_ms"]
                for b in (1, 32)}
    points = 100 * (int8["test_accuracy"] - searched["test_accuracy"])
    points_dense = 100 * (trained["dense"]["test_accuracy"] - searched["test_accuracy"])
    return {"budget": f"{args.budget}x of the unmodified model's float export",
            "trials": result["trials_completed"], "seconds": result["seconds_this_run"],
            "best": result["best"], "best_remeasured": result["best_remeasured"],
            "confirmation": result.get("confirmation"),
            "variants": rows,
            "searched_vs_ort_int8": {"speedup_batch_1": speedups[1],
                                     "speedup_batch_32": speedups[32],
                                     "points_below_ort_int8": points,
                                     "points_below_pytorch_dense": points_dense,
                                     "goal_2x_at_le_1_point": speedups[1] >= 2.0
                                     and points_dense <= 1.0}}


def _decode_alone(folder: Path, args) -> dict:
    """Each runtime in its own `mmkit bench --generate` process with its default threading
    (torch's threads spinning, as a user runs it), the two alternated: medians of the runs'
    figures. In one process torch's threads must sleep between calls, which slows its decode
    steps (many small ops per token) more than its prefill."""
    import subprocess
    import sys

    common = ["--generate", str(args.new_tokens), "--seq-len", "128", "--threads",
              str(args.threads), "--warmup", "1", "--repeats", "5", "--json"]
    commands = {"torch": ["smollm2", "--task", "causal-lm"],
                "onnxruntime": [str(folder), "--runtime", "onnxruntime"]}
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    runs = {name: [] for name in commands}
    for _ in range(args.decode_rounds // 2 + 1):
        for name, command in commands.items():
            done = subprocess.run([sys.executable, "-m", "mmkit.cli.main", "bench", *command,
                                   *common], capture_output=True, text=True, env=env,
                                  check=True)
            runs[name].append(json.loads(done.stdout))
    row = {name: {"prefill_ms": statistics.median(r["prefill_ms"]["median"] for r in rs),
                  "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rs),
                  "runs": len(rs)}
           for name, rs in runs.items()}
    row["ort_over_torch_decode"] = (row["onnxruntime"]["decode_tokens_per_s"]
                                    / row["torch"]["decode_tokens_per_s"])
    return row


def decode_part(args, work: Path) -> dict:
    """smollm2 decoding in PyTorch fp32 and in ONNX Runtime on its export with the KV cache
    (fp32: dynamic int8 loses causal LMs' outliers), interleaved round by round: the same
    prompt, the same forwards, and whether both pick the same greedy tokens."""
    import numpy as np
    import torch

    from mmkit.compression.onnx_export import export_onnx
    from mmkit.core.decoding import greedy_decode
    from mmkit.core.loading import load_model
    from mmkit.core.ort_decoding import ort_greedy_decode
    from mmkit.core.ort_runtime import session

    folder = work / "smollm2-onnx"
    if not (folder / "mmkit_onnx.json").is_file():
        export_onnx("smollm2", folder, overwrite=True)
    model = load_model("smollm2", "causal-lm").model
    sess = session(folder / "model.onnx", args.threads, spin=False)
    rows = {}
    for batch in (1, 4):
        prompt = torch.randint(5, model.config.vocab_size, (batch, 128),
                               generator=torch.Generator().manual_seed(0))
        times = {"torch": ([], []), "onnxruntime": ([], [])}
        for r in range(args.decode_rounds + 1):  # round 0 warms up
            for name in (("torch", "onnxruntime") if r % 2 else ("onnxruntime", "torch")):
                if name == "torch":
                    tokens, prefill, decode = greedy_decode(model, prompt, args.new_tokens)
                    torch_tokens = tokens.numpy()
                else:
                    tokens, prefill, decode, _ = ort_greedy_decode(sess, prompt.numpy(),
                                                                   args.new_tokens)
                    ort_tokens = tokens
                if r:
                    times[name][0].append(prefill * 1e3)
                    times[name][1].append(decode * 1e3 / args.new_tokens)
        row = {name: {"prefill_ms": statistics.median(p),
                      "decode_tokens_per_s": batch * 1e3 / statistics.median(d)}
               for name, (p, d) in times.items()}
        row["ort_over_torch_decode"] = (row["onnxruntime"]["decode_tokens_per_s"]
                                        / row["torch"]["decode_tokens_per_s"])
        row["ort_over_torch_prefill_time"] = (row["onnxruntime"]["prefill_ms"]
                                              / row["torch"]["prefill_ms"])
        row["same_greedy_tokens"] = float(np.mean(ort_tokens == torch_tokens))
        rows[f"batch_{batch}"] = row
    rows["alone_batch_1"] = _decode_alone(folder, args)
    return {"model": "smollm2 (float32 in both runtimes)",
            "decoding": f"prompt 128 random tokens, {args.new_tokens} greedy tokens on the KV "
                        f"cache; medians of {args.decode_rounds} interleaved rounds, "
                        f"{args.threads} threads",
            "onnx_mb": json.loads((folder / "mmkit_onnx.json").read_text())["onnx_mb"], **rows}


def main() -> None:
    """Run the parts asked for and write the JSON (parts not run keep their old figures)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="compare,decode,search")
    parser.add_argument("--work", default="/tmp/mmkit-bench-elastic",
                        help="bench/elastic.py's folder: its fine-tunes are reused")
    parser.add_argument("--samples", type=int, default=500,
                        help="tweets per split: the search's data (its recovery trains on "
                             "them) and every score")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--knobs", default=KNOBS,
                        help="the search's knobs (add recovery: distillation from the uncut "
                             "model for each point within the budget)")
    parser.add_argument("--space", default="",
                        help="bench/elastic.py's --space: the elastic model searched")
    parser.add_argument("--space-file", default="",
                        help="the search's space file (instead of --knobs), e.g. to give the "
                             "recovery knob more steps")
    # 0.3x of the float export is about 2x faster than its int8 (0.6x): only the deepest cuts
    # reach it (a first run: none did, 0.302x at best), so the search runs at a budget its
    # accurate points can meet and the comparison says how far that is from 2x
    parser.add_argument("--budget", type=float, default=0.45)
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds, batch 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-rounds", type=int, default=5, help="decode: interleaved rounds")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: greedy tokens")
    parser.add_argument("--quick", action="store_true", help="tiny settings to try the bench")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.space_file and args.knobs != KNOBS:
        parser.error("--space-file names the knobs itself: give it or --knobs, not both")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # torch and ONNX Runtime timed in turns in one process: idle threads must sleep, or one
    # runtime's spinning threads slow the other's calls (torch 18 -> 30-60 ms measured);
    # ONNX Runtime's sessions are made without spinning (core/ort_model.py)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    import elastic  # bench/elastic.py: the dense and elastic fine-tunes, cached

    ea = argparse.Namespace(train_samples=200 if args.quick else 2000,
                            samples=100 if args.quick else args.samples,
                            epochs=1 if args.quick else 2, lr=5e-5, samples_k=1,
                            space=args.space)
    if args.quick:
        args.samples, args.trials, args.rounds, args.budget = 100, 4, 6, 0.9
    work = Path(args.work + ("-quick" if args.quick else ""))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or (work / "runtime-quick.json" if args.quick
                            else RESULTS / "runtime.json"))
    from mmkit.core.data import load_data

    data = load_data("tweets-sentiment", "text-classification", max_samples=args.samples,
                     seed=0)
    trained = elastic.train(ea, work, data)
    result = json.loads(out.read_text()) if out.exists() else {}
    parts = args.parts.split(",")
    if "compare" in parts:
        result["compare"] = compare(args, work, data, trained["dense"]["artifact"])
        write_result(result, out)
    if "decode" in parts:
        result["decode"] = decode_part(args, work)
        write_result(result, out)
    if "search" in parts:
        _variants(work, trained["dense"]["artifact"])  # the exports the search compares with
        key = "search" + (f" (space {args.space})" if args.space else "") + (
            f" (budget {args.budget:g}x)" if args.budget != 0.45 else "") + (
            f" ({args.knobs})" if args.knobs != KNOBS else "") + (
            f" (samples {args.samples})" if args.samples != 500 else "") + (
            f" (space file {Path(args.space_file).name})" if args.space_file else "")
        result[key] = {**search_part(args, work, data, trained),
                       "space": args.space or "the elastic method's default"}
        write_result(result, out)


if __name__ == "__main__":
    main()
