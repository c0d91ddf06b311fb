"""The commands around training: ``orpo report | data | generate | chat | compare``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import config as C
from ..errors import UserError
from .parser import GEN_FLAGS, default_job_path, typed

def cmd_report(ns: argparse.Namespace) -> int:
    from ..report import write_report

    path = write_report(ns.run_dir, ns.output)
    print(path)
    return 0


def cmd_data(ns: argparse.Namespace) -> int:
    from ..inspect_data import inspect_command

    values = typed(ns, skip=("command", "config", "data", "examples", "color", "json"))
    cfg = C.build(values)
    if ns.examples < 0:
        raise UserError(f"--examples must be >= 0; got {ns.examples}")
    print(inspect_command(cfg, ns.data, ns.examples, ns.color, ns.json))
    return 0


def _gen_cfg(ns: argparse.Namespace) -> C.TrainConfig:
    keep = {k: v for k, v in vars(ns).items() if k in GEN_FLAGS}
    return C.build(typed(argparse.Namespace(**keep)))


def cmd_generate(ns: argparse.Namespace) -> int:
    from ..chat import generate_text, load_for_generation

    cfg = _gen_cfg(ns)
    model, tok, device = load_for_generation(cfg.model, cfg.trust_remote_code, cfg.allow_pickle)
    answers = generate_text(model, tok, ns.prompt, ns.system, ns.raw, ns.max_new_tokens, ns.temperature, ns.top_p,
                            ns.seed, device)
    for i, a in enumerate(answers):
        if len(answers) > 1:
            print(f"--- {i + 1}: {ns.prompt[i]}")
        print(a)
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from ..chat import ChatSession, _seed, chat_loop, load_for_generation

    cfg = _gen_cfg(ns)
    model, tok, device = load_for_generation(cfg.model, cfg.trust_remote_code, cfg.allow_pickle)
    _seed(ns.seed)
    session = ChatSession(model, tok, ns.system, ns.max_new_tokens, ns.temperature, ns.top_p, device)
    return chat_loop(session)


def cmd_compare(ns: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..compare import DEFAULT_EVAL_STEPS, DEFAULT_OUT, format_numbers, run_compare

    overrides = typed(ns, skip=("command", "config", "orpo_beta"))
    config = ns.config
    if config is None:  # as for `orpo train`: flags change the default job's recipe, trained twice
        config = default_job_path()
        said = "no --data, so comparing SFT and ORPO on the default job" if "data" not in overrides else \
            "starting from the default job"
        print(f"orpo compare: {said} ({config})", flush=True)
    base = C.build(overrides, config)
    yaml_keys = set(C.load_yaml(config))
    if config is not ns.config:  # not the default job's own folder, nor its overwrite: runs/compare, reused when finished
        yaml_keys -= {"output_dir"}
        base = replace(base, overwrite=bool(overrides.get("overwrite", False)))
    orpo_beta = ns.orpo_beta if ns.orpo_beta is not None else (base.beta if "beta" in yaml_keys else 0.1)
    out = base.output_dir if ("output_dir" in overrides or "output_dir" in yaml_keys) else DEFAULT_OUT
    if "eval_steps" not in overrides and "eval_steps" not in yaml_keys:
        base = replace(base, eval_steps=DEFAULT_EVAL_STEPS)
    result = run_compare(base, orpo_beta, out)
    print("\n" + format_numbers(result))
    print(f"\nfigure:  {result['figure']}\nnumbers: {Path(out) / 'compare.json'}")
    return 0


