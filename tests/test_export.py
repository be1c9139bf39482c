import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import tiny_train_overrides
from moedpo.checkpoint import restore_weights, save_weights
from moedpo.config import ModelConfig
from moedpo.models.load import build_models
from moedpo.trainer import run


def test_export_round_trips_through_from_pretrained(make_cfg, tmp_path):
    result = run(make_cfg(*tiny_train_overrides(), "max_steps=2"))
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "moedpo", "export", str(result.run_dir),
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step_00000002" in done.stdout
    assert "moedpo" not in (out / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 500, (2, 12))
    result.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits,
                                   result.policy(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").exists()


def test_convert_hf_to_dcp_and_back(tiny_mixtral_dir, tmp_path):
    dcp_dir, back = tmp_path / "dcp", tmp_path / "back"
    for args in ([str(tiny_mixtral_dir), str(dcp_dir)],
                 ["--to-hf", str(dcp_dir), str(back), "--model", str(tiny_mixtral_dir)]):
        done = subprocess.run([sys.executable, "-m", "moedpo", "convert", *args],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    original = load_file(next(tiny_mixtral_dir.glob("*.safetensors")))
    converted = load_file(next(back.glob("*.safetensors")))
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[k], converted[k]) for k in original)
    # the DCP folder is what checkpoint_manager_path reads
    model, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                        policy_dtype="float32"), seed=5)
    restore_weights(str(dcp_dir), [model])
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_mixtral_dir))
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "moedpo", "export", str(tmp_path),
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no config.yaml" in done.stderr


def test_lora_export_loads_as_peft_adapter_and_merged_model(make_cfg, tmp_path):
    """A LoRA run's checkpoint holds its adapters only; `moedpo export` writes a PEFT
    adapter folder that PeftModel.from_pretrained puts on the base, `--merge` a plain model;
    both compute the trained policy's logits."""
    from peft import PeftModel

    cfg = make_cfg(*tiny_train_overrides(), "max_steps=3", "model.lora.r=4", "lr=3e-3")
    result = run(cfg)
    ids = torch.randint(0, 500, (2, 12))
    result.policy.eval()
    with torch.no_grad():
        want = result.policy(input_ids=ids).logits
        start, _ = build_models(ModelConfig(config_path=cfg.model.config_path,
                                            policy_dtype="float32"), cfg.seed,
                                with_reference=False)
        assert (start(input_ids=ids).logits - want).abs().max() > 1e-3  # it trained

    def export(*extra):
        out = tmp_path / ("merged" if extra else "adapter")
        done = subprocess.run([sys.executable, "-m", "moedpo", "export", str(result.run_dir),
                               str(out), *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return out

    adapter = export()
    assert (adapter / "adapter_config.json").exists()
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # adapters only, no base weights
    loaded = PeftModel.from_pretrained(start, str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(export("--merge"))).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def run_export(source, out, *extra) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "moedpo", "export", str(source), str(out),
                           *extra], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


# Slow tier: a LoRA run and export; the LoRA export itself stays in the fast tier.
@pytest.mark.slow
def test_lora_export_restores_a_checkpoint_manager_base(make_cfg, tmp_path, tiny_mixtral_dir):
    """A LoRA run whose base came from checkpoint_manager_path (not the named model): the
    merged export is the run's policy, and the adapter folder names the DCP base and says how to
    make the DCP base a folder, on which the adapters give the run's policy too."""
    from peft import PeftModel

    perturbed, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                            policy_dtype="float32"), seed=5)
    save_weights(perturbed, str(tmp_path / "base_dcp"))
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=2", "model.lora.r=8", "lr=3e-3",
                   "model.config_path=null", f"model.name_or_path={tiny_mixtral_dir}",
                   f"checkpoint_manager_path={tmp_path / 'base_dcp'}")
    result = run(cfg)
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        want = result.policy.eval()(input_ids=ids).logits
        named = AutoModelForCausalLM.from_pretrained(str(tiny_mixtral_dir)).eval()
        assert (named(input_ids=ids).logits - want).abs().max() > 0.1  # the named base differs
    run_export(result.run_dir, tmp_path / "merged", "--merge")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    done = run_export(result.run_dir, tmp_path / "adapter")
    assert "moedpo convert --to-hf" in done.stderr
    config = (tmp_path / "adapter" / "adapter_config.json").read_text()
    # Names the DCP base (an id that loads nothing rather than the wrong model)
    assert f'"base_model_name_or_path": "{tmp_path / "base_dcp"}"' in config
    subprocess.run([sys.executable, "-m", "moedpo", "convert", "--to-hf",
                    str(tmp_path / "base_dcp"), str(tmp_path / "base_hf"), "--model",
                    str(tiny_mixtral_dir)], check=True, capture_output=True, timeout=300)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base_hf"))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# Slow tier: a PiSSA run and export; the LoRA export and PiSSA's reference stay fast.
