"""Command line: ``orpo train | eval | export | report | data | generate | chat | compare``. The only module that reads argv.

Every ``TrainConfig`` field is a flag (``max_length`` -> ``--max-length``; booleans also have
``--no-...``). ``orpo train config.yaml --flag value`` applies defaults, then the YAML, then the flags.
``orpo train`` without a YAML file runs the default job (``recipes/default.yaml`` in the package) with the
flags given changed, so ``orpo train --max-steps 20`` is the default job in 20 steps.
A user mistake prints one line on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from .. import config as C
from ..errors import UserError
from ..multimodal import loader_name
from .parser import build_parser, default_job_path, typed, unknown_flags
from .tools import cmd_chat, cmd_compare, cmd_data, cmd_generate, cmd_report

def resume_argv(argv: list[str]) -> list[str]:
    """The command's arguments without those that only make sense once (--overwrite, --resume, --resume-from)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--overwrite", "--no-overwrite", "--resume", "--no-resume") or a.startswith("--resume-from="):
            continue
        elif a == "--resume-from":
            skip = True
        else:
            out.append(a)
    return out


def cmd_train(ns: argparse.Namespace, argv: list[str]) -> int:
    from ..train import train

    overrides = typed(ns)
    yaml_path = ns.config
    if yaml_path is None:
        # Flags change the default job; they never fall back to another set of defaults.
        yaml_path = default_job_path()
        said = "no arguments, so running the default job" if not argv else "starting from the default job"
        print(f"orpo: {said} ({yaml_path})", flush=True)
    cfg = C.build(overrides, yaml_path)
    result = train(cfg, argv_for_resume=[shlex.quote(a) for a in ["orpo", "train", *resume_argv(argv), "--resume"]])
    if not result.is_main or result.stopped:
        return 0
    print(f"\nmetrics: {result.output_dir / 'metrics.jsonl'}")
    print(f"model:   {result.model_dir}  ({loader_name(result.model_dir)}.from_pretrained loads it)")
    if cfg.lora:
        print(f"adapter: {result.output_dir / 'adapter'}")
    if result.answers is not None:
        from ..answers import summary_lines

        print("\n".join(summary_lines(result.answers)))
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from ..evaluate import evaluate_model

    values = typed(ns)
    values["eval_data"] = values.pop("data", None)
    values, note = C.eval_options(values.get("model"), values)  # a run folder: the run's beta, max length, ...
    if note:
        print(f"orpo: {note}", file=sys.stderr)
    metrics = evaluate_model(C.build(values))
    print(json.dumps(metrics))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from ..export import export

    merge = ns.merge or not ns.gguf
    if ns.verify and not ns.gguf:
        raise UserError("--verify checks a GGUF; add --gguf")
    export(ns.src, ns.output, merge=merge, gguf=ns.gguf, gguf_type=ns.gguf_type, verify=ns.verify)
    return 0


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Where torchao is installed (for --optim), transformers imports it whenever it builds a model, and
    # it warns about CUDA-only extensions a CPU cannot load (and torch about the enums it registers):
    # four lines of noise on every run. bitsandbytes does the same on import.
    import logging

    for name in ("torchao", "torch.utils._pytree", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        unknown_flags(parser, subs.get(ns.command), extra)
    if ns.command is None:
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        if ns.command == "train":
            return cmd_train(ns, argv[1:])
        if ns.command in COMMANDS:
            return COMMANDS[ns.command](ns)
    except UserError as e:
        if not e.printed:
            print(f"orpo: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("orpo: interrupted", file=sys.stderr)
        return 130
    parser.print_help()
    return 2


# Every command but train (which also needs its argv, to print the command that resumes it).
COMMANDS = {"eval": cmd_eval, "export": cmd_export, "report": cmd_report, "data": cmd_data,
            "generate": cmd_generate, "chat": cmd_chat, "compare": cmd_compare}


