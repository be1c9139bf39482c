import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moedpo.config import ConfigError, resolve_model_json
from moedpo.validate import validate


def test_defaults_are_the_originals(make_cfg):
    cfg = make_cfg()
    assert (cfg.exp_name, cfg.seed, cfg.lr, cfg.beta, cfg.max_steps) == ("moe_trial", 0, 5e-7,
                                                                       0.1, 10)
    assert (cfg.max_length, cfg.max_prompt_length, cfg.eval_frequency) == (512, 256, 3)
    assert cfg.optimizer == "ADAMW_TORCH_XLA" and cfg.use_synthetic_data is True
    assert cfg.model.name_or_path == "mistralai/Mixtral-8x7B-v0.1"
    assert (cfg.model.policy_dtype, cfg.model.capacity_factor) == ("bfloat16", 0.0)
    assert (cfg.sched.name, cfg.sched.warmup_steps) == ("WarmupHoldPolicy", 150)
    validate(cfg)


def test_pythia_preset_resolves_to_its_values(make_cfg):
    cfg = make_cfg("+experiment=pythia28-hh")
    assert cfg.seed == 4321 and cfg.optimizer == "RMSprop" and cfg.lr == 5e-7
    assert cfg.max_grad_norm == 10.0 and cfg.datasets == "hh" and cfg.max_steps == 2600
    assert cfg.eval_frequency == 312 and cfg.do_first_eval and cfg.full_precision
    assert cfg.model.name_or_path == "EleutherAI/pythia-2.8b"
    assert cfg.model.policy_dtype == cfg.model.reference_dtype == "float32"
    assert cfg.use_synthetic_data is False and cfg.sched.warmup_steps == 150


def test_cosine_schedule_group(make_cfg):
    cfg = make_cfg("sched=CosineAnnealing")
    assert (cfg.sched.name, cfg.sched.min_lr) == ("CosineAnnealing", 9e-7)


@pytest.mark.parametrize("override, message", [
    ("optimizer=Adamm", "optimizer=Adamm: not a torch.optim optimizer"),
    ("datasets=hhh", "datasets: 'hhh' is neither a known dataset"),
    ("full_precision=true", "full_precision=true needs float32 models"),
    ("model.capacity_factor=-1", "model.capacity_factor=-1.0: must be >= 0"),
    ("use_synthetic_data=false max_prompt_length=600",
     "max_prompt_length=600: must be >= 0 and below max_length=512"),
    ("loss.name=dpoo", "loss.name=dpoo: unknown loss; use one of"),
    ("loss.weights=[1.0,2.0]", "loss.weights=[1.0, 2.0]: 2 weights for 1 losses"),
    ("loss.name=[sigmoid,sft] aux_nll_loss_coef=0.1", "both add the NLL term"),
    ("loss.name=exo_pair", "loss.name=exo_pair needs loss.label_smoothing > 0"),
    ("loss.name=simpo loss.f_divergence=forward_kl",
     "loss.f_divergence=forward_kl does not apply to simpo"),
    ("loss.f_divergence=chi2", "loss.f_divergence=chi2: use one of reverse_kl"),
    ("model.config_path=nope.json", "model.config_path=nope.json: no such file"),
    ("dataset_dir.hh=/no/such/dir", "dataset_dir.hh=/no/such/dir: no such folder"),
    ("datasets=[not-a-hub/id/x]", "a folder (train and test files: jsonl, json, parquet"),
    ("data.columns={answer:x}", "data.columns.answer: unknown key; use prompt, chosen"),
    ("data.chat_template=/no/t.jinja", "data.chat_template=/no/t.jinja: no such file"),
    ("model.attn_implementation=flash", "model.attn_implementation=flash: use one of auto, sdpa"),
    ("data.packing=maybe", "data.packing=maybe: use one of auto, true, false"),
    ("data.share_prompt=on", "data.share_prompt=on: use one of auto, true, false"),
    ("data.add_bos=yes", "data.add_bos=yes: use one of auto, true, false"),
    ("model.fsdp_config.xla_fsdp_v2=false", "xla_fsdp_v2=false: torch_xla's FSDP v1 wrapper is "
     "not supported"),
    ("model.attn_implementation=sdpa model.flash_attention=false",
     "model.flash_attention=false (eager attention) contradicts model.attn_implementation=sdpa"),
])
def test_validation_names_the_key(make_cfg, override, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*override.split()))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("datasets", ["demo_chat", "HuggingFaceH4/ultrafeedback_binarized",
                                      "[demo,org/name]", "memory://bucket/prefs"])
