"""The Python API, for notebooks and scripts: the same runs as the command line, without argv.

``train(config)`` runs one training job and returns a :class:`RunResult`; it can be called again in the
same process, also off the main thread (signals are then left to the caller; on the main thread, a
SIGTERM or an interrupt of the kernel saves a checkpoint and returns with ``result.stopped``).
``evaluate`` gives the held-out metrics of a model, ``export_model`` writes merged weights, a GGUF and a
model card. Data may be a path, a ``datasets.Dataset``, a pandas ``DataFrame`` or a list of dicts.
Heavy modules (torch, transformers) are imported on the first call, not by ``import orpo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainConfig, build, validate, with_changes

if TYPE_CHECKING:  # the loop imports torch; `import orpo` does not
    from .train import RunResult


def default_job(**changes: Any) -> TrainConfig:
    """The config of ``orpo train`` with no YAML file (the default job's recipe), with ``changes``
    (orpo's or TRL's option names) applied, as ``orpo train --flag value`` would."""
    from importlib import resources

    recipe = Path(str(resources.files("orpo") / "recipes" / "default.yaml"))
    base = build(yaml_path=recipe)
    return with_changes(base, **changes)


def train(config: TrainConfig | None = None, **changes: Any) -> "RunResult":
    """Train with ``config`` (default: :func:`default_job`), with ``changes`` applied to it first. The
    result names the output folder, the final model folder and the last train and eval metrics;
    ``result.stopped`` is true when a signal ended the run early (after saving a checkpoint).

    Raises ``orpo.errors.UserError`` with a one-line message for a mistake in the config or the data.
    """
    from .train import train as run

    cfg = config if config is not None else default_job()
    cfg = with_changes(cfg, **changes)  # a copy, checked (TrainConfig(...) itself checks nothing)
    return run(cfg, argv_for_resume=["orpo.train(config, resume=True)"])


def evaluate(model: str | Path, data: Any = None, **options: Any) -> dict:
    """Held-out metrics (``eval_loss``, ``eval_rewards/accuracies``, ...) of ``model`` (a model, run-output
    model or adapter folder, or a GGUF) on ``data``, as ``orpo eval`` prints them. ``options`` are
    TrainConfig options such as ``beta``, ``max_length``, ``columns``, ``eval_max_rows``. For a run's
    folder (or its model/ or adapter/) the run's own options apply where ``options`` leaves them unset,
    and ``data`` defaults to the run's held-out data, so the numbers are the run's own evaluation's."""
    import sys

    from .config import eval_options, fields
    from .config.trl_names import translate
    from .evaluate import evaluate_model

    given, notes = translate(options, [f.name for f in fields()], "evaluate()")  # TRL's names too
    values, note = eval_options(model, {**given, "model": str(model), "eval_data": data})
    for line in notes + [note] * bool(note):
        print(f"orpo: {line}", file=sys.stderr)
    return evaluate_model(validate(TrainConfig(**values)))


def export_model(src: str | Path, output_dir: str | Path | None = None, merge: bool = True, gguf: bool = False,
                 gguf_type: str = "f16", verify: bool = False):
    """``orpo export``: merged safetensors weights (``merge``) and/or a GGUF (``gguf``) of a run folder,
    adapter folder or model folder, with a model card, in ``output_dir`` (default ``SRC/export``)."""
    from .export import export

    return export(src, output_dir, merge=merge, gguf=gguf, gguf_type=gguf_type, verify=verify)
