"""One search trial: build the candidate, profile it on the target device, and evaluate it
only when it meets the latency budget."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import time

from ..core.errors import InputError, RuntimeFailure

log = logging.getLogger("mmkit")

# what each objective measures, its direction, and the value an unevaluated trial gets
OBJECTIVES = {
    "accuracy": ("maximize", 0.0),
    "macro_f1": ("maximize", 0.0),
    "perplexity": ("minimize", 1e9),
    "latency": ("minimize", None),
    "size": ("minimize", None),
}
QUALITY = ("accuracy", "macro_f1", "perplexity")


def check_objectives(names: list[str], task: str) -> list[str]:
    """Objectives the task can measure, or a clear error."""
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise InputError(f"Unknown objective '{unknown[0]}'. Objectives: {', '.join(OBJECTIVES)}.")
    quality = "perplexity" if task == "causal-lm" else "accuracy"
    for n in names:
        if n in QUALITY and n != quality and not (n == "macro_f1" and quality == "accuracy"):
            raise InputError(f"The objective '{n}' cannot be measured on a {task} model; use "
                             f"{quality}.")
    if not any(n in QUALITY for n in names):
        raise InputError(f"The objectives need one quality measure ({quality}) beside "
                         f"{', '.join(names)}.")
    return names


def n_layers(model) -> int:
    """Depth of the deepest stack of transformer blocks."""
    from ..compression.calibration import block_stacks

    return max((len(blocks) for _, blocks in block_stacks(model)), default=1)


class Trial:
    """Evaluates points of the space on one pristine copy of the model."""

    def __init__(self, settings, base, dataset, repeats: int = 10):
        """`settings`: the search's SearchSettings; `base`: the loaded model every trial
        copies; `dataset`: the data it is evaluated (and calibrated) on."""
        self.settings, self.base, self.dataset, self.repeats = settings, base, dataset, repeats
        self.space, self.objectives = settings.space, settings.objectives
        self.budget_ms, self.device = settings.budget_ms, settings.device
        self.batch_size, self.seq_len = settings.batch_size, settings.seq_len
        self.calib = settings.data  # structured cuts and GPTQ calibrate on the search's data
        self.depth = n_layers(base.model)
        self.runtime = settings.runtime  # None: PyTorch
        self._reference = None  # under ONNX Runtime: the unmodified model's export

    def build(self, steps: list[dict]):
        """Apply the steps to a copy of the base model, through the recipe's step runner."""
        from ..core.registry import Context
        from ..core.steps import apply_steps, check_steps, resolve_steps

        checked = resolve_steps(check_steps(steps, "search"), self.base.kind, self.device,
                                "search")
        loaded = copy.deepcopy(self.base)
        with tempfile.TemporaryDirectory(prefix="mmkit-trial-") as tmp:
            ctx = Context(device=self.device, dataset=self.dataset, workdir=tmp,
                          fingerprint="search", origin=self.base)  # recovery's teacher
            loaded, _ = apply_steps(loaded, checked, ctx, announce=False)
        return loaded

    def __call__(self, trial):
        """The Optuna objective."""
        import optuna

        from .space import no_faster, point_key, steps_for

        start = time.perf_counter()
        params = {name: trial.suggest_categorical(name, values)
                  for name, values in self.space.items()}
        key = point_key(params, self.space)
        trial.set_user_attr("point", key)
        # the database storages set it already as the trial starts; a journal file does not
        trial.set_user_attr("worker_pid", os.getpid())
        settled, running = taken_points(trial.study, self.space, trial.number)
        over = self.over_budget_points(trial.study)
        twin = settled.get(key, running.get(key))
        if twin is not None:  # another trial has measured it, or is measuring it now
            trial.set_user_attr("duplicate_of", twin)
            log.info("trial %d: %s is trial %d's point; skipped", trial.number, key, twin)
            self._move_on(trial, {key, *settled, *running}, over)
            raise optuna.TrialPruned(f"the point {key} is trial {twin}'s")
        beaten = next((n for point, n in over if no_faster(params, point)), None)
        if beaten is not None:  # it cannot meet the budget: a trial is worth more elsewhere
            trial.set_user_attr("slower_than", beaten)
            log.info("trial %d: %s cuts no more than trial %d's point, which is over the "
                     "budget; skipped", trial.number, key, beaten)
            self._move_on(trial, {key, *settled, *running}, over)
            raise optuna.TrialPruned(f"the point {key} is no faster than trial {beaten}'s")
        elastic = self.base.extra.get("elastic")
        steps = steps_for(params, self.depth, self.calib, elastic)
        trial.set_user_attr("steps", steps)
        # recovery trains weights, not the architecture: the latency it would be timed at is
        # the cut model's, so the training is paid for only by a point within the budget
        deferred = steps if params.get("recovery") else None
        try:
            loaded = self.build(steps_for({**params, "recovery": 0}, self.depth, self.calib,
                                          elastic) if deferred else steps)
        except InputError as exc:  # e.g. every layer removed: not a candidate
            trial.set_user_attr("invalid", str(exc))
            self._stop_when_all_tried(trial, {key, *settled})
            raise optuna.TrialPruned(str(exc)) from None
        if self.runtime == "onnxruntime":
            self.reference()  # the unmodified model must export: else stop here
            try:
                measured = self._measure(trial, key, loaded, params, deferred)
            except (InputError, RuntimeFailure) as exc:  # this cut's graph does not export
                log.warning("trial %d (%s): %s", trial.number, key, exc)
                trial.set_user_attr("invalid", f"ONNX export: {exc}")
                self._stop_when_all_tried(trial, {key, *settled})
                raise optuna.TrialPruned(str(exc)) from None
        else:
            measured = self._measure(trial, key, loaded, params, deferred)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        self._stop_when_all_tried(trial, {key, *settled})
        return tuple(measured.get(n, OBJECTIVES[n][1]) for n in self.objectives)

    def _measure(self, trial, key: str, loaded, params: dict, deferred: list | None) -> dict:
        """Time `loaded` in the target runtime and, within the budget, score it; when its
        recovery was `deferred` (the full steps), the model those steps build is scored."""
        with self.candidate(loaded, params) as (candidate, reference, size):
            measured = self._time(trial, candidate, reference, size)
            if deferred is not None and measured["over"] > 0:
                trial.set_user_attr("recovery_trained", False)
            if measured["over"] > 0 or deferred is None:
                return self._score(trial, key, candidate, measured)
        loaded = self.build(deferred)
        trial.set_user_attr("recovery_trained", True)
        with self.candidate(loaded, params) as (candidate, _, _):
            return self._score(trial, key, candidate, measured)

    @contextlib.contextmanager
    def candidate(self, loaded, params: dict):
        """(the model the runtime runs, the unmodified model it is timed against, its size in
        MB): `loaded` itself in PyTorch, its export under ONNX Runtime."""
        from ..core.layers import weight_bytes
        from ..core.profile import megabytes

        if self.runtime == "onnxruntime":
            with self.in_onnxruntime(loaded, params) as (exported, size):
                yield exported, self.reference(), size
        else:
            yield loaded, self.base, megabytes(weight_bytes(loaded.model))

    def _time(self, trial, candidate, reference, size: float) -> dict:
        """Latency (interleaved with `reference`) and size, and how far over the budget
        (`over`, > 0: over); the trial's attributes are set on the way."""
        from ..core.profile import profile_pair
        from .results import budget_text

        # timed interleaved with the unmodified model, so that the ratio holds while the
        # machine's speed drifts between (and during) trials
        prof = profile_pair(candidate, reference, self.device, batch_size=self.batch_size,
                            seq_len=self.seq_len, warmup=2, rounds=self.repeats)
        latency = prof["candidate_ms"]["median"]
        over = self._over_budget(latency, prof["ratio"])
        trial.set_user_attr("latency_ms", latency)
        trial.set_user_attr("reference_latency_ms", prof["reference_ms"]["median"])
        trial.set_user_attr("latency_ratio", prof["ratio"])
        trial.set_user_attr("latency_p90_ms", prof["candidate_ms"]["p90"])
        trial.set_user_attr("latency_steady", prof["stable"])
        trial.set_user_attr("threads", prof["environment"]["threads"])
        trial.set_user_attr("load_per_cpu", prof["environment"]["load_per_cpu"])
        trial.set_user_attr("size_mb", size)
        trial.set_user_attr("constraint", [over])  # for pareto.json, as earlier searches have it
        trial.set_constraint("latency", over)  # what the samplers and the plot read
        if over > 0:  # over the budget: no need to pay for the evaluation (nor the recovery)
            trial.set_user_attr("evaluated", False)
            log.info("trial %d: %.1f ms, %.2fx the unmodified model, over the %s budget; not "
                     "evaluated", trial.number, latency, prof["ratio"],
                     budget_text(self.budget_ms, self.settings.budget_ratio))
        return {"latency": latency, "size": size, "ratio": prof["ratio"], "over": over}

    def _score(self, trial, key: str, candidate, measured: dict) -> dict:
        """`measured` with the candidate's quality on the validation split when it is within
        the budget (as it is)."""
        from ..core.evaluate import evaluate

        if measured["over"] > 0:
            return measured
        metrics = evaluate(candidate, self.dataset, "validation")
        measured = {**measured, **{k: metrics[k] for k in QUALITY if k in metrics}}
        trial.set_user_attr("evaluated", True)
        trial.set_user_attr("metrics", {k: metrics[k] for k in QUALITY if k in metrics})
        log.info("trial %d (%s): %s, %.1f ms (%.2fx the unmodified model), %.1f MB",
                 trial.number, key,
                 ", ".join(f"{k} {v:.4f}" for k, v in trial.user_attrs["metrics"].items()),
                 measured["latency"], measured["ratio"], measured["size"])
        return measured

    @contextlib.contextmanager
    def in_onnxruntime(self, loaded, params: dict):
        """The candidate exported to ONNX (ONNX Runtime's int8 when the point asks for it),
        as a model evaluate / profile can call, and its graph's size in MB."""
        from ..compression.onnx_export import temporary_export
        from ..core.ort_model import as_onnx
        from ..core.ort_runtime import onnx_bytes
        from ..core.profile import megabytes
        from .space import ort_int8

        threads = self.settings.threads
        # no warning when the int8 graph strays from PyTorch: the trial scores its accuracy,
        # and the warning would name the searched model, not this candidate, on every trial
        with temporary_export(loaded, int8=ort_int8(params), threads=threads,
                              warn=False) as folder:
            yield as_onnx(loaded, folder, threads), megabytes(onnx_bytes(folder))

    def reference(self):
        """The unmodified model in ONNX Runtime (float32), exported once per worker."""
        if self._reference is None:
            import tempfile

            from ..compression.onnx_export import export_model_
            from ..core.ort_model import as_onnx

            folder = tempfile.TemporaryDirectory(prefix="mmkit-onnx-reference-")
            export_model_(copy.deepcopy(self.base), folder.name, threads=self.settings.threads)
            self._reference = (folder, as_onnx(self.base, folder.name, self.settings.threads))
        return self._reference[1]

    def _over_budget(self, latency_ms: float, ratio: float) -> float:
        """How far over the budget a candidate is (Optuna's constraint: feasible at 0 or
        below): in the ratio to the unmodified model's latency when the budget is a ratio,
        in ms when it is a time."""
        budget_ratio = self.settings.budget_ratio
        if budget_ratio is not None:
            return ratio - budget_ratio
        return latency_ms - self.budget_ms if self.budget_ms else 0.0

    def nothing_left(self, study) -> bool:
        """True when every point of the (listable) space has been tried."""
        from .space import ENUMERATE_LIMIT, size

        settled, _ = taken_points(study, self.space)
        return size(self.space) <= ENUMERATE_LIMIT and len(settled) >= size(self.space)

    def _stop_when_all_tried(self, trial, settled: set[str]) -> None:
        """Stop the study once every point of the space has been tried (with this trial)."""
        from .space import ENUMERATE_LIMIT, size

        if size(self.space) <= ENUMERATE_LIMIT and len(settled) >= size(self.space):
            log.info("every one of the %d points of the space has been tried; the search stops",
                     size(self.space))
            trial.study.stop()

    def _move_on(self, trial, taken: set[str], over: list) -> None:
        """After a point that was taken already, or cannot meet the budget: queue one that is
        neither, so that a sampler that keeps proposing such points still makes progress; stop
        when none is left."""
        from .space import ENUMERATE_LIMIT, no_faster, size, untried_point

        point = untried_point(self.space, taken, seed=trial.number,
                              skip=lambda p: any(no_faster(p, q) for q, _ in over))
        if point is not None:
            trial.study.enqueue_trial(point)
        elif size(self.space) <= ENUMERATE_LIMIT:
            log.info("every point of the space has been tried, is being tried, or is no faster "
                     "than one over the budget; this worker stops")
            trial.study.stop()

    def over_budget_points(self, study) -> list[tuple[dict, int]]:
        """The points measured over this search's budget, steadily, with their trial numbers:
        a point that cuts no more than one of them cannot meet the budget either (an unsteady
        figure rules nothing out)."""
        import optuna

        over = []
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            attrs = t.user_attrs
            latency, ratio = attrs.get("latency_ms"), attrs.get("latency_ratio")
            unknown = latency is None or (ratio is None and self.settings.budget_ratio is not None)
            if unknown or attrs.get("latency_steady") is False:
                continue
            if self._over_budget(latency, ratio) > 0:
                over.append((t.params, t.number))
        return over


def taken_points(study, space: dict, number: int | None = None) -> tuple[dict, dict]:
    """The points other trials than `number` have settled (measured, or found invalid) and
    the points running now, each {point: trial number}."""
    import optuna

    from .space import point_key

    state = optuna.trial.TrialState
    settled, running = {}, {}
    for t in study.get_trials(deepcopy=False,
                              states=(state.COMPLETE, state.PRUNED, state.RUNNING)):
        if t.number == number:
            continue
        key = t.user_attrs.get("point")
        if key is None and t.state == state.COMPLETE:  # a trial of an older mmkit
            key = point_key(t.params, space)
        if key is None:
            continue
        if t.state == state.COMPLETE or "invalid" in t.user_attrs:
            settled.setdefault(key, t.number)
        elif t.state == state.RUNNING:
            running.setdefault(key, t.number)
    return settled, running