def test_dataset_names_folders_urls_and_hub_ids_validate(make_cfg, datasets):
    validate(make_cfg(f"datasets={datasets}"))


def test_model_json_found_by_bare_name_or_path(tmp_path):
    assert resolve_model_json("mixtral80.json").name == "mixtral80.json"
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert resolve_model_json(str(own)) == own


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moedpo", "train", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_typo_is_one_line_with_suggestion():
    result = run_cli("lrr=1e-3")
    assert result.returncode == 2
    assert result.stderr.strip() == ("moedpo: error: unknown config key 'lrr' (did you mean "
                                     "'lr'?); see docs/reference/config.md")


@pytest.mark.parametrize("item", ["+lrr=1e-3", "++lrr=1e-3", "+model.polcy_dtype=float32"])
def test_added_keys_are_checked_like_others(item, capsys):
    from moedpo.cli import check_override_keys

    with pytest.raises(SystemExit) as exit_info:
        check_override_keys([item])
    assert exit_info.value.code == 2
    assert "unknown config key" in capsys.readouterr().err
    check_override_keys(["+experiment=demo", "+lr=1e-3"])  # groups and real keys pass


def test_cli_validation_error_exit_code(tmp_path):
    result = run_cli(f"output_dir={tmp_path}", "optimizer=Nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "moedpo: error: optimizer=Nope: not a torch.optim optimizer")


@pytest.mark.parametrize("where", ["../escape", "/abs/escape", ".."])
def test_refused_exp_name_writes_nothing_anywhere(tmp_path, where):
    """Hydra creates output_dir/exp_name and writes .hydra/ and train.log before the run
    validates: a refused exp_name must be refused before that, so nothing appears at the
    traversed path (or anywhere under tmp_path)."""
    out = tmp_path / "runs"
    out.mkdir()
    result = run_cli("+experiment=demo", f"output_dir={out}", f"exp_name={where}")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"moedpo: error: exp_name={where}: must be a plain folder "
                                     "name (the run lives in output_dir/exp_name); put the "
                                     "path in output_dir")
    assert [p.name for p in tmp_path.rglob("*")] == ["runs"]
    assert not Path("/abs").exists()


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    result = run_cli("+experiment=demo", f"output_dir={tmp_path / 'a_file'}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"moedpo: error: output_dir={tmp_path / 'a_file'}: is a " \
                                    "file; give a folder"


def test_data_inspect_checks_value_types_in_one_line():
    result = subprocess.run([sys.executable, "-m", "moedpo", "data", "inspect",
                             "max_length=abc"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moedpo: error: max_length: ")
    assert "Traceback" not in result.stderr


def config_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        if dataclasses.is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


@pytest.mark.parametrize("name", ["/abs/run", "../up", "a/b", "..", ""])
def test_exp_name_is_a_plain_folder_name(make_cfg, name):
    from moedpo.config import ConfigError
    from moedpo.validate import validate

    with pytest.raises(ConfigError, match="exp_name=.*must be a plain folder name"):
        validate(make_cfg(f"exp_name='{name}'"))


@pytest.mark.parametrize("overrides, message", [
    (["optimizer=LBFGS"], "optimizer=LBFGS: LBFGS needs a closure"),
    (["optimizer=SparseAdam"], "optimizer=SparseAdam: SparseAdam takes only sparse"),
    (["weight_decay=-0.1"], "weight_decay=-0.1: must be >= 0"),
    (["lr=inf"], "lr=inf: must be a finite number"),
    (["per_device_eval_batch_size=0"], "per_device_eval_batch_size=0: must be >= 1"),
    (["tensor_parallelism=2", "parallel.backend=cpu"], "tensor_parallelism=2 needs the xla"),
    (["parallel.expert_parallel=0"], "parallel.expert_parallel=0: must be >= 1"),
    (["parallel.expert_parallel=2", "model.lora.r=4"], "LoRA's expert adapters are not sharded"),
    (["parallel.backend=xla", "model.moe_implementation=dropless"],
     "model.moe_implementation=dropless has data-dependent shapes, which XLA recompiles"),
    (["model.hub_kernels=true", "model.meta_init=true"],
     "Hub kernels are chosen for the device the weights are on, which meta init fills"),
    (["model.lora.r=4", "model.lora.init=pissa", "model.lora.target_experts=false",
      "model.meta_init=true"],
     "model.lora.init=pissa rewrites the base weights, so the reference is a copy"),
])
def test_settings_that_cannot_work_fail_up_front(make_cfg, overrides, message):
    from moedpo.config import ConfigError
    from moedpo.validate import validate

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_cfg(*overrides))


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "the JSON must be an object"),
    ('{"model_type": "mixtrall"}', "model_type='mixtrall' is not a transformers model type"),
    ('{"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 6}',
     "num_experts_per_tok=6 is above the 4 experts"),
])
def test_bad_model_json_fails_before_loading(make_cfg, tmp_path, content, message):
    from moedpo.config import ConfigError
    from moedpo.validate import validate

    path = tmp_path / "model.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_cfg(f"model.config_path={path}"))


