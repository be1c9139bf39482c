"""Evaluation helpers: greedy samples."""


def test_samples_of_an_empty_prompt(tokenizer):
    from moedpo.config import ModelConfig
    from moedpo.evaluate import generate
    from moedpo.models.load import build_models

    policy, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                         policy_dtype="float32"))
    texts = generate(policy, tokenizer, [[], list(tokenizer("Hi")["input_ids"])], 3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
