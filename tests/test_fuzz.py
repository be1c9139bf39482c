"""Random malformed data rows and config values: each ends in a clean result or a one-line
error of ours, never a traceback from inside a library and never a NaN loss."""

import json
import math

import pytest
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from conftest import compose_cfg
from moedpo.config import ConfigError, ModelConfig, schema_keys
from moedpo.data.collate import collate
from moedpo.data.sources import DataError, SkipLog, load_pairs
from moedpo.data.tokenize import tokenize_pairs
from moedpo.models.load import build_models
from moedpo.step import batch_loss
from moedpo.validate import validate

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
dialogue = st.builds(lambda h, a: f"\n\nHuman: {h}\n\nAssistant: {a}", texts, texts)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system",
                                                                   "tool", ""]),
                                           "content": st.one_of(texts, st.none())}),
                   max_size=3)
values = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), texts, dialogue,
                   st.lists(st.integers(), max_size=3), st.dictionaries(texts, texts, max_size=2),
                   messages)
rows = st.one_of(
    st.dictionaries(st.sampled_from(["chosen", "rejected", "prompt", "extra"]), values),
    st.builds(lambda p, c, r: {"chosen": p + c, "rejected": p + r}, dialogue, texts, texts),
    st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, texts, texts, texts),
    st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, messages, messages,
              messages),
)
lines = st.one_of(rows.map(json.dumps), texts, st.just("{"), st.just("[]"), st.just("null"))


@pytest.fixture(scope="module")
def tiny():
    return build_models(ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                                    reference_dtype="float32"), seed=0)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(lines, min_size=1, max_size=8), st.booleans())
def test_random_rows_load_cleanly_and_train_finite(tmp_path_factory, tokenizer, tiny, make_cfg,
                                                   data_lines, strict):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "train.jsonl").write_text("\n".join(data_lines) + "\n")
    log = SkipLog(strict=strict)
    try:
        pairs = load_pairs(str(folder), "train", {}, log)
        tokenized = tokenize_pairs(pairs, tokenizer, 64, 32, "keep_end", log)
    except DataError as err:
        # Not strict: only a first row that fits no format stops the source.
        assert "\n" not in str(err) and "train.jsonl:" in str(err)
        assert strict or "not a preference row" in str(err), str(err)
        return
    assert len(tokenized) + log.total <= len([x for x in data_lines if x.strip()]) + 1
    if tokenized:
        assert all(p.chosen and p.rejected for p in tokenized)
        policy, reference = tiny
        out = batch_loss(policy, reference, collate(tokenized[:4], tokenizer.pad_token_id),
                         make_cfg())
        assert math.isfinite(out.loss.item())


config_values = st.one_of(st.integers(-5, 5000), st.floats(-10, 10, allow_nan=False),
                          st.sampled_from(["null", "abc", "true", "[]", "float32", "-1"]))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([k for k in schema_keys() if k not in ("model", "sched", "loss", "data",
                                                              "checkpoint", "dataset_dir",
                                                              "model.fsdp_config")]),
       config_values)
def test_random_config_values_fail_cleanly(key, value):
    try:
        cfg = compose_cfg(f"{key}={value}", "output_dir=/tmp/moedpo-fuzz")
    except (ConfigCompositionException, OmegaConfBaseException):
        return  # Hydra's own message names the key and the type it wants
    try:
        validate(cfg)
    except ConfigError as err:
        assert "\n" not in str(err) and key.split(".")[-1] in str(err)