@pytest.mark.slow
def test_pissa_adapters_export_onto_the_original_base(make_cfg, tmp_path, tiny_mixtral_dir):
    """PiSSA trains adapters on the residual W - B0 A0; the exported adapter folder (PEFT's
    rank-2r conversion) applies to the original named base, and --merge is the policy."""
    from peft import PeftModel

    cfg = make_cfg(*tiny_train_overrides(), "max_steps=2", "model.lora.r=4", "lr=3e-3",
                   "model.lora.init=pissa", "model.lora.target_experts=false",
                   "sched.warmup_steps=0",
                   "model.config_path=null", f"model.name_or_path={tiny_mixtral_dir}")
    result = run(cfg)
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        want = result.policy.eval()(input_ids=ids).logits
    run_export(result.run_dir, tmp_path / "adapter")
    run_export(result.run_dir, tmp_path / "merged", "--merge")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_mixtral_dir))
    with torch.no_grad():
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-3  # it trained
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# Slow tier: a run and export; signing and trust are tested in the fast tier by tests/test_trust.py.
@pytest.mark.slow
def test_a_crafted_run_folder_is_not_read_without_trust(make_cfg, tmp_path):
    """A run folder from elsewhere is code: its checkpoint's .metadata is a pickle and its
    config.yaml may turn trust_remote_code on. Export reads only checkpoints this machine
    signed (not the folder's own trusted_paths), refuses remote code, and says --trust."""
    import shutil

    from moedpo.trust import MANIFEST

    result = run(make_cfg(*tiny_train_overrides(), "max_steps=1"))
    crafted = tmp_path / "crafted"
    shutil.copytree(result.run_dir, crafted)
    config = crafted / "config.yaml"
    config.write_text(config.read_text().replace("trusted_paths: []",
                                                 f"trusted_paths: ['{crafted}']"))
    for manifest in crafted.rglob(MANIFEST):
        manifest.unlink()  # as a folder made elsewhere: not signed by this machine's key
    done = subprocess.run([sys.executable, "-m", "moedpo", "export", str(crafted),
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and not (tmp_path / "o").exists()
    assert "not read, it has no readable moedpo-manifest.json" in done.stderr
    assert "or pass --trust" in done.stderr and "Traceback" not in done.stderr
    run_export(crafted, tmp_path / "trusted", "--trust")
    assert (tmp_path / "trusted" / "config.json").exists()

    config.write_text(config.read_text().replace("trust_remote_code: false",
                                                 "trust_remote_code: true"))
    done = subprocess.run([sys.executable, "-m", "moedpo", "export", str(crafted),
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "model.trust_remote_code=true" in done.stderr
    config.write_text("lr: [not, a, number]\nno_such_key: 1\n")
    done = subprocess.run([sys.executable, "-m", "moedpo", "export", str(crafted),
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "config.yaml: not a moedpo run config" in done.stderr
    assert "Traceback" not in done.stderr
