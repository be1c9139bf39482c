"""Chat templates: the one a run uses, and conversational pairs rendered to text with it.

Rendering then tokenising the text with `add_special_tokens=False` is what
`tokenizer.apply_chat_template(..., tokenize=True)` does, and so what TRL's DPOTrainer does:
the prompt with the generation prompt, each response as the conversation prompt + response
(the template ends the turn: no EOS is added after it).
"""

from __future__ import annotations

from .pairs import DataError, Pair, RowError


def load_chat_template(path: str) -> str:
    """`data.chat_template=PATH`: a Jinja template file (local or an fsspec URL)."""
    import fsspec

    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            template = f.read()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as err:
        raise DataError(f"data.chat_template={path}: cannot read it ({type(err).__name__}); "
                        "give a Jinja template file") from None
    if "{{" not in template and "{%" not in template:
        raise DataError(f"data.chat_template={path}: not a Jinja template (no '{{{{' or "
                        "'{%' in it)")
    import jinja2

    try:  # a syntax error is the template's, not each row's: say so once, before any row
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as err:
        raise DataError(f"data.chat_template={path}: a Jinja syntax error at line {err.lineno} "
                        f"({err.message})") from None
    return template


def use_chat_template(tokenizer, path: str | None) -> None:
    """Put `data.chat_template` on the tokenizer (so exports carry it too); null keeps the
    tokenizer's own."""
    if path:
        tokenizer.chat_template = load_chat_template(path)


def render(pair: Pair, tokenizer) -> tuple[str, str, str]:
    """(prompt, prompt+chosen, prompt+rejected) as text to tokenise. Standard pairs are
    concatenated; conversational ones go through the chat template."""
    if not pair.conversational:
        return pair.prompt, pair.prompt + pair.chosen, pair.prompt + pair.rejected
    if not tokenizer.chat_template:
        raise DataError(f"{pair.origin}: a conversational row (messages), but the tokenizer "
                        f"({tokenizer.name_or_path or 'embedded'}) has no chat template; set "
                        "data.chat_template=PATH (a Jinja file), or use the model's own (chat) "
                        "tokenizer via model.tokenizer_name_or_path")
    kwargs = pair.template_kwargs or {}

    def apply(messages: list, generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=generation_prompt,
                                                 **kwargs)
        except Exception as err:  # jinja2 raises TemplateError, TypeError, KeyError...
            import jinja2

            if isinstance(err, jinja2.TemplateSyntaxError):  # every row would fail alike
                raise DataError(f"the chat template of the tokenizer "
                                f"({tokenizer.name_or_path or 'embedded'}) has a Jinja syntax "
                                f"error at line {getattr(err, 'lineno', '?')} ({err}); fix it "
                                "or give data.chat_template=PATH") from None
            raise RowError(f"the chat template failed on this row ({type(err).__name__}: "
                           f"{err})") from None
    return (apply(pair.prompt, generation_prompt=True), apply(pair.prompt + pair.chosen),
            apply(pair.prompt + pair.rejected))
