"""Kills and concurrent writers against real `mmkit` processes: what survives, what is left.

    HF_HUB_OFFLINE=1 python bench/hardening.py [--kills 24] [--rounds 8] \
        [--out bench/results/hardening.json]

Kills: a command is started and killed with SIGKILL after a random delay (spread over its
whole run); then the output must be a valid artifact (the old one, or the new one) or absent
when there was none, and the same command run again must succeed and leave no hidden
leftovers beside the output. Writers: several processes write the same new output at once
(each with its own seed); exactly one may win, the others must exit 2, and no process may
exit 0 without its result being the one on disk ("lost runs"). Not a test: it counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# (name, command before -o, whether OUT already holds an artifact the command replaces)
COMMANDS = [
    ("quantize --overwrite", ["quantize", "tiny:llama", "--bits", "4", "--method", "gptq",
                              "--calib", "bbc-text", "--calib-samples", "16"], True),
    ("finetune", ["finetune", "tiny:bert", "--max-samples", "64", "--epochs", "2",
                  "--batch-size", "8", "--save-steps", "2"], False),
    ("prune --overwrite", ["prune", "tiny:llama", "--method", "wanda", "--calib", "bbc-text",
                           "--calib-samples", "16"], True),
]


def mmkit(args, **kwargs) -> subprocess.Popen:
    """Start `mmkit ARGS` as its own process group."""
    return subprocess.Popen(["mmkit", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def valid(path: Path) -> bool:
    """An artifact every file of which matches its manifest (as `mmkit inspect` checks)."""
    return subprocess.run(["mmkit", "inspect", str(path)], env=ENV, capture_output=True
                          ).returncode == 0


def leftovers(out: Path) -> list[str]:
    """Hidden siblings of OUT (lock files, unfinished or swapped-out folders)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def timed(args) -> float:
    """Seconds one uninterrupted run takes (to spread the kills over it)."""
    start = time.perf_counter()
    proc = mmkit(args)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"mmkit {' '.join(map(str, args))} failed:\n{err[-2000:]}")
    return time.perf_counter() - start


def kills(n: int, root: Path, rng: random.Random) -> dict:
    """Kill each command at random moments; check what it left and that a rerun recovers."""
    rows = []
    for name, args, replaces in COMMANDS:
        out = root / name.split()[0]
        duration = timed([*args, "-o", out, "--overwrite"])
        for i in range(n // len(COMMANDS)):
            if not replaces:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(f"{out}.checkpoints", ignore_errors=True)
            proc = mmkit([*args, "-o", out, "--overwrite"])
            delay = rng.uniform(0.3, duration)
            time.sleep(delay)
            killed = proc.poll() is None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished first
                pass
            proc.wait()
            state = "valid" if valid(out) else ("absent" if not out.exists() else "corrupt")
            left = leftovers(out)
            resumable = Path(f"{out}.checkpoints").is_dir()
            again = [*args, "-o", out, "--overwrite"] + (["--resume"] if resumable else [])
            rerun = mmkit(again)
            _, err = rerun.communicate()
            rows.append({"command": name, "delay_s": round(delay, 2), "killed_mid_run": killed,
                         "output_after_kill": state, "hidden_leftovers_after_kill": left,
                         "resumed": resumable, "rerun_exit": rerun.returncode,
                         "rerun_error": err.strip().splitlines()[-1] if rerun.returncode else "",
                         "output_valid_after_rerun": valid(out),
                         "leftovers_after_rerun": leftovers(out) + (
                             [f"{out.name}.checkpoints"]
                             if Path(f"{out}.checkpoints").exists() else [])})
            print(json.dumps(rows[-1]), flush=True)
    bad_state = [r for r in rows if r["output_after_kill"] == "corrupt"
                 or (r["output_after_kill"] == "absent" and r["command"].endswith("overwrite"))]
    return {"kills": len(rows), "killed_mid_run": sum(r["killed_mid_run"] for r in rows),
            "outputs_valid_or_absent_as_expected": len(rows) - len(bad_state),
            "reruns_ok": sum(r["rerun_exit"] == 0 and r["output_valid_after_rerun"]
                             for r in rows),
            "leftovers_after_rerun": sum(len(r["leftovers_after_rerun"]) for r in rows),
            "runs": rows}


def writers(rounds: int, per_round: int, root: Path) -> dict:
    """Several processes write one new output at once, each with its own seed."""
    recipe = root / "cast.yaml"
    recipe.write_text("model: tiny:llama\ndata: bbc-text\nmax_samples: 32\nsteps:\n"
                      "  - {step: prune, method: magnitude, sparsity: 0.5}\n"
                      "eval: {split: train, max_length: 128}\n")
    rows = []
    for r in range(rounds):
        out = root / f"w{r}"
        procs = []
        for seed in range(per_round):
            seeded = root / f"w{r}-{seed}.yaml"
            seeded.write_text(recipe.read_text() + f"seed: {seed}\n")
            procs.append((seed, mmkit(["run", seeded, "-o", out])))
        ends = [(seed, p.wait(), p.stderr.read()) for seed, p in procs]
        winner = json.loads((out / "mmkit.json").read_text())["parent"]["seed"] \
            if valid(out) else None
        exits = sorted(code for _, code, _ in ends)
        lost = [seed for seed, code, _ in ends if code == 0 and seed != winner]
        told = [err.strip().splitlines()[-1] for _, code, err in ends if code == 2]
        rows.append({"round": r, "exits": exits, "winner_seed": winner, "lost_runs": lost,
                     "losers_told": told[:2], "leftovers": leftovers(out)})
        print(json.dumps(rows[-1]), flush=True)
    return {"rounds": rounds, "writers_per_round": per_round,
            "writers": rounds * per_round,
            "succeeded": sum(r["exits"].count(0) for r in rows),
            "refused_exit_2": sum(r["exits"].count(2) for r in rows),
            "other_exits": sum(len([e for e in r["exits"] if e not in (0, 2)]) for r in rows),
            "lost_runs": sum(len(r["lost_runs"]) for r in rows),
            "leftovers": sum(len(r["leftovers"]) for r in rows), "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "hardening.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="mmkit-hardening-") as tmp:
        root = Path(tmp)
        result = {"kills": kills(args.kills, root, rng),
                  "concurrent_writers": writers(args.rounds, args.writers, root)}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
