"""The argument parser of every command: each ``TrainConfig`` field is a flag (``max_length`` ->
``--max-length``; booleans also have ``--no-...``), and an unknown flag is one line with the closest
flag, or the orpo flag for a TRL name."""

from __future__ import annotations

import argparse
import difflib
from importlib import resources
from pathlib import Path

from .. import config as C
from ..errors import UserError

GROUPS = {
    "model": "model",
    "data": "data",
    "optim": "objective and optimisation",
    "speed": "speed",
    "run": "run and outputs",
}


class _Parser(argparse.ArgumentParser):
    """argparse that exits with one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def unknown_flags(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser | None, extra: list[str]) -> None:
    """Every unknown flag at once, each with the closest flag of its own command, or the orpo flag for a TRL
    name (--learning-rate is --lr)."""
    options = _all_options(sub or parser)
    parts = []
    for arg in extra:
        if not arg.startswith("-"):
            if not parts:  # a value after an unknown flag belongs to it
                parts.append(f"unexpected argument {arg!r}")
            continue
        flag = arg.split("=")[0]
        name = flag.lstrip("-").replace("-", "_")
        target = _trl_target(name)
        if target and _flag(target) in options:
            hint = f" (TRL's {name} is {_flag(target)} in orpo)"
        else:
            close = difflib.get_close_matches(flag, options, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
        parts.append(f"unknown option {flag}{hint}")
    prog = sub.prog if sub is not None else parser.prog
    parser.exit(2, f"{prog}: error: {'; '.join(parts)}\n")


def _trl_target(name: str) -> str | None:
    """The orpo option a TRL name sets directly (learning_rate -> lr), if there is exactly one."""
    if name not in C.TRL_ALIASES:
        return None
    try:
        mapped = C.TRL_ALIASES[name]("x")
    except UserError:
        return None
    return next(iter(mapped)) if len(mapped) == 1 else None


def _all_options(parser: argparse.ArgumentParser) -> list[str]:
    """Long options of a parser and of all its subcommands."""
    out = []
    for a in parser._actions:
        if a.help != argparse.SUPPRESS:  # old names kept working are not suggested
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
        description="Train with ORPO. Without a YAML file it runs the default job (SmolLM2-135M-Instruct, LoRA, "
        "lr 1e-4, beta 0.5, batch 8, max length 256, bf16, on the built-in dataset, a few minutes on a laptop CPU) with the "
        "flags given changed; with a YAML file, the file's values over the defaults listed here, then the flags.",
    )
    t.add_argument("config", nargs="?", help="YAML config file; flags given after it override its values")
    add_config_flags(t)

    e = sub.add_parser(
        "eval",
        allow_abbrev=False,
        help="held-out preference metrics of a model, as one JSON object",
        description="Compute eval_ metrics (accuracy, log-probs, log-odds ratio, NLL) of a model on held-out pairs. "
        "The JSON object is the last line of stdout. On an orpo run folder (or its model/ or adapter/) the run's "
        "own beta, max length, truncation, template and precision apply, unless given here, so the numbers are "
        "the run's own evaluation's.",
    )
    add_config_flags(e, only=EVAL_OPTIONS)
    e.add_argument("--data", "--eval-data", dest="data", default=argparse.SUPPRESS,
                   help="held-out pairs (any supported format); --eval-data is the same flag, as train names it. "
                   "Optional when --model is an orpo run folder (or its model/ or adapter/): then the run's own "
                   "held-out data")
    e.add_argument("--max-rows", dest="eval_max_rows", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name

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
    x.add_argument("--output-dir", "--output", dest="output", default=None, help="output folder [default: SRC/export]")
    x.add_argument("--verify", action="store_true",
                   help="load the GGUF back with transformers and compare logits and tokenization with the model")
    _add_tool_parsers(sub)
    return parser


def typed(ns: argparse.Namespace, skip: tuple = ("command", "config")) -> dict:
    out = {}
    for k, v in vars(ns).items():
        if k in skip:
            continue
        out[k] = C.coerce(k, v, _flag(k))
    return out


# The options of `orpo eval`: what decides which tokens are scored and how the model is loaded and run.
EVAL_OPTIONS = {"model", "max_length", "max_prompt_length", "max_completion_length", "truncation_mode", "beta",
                "batch_size", "precision", "prompt_in_nll", "trust_remote_code", "allow_pickle", "strict",
                "prefix_sharing", "packing", "attention", "logits_chunk", "eval_max_rows", "columns", "chat_template",
                "dataset_num_proc", "model_dtype", "attn_implementation", "eval_batch_size"}

# The tools around training: report, data, generate, chat, compare.

GEN_FLAGS = {"model", "trust_remote_code", "allow_pickle"}


def _add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--system", default=None, help="system message (chat models)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"most tokens to generate [default: {max_new_tokens}]")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; > 0 samples [default: 0]")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when sampling [default: 1.0]")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")


def _add_tool_parsers(sub) -> None:
    r = sub.add_parser("report", allow_abbrev=False, help="(re)build OUT/report.html from a run folder",
                       description="Build the self-contained HTML report of a run (plots, evaluations, generations, "
                       "data counts, timings, config) from the files in its output folder. Works while the run is going.")
    r.add_argument("run_dir", metavar="OUT", help="a run's output folder")
    r.add_argument("--output", default=None, help="where to write the page [default: OUT/report.html]")

    d = sub.add_parser("data", allow_abbrev=False, help="inspect a dataset through the model's tokenizer",
                       description="Row counts and format, token-length percentiles, what --max-length truncates or "
                       "drops, and pairs rendered exactly as the model sees them, with the prompt/completion boundary "
                       "and the loss mask marked. Loads only the tokenizer.")
    d.add_argument("--data", dest="data", required=True, help="pairs (any supported format)")
    add_config_flags(d, only={"model", "max_length", "max_prompt_length", "max_rows", "prompt_in_nll", "trust_remote_code",
                              "columns", "chat_template"})
    d.add_argument("--examples", type=int, default=2, help="pairs to render [default: 2]")
    d.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the rendering (auto: on a terminal, unless NO_COLOR is set) [default: auto]")
    d.add_argument("--json", action="store_true", help="also print the numbers as one JSON object on the last line")

    g = sub.add_parser("generate", allow_abbrev=False, help="answer a prompt with a model (greedy or sampled)",
                       description="Answer one or more prompts. Chat models get the prompt as a user message through "
                       "their chat template; --raw feeds the text as it is.")
    add_config_flags(g, only=GEN_FLAGS)
    g.add_argument("--prompt", action="append", required=True, help="the prompt (repeat for several)")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the text as it is")
    _add_sampling_flags(g, 128)

    c = sub.add_parser("chat", allow_abbrev=False, help="talk to a model in the terminal",
                       description="An interactive loop that keeps the conversation and renders it through the chat "
                       "template each turn. /exit or Ctrl-D ends it, /reset clears the history.")
    add_config_flags(c, only=GEN_FLAGS)
    _add_sampling_flags(c, 256)

    m = sub.add_parser("compare", allow_abbrev=False, help="SFT vs ORPO on held-out pairs (the paper's Figure 3)",
                       description="Train the same config twice, SFT (beta 0) and ORPO (beta --orpo-beta), with the same "
                       "data, seed and budget, evaluating both on --eval-data throughout; draw the held-out log-probs of "
                       "chosen and rejected answers on one figure with 95% intervals (OUT/figure3.png, numbers in "
                       "OUT/compare.json) and the paired difference ORPO - SFT on the same held-out pairs. With no "
                       "--data it runs the default job's recipe on the built-in data; without a YAML file, flags change "
                       "that recipe, as for orpo train. --output-dir defaults to runs/compare, --eval-steps to the "
                       "config's or 10.")
    m.add_argument("config", nargs="?", help="YAML config file; flags given after it override its values")
    add_config_flags(m, only={f.name for f in C.fields()} - {"beta"})
    m.add_argument("--orpo-beta", type=float, default=None,
                   help="beta of the ORPO run [default: the config's beta if it sets one, else 0.1]")


def default_job_path() -> Path:
    return Path(str(resources.files("orpo") / "recipes" / "default.yaml"))
