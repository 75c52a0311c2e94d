"""TensorBoard during `nas search`: per-trial scalars, the Pareto figure every K trials, the hparams dashboard
(sampled choices against metrics) and the final front's arch YAMLs, written to RUN/tb by an Optuna callback."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from nas.errors import NoSpaceError
from nas.report.baselines import BASELINES_ATTR, Baseline, zoo_baselines
from nas.report.figures import figure_to_array, pareto_figure
from nas.report.fronts import default_reference, front, hypervolume, knee, trial_points
from nas.system import no_space

METRICS = ("hparam/score", "hparam/predicted_ms", "hparam/params", "hparam/macs", "hparam/feasible")


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
log = logging.getLogger(__name__)


def score_label(exp) -> str:
    ev = exp.evaluator
    return f"{ev.proxy} proxy score" if ev.kind == "proxy" else "short-training mAP"


class TensorBoardLogger:
    """Optuna callback (worker 0 only). It logs every finished trial of the study, whichever worker ran it, in
    trial order; any error disables it with one warning instead of stopping the search."""

    def __init__(self, exp, log_dir: str | Path | None = None, every: int | None = None,
                 baselines: list[Baseline] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.exp = exp
        self.dir = Path(log_dir) if log_dir else exp.run_dir / "tb"
        self.every = max(1, every or getattr(exp, "tensorboard_every", 25) or 25)
        # A resumed search appends to the same folder: trials the previous run logged are not logged twice.
        self._resumed = any(self.dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(self.dir))
        self._logged: set[int] = set()
        self._started = False
        self._next_figure = self.every
        self._hp_config = False
        self._baselines = baselines
        self._reference: tuple[float, float] | None = None
        self._broken = False
        self.notes: list[str] = []

    # ------------------------------------------------------------ Optuna callback
    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._safely(self.update, study)

    def finish(self, study: optuna.Study) -> None:
        """Log what is left, the final figure and the front's arch YAMLs, and close the files."""
        self._safely(self.update, study, True)
        self._safely(self._front_texts, study)
        self.close()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001
            pass

    def _safely(self, fn, *args) -> None:
        if self._broken:
            return
        try:
            fn(*args)
        except Exception as e:  # logging must never cost a search its results
            reason = no_space(e)
            if reason is not None:  # the study's own writes fail next: stop now, in one line; the re-run logs the rest
                events = getattr(self.writer.file_writer.event_writer, "_file_name", self.dir)
                raise NoSpaceError(f"{events}: {reason} while writing TensorBoard events; free space and run the same "
                                   "command again: it resumes, and logs the trials missing here") from e
            self._broken = True
            first = (str(e).splitlines() or [""])[0][:200]  # one line, whatever the exception holds
            log.warning("TensorBoard logging to %s stopped: %s: %s; the search goes on, and `nas pareto %s` draws "
                        "the front when it ends", self.dir, type(e).__name__, first, self.exp.run_dir)

    # ------------------------------------------------------------ logging
    def _logged_before(self) -> set[int]:
        """Trials whose scalars the folder's event files hold: read back, as the previous run may have stopped before
        it logged every finished trial (a full disk, a kill). A record cut short at a file's end is skipped."""
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        return {ev.step for f in self.dir.glob("events.out.tfevents.*") for ev in EventFileLoader(str(f)).Load()
                if any(v.tag == "trial/feasible" for v in ev.summary.value)}  # a trial's last scalar

    def update(self, study: optuna.Study, final: bool = False) -> None:
        trials = study.get_trials(deepcopy=False, states=FINISHED)
        if not self._started:
            self._started = True
            if self._resumed:
                self._logged.update(self._logged_before())
        for t in sorted((t for t in trials if t.number not in self._logged), key=lambda t: t.number):
            self._log_trial(t)
            self._logged.add(t.number)
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        if final or done >= self._next_figure:
            self._log_front(study, done)
            self._next_figure = (done // self.every + 1) * self.every
        self.writer.flush()

    def _log_trial(self, t: FrozenTrial) -> None:
        a, step = t.user_attrs, t.number
        score = a.get("score") if isinstance(a.get("score"), (int, float)) else None
        feasible = float(t.state == TrialState.COMPLETE and a.get("evaluated") is True and score is not None
                         and all(v <= 0 for v in t.constraints.values()))
        metrics = {"hparam/score": score, "hparam/predicted_ms": a.get("predicted_ms"),
                   "hparam/params": a.get("params"), "hparam/macs": a.get("macs"), "hparam/feasible": feasible}
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        for k, v in metrics.items():
            self.writer.add_scalar(k.replace("hparam/", "trial/"), v, step)
        self._log_hparams(t, metrics)

    def _log_hparams(self, t: FrozenTrial, metrics: dict[str, float]) -> None:
        """One hparams session per trial (a run under tb/hparams/), the experiment config once in the root run: the
        plugin takes the config from the first run that has one, so it must hold every metric, not one trial's."""
        from tensorboard.plugins.hparams.api_pb2 import Status
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        hp = {k: v for k, v in t.params.items() if isinstance(v, (int, float, str, bool))}
        domain = {k: list(d.choices) for k, d in t.distributions.items()
                  if k in hp and isinstance(d, CategoricalDistribution)
                  and all(type(c) is type(hp[k]) for c in d.choices)}
        exp_summary, start, end = hparams(hp, {m: 0.0 for m in METRICS}, domain)
        if not self._hp_config:
            self.writer.file_writer.add_summary(exp_summary)
            self._hp_config = True
        if t.state == TrialState.PRUNED:  # the plugin has no "stopped early" status: show it as not a success
            end = _session_end(Status.Value("STATUS_FAILURE"))
        with SummaryWriter(str(self.dir / "hparams" / f"trial-{t.number:05d}")) as w:
            w.file_writer.add_summary(start)
            w.file_writer.add_summary(end)
            for k, v in metrics.items():
                w.add_scalar(k, v, 0)

    def _log_front(self, study: optuna.Study, step: int) -> None:
        points = trial_points(study)
        members = front(study)
        if not points:
            return
        budget = self.exp.budget_ms
        baselines = self.baselines(study)
        table = next((t.user_attrs.get("table") for t in study.get_trials(deepcopy=False, states=FINISHED)), None)
        fig = pareto_figure(points, members, budget_ms=budget, baselines=baselines, score_label=score_label(self.exp),
                            title=f"{study.study_name}: {len(points)} trials, {len(members)} on the front, "
                                  f"latency table {table}",
                            highlight=knee(members) if members else None, scope=self.exp.scope)
        self.writer.add_image("pareto/front", figure_to_array(fig), step, dataformats="HWC")
        self.writer.add_scalar("search/front_size", len(members), step)
        if members:
            # Frozen at the first figure so the curve is comparable along the run (a moving reference is not).
            self._reference = self._reference or default_reference(points, budget)
            self.writer.add_scalar("search/hypervolume", hypervolume([m.key for m in members], self._reference), step)
            self.writer.add_scalar("search/best_score", max(m.score for m in members), step)

    def _front_texts(self, study: optuna.Study) -> None:
        members = front(study)
        step = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        rows = ["| trial | predicted ms | score | params | MACs |", "|---:|---:|---:|---:|---:|"]
        rows += [f"| {m.trial} | {m.predicted_ms:.3f} | {m.score:.4g} | {m.params or 0:,} | "
                 f"{(m.macs or 0) / 1e6:.1f}M |" for m in members]
        if self._reference:
            rows.append(f"\nhypervolume reference (score, ms): {self._reference[0]:.4g}, {self._reference[1]:.4g}")
        self.writer.add_text("front/table", "\n".join(rows), step)
        for m in members:
            yaml_text = "\n".join("    " + line for line in (m.arch or "").splitlines())  # markdown code block
            self.writer.add_text(f"front/trial-{m.trial:05d}",
                                 f"predicted {m.predicted_ms:.3f} ms, score {m.score:.4g}\n\n{yaml_text}", step)
        if self.notes:
            self.writer.add_text("notes", "\n\n".join(self.notes), step)

    # ------------------------------------------------------------ baselines
    def baselines(self, study: optuna.Study) -> list[Baseline]:
        """Zoo models on the same axes, computed once per study: same table, same evaluator (proxy evaluators only:
        training every baseline is the job of `nas train`). Kept in the study's user attrs for `nas pareto`."""
        if self._baselines is not None:
            return self._baselines
        stored = study.user_attrs.get(BASELINES_ATTR)
        if isinstance(stored, list):  # a resumed search: already computed with this table and evaluator
            self._baselines = [Baseline(**b) for b in stored]
            return self._baselines
        self._baselines = []
        ev = self.exp.evaluator
        if ev.kind != "proxy":
            self._note("zoo baselines are not plotted with the short-training evaluator (each would need a training "
                       "run); compare them with `nas train`")
            return self._baselines
        from nas.latency.table import LatencyTable
        from nas.search.proxies import score
        from nas.space import load_space

        table = LatencyTable.load(self.exp.table)
        resolutions = load_space(self.exp.space).resolution

        def score_fn(arch) -> float:  # exactly what the objective calls
            return score(arch, ev.proxy, resolution=ev.resolution, batch=ev.batch, seed=self.exp.seed,
                         device=self.exp.device)

        self._baselines, notes = zoo_baselines(table, resolutions, score_fn, head=self.exp.head)
        for n in notes:
            self._note(n)
        study.set_user_attr(BASELINES_ATTR, [asdict(b) for b in self._baselines])
        return self._baselines

    def _note(self, text: str) -> None:
        self.notes.append(text)
        log.info("tensorboard: %s", text)


def _session_end(status: int):
    """The hparams plugin's end-of-session summary with `status` (torch's helper always writes SUCCESS)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams.metadata import SESSION_END_INFO_TAG, create_summary_metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    md = create_summary_metadata(HParamsPluginData(session_end_info=SessionEndInfo(status=status)))
    return Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=md)])


def tensorboard_callbacks(exp) -> list[TensorBoardLogger]:
    """The search callbacks that log to RUN/tb (none when the experiment's `tensorboard_every` is 0)."""
    return [TensorBoardLogger(exp)] if exp.tensorboard_every else []
