"""Command line: ``orpo train | eval | export``. The only module that reads argv.

Every ``TrainConfig`` field is a flag (``max_length`` -> ``--max-length``; booleans also have
``--no-...``). ``orpo train config.yaml --flag value`` applies defaults, then the YAML, then the flags.
``orpo train`` with no arguments at all runs the default job (``recipes/default.yaml`` in the package).
A user mistake prints one line on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from importlib import resources
from pathlib import Path

from . import config as C
from .errors import UserError

GROUPS = {
    "model": "model",
    "data": "data",
    "optim": "objective and optimisation",
    "speed": "speed",
    "run": "run and outputs",
}


class _Parser(argparse.ArgumentParser):
    """argparse that suggests the closest flag for a typo and exits with one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        if "unrecognized arguments:" in message:
            bad = message.split("unrecognized arguments:", 1)[1].split()
            flag = next((b for b in bad if b.startswith("-")), bad[0] if bad else "")
            options = _all_options(self)
            close = difflib.get_close_matches(flag.split("=")[0], options, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            message = f"unknown option {flag}{hint}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _all_options(parser: argparse.ArgumentParser) -> list[str]:
    """Long options of a parser and of all its subcommands (unknown flags surface at the top level)."""
    out = []
    for a in parser._actions:
        out += [o for o in a.option_strings if o.startswith("--")]
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out += _all_options(sub)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(f) -> str:
    if f.name == "lr":
        return "5e-6 full, 1e-4 LoRA"
    if f.default is None:
        return "none"
    return str(f.default)


def add_config_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    groups = {}
    for f in C.fields():
        if only is not None and f.name not in only:
            continue
        g = f.metadata.get("group", "run")
        if g not in groups:
            groups[g] = parser.add_argument_group(GROUPS.get(g, g))
        base, _ = C.field_type(f)
        help_text = f"{f.metadata.get('help', '')} [default: {_default_text(f)}]".replace("%", "%%")
        if base is bool:
            groups[g].add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            groups[g].add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orpo", description="Fine-tune causal language models on preference pairs with ORPO.",
                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    t = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="train a model with ORPO",
        description="Train with ORPO. With no arguments at all, runs the default job: SmolLM2-135M-Instruct, "
        "LoRA, bf16, on the built-in dataset, in a few minutes on a laptop CPU.",
    )
    t.add_argument("config", nargs="?", help="YAML config file; flags given after it override its values")
    add_config_flags(t)

    e = sub.add_parser(
        "eval",
        allow_abbrev=False,
        help="held-out preference metrics of a model, as one JSON object",
        description="Compute eval_ metrics (accuracy, log-probs, log-odds ratio, NLL) of a model on held-out pairs. "
        "The JSON object is the last line of stdout.",
    )
    add_config_flags(e, only={"model", "max_length", "max_prompt_length", "beta", "batch_size", "precision",
                              "prompt_in_nll", "trust_remote_code", "allow_pickle", "strict", "prefix_sharing",
                              "packing", "attention"})
    e.add_argument("--data", dest="data", required=True, help="held-out pairs (any supported format)")
    e.add_argument("--max-rows", dest="eval_max_rows", default=argparse.SUPPRESS, help="use only the first N rows")

    # --- orpo export ------------------------------------------------------------------------------
    x = sub.add_parser(
        "export",
        allow_abbrev=False,
        help="merged safetensors weights and/or a GGUF, with a model card",
        description="Export a trained model into one folder: --merge writes full safetensors weights (LoRA "
        "merged) and the tokenizer; --gguf writes a GGUF for llama.cpp and ollama (Llama-architecture models). "
        "Both get a model card (README.md). With neither flag, --merge is done.",
    )
    x.add_argument("src", metavar="SRC", help="an orpo run folder, a LoRA adapter folder or a model folder")
    x.add_argument("--merge", action="store_true", help="write merged full weights (safetensors) and the tokenizer")
    x.add_argument("--gguf", action="store_true", help="write <name>-<type>.gguf")
    x.add_argument("--gguf-type", dest="gguf_type", choices=("f16", "bf16", "f32"), default="f16",
                   help="tensor type of the GGUF's weight matrices (norms stay f32) [default: f16]")
    x.add_argument("--output", dest="output", default=None, help="output folder [default: SRC/export]")
    x.add_argument("--verify", action="store_true",
                   help="load the GGUF back with transformers and compare logits and tokenization with the model")
    return parser


def _typed(ns: argparse.Namespace, skip: tuple = ("command", "config")) -> dict:
    out = {}
    for k, v in vars(ns).items():
        if k in skip:
            continue
        out[k] = C.coerce(k, v, _flag(k))
    return out


def default_job_path() -> Path:
    return Path(str(resources.files("orpo") / "recipes" / "default.yaml"))


def cmd_train(ns: argparse.Namespace, argv: list[str]) -> int:
    from .train import train

    overrides = _typed(ns)
    yaml_path = ns.config
    if not argv:
        yaml_path = default_job_path()
        print(f"orpo: no arguments, so running the default job ({yaml_path})", flush=True)
    cfg = C.build(overrides, yaml_path)
    result = train(cfg, argv_for_resume=[a for a in argv if a not in ("--overwrite", "--resume")] or None)
    if not result.is_main:
        return 0
    print(f"\nmetrics: {result.output_dir / 'metrics.jsonl'}")
    print(f"model:   {result.model_dir}  (AutoModelForCausalLM.from_pretrained loads it)")
    if cfg.lora:
        print(f"adapter: {result.output_dir / 'adapter'}")
    if result.answer_accuracy is not None:
        before, after = result.answer_accuracy
        print(f"held-out questions answered exactly right: {before:.0%} before training -> {after:.0%} after")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from .evaluate import evaluate_model

    values = _typed(ns)
    data = values.pop("data")
    cfg = C.build({**values, "eval_data": data})
    metrics = evaluate_model(cfg)
    print(json.dumps(metrics))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from .export import export

    merge = ns.merge or not ns.gguf
    if ns.verify and not ns.gguf:
        raise UserError("--verify checks a GGUF; add --gguf")
    export(ns.src, ns.output, merge=merge, gguf=ns.gguf, gguf_type=ns.gguf_type, verify=ns.verify)
    return 0


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        if ns.command == "train":
            return cmd_train(ns, argv[1:])
        if ns.command == "eval":
            return cmd_eval(ns)
        if ns.command == "export":
            return cmd_export(ns)
    except UserError as e:
        print(f"orpo: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("orpo: interrupted", file=sys.stderr)
        return 130
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