def test_truncated_safetensors_and_unwritable_dirs_fail_up_front(make_cfg, tmp_path,
                                                                 tiny_neox_dir):
    import os
    import shutil

    from moedpo.config import ConfigError
    from moedpo.validate import validate

    folder = tmp_path / "model"
    shutil.copytree(tiny_neox_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="model.safetensors is not a complete safetensors "
                       r"file \(.*not fully covered\); download it again"):
        validate(make_cfg("model=pythia", f"model.name_or_path={folder}"))
    weights.write_bytes(b"garbage" * 10)  # no header at all
    with pytest.raises(ConfigError, match="model.safetensors is not a complete safetensors"):
        validate(make_cfg("model=pythia", f"model.name_or_path={folder}"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="output_dir=.*a_file: is a file"):
        validate(make_cfg(f"output_dir={tmp_path / 'a_file'}"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="checkpoint.dir=.*not writable"):
            validate(make_cfg(f"checkpoint.dir={locked / 'ckpt'}"))


def test_wrong_types_are_one_moedpo_error_line(capsys):
    from moedpo.cli import check_override_values

    with pytest.raises(SystemExit) as exit_info:
        check_override_values(["lr=abc"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "moedpo: error: lr: Value 'abc' of type 'str' could not be converted to Float")
    check_override_values(["+experiment=demo", "lr=1e-3"])  # fine values pass


@pytest.mark.parametrize("change, message", [
    ({"num_hidden_layers": -1}, "num_hidden_layers=-1 must be a whole number >= 1"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide num_attention_heads=8"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok=0 must be a whole number >= 1"),
    ({"hidden_size": "abc"}, "hidden_size='abc' must be a whole number >= 1"),
    ({"head_dim": 7}, "transformers cannot build a mixtral config from it (ValueError: RoPE "
     "requires an even rotary dimension"),
    ({"hidden_size": 130, "head_dim": None}, "hidden_size=130 must be a multiple of "
     "num_attention_heads=8"),
])
def test_model_shapes_that_would_fail_in_the_forward_are_one_line(make_cfg, tmp_path, change,
                                                                   message):
    """Each was a 0-layer model, a RuntimeError in the first forward or a library
    traceback; now one line naming the file and the key, for a JSON and a saved folder."""
    from moedpo.config import MODEL_JSON_DIR
    from moedpo.validate import validate

    fields = json.loads((MODEL_JSON_DIR / "tiny-mixtral.json").read_text())
    fields.update(num_attention_heads=8, num_key_value_heads=2, head_dim=16)  # valid as is
    fields.update(change)
    fields = {k: v for k, v in fields.items() if v is not None}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match=re.escape(f"model.config_path={path}: {message}")):
        validate(make_cfg(f"model.config_path={path}"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match=re.escape(f"(config.json): {message}")):
        validate(make_cfg("model.config_path=null", f"model.name_or_path={folder}"))


def test_every_shipped_and_tested_model_config_passes_the_shape_checks():
    """No false refusal: the shipped model JSONs and every family the tests build."""
    from transformers import AutoConfig

    from moedpo.config import MODEL_JSON_DIR
    from moedpo.validate import check_model_shapes

    for path in sorted(MODEL_JSON_DIR.glob("*.json")):
        check_model_shapes(json.loads(path.read_text()), str(path))
    sys.path.insert(0, str(Path(__file__).parent / "models"))
    from test_families import COMMON, FAMILIES

    for family, extra in FAMILIES.items():
        fields = AutoConfig.for_model(family, **{**COMMON, **extra}).to_dict()
        check_model_shapes(fields, family)
    for family in ("gpt_oss", "deepseek_v3", "qwen3_moe", "mixtral", "llama", "gpt_neox"):
        check_model_shapes(AutoConfig.for_model(family).to_dict(), family)  # real defaults


@pytest.mark.parametrize("kind, world, overrides, message", [
    ("cpu", 1, "tensor_parallelism=2", "tensor_parallelism=2 needs the xla backend (this run "
     "is on cpu)"),
    ("xla", 1, "model.meta_init=true", "model.meta_init=true on XLA reads the weights shard "
     "by shard from checkpoint_manager_path"),
    ("cuda", 2, "model.lora.r=8 model.lora.quantize=4bit model.config_path=null "
     "model.name_or_path=org/model", "model.lora.quantize=4bit under torchrun"),
    ("cpu", 2, "model.lora.r=8 model.lora.init=pissa checkpoint_manager_path=/tmp/ckpt",
     "model.lora.init=pissa computes the adapters from the base weights"),
    ("cpu", 1, "parallel.expert_parallel=2", "parallel.expert_parallel=2 spreads the experts "
     "over torchrun's processes; this run has one (cpu)"),
    ("xla", 1, "model.lora.r=8", "model.lora.r > 0 on XLA"),
    ("xla", 1, "model.compile=true", "model.compile=true: on XLA every step is compiled whole"),
])
def test_placement_refusals_come_before_anything_loads(make_cfg, monkeypatch, kind, world,
                                                       overrides, message):
    """Each refusal that depends on the backend `auto` resolves to or on torchrun's process
    count is one line from validate (they came only after the model had loaded)."""
    import moedpo.validate as validate_module

    monkeypatch.setattr(validate_module, "choose_kind", lambda requested: kind)
    monkeypatch.setattr(validate_module, "launched_processes", lambda: world)
    monkeypatch.setattr(validate_module.torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError) as err:
        validate_module.check_placement(make_cfg(*overrides.split()))
    assert message in str(err.value) and "\n" not in str(err.value)
    # The same config where it can run: no refusal from this check.
    runs_here = {"tensor_parallelism=2": ("xla", 1), "parallel.expert_parallel=2": ("cpu", 2)}
    if overrides in runs_here:
        kind, world = runs_here[overrides]
        validate_module.check_placement(make_cfg(*overrides.split()))


def test_cuda_requested_without_a_device_is_refused_up_front(make_cfg, monkeypatch):
    import moedpo.validate as validate_module

    monkeypatch.setattr(validate_module.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="parallel.backend=cuda but no CUDA device is visible"):
        validate(make_cfg("parallel.backend=cuda"))


@pytest.mark.parametrize("written, held", [("true", "true"), ("false", "false"),
                                           ("True", "true"), ("auto", "auto")])
def test_three_way_keys_hold_their_names_however_yaml_wrote_them(make_cfg, written, held):
    """OmegaConf turns YAML's true into "True" for a str key: the schema holds "true"."""
    cfg = make_cfg(f"data.packing={written}", f"data.share_prompt={written}",
                   f"data.add_bos={written}")
    assert (cfg.data.packing, cfg.data.share_prompt, cfg.data.add_bos) == (held,) * 3
    validate(make_cfg(f"data.add_bos={written}"))
