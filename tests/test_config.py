import hashlib
import json

import pytest
import yaml

from orpo import config as C
from orpo.errors import UserError


def test_defaults_valid_and_lr_depends_on_lora():
    cfg = C.build()
    assert cfg.resolved_lr() == C.FULL_FINETUNE_LR
    assert C.build({"lora": True}).resolved_lr() == C.LORA_LR
    assert C.build({"lora": True, "lr": 3e-4}).resolved_lr() == 3e-4


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1.0e-5\nmax-length: 512\nlora: yes\n")
    cfg = C.build({"max_length": 256}, p)
    assert cfg.lr == 1e-5 and cfg.max_length == 256 and cfg.lora is True


def test_unknown_yaml_key_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rat: 1\n")
    with pytest.raises(UserError, match=r"unknown option 'learning_rat'"):
        C.build(yaml_path=p)
    p.write_text("max_lenght: 12\n")
    with pytest.raises(UserError, match=r"did you mean 'max_length'"):
        C.build(yaml_path=p)


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1\nbeta: [unclosed\n")
    with pytest.raises(UserError, match=r"c.yaml:\d+: invalid YAML"):
        C.build(yaml_path=p)


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("max_length", "abc", "must be an integer"),
        ("beta", "x", "must be a number"),
        ("lora", "maybe", "true or false"),
        ("precision", "fp16", "must be one of auto, bf16, fp32"),
        ("scheduler", "cosin", "did you mean 'cosine'"),
        ("beta", float("nan"), "finite"),
    ],
)
def test_wrong_types_rejected(name, value, match):
    with pytest.raises(UserError, match=match):
        C.coerce(name, value, "--x")


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"lora_r": 0}, "lora_r must be >= 1"),
        ({"max_length": 4}, "max_length must be at least 8"),
        ({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"resume": True, "overwrite": True}, "contradict"),
        ({"lr": 0.0}, "lr must be > 0"),
    ],
)
def test_impossible_values_rejected(overrides, match):
    with pytest.raises(UserError, match=match):
        C.build(overrides)


def test_dump_roundtrip(tmp_path):
    cfg = C.build({"lora": True, "beta": 0.25})
    C.dump_yaml(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["lr"] == C.LORA_LR
    again = C.build(yaml_path=tmp_path / "config.yaml")
    assert again.fingerprint() == C.build({"lora": True, "beta": 0.25, "lr": C.LORA_LR}).fingerprint()


def test_fingerprint_ignores_logging_but_not_training():
    a = C.build({"save_steps": 5, "max_steps": 10})
    b = C.build({"save_steps": 7, "max_steps": 20})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != C.build({"beta": 0.2}).fingerprint()


def test_fingerprint_of_a_config_saved_before_an_option_existed():
    """A checkpoint written by an older orpo lacks options added since; at their defaults they do not
    block a resume, set to anything else they do."""
    cfg = C.build({"beta": 0.2})
    old = {k: v for k, v in cfg.to_dict().items() if k != "lean_activations"}
    old_fingerprint = hashlib.sha256(json.dumps(
        {k: v for k, v in old.items() if k not in C.NOT_IN_FINGERPRINT}, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() != old_fingerprint
    assert cfg.fingerprint(old) == old_fingerprint
    assert C.build({"beta": 0.2, "lean_activations": False}).fingerprint(old) != old_fingerprint
    assert C.build({"beta": 0.3}).fingerprint(old) != old_fingerprint


def test_every_shipped_yaml_loads():
    from pathlib import Path

    import orpo

    root = Path(__file__).resolve().parents[1]
    files = list((root / "configs").glob("*.yaml")) + list((Path(orpo.__file__).parent / "recipes").glob("*.yaml"))
    assert len(files) >= 8, files
    for f in files:
        C.build(yaml_path=f)


def test_every_accelerate_config_is_valid():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))
    assert {f.stem for f in files} >= {"fsdp", "deepspeed-zero2", "deepspeed-zero3", "multi-gpu-ddp"}
    for f in files:
        cfg = ClusterConfig.from_yaml_file(str(f))
        assert cfg.distributed_type is not None and cfg.mixed_precision == "bf16"
        if "deepspeed" in f.stem:
            assert cfg.deepspeed_config["zero_stage"] in (2, 3)
        if f.stem == "fsdp":
            assert cfg.fsdp_config["fsdp_activation_checkpointing"] is True
